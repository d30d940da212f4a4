//! The NBD wire format: constants and pure encoders and decoders, no I/O.
//!
//! Every decoder takes bytes from an untrusted peer and returns a [`ProtoError`] for anything it
//! does not accept; none of them panics. Lengths a peer announces are bounded before anything is
//! allocated for them ([`MAX_OPTION_DATA`], [`MAX_REQUEST`]). All integers are big-endian.

use thiserror::Error;

// ---------------------------------------------------------------------------------------------
// Handshake

/// `NBDMAGIC`, the first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic the server sends and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server to client).
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (client to server, after the greeting).
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    /// Every flag this server understands; a client that sets any other makes it hang up.
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Length of the server's greeting: two magics and the handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header: magic, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Largest option data accepted from a client.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Largest export name (the spec's limit for strings).
pub const MAX_NAME: usize = 4096;
/// Zero bytes after the `NBD_OPT_EXPORT_NAME` reply unless the client set `NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Option types.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types; errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = (1 << 31) + 8;
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;

    /// Whether `reply` is an error reply.
    #[must_use]
    pub const fn is_error(reply: u32) -> bool {
        reply & (1 << 31) != 0
    }
}

/// Information types in `NBD_REP_INFO` replies to `NBD_OPT_INFO` and `NBD_OPT_GO`.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags, sent with the export's size.
pub mod transmission_flags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

// ---------------------------------------------------------------------------------------------
// Transmission

/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Length of a request header (the payload of a write follows it).
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header (the data of a read follows it).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Largest read or write payload this server accepts in one request.
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Largest error message sent in an error chunk.
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Command flags.
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply flags.
pub mod reply_flags {
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types; error chunks have bit 15 set.
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Error values in replies.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Request types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Resize,
}

impl Command {
    /// The command for a request type, `None` for one this crate does not know.
    #[must_use]
    pub const fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            5 => Self::Cache,
            6 => Self::WriteZeroes,
            7 => Self::BlockStatus,
            8 => Self::Resize,
            _ => return None,
        })
    }

    /// The request type on the wire.
    #[must_use]
    pub const fn to_u16(self) -> u16 {
        match self {
            Self::Read => 0,
            Self::Write => 1,
            Self::Disc => 2,
            Self::Flush => 3,
            Self::Trim => 4,
            Self::Cache => 5,
            Self::WriteZeroes => 6,
            Self::BlockStatus => 7,
            Self::Resize => 8,
        }
    }

    /// A short name for logs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Disc => "disc",
            Self::Flush => "flush",
            Self::Trim => "trim",
            Self::Cache => "cache",
            Self::WriteZeroes => "write_zeroes",
            Self::BlockStatus => "block_status",
            Self::Resize => "resize",
        }
    }
}

/// What was wrong with bytes a peer sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    #[error("expected {expected} bytes, got {got}")]
    Length { expected: usize, got: usize },
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    Magic { expected: u64, found: u64 },
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("option data of {0} bytes is longer than the limit of {MAX_OPTION_DATA}")]
    OptionTooLong(u32),
    #[error("the export name length {0} does not fit the option data")]
    NameLength(u32),
    #[error("the export name is longer than {MAX_NAME} bytes")]
    NameTooLong,
    #[error("the export name is not UTF-8")]
    NameNotUtf8,
    #[error("the list of information requests does not fit the option data")]
    InfoRequests,
    #[error("the list of metadata context queries does not fit the option data")]
    MetaQueries,
    #[error("a metadata context query is longer than {MAX_NAME} bytes or not UTF-8")]
    MetaQuery,
    #[error("a block status payload of {0} bytes is not a context id and whole descriptors")]
    BlockStatus(usize),
}

type Result<T> = std::result::Result<T, ProtoError>;

fn exact<const N: usize>(buf: &[u8]) -> Result<[u8; N]> {
    buf.try_into().map_err(|_| ProtoError::Length { expected: N, got: buf.len() })
}

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Length of a slice as a `u32`, saturating (callers bound their slices well below 4 GiB).
fn len32(b: &[u8]) -> u32 {
    u32::try_from(b.len()).unwrap_or(u32::MAX)
}

// ---------------------------------------------------------------------------------------------
// Handshake encoders and decoders

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[must_use]
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Decodes a greeting into its handshake flags.
///
/// # Errors
/// A wrong length or magic.
pub fn decode_greeting(buf: &[u8]) -> Result<u16> {
    let b: [u8; GREETING_LEN] = exact(buf)?;
    check_magic64(NBDMAGIC, be64(&b, 0))?;
    check_magic64(IHAVEOPT, be64(&b, 8))?;
    Ok(be16(&b, 16))
}

/// Decodes the client's flags.
///
/// # Errors
/// A wrong length, or a flag outside [`client_flags::KNOWN`] (the server must then hang up).
pub fn decode_client_flags(buf: &[u8]) -> Result<u32> {
    let flags = u32::from_be_bytes(exact::<4>(buf)?);
    if flags & !client_flags::KNOWN != 0 {
        return Err(ProtoError::ClientFlags(flags));
    }
    Ok(flags)
}

fn check_magic64(expected: u64, found: u64) -> Result<()> {
    if expected == found { Ok(()) } else { Err(ProtoError::Magic { expected, found }) }
}

fn check_magic32(expected: u32, found: u32) -> Result<()> {
    check_magic64(u64::from(expected), u64::from(found))
}

/// The header of an option request; `len` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

impl OptionHeader {
    /// # Errors
    /// A wrong length or magic, or data longer than [`MAX_OPTION_DATA`].
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let b: [u8; OPTION_HEADER_LEN] = exact(buf)?;
        check_magic64(IHAVEOPT, be64(&b, 0))?;
        let header = Self { option: be32(&b, 8), len: be32(&b, 12) };
        if header.len > MAX_OPTION_DATA {
            return Err(ProtoError::OptionTooLong(header.len));
        }
        Ok(header)
    }

    #[must_use]
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..16].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// The header of an option reply; `len` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

impl OptionReplyHeader {
    /// # Errors
    /// A wrong length or magic.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let b: [u8; OPTION_REPLY_HEADER_LEN] = exact(buf)?;
        check_magic64(OPTION_REPLY_MAGIC, be64(&b, 0))?;
        Ok(Self { option: be32(&b, 8), reply: be32(&b, 12), len: be32(&b, 16) })
    }
}

/// An option reply with its data.
#[must_use]
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len32(data).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client set
/// `NO_ZEROES`, 124 zero bytes.
#[must_use]
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + EXPORT_NAME_PADDING, 0);
    }
    out
}

/// Checks an export name a client sent (UTF-8, at most [`MAX_NAME`] bytes).
///
/// # Errors
/// A name too long or not UTF-8.
pub fn decode_name(buf: &[u8]) -> Result<String> {
    if buf.len() > MAX_NAME {
        return Err(ProtoError::NameTooLong);
    }
    String::from_utf8(buf.to_vec()).map_err(|_| ProtoError::NameNotUtf8)
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

impl InfoRequest {
    /// # Errors
    /// Lengths that do not add up to the option data, or a bad name.
    pub fn decode(data: &[u8]) -> Result<Self> {
        if data.len() < 4 {
            return Err(ProtoError::Length { expected: 6, got: data.len() });
        }
        let name_len = be32(data, 0);
        let rest = &data[4..];
        let Some(name_end) = usize::try_from(name_len).ok().filter(|&n| n <= rest.len()) else {
            return Err(ProtoError::NameLength(name_len));
        };
        let name = decode_name(&rest[..name_end])?;
        let rest = &rest[name_end..];
        if rest.len() < 2 {
            return Err(ProtoError::InfoRequests);
        }
        let count = usize::from(be16(rest, 0));
        let list = &rest[2..];
        if list.len() != count * 2 {
            return Err(ProtoError::InfoRequests);
        }
        let infos = list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
        Ok(Self { name, infos })
    }

    /// The option data (for clients and tests); names and lists are assumed to be short.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(6 + self.name.len() + 2 * self.infos.len());
        out.extend_from_slice(&len32(self.name.as_bytes()).to_be_bytes());
        out.extend_from_slice(self.name.as_bytes());
        let count = u16::try_from(self.infos.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for i in self.infos.iter().take(usize::from(count)) {
            out.extend_from_slice(&i.to_be_bytes());
        }
        out
    }
}

/// `NBD_INFO_EXPORT` data: size and transmission flags.
#[must_use]
pub fn encode_info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&info::EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` data: the type and a string.
#[must_use]
pub fn encode_info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + s.len());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

/// `NBD_INFO_BLOCK_SIZE` data: minimum, preferred and maximum block sizes.
#[must_use]
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&min.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&max.to_be_bytes());
    out
}

/// `NBD_REP_SERVER` data: the name's length, the name, then an optional description.
#[must_use]
pub fn encode_rep_server(name: &str, description: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&len32(name.as_bytes()).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    if let Some(d) = description {
        out.extend_from_slice(d.as_bytes());
    }
    out
}

/// Metadata contexts: the names this crate knows and the status flags they report.
pub mod meta {
    /// The spec's allocation context: holes and ranges known to read as zeroes.
    pub const BASE_ALLOCATION: &str = "base:allocation";
    /// `base:allocation`: the range is not allocated.
    pub const STATE_HOLE: u32 = 1 << 0;
    /// `base:allocation`: the range reads as zeroes.
    pub const STATE_ZERO: u32 = 1 << 1;
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: an export name and
/// queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// # Errors
    /// Lengths that do not add up to the option data, a bad export name or a bad query.
    pub fn decode(data: &[u8]) -> Result<Self> {
        let (export, rest) = take_string(data).ok_or(ProtoError::NameLength(prefix32(data)))?;
        let export = decode_name(export)?;
        if rest.len() < 4 {
            return Err(ProtoError::MetaQueries);
        }
        let count = be32(rest, 0);
        let mut rest = &rest[4..];
        // Each query takes at least its 4-byte length: a count beyond that cannot be honest.
        if usize::try_from(count).map_or(true, |c| c > rest.len() / 4) {
            return Err(ProtoError::MetaQueries);
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (q, next) = take_string(rest).ok_or(ProtoError::MetaQueries)?;
            if q.len() > MAX_NAME {
                return Err(ProtoError::MetaQuery);
            }
            queries.push(String::from_utf8(q.to_vec()).map_err(|_| ProtoError::MetaQuery)?);
            rest = next;
        }
        if !rest.is_empty() {
            return Err(ProtoError::MetaQueries);
        }
        Ok(Self { export, queries })
    }

    /// The option data (for clients and tests).
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&len32(self.export.as_bytes()).to_be_bytes());
        out.extend_from_slice(self.export.as_bytes());
        out.extend_from_slice(&u32::try_from(self.queries.len()).unwrap_or(u32::MAX).to_be_bytes());
        for q in &self.queries {
            out.extend_from_slice(&len32(q.as_bytes()).to_be_bytes());
            out.extend_from_slice(q.as_bytes());
        }
        out
    }
}

/// The first four bytes as a length, or 0 when there are fewer (for error messages).
fn prefix32(b: &[u8]) -> u32 {
    if b.len() >= 4 { be32(b, 0) } else { 0 }
}

/// Splits a 32-bit length and that many bytes off the front of `b`.
fn take_string(b: &[u8]) -> Option<(&[u8], &[u8])> {
    if b.len() < 4 {
        return None;
    }
    let len = usize::try_from(be32(b, 0)).ok()?;
    let rest = &b[4..];
    (len <= rest.len()).then(|| rest.split_at(len))
}

/// `NBD_REP_META_CONTEXT` data: the context's id and name.
#[must_use]
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Decodes `NBD_REP_META_CONTEXT` data into the id and name.
///
/// # Errors
/// Data shorter than the id, or a name that is not UTF-8 or too long.
pub fn decode_rep_meta_context(data: &[u8]) -> Result<(u32, String)> {
    if data.len() < 4 {
        return Err(ProtoError::Length { expected: 4, got: data.len() });
    }
    let name = &data[4..];
    if name.len() > MAX_NAME {
        return Err(ProtoError::MetaQuery);
    }
    let name = String::from_utf8(name.to_vec()).map_err(|_| ProtoError::MetaQuery)?;
    Ok((be32(data, 0), name))
}

// ---------------------------------------------------------------------------------------------
// Transmission encoders and decoders

/// A request header. `kind` is the raw type, so an unknown command can still be answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    /// Decodes a header. Lengths are checked by the server against [`MAX_REQUEST`], since an
    /// oversized request still gets an answer.
    ///
    /// # Errors
    /// A wrong length or magic (the server then hangs up).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let b: [u8; REQUEST_LEN] = exact(buf)?;
        check_magic32(REQUEST_MAGIC, be32(&b, 0))?;
        Ok(Self {
            flags: be16(&b, 4),
            kind: be16(&b, 6),
            cookie: be64(&b, 8),
            offset: be64(&b, 16),
            length: be32(&b, 24),
        })
    }

    #[must_use]
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// The command, `None` for an unknown type.
    #[must_use]
    pub const fn command(&self) -> Option<Command> {
        Command::from_u16(self.kind)
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    #[must_use]
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        self.encode_into(&mut out);
        out
    }

    /// Writes the header into the first [`SIMPLE_REPLY_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`SIMPLE_REPLY_LEN`] (a caller's bug, never a peer's bytes).
    pub fn encode_into(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
    }

    /// # Errors
    /// A wrong length or magic.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let b: [u8; SIMPLE_REPLY_LEN] = exact(buf)?;
        check_magic32(SIMPLE_REPLY_MAGIC, be32(&b, 0))?;
        Ok(Self { error: be32(&b, 4), cookie: be64(&b, 8) })
    }
}

/// A structured reply chunk header; `len` bytes of payload follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

impl ChunkHeader {
    #[must_use]
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        self.encode_into(&mut out);
        out
    }

    /// Writes the header into the first [`CHUNK_HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`CHUNK_HEADER_LEN`] (a caller's bug, never a peer's bytes).
    pub fn encode_into(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
    }

    /// # Errors
    /// A wrong length or magic.
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let b: [u8; CHUNK_HEADER_LEN] = exact(buf)?;
        check_magic32(STRUCTURED_REPLY_MAGIC, be32(&b, 0))?;
        Ok(Self { flags: be16(&b, 4), kind: be16(&b, 6), cookie: be64(&b, 8), len: be32(&b, 16) })
    }
}

/// Bytes before the data of an `OFFSET_DATA` chunk: the chunk header and the offset.
pub const OFFSET_DATA_PREFIX: usize = CHUNK_HEADER_LEN + 8;

/// Writes the header of an `OFFSET_DATA` chunk carrying `data_len` bytes at `offset` into the
/// first [`OFFSET_DATA_PREFIX`] bytes of `out`; the data goes right after.
///
/// # Panics
/// If `out` is shorter than [`OFFSET_DATA_PREFIX`] or `data_len` exceeds `u32::MAX - 8`
/// (callers bound reads by [`MAX_REQUEST`]).
pub fn encode_offset_data_prefix(out: &mut [u8], cookie: u64, offset: u64, data_len: usize, done: bool) {
    let len = u32::try_from(data_len)
        .ok()
        .and_then(|l| l.checked_add(8))
        .expect("read payloads are bounded by MAX_REQUEST");
    let flags = if done { reply_flags::DONE } else { 0 };
    ChunkHeader { flags, kind: reply_type::OFFSET_DATA, cookie, len }.encode_into(out);
    out[CHUNK_HEADER_LEN..OFFSET_DATA_PREFIX].copy_from_slice(&offset.to_be_bytes());
}

/// An `OFFSET_HOLE` chunk: `len` bytes at `offset` read as zeroes.
#[must_use]
pub fn encode_offset_hole(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let flags = if done { reply_flags::DONE } else { 0 };
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 12);
    out.extend_from_slice(&ChunkHeader { flags, kind: reply_type::OFFSET_HOLE, cookie, len: 12 }.encode());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// One block status descriptor: a run of `len` bytes with the context's `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub len: u32,
    pub flags: u32,
}

/// A `BLOCK_STATUS` chunk for one metadata context.
///
/// # Panics
/// If more than `(u32::MAX - 4) / 8` descriptors are given (callers bound them far lower).
#[must_use]
pub fn encode_block_status(
    cookie: u64,
    context: u32,
    descriptors: &[BlockDescriptor],
    done: bool,
) -> Vec<u8> {
    let flags = if done { reply_flags::DONE } else { 0 };
    let len = u32::try_from(4 + 8 * descriptors.len()).expect("descriptor lists are bounded");
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + len as usize);
    out.extend_from_slice(&ChunkHeader { flags, kind: reply_type::BLOCK_STATUS, cookie, len }.encode());
    out.extend_from_slice(&context.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.len.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
    out
}

/// Decodes the payload of a `BLOCK_STATUS` chunk into the context id and its descriptors.
///
/// # Errors
/// A payload without a context id or with a partial descriptor.
pub fn decode_block_status(payload: &[u8]) -> Result<(u32, Vec<BlockDescriptor>)> {
    if payload.len() < 4 || !(payload.len() - 4).is_multiple_of(8) {
        return Err(ProtoError::BlockStatus(payload.len()));
    }
    let descriptors = payload[4..]
        .chunks_exact(8)
        .map(|c| BlockDescriptor { len: be32(c, 0), flags: be32(c, 4) })
        .collect();
    Ok((be32(payload, 0), descriptors))
}

/// The final `NONE` chunk of a structured reply.
#[must_use]
pub fn encode_none(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    ChunkHeader { flags: reply_flags::DONE, kind: reply_type::NONE, cookie, len: 0 }.encode()
}

/// A final `ERROR` chunk with a message (cut to [`MAX_ERROR_MESSAGE`] bytes at a character
/// boundary).
#[must_use]
pub fn encode_error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let mut cut = message.len().min(MAX_ERROR_MESSAGE);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let msg = &msg[..usize::from(msg_len)];
    let len = 6 + u32::from(msg_len);
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + msg.len());
    out.extend_from_slice(
        &ChunkHeader { flags: reply_flags::DONE, kind: reply_type::ERROR, cookie, len }.encode(),
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// The payload of an error chunk: the error and its message.
///
/// # Errors
/// A payload shorter than 6 bytes or a message length past its end.
pub fn decode_error_payload(payload: &[u8]) -> Result<(u32, String)> {
    if payload.len() < 6 {
        return Err(ProtoError::Length { expected: 6, got: payload.len() });
    }
    let error = be32(payload, 0);
    let msg_len = usize::from(be16(payload, 4));
    let Some(msg) = payload.get(6..6 + msg_len) else {
        return Err(ProtoError::Length { expected: 6 + msg_len, got: payload.len() });
    };
    Ok((error, String::from_utf8_lossy(msg).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_round_trips() {
        let g = encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(decode_greeting(&g), Ok(3));
    }

    #[test]
    fn client_flags_reject_unknown_bits() {
        assert_eq!(decode_client_flags(&[0, 0, 0, 3]), Ok(3));
        assert_eq!(decode_client_flags(&[0, 0, 0, 4]), Err(ProtoError::ClientFlags(4)));
        assert!(decode_client_flags(&[0, 0, 3]).is_err());
    }

    #[test]
    fn option_data_is_bounded() {
        let h = OptionHeader { option: opt::GO, len: MAX_OPTION_DATA + 1 }.encode();
        assert_eq!(OptionHeader::decode(&h), Err(ProtoError::OptionTooLong(MAX_OPTION_DATA + 1)));
        let h = OptionHeader { option: opt::GO, len: MAX_OPTION_DATA }.encode();
        assert!(OptionHeader::decode(&h).is_ok());
    }

    #[test]
    fn info_request_rejects_inconsistent_lengths() {
        let ok = InfoRequest { name: "disk".into(), infos: vec![info::BLOCK_SIZE] }.encode();
        assert!(InfoRequest::decode(&ok).is_ok());
        assert!(InfoRequest::decode(&ok[..ok.len() - 1]).is_err());
        let mut long = ok.clone();
        long.push(0);
        assert!(InfoRequest::decode(&long).is_err());
        let mut bad_name = ok;
        bad_name[3] = 200;
        assert_eq!(InfoRequest::decode(&bad_name), Err(ProtoError::NameLength(200)));
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
        assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
    }

    #[test]
    fn bad_request_magic_is_an_error() {
        let mut r = Request { flags: 0, kind: 0, cookie: 1, offset: 0, length: 512 }.encode();
        r[0] ^= 1;
        assert!(matches!(Request::decode(&r), Err(ProtoError::Magic { .. })));
    }

    #[test]
    fn error_chunk_round_trips_and_truncates() {
        let c = encode_error_chunk(9, errno::EINVAL, "bad");
        let h = ChunkHeader::decode(&c[..CHUNK_HEADER_LEN]).unwrap();
        assert_eq!((h.kind, h.flags, h.cookie, h.len), (reply_type::ERROR, reply_flags::DONE, 9, 9));
        assert_eq!(decode_error_payload(&c[CHUNK_HEADER_LEN..]), Ok((errno::EINVAL, "bad".into())));
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let c = encode_error_chunk(1, errno::EIO, &long);
        let (_, msg) = decode_error_payload(&c[CHUNK_HEADER_LEN..]).unwrap();
        assert!(msg.len() <= MAX_ERROR_MESSAGE && !msg.is_empty());
    }

    #[test]
    fn offset_data_prefix_describes_the_data() {
        let mut buf = vec![0u8; OFFSET_DATA_PREFIX + 3];
        encode_offset_data_prefix(&mut buf, 5, 4096, 3, true);
        let h = ChunkHeader::decode(&buf[..CHUNK_HEADER_LEN]).unwrap();
        assert_eq!((h.kind, h.len, h.flags), (reply_type::OFFSET_DATA, 11, reply_flags::DONE));
        assert_eq!(be64(&buf, CHUNK_HEADER_LEN), 4096);
        let hole = encode_offset_hole(5, 8, 16, false);
        let h = ChunkHeader::decode(&hole[..CHUNK_HEADER_LEN]).unwrap();
        assert_eq!((h.kind, h.len, h.flags), (reply_type::OFFSET_HOLE, 12, 0));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_greeting(&bytes);
            let _ = decode_client_flags(&bytes);
            let _ = OptionHeader::decode(&bytes);
            let _ = OptionReplyHeader::decode(&bytes);
            let _ = InfoRequest::decode(&bytes);
            let _ = decode_name(&bytes);
            let _ = Request::decode(&bytes);
            let _ = SimpleReply::decode(&bytes);
            let _ = ChunkHeader::decode(&bytes);
            let _ = decode_error_payload(&bytes);
            let _ = MetaContextRequest::decode(&bytes);
            let _ = decode_rep_meta_context(&bytes);
            let _ = decode_block_status(&bytes);
        }

        #[test]
        fn meta_context_requests_round_trip(
            export in "[a-z]{0,8}",
            queries in proptest::collection::vec("[a-z:]{0,12}", 0..4),
        ) {
            let r = MetaContextRequest { export, queries };
            prop_assert_eq!(MetaContextRequest::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn block_status_round_trips(context: u32, runs in proptest::collection::vec((1u32.., any::<u32>()), 1..8)) {
            let d: Vec<_> = runs.into_iter().map(|(len, flags)| BlockDescriptor { len, flags }).collect();
            let chunk = encode_block_status(7, context, &d, true);
            let h = ChunkHeader::decode(&chunk[..CHUNK_HEADER_LEN]).unwrap();
            prop_assert_eq!(h.len as usize, chunk.len() - CHUNK_HEADER_LEN);
            prop_assert_eq!(decode_block_status(&chunk[CHUNK_HEADER_LEN..]), Ok((context, d)));
        }

        #[test]
        fn fixed_size_decoders_never_panic_with_valid_magic(
            tail in proptest::collection::vec(any::<u8>(), 24),
        ) {
            let mut req = REQUEST_MAGIC.to_be_bytes().to_vec();
            req.extend_from_slice(&tail);
            prop_assert!(Request::decode(&req).is_ok());
            let mut opt = IHAVEOPT.to_be_bytes().to_vec();
            opt.extend_from_slice(&tail[..8]);
            let _ = OptionHeader::decode(&opt);
        }

        #[test]
        fn request_round_trips(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, kind, cookie, offset, length };
            prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn option_header_round_trips(option: u32, len in 0..=MAX_OPTION_DATA) {
            let h = OptionHeader { option, len };
            prop_assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn replies_round_trip(error: u32, cookie: u64, flags: u16, kind: u16, len: u32) {
            let s = SimpleReply { error, cookie };
            prop_assert_eq!(SimpleReply::decode(&s.encode()), Ok(s));
            let c = ChunkHeader { flags, kind, cookie, len };
            prop_assert_eq!(ChunkHeader::decode(&c.encode()), Ok(c));
            let r = encode_option_reply(len, error, b"xyz");
            let h = OptionReplyHeader::decode(&r[..OPTION_REPLY_HEADER_LEN]).unwrap();
            prop_assert_eq!(h, OptionReplyHeader { option: len, reply: error, len: 3 });
        }

        #[test]
        fn info_request_round_trips(
            name in "[a-z0-9/._-]{0,64}",
            infos in proptest::collection::vec(any::<u16>(), 0..8),
        ) {
            let r = InfoRequest { name, infos };
            prop_assert_eq!(InfoRequest::decode(&r.encode()), Ok(r));
        }
    }
}
