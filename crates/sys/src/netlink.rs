//! Generic netlink, as much as attaching NBD devices needs: messages and attributes encoded and
//! decoded by hand (pure functions, tested below), and a blocking socket that sends one request
//! and collects its answer. No unsafe code: it sits here because it is a kernel interface, beside
//! the NBD driver's ioctls it replaces on kernels that have it.
//!
//! Written by hand rather than with `neli`: the NBD driver needs one request shape (a generic
//! netlink header with flat or nested `u32`/`u64`/string attributes) and one answer shape (an
//! ack or attributes), which is some 300 lines of pure, tested encoding here; `neli` is a large
//! typed API, with derive macros, for all of netlink.

use std::io;
use std::os::fd::OwnedFd;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType};

/// `nlmsghdr` length.
const NLMSG_HDR: usize = 16;
/// `genlmsghdr` length.
const GENL_HDR: usize = 4;
const NLA_HDR: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLMSG_ERROR: u16 = 0x2;
const NLMSG_DONE: u16 = 0x3;

/// The generic netlink controller, which maps family names to ids.
pub const GENL_ID_CTRL: u16 = 0x10;
pub const CTRL_CMD_GETFAMILY: u8 = 3;
pub const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub const CTRL_ATTR_FAMILY_NAME: u16 = 2;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// An attribute to encode: a value, or attributes nested in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    U32(u16, u32),
    U64(u16, u64),
    /// A NUL-terminated string.
    Str(u16, String),
    Nested(u16, Vec<Attr>),
}

impl Attr {
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; NLA_HDR]);
        let kind = match self {
            Self::U32(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Self::U64(t, v) => {
                out.extend_from_slice(&v.to_ne_bytes());
                *t
            }
            Self::Str(t, s) => {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
                *t
            }
            Self::Nested(t, inner) => {
                for a in inner {
                    a.encode(out);
                }
                *t | NLA_F_NESTED
            }
        };
        let len = u16::try_from(out.len() - start).expect("attributes are small");
        out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        out[start + 2..start + 4].copy_from_slice(&kind.to_ne_bytes());
        out.resize(align4(out.len()), 0);
    }
}

/// A generic netlink request: `family` is the message type, `cmd` the family's command.
pub fn encode_request(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[Attr]) -> Vec<u8> {
    let mut out = vec![0u8; NLMSG_HDR];
    out.extend_from_slice(&[cmd, version, 0, 0]);
    for a in attrs {
        a.encode(&mut out);
    }
    let len = u32::try_from(out.len()).expect("requests are small");
    out[0..4].copy_from_slice(&len.to_ne_bytes());
    out[4..6].copy_from_slice(&family.to_ne_bytes());
    out[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out[8..12].copy_from_slice(&seq.to_ne_bytes());
    // The port id 0: the kernel fills in ours.
    out
}

/// One attribute as decoded: its type (without flags) and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawAttr {
    pub kind: u16,
    pub payload: Vec<u8>,
}

impl RawAttr {
    pub fn u16(&self) -> Option<u16> {
        Some(u16::from_ne_bytes(self.payload.get(..2)?.try_into().ok()?))
    }

    pub fn u32(&self) -> Option<u32> {
        Some(u32::from_ne_bytes(self.payload.get(..4)?.try_into().ok()?))
    }
}

fn bad(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("malformed netlink answer: {msg}"))
}

/// Decodes a run of attributes.
///
/// # Errors
/// `InvalidData` for a length that does not fit.
pub fn decode_attrs(mut b: &[u8]) -> io::Result<Vec<RawAttr>> {
    let mut attrs = Vec::new();
    while b.len() >= NLA_HDR {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDR || len > b.len() {
            return Err(bad("attribute length"));
        }
        attrs.push(RawAttr { kind, payload: b[NLA_HDR..len].to_vec() });
        b = &b[align4(len).min(b.len())..];
    }
    Ok(attrs)
}

/// What a request got back: the attributes of its answer messages, or the kernel's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The attributes of every data message, in order; the request was acknowledged.
    Done(Vec<RawAttr>),
    /// A negative errno from the kernel.
    Error(i32),
    /// More messages are to come (the buffer ended before the acknowledgement).
    Partial(Vec<RawAttr>),
}

/// Decodes the messages of one `recv` for the request `seq`, appending to `so_far`.
///
/// # Errors
/// `InvalidData` for malformed messages.
pub fn decode_answer(mut b: &[u8], seq: u32, mut so_far: Vec<RawAttr>) -> io::Result<Answer> {
    while b.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(b[0..4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let their_seq = u32::from_ne_bytes(b[8..12].try_into().expect("4 bytes"));
        if len < NLMSG_HDR || len > b.len() {
            return Err(bad("message length"));
        }
        let body = &b[NLMSG_HDR..len];
        b = &b[align4(len).min(b.len())..];
        if their_seq != seq {
            continue;
        }
        match kind {
            NLMSG_ERROR => {
                let code =
                    i32::from_ne_bytes(body.get(..4).ok_or_else(|| bad("error"))?.try_into().expect("4"));
                return Ok(if code == 0 { Answer::Done(so_far) } else { Answer::Error(code) });
            }
            NLMSG_DONE => return Ok(Answer::Done(so_far)),
            _ => {
                let attrs = body.get(GENL_HDR..).ok_or_else(|| bad("generic header"))?;
                so_far.extend(decode_attrs(attrs)?);
            }
        }
    }
    Ok(Answer::Partial(so_far))
}

/// A generic netlink socket that sends requests and waits for their answers.
#[derive(Debug)]
pub struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    /// # Errors
    /// The socket cannot be made (no netlink in this kernel, out of descriptors).
    pub fn open() -> io::Result<Self> {
        let fd = rustix::net::socket(AddressFamily::NETLINK, SocketType::RAW, Some(netlink::GENERIC))?;
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, 0))?;
        Ok(Self { fd, seq: 1 })
    }

    /// Sends a request of `family` and returns the attributes of its answer, or the kernel's
    /// error as an `io::Error` of that errno.
    ///
    /// # Errors
    /// The kernel's error; a malformed answer.
    pub fn request(&mut self, family: u16, cmd: u8, version: u8, attrs: &[Attr]) -> io::Result<Vec<RawAttr>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = encode_request(family, cmd, version, self.seq, attrs);
        rustix::net::sendto(&self.fd, &msg, SendFlags::empty(), &SocketAddrNetlink::new(0, 0))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut so_far = Vec::new();
        loop {
            let (n, _) = rustix::net::recv(&self.fd, &mut buf, RecvFlags::empty())?;
            match decode_answer(&buf[..n], self.seq, so_far)? {
                Answer::Done(attrs) => return Ok(attrs),
                Answer::Error(code) => return Err(io::Error::from_raw_os_error(-code)),
                Answer::Partial(attrs) => so_far = attrs,
            }
        }
    }

    /// The id of the generic netlink family `name`.
    ///
    /// # Errors
    /// `NotFound` when no such family is registered (its module is not loaded).
    pub fn family(&mut self, name: &str) -> io::Result<u16> {
        let attrs = self
            .request(
                GENL_ID_CTRL,
                CTRL_CMD_GETFAMILY,
                1,
                &[Attr::Str(CTRL_ATTR_FAMILY_NAME, name.to_owned())],
            )
            .map_err(|e| match e.raw_os_error() {
                Some(c) if c == rustix::io::Errno::NOENT.raw_os_error() => io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the kernel has no '{name}' netlink family (its module is not loaded)"),
                ),
                _ => e,
            })?;
        attrs
            .iter()
            .find(|a| a.kind == CTRL_ATTR_FAMILY_ID)
            .and_then(RawAttr::u16)
            .ok_or_else(|| bad("no family id"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_headers_and_padded_attributes() {
        let msg = encode_request(
            0x1c,
            1,
            1,
            7,
            &[
                Attr::U64(2, 1 << 30),
                Attr::Str(5, "nbd".into()),
                Attr::Nested(7, vec![Attr::Nested(1, vec![Attr::U32(1, 9)])]),
            ],
        );
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x1c);
        assert_eq!(u16::from_ne_bytes([msg[6], msg[7]]), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 7);
        assert_eq!(&msg[16..20], &[1, 1, 0, 0]);
        let attrs = decode_attrs(&msg[20..]).unwrap();
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0], RawAttr { kind: 2, payload: (1u64 << 30).to_ne_bytes().to_vec() });
        assert_eq!(attrs[1], RawAttr { kind: 5, payload: b"nbd\0".to_vec() });
        // The nested socket list: one item holding one fd.
        let items = decode_attrs(&attrs[2].payload).unwrap();
        assert_eq!(items.len(), 1);
        let fd = decode_attrs(&items[0].payload).unwrap();
        assert_eq!(fd[0].u32(), Some(9));
    }

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HDR];
        m.extend_from_slice(body);
        let len = u32::try_from(m.len()).unwrap();
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m.resize(align4(m.len()), 0);
        m
    }

    #[test]
    fn answers_are_data_then_an_acknowledgement_or_an_error() {
        let mut data = vec![1, 1, 0, 0];
        Attr::U32(1, 3).encode(&mut data);
        let mut b = message(0x1c, 5, &data);
        b.extend(message(0x1c, 4, &data)); // another request's: ignored
        assert_eq!(
            decode_answer(&b, 5, Vec::new()).unwrap(),
            Answer::Partial(vec![RawAttr { kind: 1, payload: 3u32.to_ne_bytes().to_vec() }])
        );
        b.extend(message(NLMSG_ERROR, 5, &0i32.to_ne_bytes()));
        let Answer::Done(attrs) = decode_answer(&b, 5, Vec::new()).unwrap() else { panic!("not done") };
        assert_eq!(attrs[0].u32(), Some(3));
        let e = message(NLMSG_ERROR, 6, &(-16i32).to_ne_bytes());
        assert_eq!(decode_answer(&e, 6, Vec::new()).unwrap(), Answer::Error(-16));
    }

    #[test]
    fn malformed_answers_are_errors_not_panics() {
        let mut m = message(0x1c, 1, &[1, 1, 0, 0, 200, 0, 1, 0]);
        assert!(decode_answer(&m, 1, Vec::new()).is_err(), "an attribute longer than its message");
        m[0] = 255;
        assert!(decode_answer(&m, 1, Vec::new()).is_err(), "a message longer than the buffer");
        assert!(decode_answer(&message(NLMSG_ERROR, 1, &[]), 1, Vec::new()).is_err());
        assert_eq!(decode_answer(&[1, 2, 3], 1, Vec::new()).unwrap(), Answer::Partial(Vec::new()));
    }
}
