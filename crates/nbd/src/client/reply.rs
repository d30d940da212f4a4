//! Replies in the transmission phase: error values, and the chunks of one structured reply
//! gathered and checked until its final chunk.
//!
//! Everything here judges bytes from the server. Anything the protocol forbids (a chunk outside
//! the request's range, overlapping data, a chunk type that does not fit the command, a success
//! that did not deliver all the data) is a [`Violation`], which ends the connection.

use std::collections::BTreeMap;
use std::fmt;
use std::io;

use r3map_core::geometry::to_usize;

use crate::proto::{ChunkHeader, Command, errno, reply_flags, reply_type};

/// `NBD_STATE_HOLE` in `base:allocation`: the extent is not allocated.
pub(crate) const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` in `base:allocation`: the extent reads as zeroes.
pub(crate) const STATE_ZERO: u32 = 1 << 1;

/// Largest block status chunk accepted: a million extents.
const MAX_BLOCK_STATUS: u32 = 4 + 8 * (1 << 20);
/// Largest error chunk accepted: the longest message a 16-bit length allows, and room for the
/// structured fields of error types this client does not know.
const MAX_ERROR_CHUNK: u32 = 6 + u16::MAX as u32 + 1024;
/// Most chunks one reply may have.
const MAX_CHUNKS: usize = 1 << 20;

/// What the server answered to one request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Done,
    /// The data of a read, exactly as long as the request.
    Data(Vec<u8>),
    /// `base:allocation` descriptors of a block status query: length and flags.
    Extents(Vec<(u32, u32)>),
}

/// The server broke the protocol; the connection cannot be trusted any more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn violation(message: impl Into<String>) -> Violation {
    Violation(message.into())
}

/// A request as sent, which its reply is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expect {
    pub cmd: Command,
    pub offset: u64,
    pub length: u32,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cmd {
            Command::Flush | Command::Disc => write!(f, "{}", self.cmd.name()),
            cmd => write!(f, "{} of {} bytes at offset {}", cmd.name(), self.length, self.offset),
        }
    }
}

/// The `io::ErrorKind` for an NBD error value.
#[must_use]
pub(crate) fn error_kind(error: u32) -> io::ErrorKind {
    use io::ErrorKind as K;
    match error {
        errno::EPERM => K::PermissionDenied,
        errno::ENOMEM => K::OutOfMemory,
        errno::EINVAL | errno::EOVERFLOW => K::InvalidInput,
        errno::ENOSPC => K::StorageFull,
        errno::ENOTSUP => K::Unsupported,
        errno::ESHUTDOWN => K::ConnectionAborted,
        _ => K::Other,
    }
}

fn error_name(error: u32) -> String {
    match error {
        errno::EPERM => "EPERM (operation not permitted)".into(),
        errno::EIO => "EIO (input/output error)".into(),
        errno::ENOMEM => "ENOMEM (out of memory)".into(),
        errno::EINVAL => "EINVAL (invalid argument)".into(),
        errno::ENOSPC => "ENOSPC (no space left)".into(),
        errno::EOVERFLOW => "EOVERFLOW (request too large)".into(),
        errno::ENOTSUP => "ENOTSUP (not supported)".into(),
        errno::ESHUTDOWN => "ESHUTDOWN (the server is shutting down)".into(),
        other => format!("error {other}"),
    }
}

/// The error a caller gets when the server failed `request` with `error` and `message`.
pub(crate) fn server_error(peer: &str, request: &Expect, error: u32, message: &str) -> io::Error {
    let mut text = format!("{request} failed on the NBD server at {peer}: {}", error_name(error));
    if !message.is_empty() {
        text.push_str(": ");
        text.push_str(message);
    }
    io::Error::new(error_kind(error), text)
}

/// An error chunk's payload: error, message, and the offset of `ERROR_OFFSET`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ErrorChunk {
    pub error: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// Decodes the payload of an error chunk of type `kind`.
pub(crate) fn decode_error_chunk(kind: u16, payload: &[u8]) -> Result<ErrorChunk, Violation> {
    let Some((head, rest)) = payload.split_first_chunk::<6>() else {
        return Err(violation(format!("an error chunk of {} bytes, shorter than 6", payload.len())));
    };
    let error = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let message_len = usize::from(u16::from_be_bytes([head[4], head[5]]));
    let Some((message, fields)) = rest.split_at_checked(message_len) else {
        return Err(violation(format!("an error message of {message_len} bytes does not fit its chunk")));
    };
    if error == 0 {
        return Err(violation("an error chunk with error value 0"));
    }
    let offset = if kind == reply_type::ERROR_OFFSET {
        let Ok(b) = <[u8; 8]>::try_from(fields) else {
            return Err(violation("an ERROR_OFFSET chunk without its 8-byte offset"));
        };
        Some(u64::from_be_bytes(b))
    } else {
        None
    };
    Ok(ErrorChunk { error, message: String::from_utf8_lossy(message).into_owned(), offset })
}

/// Decodes an `OFFSET_HOLE` payload: offset and length.
pub(crate) fn decode_hole(payload: &[u8]) -> Result<(u64, u32), Violation> {
    let Ok(b) = <[u8; 12]>::try_from(payload) else {
        return Err(violation(format!("an OFFSET_HOLE chunk of {} bytes, not 12", payload.len())));
    };
    let offset = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]);
    if len == 0 {
        return Err(violation("an empty OFFSET_HOLE chunk"));
    }
    Ok((offset, len))
}

/// Decodes a `BLOCK_STATUS` payload: the context id and its descriptors (length, flags).
pub(crate) fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<(u32, u32)>), Violation> {
    let Some((id, descriptors)) = payload.split_first_chunk::<4>() else {
        return Err(violation("a BLOCK_STATUS chunk shorter than 4 bytes"));
    };
    if descriptors.is_empty() || descriptors.len() % 8 != 0 {
        return Err(violation(format!(
            "a BLOCK_STATUS chunk of {} bytes, not 4 + 8n (n > 0)",
            payload.len()
        )));
    }
    let mut extents = Vec::with_capacity(descriptors.len() / 8);
    for d in descriptors.chunks_exact(8) {
        let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        if len == 0 {
            return Err(violation("a block status extent of length 0"));
        }
        extents.push((len, u32::from_be_bytes([d[4], d[5], d[6], d[7]])));
    }
    Ok((u32::from_be_bytes(*id), extents))
}

/// What to do with a chunk's payload, decided from its header before it is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payload {
    /// `OFFSET_DATA`: an 8-byte offset, then this many bytes of data.
    Data(u32),
    /// Any other chunk: read the payload whole (its length is bounded), then [`Assembly::chunk`].
    Whole,
}

/// The chunks of one structured reply, gathered until the final one.
#[derive(Debug)]
pub(crate) struct Assembly {
    expect: Expect,
    /// The read's data, allocated at the first content chunk.
    data: Vec<u8>,
    /// Ranges of the read already described (relative start → end, adjacent ranges merged).
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    extents: Option<Vec<(u32, u32)>>,
    error: Option<ErrorChunk>,
    chunks: usize,
}

impl Assembly {
    pub(crate) fn new(expect: Expect) -> Self {
        Self {
            expect,
            data: Vec::new(),
            covered: BTreeMap::new(),
            covered_bytes: 0,
            extents: None,
            error: None,
            chunks: 0,
        }
    }

    /// Checks a chunk header against the request (type, payload length) before its payload is
    /// read.
    pub(crate) fn begin(&mut self, h: &ChunkHeader) -> Result<Payload, Violation> {
        self.chunks += 1;
        if self.chunks > MAX_CHUNKS {
            return Err(violation(format!("more than {MAX_CHUNKS} chunks in the reply to {}", self.expect)));
        }
        let is_read = self.expect.cmd == Command::Read;
        let too_long = |limit: u32| {
            violation(format!(
                "a chunk of type {} with {} bytes (at most {limit} fit) for {}",
                h.kind, h.len, self.expect
            ))
        };
        match h.kind {
            reply_type::OFFSET_DATA if is_read => {
                let limit = self.expect.length.saturating_add(8);
                if h.len > limit {
                    return Err(too_long(limit));
                }
                if h.len <= 8 {
                    return Err(violation(format!(
                        "an OFFSET_DATA chunk of {} bytes carries no data",
                        h.len
                    )));
                }
                Ok(Payload::Data(h.len - 8))
            }
            reply_type::OFFSET_HOLE if is_read => {
                if h.len != 12 {
                    return Err(violation(format!("an OFFSET_HOLE chunk of {} bytes, not 12", h.len)));
                }
                Ok(Payload::Whole)
            }
            reply_type::NONE => {
                if h.len != 0 {
                    return Err(violation(format!("a NONE chunk with {} bytes of payload", h.len)));
                }
                if h.flags & reply_flags::DONE == 0 {
                    return Err(violation("a NONE chunk without the DONE flag"));
                }
                Ok(Payload::Whole)
            }
            reply_type::BLOCK_STATUS if self.expect.cmd == Command::BlockStatus => {
                if h.len > MAX_BLOCK_STATUS {
                    return Err(too_long(MAX_BLOCK_STATUS));
                }
                Ok(Payload::Whole)
            }
            kind if kind & (1 << 15) != 0 => {
                if h.len > MAX_ERROR_CHUNK {
                    return Err(too_long(MAX_ERROR_CHUNK));
                }
                Ok(Payload::Whole)
            }
            kind => Err(violation(format!("a chunk of type {kind}, which does not answer {}", self.expect))),
        }
    }

    /// Marks `rel..rel + len` of the read as described; fails if any of it already was.
    fn cover(&mut self, rel: u64, len: u64) -> Result<(), Violation> {
        let end = rel + len;
        let before = self.covered.range(..=rel).next_back().map(|(&s, &e)| (s, e));
        let after = self.covered.range(rel..).next().map(|(&s, &e)| (s, e));
        if before.is_some_and(|(_, e)| e > rel) || after.is_some_and(|(s, _)| s < end) {
            return Err(violation(format!(
                "chunks overlap at offset {} of {}",
                self.expect.offset + rel,
                self.expect
            )));
        }
        let (mut start, mut stop) = (rel, end);
        if let Some((s, e)) = before.filter(|&(_, e)| e == rel) {
            self.covered.remove(&s);
            start = s.min(start);
            stop = stop.max(e);
        }
        if let Some((s, e)) = after.filter(|&(s, _)| s == end) {
            self.covered.remove(&s);
            stop = e;
        }
        self.covered.insert(start, stop);
        self.covered_bytes += len;
        Ok(())
    }

    /// The part of the request `offset..offset + len` names, relative to its start.
    fn relative(&self, offset: u64, len: u64) -> Result<u64, Violation> {
        let rel = offset.checked_sub(self.expect.offset);
        match rel {
            Some(rel) if rel.checked_add(len).is_some_and(|end| end <= u64::from(self.expect.length)) => {
                Ok(rel)
            }
            _ => {
                Err(violation(format!("a chunk for {len} bytes at offset {offset}, outside {}", self.expect)))
            }
        }
    }

    fn buffer(&mut self) -> &mut [u8] {
        if self.data.is_empty() {
            self.data = vec![0; self.expect.length as usize];
        }
        &mut self.data
    }

    /// Where the data of an `OFFSET_DATA` chunk at `offset` goes.
    pub(crate) fn data_slot(&mut self, offset: u64, len: u32) -> Result<&mut [u8], Violation> {
        let rel = self.relative(offset, u64::from(len))?;
        self.cover(rel, u64::from(len))?;
        let start = to_usize(rel);
        Ok(&mut self.buffer()[start..start + len as usize])
    }

    /// Takes a whole chunk other than `OFFSET_DATA`.
    pub(crate) fn chunk(&mut self, kind: u16, payload: &[u8], context: Option<u32>) -> Result<(), Violation> {
        match kind {
            reply_type::NONE => Ok(()),
            reply_type::OFFSET_HOLE => {
                let (offset, len) = decode_hole(payload)?;
                let rel = self.relative(offset, u64::from(len))?;
                self.cover(rel, u64::from(len))?;
                let start = to_usize(rel);
                // A fresh buffer is zeroes already.
                self.buffer()[start..start + len as usize].fill(0);
                Ok(())
            }
            reply_type::BLOCK_STATUS => {
                let (id, extents) = decode_block_status(payload)?;
                if Some(id) != context {
                    return Err(violation(format!(
                        "block status for metadata context {id}, which was not negotiated"
                    )));
                }
                if self.extents.is_some() {
                    return Err(violation("two BLOCK_STATUS chunks for one context in one reply"));
                }
                self.extents = Some(extents);
                Ok(())
            }
            kind => {
                let e = decode_error_chunk(kind, payload)?;
                if let Some(offset) = e.offset
                    && self.expect.cmd != Command::Flush
                    && self.relative(offset, 1).is_err()
                {
                    return Err(violation(format!("an error at offset {offset}, outside {}", self.expect)));
                }
                self.error.get_or_insert(e);
                Ok(())
            }
        }
    }

    /// The error value of the first error chunk, if any.
    pub(crate) fn error_value(&self) -> Option<u32> {
        self.error.as_ref().map(|e| e.error)
    }

    /// The outcome once the final chunk arrived: the request's result, or a violation when the
    /// server claimed success without delivering what the command needs.
    pub(crate) fn finish(self, peer: &str) -> Result<io::Result<Reply>, Violation> {
        if let Some(e) = self.error {
            return Ok(Err(server_error(peer, &self.expect, e.error, &e.message)));
        }
        match self.expect.cmd {
            Command::Read if self.covered_bytes != u64::from(self.expect.length) => Err(violation(format!(
                "the server reported success for {} but described only {} bytes",
                self.expect, self.covered_bytes
            ))),
            Command::Read => Ok(Ok(Reply::Data(self.data))),
            Command::BlockStatus => match self.extents {
                Some(extents) => Ok(Ok(Reply::Extents(extents))),
                None => Err(violation(format!(
                    "the server reported success for {} without block status",
                    self.expect
                ))),
            },
            _ => Ok(Ok(Reply::Done)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_error_chunk, encode_offset_hole};

    const DONE: u16 = reply_flags::DONE;

    fn read(offset: u64, length: u32) -> Assembly {
        Assembly::new(Expect { cmd: Command::Read, offset, length })
    }

    fn header(kind: u16, len: u32, flags: u16) -> ChunkHeader {
        ChunkHeader { flags, kind, cookie: 1, len }
    }

    /// Feeds a data chunk of `data` at `offset`.
    fn data(a: &mut Assembly, offset: u64, data: &[u8]) -> Result<(), Violation> {
        let len = u32::try_from(data.len()).unwrap();
        assert_eq!(a.begin(&header(reply_type::OFFSET_DATA, 8 + len, 0))?, Payload::Data(len));
        a.data_slot(offset, len)?.copy_from_slice(data);
        Ok(())
    }

    fn hole(a: &mut Assembly, offset: u64, len: u32) -> Result<(), Violation> {
        let chunk = encode_offset_hole(1, offset, len, false);
        a.begin(&header(reply_type::OFFSET_HOLE, 12, 0))?;
        a.chunk(reply_type::OFFSET_HOLE, &chunk[crate::proto::CHUNK_HEADER_LEN..], None)
    }

    #[test]
    fn reads_reassemble_chunks_in_any_order() {
        let mut a = read(1000, 10);
        data(&mut a, 1006, b"6789").unwrap();
        hole(&mut a, 1003, 3).unwrap();
        data(&mut a, 1000, b"012").unwrap();
        assert_eq!(a.covered.len(), 1, "adjacent ranges merge");
        assert_eq!(a.finish("p").unwrap().unwrap(), Reply::Data(b"012\x00\x00\x006789".to_vec()));
    }

    #[test]
    fn reads_must_be_covered_exactly_once() {
        let mut a = read(0, 10);
        data(&mut a, 0, b"01234").unwrap();
        assert!(data(&mut a, 4, b"xx").unwrap_err().0.contains("overlap"));
        assert!(hole(&mut a, 2, 1).unwrap_err().0.contains("overlap"));
        let e = a.finish("p").unwrap_err();
        assert!(e.0.contains("described only 5 bytes"), "{e}");

        let mut a = read(100, 10);
        assert!(data(&mut a, 99, b"x").unwrap_err().0.contains("outside"));
        assert!(data(&mut a, 109, b"xy").unwrap_err().0.contains("outside"));
        assert!(hole(&mut a, u64::MAX, 1).unwrap_err().0.contains("outside"));
        assert!(hole(&mut a, 100, 0).unwrap_err().0.contains("empty"));
        let e = a.begin(&header(reply_type::OFFSET_DATA, 8 + 11, 0)).unwrap_err();
        assert!(e.0.contains("at most 18"), "{e}");
        assert!(a.begin(&header(reply_type::OFFSET_DATA, 8, 0)).unwrap_err().0.contains("no data"));
    }

    #[test]
    fn chunk_types_must_fit_the_command() {
        let mut w = Assembly::new(Expect { cmd: Command::Write, offset: 0, length: 4 });
        assert!(
            w.begin(&header(reply_type::OFFSET_DATA, 12, 0)).unwrap_err().0.contains("does not answer write")
        );
        assert!(w.begin(&header(reply_type::BLOCK_STATUS, 12, 0)).is_err());
        assert!(w.begin(&header(77, 0, 0)).is_err());
        assert!(w.begin(&header(reply_type::NONE, 0, 0)).unwrap_err().0.contains("without the DONE flag"));
        assert!(w.begin(&header(reply_type::NONE, 1, DONE)).is_err());
        assert_eq!(w.begin(&header(reply_type::NONE, 0, DONE)), Ok(Payload::Whole));
        assert_eq!(w.finish("p").unwrap().unwrap(), Reply::Done);
    }

    #[test]
    fn errors_keep_the_server_message_and_map_to_kinds() {
        let chunk = encode_error_chunk(1, errno::ENOSPC, "disk full");
        let mut w = Assembly::new(Expect { cmd: Command::Write, offset: 4096, length: 512 });
        let payload = &chunk[crate::proto::CHUNK_HEADER_LEN..];
        w.begin(&header(reply_type::ERROR, u32::try_from(payload.len()).unwrap(), DONE)).unwrap();
        w.chunk(reply_type::ERROR, payload, None).unwrap();
        let e = w.finish("host:1").unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert_eq!(
            e.to_string(),
            "write of 512 bytes at offset 4096 failed on the NBD server at host:1: ENOSPC (no space left): disk full"
        );
        for (error, kind) in [
            (errno::EPERM, io::ErrorKind::PermissionDenied),
            (errno::EIO, io::ErrorKind::Other),
            (errno::ENOMEM, io::ErrorKind::OutOfMemory),
            (errno::EINVAL, io::ErrorKind::InvalidInput),
            (errno::EOVERFLOW, io::ErrorKind::InvalidInput),
            (errno::ENOTSUP, io::ErrorKind::Unsupported),
            (errno::ESHUTDOWN, io::ErrorKind::ConnectionAborted),
            (1234, io::ErrorKind::Other),
        ] {
            assert_eq!(error_kind(error), kind, "{error}");
        }
    }

    #[test]
    fn error_chunks_are_checked() {
        let ok = |kind, p: &[u8]| decode_error_chunk(kind, p);
        assert_eq!(
            ok(reply_type::ERROR, &[0, 0, 0, 5, 0, 2, b'h', b'i']).unwrap(),
            ErrorChunk { error: 5, message: "hi".into(), offset: None }
        );
        assert!(
            ok(reply_type::ERROR, &[0, 0, 0, 5, 0, 3, b'h', b'i']).unwrap_err().0.contains("does not fit")
        );
        assert!(ok(reply_type::ERROR, &[0, 0, 0, 0, 0, 0]).unwrap_err().0.contains("error value 0"));
        assert!(ok(reply_type::ERROR, &[0, 0, 0]).is_err());
        let mut with_offset = vec![0, 0, 0, 5, 0, 0];
        with_offset.extend_from_slice(&4096u64.to_be_bytes());
        assert_eq!(ok(reply_type::ERROR_OFFSET, &with_offset).unwrap().offset, Some(4096));
        assert!(ok(reply_type::ERROR_OFFSET, &with_offset[..10]).is_err());

        // The offset of ERROR_OFFSET must lie in the request.
        let mut r = read(0, 4096);
        r.begin(&header(reply_type::ERROR_OFFSET, 14, 0)).unwrap();
        assert!(r.chunk(reply_type::ERROR_OFFSET, &with_offset, None).unwrap_err().0.contains("outside"));
        // An unknown error type still fails the request.
        let mut r = read(0, 4096);
        r.begin(&header(0x8123, 6, DONE)).unwrap();
        r.chunk(0x8123, &[0, 0, 0, 5, 0, 0], None).unwrap();
        assert_eq!(r.finish("p").unwrap().unwrap_err().kind(), io::ErrorKind::Other);
    }

    #[test]
    fn block_status() {
        let expect = Expect { cmd: Command::BlockStatus, offset: 0, length: 1 << 20 };
        let mut payload = 9u32.to_be_bytes().to_vec();
        for (len, flags) in [(4096u32, 0u32), (8192, STATE_HOLE | STATE_ZERO)] {
            payload.extend_from_slice(&len.to_be_bytes());
            payload.extend_from_slice(&flags.to_be_bytes());
        }
        let mut a = Assembly::new(expect);
        a.chunk(reply_type::BLOCK_STATUS, &payload, Some(9)).unwrap();
        assert!(a.chunk(reply_type::BLOCK_STATUS, &payload, Some(9)).unwrap_err().0.contains("two"));
        assert_eq!(a.finish("p").unwrap().unwrap(), Reply::Extents(vec![(4096, 0), (8192, 3)]));

        let mut a = Assembly::new(expect);
        assert!(a.chunk(reply_type::BLOCK_STATUS, &payload, Some(1)).unwrap_err().0.contains("context 9"));
        assert!(Assembly::new(expect).finish("p").unwrap_err().0.contains("without block status"));
        assert!(decode_block_status(&payload[..8]).is_err());
        assert!(decode_block_status(&payload[..4]).is_err());
        assert!(
            decode_block_status(&[0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0]).unwrap_err().0.contains("length 0")
        );
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(kind: u16, payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = decode_error_chunk(kind, &payload);
            let _ = decode_hole(&payload);
            let _ = decode_block_status(&payload);
        }

        /// Any sequence of chunks either completes the request with a result that fits it, or
        /// is a violation; nothing panics.
        #[test]
        fn assemblies_never_panic(
            offset in 0u64..16,
            length in 1u32..64,
            chunks in proptest::collection::vec(
                (0u16..8, proptest::prelude::any::<u16>(), 0u64..96, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24)),
                0..8,
            ),
        ) {
            let cmd = if offset % 2 == 0 { Command::Read } else { Command::BlockStatus };
            let mut a = Assembly::new(Expect { cmd, offset, length });
            let mut broken = false;
            for (pick, flags, at, payload) in chunks {
                let kind = [0, 1, 2, 5, 0x8001, 0x8002, 0x8003, 3][usize::from(pick)];
                let len = u32::try_from(payload.len()).unwrap() + if kind == 1 { 8 } else { 0 };
                let h = ChunkHeader { flags, kind, cookie: 1, len };
                let step = a.begin(&h).and_then(|p| match p {
                    Payload::Data(n) => a.data_slot(at, n).map(|slot| slot.copy_from_slice(&payload)),
                    Payload::Whole => a.chunk(kind, &payload, Some(1)),
                });
                if step.is_err() {
                    broken = true;
                    break;
                }
            }
            if !broken && let Ok(Ok(reply)) = a.finish("p") {
                match reply {
                    Reply::Data(d) => proptest::prop_assert_eq!(d.len(), length as usize),
                    Reply::Extents(e) => proptest::prop_assert!(!e.is_empty()),
                    Reply::Done => proptest::prop_assert!(false, "a read or block status cannot end without data"),
                }
            }
        }
    }

    #[test]
    fn expectations_read_well() {
        let e = Expect { cmd: Command::Flush, offset: 0, length: 0 };
        assert_eq!(e.to_string(), "flush");
        let e = Expect { cmd: Command::Trim, offset: 5, length: 6 };
        assert_eq!(e.to_string(), "trim of 6 bytes at offset 5");
    }
}
