//! The wire format: handshake messages and request/reply frames, encoded and decoded without I/O.
//!
//! Everything is big-endian. The format is documented with a sequence diagram in
//! `docs/protocol.md`; this module is its single implementation, and its decoders are the only code
//! that reads untrusted bytes (they are fuzzed).

use std::io;

use thiserror::Error;

/// First bytes of both hellos.
pub const MAGIC: [u8; 8] = *b"R3MAP\0\r\n";
/// The protocol version this crate speaks.
pub const VERSION: u16 = 1;
/// First bytes of every request frame (`R3MQ`).
pub const REQUEST_MAGIC: u32 = 0x5233_4D51;
/// First bytes of every reply frame (`R3MR`).
pub const REPLY_MAGIC: u32 = 0x5233_4D52;
/// Encoded size of a [`RequestHeader`].
pub const REQUEST_HEADER_LEN: usize = 28;
/// Encoded size of a [`ReplyHeader`].
pub const REPLY_HEADER_LEN: usize = 20;
/// Longest export name and token in a hello.
pub const MAX_NAME: usize = 4096;
/// Largest request either side accepts unless configured otherwise.
pub const DEFAULT_MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Smallest maximum request size a peer may announce.
pub const MIN_MAX_REQUEST: u32 = 4096;

/// A frame or hello that does not follow the protocol. The connection cannot continue after one:
/// framing is lost.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("the frame starts with {found:#010x}, not the magic {expected:#010x}")]
    BadMagic { expected: u32, found: u32 },
    #[error("the hello does not start with the r3map magic")]
    BadHelloMagic,
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("a {what} of {len} bytes is larger than the maximum of {max}")]
    TooLarge { what: &'static str, len: u64, max: u64 },
    #[error("the message ends after {got} bytes; {need} are needed")]
    Truncated { need: usize, got: usize },
    #[error("the {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("a {op} request carries {len} bytes of length, but must carry none")]
    UnexpectedLength { op: &'static str, len: u32 },
    #[error("the maximum request size {0} is below the minimum of 4096")]
    MaxRequestTooSmall(u32),
    #[error("unknown handshake status {0}")]
    UnknownStatus(u16),
}

impl From<FrameError> for io::Error {
    fn from(e: FrameError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Operations of a request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Read `length` bytes at `offset`; the reply carries them.
    Read = 1,
    /// Write the `length` bytes that follow the header at `offset`.
    Write = 2,
    /// Make completed writes durable.
    Flush = 3,
    /// Deallocate `offset..offset + length`.
    Trim = 4,
    /// Zero `offset..offset + length`.
    WriteZeroes = 5,
    /// Seeder: start tracking writes.
    Track = 6,
    /// Seeder: return the dirty chunks (u64 indices) and stop tracking.
    Sync = 7,
    /// Seeder: the destination is done.
    Close = 8,
    /// The client is going away; no reply.
    Disconnect = 9,
    /// Seeder: return the chunks written since `Track` or the previous `Dirty` (u64 indices) and
    /// keep tracking (a round of an iterative pre-copy).
    Dirty = 10,
}

impl Op {
    /// # Errors
    /// [`FrameError::UnknownOp`].
    pub fn from_u8(v: u8) -> Result<Self, FrameError> {
        Ok(match v {
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::WriteZeroes,
            6 => Self::Track,
            7 => Self::Sync,
            8 => Self::Close,
            9 => Self::Disconnect,
            10 => Self::Dirty,
            other => return Err(FrameError::UnknownOp(other)),
        })
    }

    /// A short lower-case name, for logs and metrics.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
            Self::Trim => "trim",
            Self::WriteZeroes => "write_zeroes",
            Self::Track => "track",
            Self::Sync => "sync",
            Self::Close => "close",
            Self::Disconnect => "disconnect",
            Self::Dirty => "dirty",
        }
    }
}

/// The fixed header of a request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub op: Op,
    pub flags: u8,
    pub id: u64,
    pub offset: u64,
    /// Bytes to read, payload bytes that follow (writes), or the range length (trim, zeroes).
    pub length: u32,
}

impl RequestHeader {
    #[must_use]
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut b = [0u8; REQUEST_HEADER_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4] = self.op as u8;
        b[5] = self.flags;
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// Decodes and checks a header: magic, operation, and a length within `max_request` for
    /// operations that move data (and zero for those that don't).
    ///
    /// # Errors
    /// A [`FrameError`] saying what is wrong.
    pub fn decode(b: &[u8], max_request: u32) -> Result<Self, FrameError> {
        let b = need(b, REQUEST_HEADER_LEN)?;
        let magic = u32::from_be_bytes(arr(&b[0..4]));
        if magic != REQUEST_MAGIC {
            return Err(FrameError::BadMagic { expected: REQUEST_MAGIC, found: magic });
        }
        let op = Op::from_u8(b[4])?;
        let length = u32::from_be_bytes(arr(&b[24..28]));
        match op {
            Op::Read | Op::Write if length > max_request => {
                return Err(FrameError::TooLarge {
                    what: "request",
                    len: u64::from(length),
                    max: u64::from(max_request),
                });
            }
            Op::Flush | Op::Track | Op::Sync | Op::Dirty | Op::Close | Op::Disconnect if length != 0 => {
                return Err(FrameError::UnexpectedLength { op: op.name(), len: length });
            }
            _ => {}
        }
        Ok(Self {
            op,
            flags: b[5],
            id: u64::from_be_bytes(arr(&b[8..16])),
            offset: u64::from_be_bytes(arr(&b[16..24])),
            length,
        })
    }

    /// Payload bytes that follow this header on the wire.
    #[must_use]
    pub fn payload_len(&self) -> usize {
        if self.op == Op::Write { self.length as usize } else { 0 }
    }
}

/// The fixed header of a reply frame. `status` 0 is success; otherwise it is an errno value
/// ([`crate::errno`]) and the payload is a UTF-8 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub status: u32,
    pub id: u64,
    pub length: u32,
}

impl ReplyHeader {
    #[must_use]
    pub fn encode(&self) -> [u8; REPLY_HEADER_LEN] {
        let mut b = [0u8; REPLY_HEADER_LEN];
        b[0..4].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.status.to_be_bytes());
        b[8..16].copy_from_slice(&self.id.to_be_bytes());
        b[16..20].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// # Errors
    /// A [`FrameError`] for a bad magic, or a payload longer than `max_payload`.
    pub fn decode(b: &[u8], max_payload: u32) -> Result<Self, FrameError> {
        let b = need(b, REPLY_HEADER_LEN)?;
        let magic = u32::from_be_bytes(arr(&b[0..4]));
        if magic != REPLY_MAGIC {
            return Err(FrameError::BadMagic { expected: REPLY_MAGIC, found: magic });
        }
        let length = u32::from_be_bytes(arr(&b[16..20]));
        if length > max_payload {
            return Err(FrameError::TooLarge {
                what: "reply",
                len: u64::from(length),
                max: u64::from(max_payload),
            });
        }
        Ok(Self { status: u32::from_be_bytes(arr(&b[4..8])), id: u64::from_be_bytes(arr(&b[8..16])), length })
    }
}

/// The client's first message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    pub version: u16,
    pub export: String,
    /// Shared secret; empty when none is used.
    pub token: String,
    /// Largest reply payload the client accepts.
    pub max_request: u32,
}

impl ClientHello {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + self.export.len() + self.token.len());
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        put_str(&mut b, &self.export);
        put_str(&mut b, &self.token);
        b.extend_from_slice(&self.max_request.to_be_bytes());
        b
    }

    /// Decodes a complete hello. Returns the hello and the bytes it took, or `Ok(None)` when more
    /// bytes are needed (streaming decoders call it again after reading more).
    ///
    /// # Errors
    /// A [`FrameError`] for a hello that can never become valid.
    pub fn decode(b: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let mut r = Reader::new(b);
        let Some(magic) = r.take(8) else { return Ok(None) };
        if magic != MAGIC {
            return Err(FrameError::BadHelloMagic);
        }
        let Some(version) = r.u16() else { return Ok(None) };
        let Some(_flags) = r.u16() else { return Ok(None) };
        let Some(export) = r.string("export name")? else { return Ok(None) };
        let Some(token) = r.string("token")? else { return Ok(None) };
        let Some(max_request) = r.u32() else { return Ok(None) };
        if max_request < MIN_MAX_REQUEST {
            return Err(FrameError::MaxRequestTooSmall(max_request));
        }
        Ok(Some((Self { version, export, token, max_request }, r.pos)))
    }
}

/// Why a server refused a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Refusal {
    /// The client speaks a version the server does not.
    Version = 1,
    /// No export of that name.
    UnknownExport = 2,
    /// Missing or wrong credentials.
    Unauthorized = 3,
    /// The hello was malformed.
    BadHello = 4,
}

impl Refusal {
    fn from_u16(v: u16) -> Result<Self, FrameError> {
        Ok(match v {
            1 => Self::Version,
            2 => Self::UnknownExport,
            3 => Self::Unauthorized,
            4 => Self::BadHello,
            other => return Err(FrameError::UnknownStatus(other)),
        })
    }
}

/// What a client learns about an export at open, in the server's hello: no extra round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub chunk_size: u32,
    /// The largest request and reply payload on this connection (the smaller of both sides').
    pub max_request: u32,
    pub flags: u32,
    /// Which incarnation of the export this is: a random number drawn when the server opened it.
    /// With [`export_flags::VOLATILE`], another number after a reconnection means the server
    /// restarted and the data is gone.
    pub instance: u64,
}

/// [`ExportInfo::flags`] bits.
pub mod export_flags {
    pub const READ_ONLY: u32 = 1;
    pub const TRIM: u32 = 1 << 1;
    pub const WRITE_ZEROES: u32 = 1 << 2;
    pub const SEEDER: u32 = 1 << 3;
    /// The data lives only as long as the server process (a memory backend).
    pub const VOLATILE: u32 = 1 << 4;
}

/// The server's answer to a [`ClientHello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerHello {
    Accepted { version: u16, info: ExportInfo },
    Refused { version: u16, reason: Refusal, message: String },
}

impl ServerHello {
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(40);
        b.extend_from_slice(&MAGIC);
        match self {
            Self::Accepted { version, info } => {
                b.extend_from_slice(&version.to_be_bytes());
                b.extend_from_slice(&0u16.to_be_bytes());
                b.extend_from_slice(&info.size.to_be_bytes());
                b.extend_from_slice(&info.chunk_size.to_be_bytes());
                b.extend_from_slice(&info.max_request.to_be_bytes());
                b.extend_from_slice(&info.flags.to_be_bytes());
                b.extend_from_slice(&info.instance.to_be_bytes());
            }
            Self::Refused { version, reason, message } => {
                b.extend_from_slice(&version.to_be_bytes());
                b.extend_from_slice(&(*reason as u16).to_be_bytes());
                put_str(&mut b, message);
            }
        }
        b
    }

    /// As [`ClientHello::decode`].
    ///
    /// # Errors
    /// A [`FrameError`] for a hello that can never become valid.
    pub fn decode(b: &[u8]) -> Result<Option<(Self, usize)>, FrameError> {
        let mut r = Reader::new(b);
        let Some(magic) = r.take(8) else { return Ok(None) };
        if magic != MAGIC {
            return Err(FrameError::BadHelloMagic);
        }
        let Some(version) = r.u16() else { return Ok(None) };
        let Some(status) = r.u16() else { return Ok(None) };
        if status == 0 {
            let (Some(size), Some(chunk_size), Some(max_request), Some(flags), Some(instance)) =
                (r.u64(), r.u32(), r.u32(), r.u32(), r.u64())
            else {
                return Ok(None);
            };
            if max_request < MIN_MAX_REQUEST {
                return Err(FrameError::MaxRequestTooSmall(max_request));
            }
            let info = ExportInfo { size, chunk_size, max_request, flags, instance };
            return Ok(Some((Self::Accepted { version, info }, r.pos)));
        }
        let reason = Refusal::from_u16(status)?;
        let Some(message) = r.string("refusal message")? else { return Ok(None) };
        Ok(Some((Self::Refused { version, reason, message }, r.pos)))
    }
}

/// Encodes a list of chunk indices (a `Sync` reply).
#[must_use]
pub fn encode_chunks(chunks: &[u64]) -> Vec<u8> {
    chunks.iter().flat_map(|c| c.to_be_bytes()).collect()
}

/// Decodes a `Sync` reply payload.
///
/// # Errors
/// [`FrameError::Truncated`] when the payload is not a whole number of u64s.
pub fn decode_chunks(b: &[u8]) -> Result<Vec<u64>, FrameError> {
    if !b.len().is_multiple_of(8) {
        return Err(FrameError::Truncated { need: b.len().next_multiple_of(8), got: b.len() });
    }
    Ok(b.chunks_exact(8).map(|c| u64::from_be_bytes(arr(c))).collect())
}

fn need(b: &[u8], n: usize) -> Result<&[u8], FrameError> {
    b.get(..n).ok_or(FrameError::Truncated { need: n, got: b.len() })
}

fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(MAX_NAME)];
    b.extend_from_slice(&u16::try_from(bytes.len()).unwrap_or(u16::MAX).to_be_bytes());
    b.extend_from_slice(bytes);
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self { b, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.pos..self.pos + n)?;
        self.pos += n;
        Some(s)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|s| u16::from_be_bytes(arr(s)))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|s| u32::from_be_bytes(arr(s)))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| u64::from_be_bytes(arr(s)))
    }

    fn string(&mut self, what: &'static str) -> Result<Option<String>, FrameError> {
        let Some(len) = self.u16() else { return Ok(None) };
        let len = usize::from(len);
        if len > MAX_NAME {
            return Err(FrameError::TooLarge { what, len: len as u64, max: MAX_NAME as u64 });
        }
        let Some(s) = self.take(len) else { return Ok(None) };
        let s = std::str::from_utf8(s).map_err(|_| FrameError::NotUtf8(what))?;
        Ok(Some(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn request_round_trip() {
        let h = RequestHeader { op: Op::Write, flags: 0, id: 7, offset: 1 << 40, length: 4096 };
        assert_eq!(RequestHeader::decode(&h.encode(), DEFAULT_MAX_REQUEST), Ok(h));
        assert_eq!(h.payload_len(), 4096);
    }

    #[test]
    fn request_errors_say_what_is_wrong() {
        let mut b = RequestHeader { op: Op::Read, flags: 0, id: 1, offset: 0, length: 100 }.encode();
        assert!(matches!(
            RequestHeader::decode(&b[..10], 1 << 20),
            Err(FrameError::Truncated { need: 28, got: 10 })
        ));
        assert_eq!(
            RequestHeader::decode(&b, 99).unwrap_err().to_string(),
            "a request of 100 bytes is larger than the maximum of 99"
        );
        b[4] = 77;
        assert_eq!(RequestHeader::decode(&b, 1 << 20), Err(FrameError::UnknownOp(77)));
        b[0] = 0;
        assert!(matches!(RequestHeader::decode(&b, 1 << 20), Err(FrameError::BadMagic { .. })));
        let flush = RequestHeader { op: Op::Flush, flags: 0, id: 1, offset: 0, length: 5 }.encode();
        assert!(matches!(RequestHeader::decode(&flush, 1 << 20), Err(FrameError::UnexpectedLength { .. })));
    }

    #[test]
    fn hellos_round_trip_and_stream() {
        let c = ClientHello {
            version: 1,
            export: "default".into(),
            token: "s3cret".into(),
            max_request: 1 << 20,
        };
        let enc = c.encode();
        for cut in 0..enc.len() {
            assert_eq!(ClientHello::decode(&enc[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(ClientHello::decode(&enc), Ok(Some((c, enc.len()))));
        let info = ExportInfo {
            size: 5,
            chunk_size: 4096,
            max_request: 1 << 20,
            flags: export_flags::SEEDER,
            instance: 7,
        };
        let s = ServerHello::Accepted { version: 1, info };
        assert_eq!(ServerHello::decode(&s.encode()), Ok(Some((s.clone(), s.encode().len()))));
        let r = ServerHello::Refused { version: 1, reason: Refusal::Unauthorized, message: "no".into() };
        assert_eq!(ServerHello::decode(&r.encode()), Ok(Some((r.clone(), r.encode().len()))));
    }

    #[test]
    fn chunk_lists_round_trip() {
        let chunks = [0, 5, u64::MAX];
        assert_eq!(decode_chunks(&encode_chunks(&chunks)), Ok(chunks.to_vec()));
        assert!(decode_chunks(&[1, 2, 3]).is_err());
    }

    proptest! {
        /// Random bytes never panic any decoder, and whatever decodes re-encodes to the same bytes.
        #[test]
        fn decoders_survive_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(h) = RequestHeader::decode(&bytes, DEFAULT_MAX_REQUEST) {
                let mut enc = h.encode().to_vec();
                enc[6..8].copy_from_slice(&bytes[6..8]);
                prop_assert_eq!(&enc[..], &bytes[..REQUEST_HEADER_LEN]);
            }
            if let Ok(h) = ReplyHeader::decode(&bytes, DEFAULT_MAX_REQUEST) {
                prop_assert_eq!(&h.encode()[..], &bytes[..REPLY_HEADER_LEN]);
            }
            let _ = ClientHello::decode(&bytes);
            let _ = ServerHello::decode(&bytes);
            let _ = decode_chunks(&bytes);
        }

        /// Random bytes after a valid magic reach the deeper checks without panicking.
        #[test]
        fn decoders_survive_random_bytes_after_the_magic(tail in prop::collection::vec(any::<u8>(), 0..200)) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&tail);
            let _ = ClientHello::decode(&b);
            let _ = ServerHello::decode(&b);
            let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&tail);
            let _ = RequestHeader::decode(&r, 4096);
        }
    }
}
