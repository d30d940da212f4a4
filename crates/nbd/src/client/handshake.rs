//! The client's side of the handshake: fixed newstyle negotiation up to the transmission phase.
//!
//! Order of options: `NBD_OPT_STRUCTURED_REPLY`, then `NBD_OPT_SET_META_CONTEXT` for
//! `base:allocation` (only with structured replies), then `NBD_OPT_GO` with an
//! `NBD_INFO_BLOCK_SIZE` request, falling back to `NBD_OPT_EXPORT_NAME` when the server does not
//! know `NBD_OPT_GO`. A server without fixed newstyle gets `NBD_OPT_EXPORT_NAME` alone.
//!
//! With TLS, `NBD_OPT_STARTTLS` comes right after the client flags, before every stateful option
//! (a server forgets them once TLS starts); once the server acknowledges it, the TLS handshake
//! runs over the same stream and the upgraded stream replaces the plain one (which is why the
//! stream is taken and handed back by value) for the rest of the negotiation and the
//! transmission phase. A server that does not start TLS ends the handshake: there is no fallback
//! to plaintext.

use std::fmt;
use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::options::NbdClientTls;

use crate::proto::{
    self, InfoRequest, OptionHeader, OptionReplyHeader, client_flags, handshake_flags, info, opt, rep,
    transmission_flags,
};

/// A byte stream to a server (TCP, Unix socket, or anything else in tests).
pub(crate) type BoxedStream = r3map_net::security::BoxedIo;

/// The second magic of an old-style server (`cliserv_magic`).
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// The metadata context extents are read from.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";
/// Largest read or write payload sent in one request, whatever the server allows.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Replies one option may get before the server is considered to be stalling.
const MAX_REPLIES_PER_OPTION: usize = 256;
/// Largest minimum block size the protocol allows.
const MAX_MIN_BLOCK: u32 = 64 * 1024;

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags ([`proto::transmission_flags`]).
    pub flags: u16,
    /// Smallest addressable length and alignment (1 unless the server says otherwise).
    pub min_block: u32,
    /// Size at which aligned requests are efficient (4096 unless the server says otherwise).
    pub preferred_block: u32,
    /// Largest request the server handles (`u32::MAX` when it sets no limit).
    pub max_block: u32,
    /// Structured replies were negotiated.
    pub structured_replies: bool,
    /// The `base:allocation` metadata context was negotiated, so `NBD_CMD_BLOCK_STATUS` works.
    pub block_status: bool,
}

impl NbdExportInfo {
    fn new(size: u64, flags: u16) -> Self {
        // Without NBD_FLAG_HAS_FLAGS the other bits mean nothing.
        let flags = if flags & transmission_flags::HAS_FLAGS == 0 { 0 } else { flags };
        Self {
            size,
            flags,
            min_block: 1,
            preferred_block: 4096,
            max_block: u32::MAX,
            structured_replies: false,
            block_status: false,
        }
    }

    /// Whether the transmission flags include `flag`.
    #[must_use]
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// The largest read or write sent in one request: the server's maximum, at most
    /// [`MAX_PAYLOAD`], rounded down to a multiple of the minimum block size.
    #[must_use]
    pub fn max_payload(&self) -> u32 {
        round_down(self.max_block.min(MAX_PAYLOAD), self.min_block)
    }

    /// The largest `NBD_CMD_WRITE_ZEROES` or `NBD_CMD_CACHE` request (bound by the server's
    /// maximum block size, although they carry no payload).
    #[must_use]
    pub fn max_unpayloaded(&self) -> u32 {
        round_down(self.max_block, self.min_block)
    }

    /// The largest `NBD_CMD_TRIM` or `NBD_CMD_BLOCK_STATUS` request (not bound by the maximum).
    #[must_use]
    pub fn max_unbounded(&self) -> u32 {
        round_down(u32::MAX, self.min_block)
    }
}

/// `value` rounded down to a multiple of `unit` (a power of two), but at least `unit`.
fn round_down(value: u32, unit: u32) -> u32 {
    (value - value % unit).max(unit)
}

/// What negotiation settled on for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub info: NbdExportInfo,
    /// The id of `base:allocation` on this connection (ids are per connection).
    pub context: Option<u32>,
}

/// Why a handshake failed; `permanent` failures are not worth retrying with the same server.
#[derive(Debug)]
pub(crate) struct HandshakeError {
    pub error: io::Error,
    pub permanent: bool,
}

impl HandshakeError {
    fn refused(kind: io::ErrorKind, message: impl Into<String>) -> Self {
        Self { error: io::Error::new(kind, message.into()), permanent: true }
    }

    fn protocol(message: impl fmt::Display) -> Self {
        Self::refused(io::ErrorKind::InvalidData, format!("the server broke the NBD protocol: {message}"))
    }
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        let error = if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server closed the connection during the handshake",
            )
        } else {
            e
        };
        Self { error, permanent: false }
    }
}

type Result<T> = std::result::Result<T, HandshakeError>;

/// Negotiates `export` on a fresh connection, inside TLS when `tls` is given, and returns the
/// stream in transmission phase.
pub(crate) async fn negotiate(
    mut io: BoxedStream,
    export: &str,
    tls: Option<&NbdClientTls>,
) -> Result<(BoxedStream, Negotiated)> {
    let flags = greeting(&mut io).await?;
    let fixed = flags & handshake_flags::FIXED_NEWSTYLE != 0;
    let no_zeroes = flags & handshake_flags::NO_ZEROES != 0;
    let mut client = 0;
    if fixed {
        client |= client_flags::FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client |= client_flags::NO_ZEROES;
    }
    io.write_all(&client.to_be_bytes()).await?;
    let Some(tls) = tls else {
        return options(io, export, fixed, no_zeroes, false).await;
    };
    if !fixed {
        return Err(HandshakeError::refused(
            io::ErrorKind::Unsupported,
            "the server does not speak fixed newstyle negotiation, so it cannot start TLS, which \
             this connection requires (TLS never falls back to plaintext)",
        ));
    }
    let io = start_tls(io, tls).await?;
    options(io, export, true, no_zeroes, true).await.map_err(|e| after_tls(e, tls))
}

/// The options after the client flags (and after `NBD_OPT_STARTTLS`, when `tls`).
async fn options(
    mut io: BoxedStream,
    export: &str,
    fixed: bool,
    no_zeroes: bool,
    tls: bool,
) -> Result<(BoxedStream, Negotiated)> {
    if !fixed {
        // Plain newstyle servers know no other option.
        let info = export_name(&mut io, export, no_zeroes).await?;
        return Ok((io, Negotiated { info, context: None }));
    }
    let asking = Asking { export, tls };
    let structured = structured_replies(&mut io, asking).await?;
    let context = if structured { set_meta_context(&mut io, asking).await? } else { None };
    let negotiated = match go(&mut io, asking).await? {
        Some(mut info) => {
            info.structured_replies = structured;
            info.block_status = context.is_some();
            Negotiated { info, context }
        }
        None => {
            tracing::debug!("the NBD server does not know NBD_OPT_GO; using NBD_OPT_EXPORT_NAME");
            let mut info = export_name(&mut io, export, no_zeroes).await?;
            // The metadata context was set for NBD_OPT_GO; a server this old does not have one.
            info.structured_replies = structured;
            Negotiated { info, context: None }
        }
    };
    Ok((io, negotiated))
}

/// Reads the greeting; returns the handshake flags.
async fn greeting<S: AsyncRead + Unpin>(io: &mut S) -> Result<u16> {
    let mut first = [0u8; 8];
    io.read_exact(&mut first).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            HandshakeError::from(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the server closed the connection before sending the NBD greeting",
            ))
        } else {
            e.into()
        }
    })?;
    if u64::from_be_bytes(first) != proto::NBDMAGIC {
        return Err(HandshakeError::refused(
            io::ErrorKind::InvalidData,
            format!("it is not an NBD server: it sent {} instead of the NBDMAGIC greeting", shown(&first)),
        ));
    }
    let mut second = [0u8; 8];
    io.read_exact(&mut second).await?;
    match u64::from_be_bytes(second) {
        proto::IHAVEOPT => {}
        OLDSTYLE_MAGIC => {
            return Err(HandshakeError::refused(
                io::ErrorKind::Unsupported,
                "the server uses the old-style NBD handshake, which has no export names and which this \
                 client does not support; run it with newstyle negotiation",
            ));
        }
        other => return Err(HandshakeError::protocol(format!("unknown handshake magic {other:#018x}"))),
    }
    let mut flags = [0u8; 2];
    io.read_exact(&mut flags).await?;
    Ok(u16::from_be_bytes(flags))
}

/// Bytes for an error message: as text when printable, else in hex.
fn shown(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        format!("{:?}", String::from_utf8_lossy(bytes))
    } else {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

async fn send_option<S: AsyncWrite + Unpin>(io: &mut S, option: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("option data too long"))?;
    let mut message = OptionHeader { option, len }.encode().to_vec();
    message.extend_from_slice(data);
    io.write_all(&message).await?;
    io.flush().await?;
    Ok(())
}

/// One option reply, checked to answer `option`.
#[derive(Debug)]
struct OptionReply {
    reply: u32,
    data: Vec<u8>,
}

async fn read_reply<S: AsyncRead + Unpin>(io: &mut S, option: u32) -> Result<OptionReply> {
    let mut header = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    io.read_exact(&mut header).await?;
    let h = OptionReplyHeader::decode(&header)
        .map_err(|e| HandshakeError::protocol(format!("option reply: {e}")))?;
    if h.option != option {
        return Err(HandshakeError::protocol(format!(
            "it answered option {} while option {} ({}) was asked",
            h.option,
            option,
            option_name(option)
        )));
    }
    if h.len > proto::MAX_OPTION_DATA {
        return Err(HandshakeError::protocol(format!(
            "an option reply of {} bytes is longer than the limit of {}",
            h.len,
            proto::MAX_OPTION_DATA
        )));
    }
    let mut data = vec![0u8; h.len as usize];
    io.read_exact(&mut data).await?;
    Ok(OptionReply { reply: h.reply, data })
}

fn option_name(option: u32) -> &'static str {
    match option {
        opt::EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        opt::STARTTLS => "NBD_OPT_STARTTLS",
        opt::STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        opt::SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        opt::GO => "NBD_OPT_GO",
        _ => "an option",
    }
}

fn reply_name(reply: u32) -> String {
    match reply {
        rep::ERR_UNSUP => "NBD_REP_ERR_UNSUP".into(),
        rep::ERR_POLICY => "NBD_REP_ERR_POLICY".into(),
        rep::ERR_INVALID => "NBD_REP_ERR_INVALID".into(),
        rep::ERR_PLATFORM => "NBD_REP_ERR_PLATFORM".into(),
        rep::ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD".into(),
        rep::ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN".into(),
        rep::ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN".into(),
        rep::ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD".into(),
        rep::ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG".into(),
        other => format!("error {other:#x}"),
    }
}

/// The server's message in an error reply, as a suffix for an error of ours.
fn message_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let text = text.trim();
    if text.is_empty() { String::new() } else { format!(" (the server says: {text})") }
}

/// What the options are negotiated for.
#[derive(Debug, Clone, Copy)]
struct Asking<'a> {
    export: &'a str,
    /// TLS is running.
    tls: bool,
}

/// The error for an error reply that ends the handshake.
fn refusal(option: u32, reply: &OptionReply, asking: Asking<'_>) -> HandshakeError {
    use io::ErrorKind as K;
    let said = message_of(&reply.data);
    let export = asking.export;
    let (kind, message) = match reply.reply {
        rep::ERR_TLS_REQD if asking.tls => {
            return HandshakeError::protocol(format!(
                "it still requires TLS after starting it, in its answer to {}{said}",
                option_name(option)
            ));
        }
        rep::ERR_TLS_REQD => (
            K::Unsupported,
            format!(
                "the server requires TLS{said}: use an nbds:// URI (nbds+unix:// on a Unix socket) with \
                 the CA that signed its certificate (tls-certificates=DIR or ca=PATH)"
            ),
        ),
        rep::ERR_UNKNOWN => (K::NotFound, format!("the server has no export named '{export}'{said}")),
        rep::ERR_POLICY => (K::PermissionDenied, format!("the server refused the export '{export}'{said}")),
        rep::ERR_SHUTDOWN => {
            return HandshakeError {
                error: io::Error::new(K::ConnectionAborted, format!("the server is shutting down{said}")),
                permanent: false,
            };
        }
        other => (
            K::Other,
            format!("the server answered {} with {}{said}", option_name(option), reply_name(other)),
        ),
    };
    HandshakeError::refused(kind, message)
}

/// Checks an error reply to an option whose failure only costs a feature; `Err` for the replies
/// that end the handshake whatever the option (TLS required, shutting down).
fn optional_failure(option: u32, reply: &OptionReply, asking: Asking<'_>) -> Result<()> {
    if matches!(reply.reply, rep::ERR_TLS_REQD | rep::ERR_SHUTDOWN) {
        return Err(refusal(option, reply, asking));
    }
    tracing::debug!(
        option = option_name(option),
        reply = %reply_name(reply.reply),
        message = %String::from_utf8_lossy(&reply.data),
        "the NBD server declined an option"
    );
    Ok(())
}

fn unexpected(option: u32, reply: u32) -> HandshakeError {
    HandshakeError::protocol(format!("unexpected reply type {reply} to {}", option_name(option)))
}

/// `NBD_OPT_STRUCTURED_REPLY`: whether the server agreed.
async fn structured_replies<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    asking: Asking<'_>,
) -> Result<bool> {
    send_option(io, opt::STRUCTURED_REPLY, &[]).await?;
    let reply = read_reply(io, opt::STRUCTURED_REPLY).await?;
    match reply.reply {
        rep::ACK => Ok(true),
        r if rep::is_error(r) => optional_failure(opt::STRUCTURED_REPLY, &reply, asking).map(|()| false),
        r => Err(unexpected(opt::STRUCTURED_REPLY, r)),
    }
}

/// The data of `NBD_OPT_SET_META_CONTEXT`: the export and one query.
fn meta_context_request(export: &str, query: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(12 + export.len() + query.len());
    put_string(&mut data, export);
    data.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut data, query);
    data
}

/// A string preceded by its 32-bit length (callers pass names bounded by `MAX_NAME`).
fn put_string(out: &mut Vec<u8>, s: &str) {
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// `NBD_OPT_SET_META_CONTEXT` for `base:allocation`: its id, or `None` when the server has none.
async fn set_meta_context<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    asking: Asking<'_>,
) -> Result<Option<u32>> {
    send_option(io, opt::SET_META_CONTEXT, &meta_context_request(asking.export, BASE_ALLOCATION)).await?;
    let mut id = None;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_reply(io, opt::SET_META_CONTEXT).await?;
        match reply.reply {
            rep::ACK => return Ok(id),
            rep::META_CONTEXT => {
                let Some((head, name)) = reply.data.split_first_chunk::<4>() else {
                    return Err(HandshakeError::protocol("a metadata context reply shorter than 4 bytes"));
                };
                if name == BASE_ALLOCATION.as_bytes() {
                    id = Some(u32::from_be_bytes(*head));
                }
            }
            r if rep::is_error(r) => {
                // The contexts are dropped on failure; extents are then not available.
                return optional_failure(opt::SET_META_CONTEXT, &reply, asking).map(|()| None);
            }
            r => return Err(unexpected(opt::SET_META_CONTEXT, r)),
        }
    }
    Err(HandshakeError::protocol("too many replies to NBD_OPT_SET_META_CONTEXT"))
}

/// `NBD_OPT_GO`: the export's information once in transmission, `None` when the server does not
/// know the option.
async fn go<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    asking: Asking<'_>,
) -> Result<Option<NbdExportInfo>> {
    let request = InfoRequest { name: asking.export.to_owned(), infos: vec![info::BLOCK_SIZE] };
    send_option(io, opt::GO, &request.encode()).await?;
    let mut export_info = None;
    let mut block_sizes = None;
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let reply = read_reply(io, opt::GO).await?;
        match reply.reply {
            rep::INFO => match decode_info(&reply.data)? {
                Info::Export { size, flags } => export_info = Some(NbdExportInfo::new(size, flags)),
                Info::BlockSize(sizes) => block_sizes = Some(sizes),
                Info::Other => {}
            },
            rep::ACK => {
                let Some(mut info) = export_info else {
                    return Err(HandshakeError::protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"));
                };
                if let Some(BlockSizes { min, preferred, max }) = block_sizes {
                    (info.min_block, info.preferred_block, info.max_block) = (min, preferred, max);
                }
                return Ok(Some(info));
            }
            rep::ERR_UNSUP => return Ok(None),
            r if rep::is_error(r) => return Err(refusal(opt::GO, &reply, asking)),
            r => return Err(unexpected(opt::GO, r)),
        }
    }
    Err(HandshakeError::protocol("too many replies to NBD_OPT_GO"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlockSizes {
    min: u32,
    preferred: u32,
    max: u32,
}

#[derive(Debug, PartialEq, Eq)]
enum Info {
    Export { size: u64, flags: u16 },
    BlockSize(BlockSizes),
    Other,
}

/// Decodes the data of an `NBD_REP_INFO` reply.
fn decode_info(data: &[u8]) -> Result<Info> {
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    let Some((kind, rest)) = data.split_first_chunk::<2>() else {
        return Err(HandshakeError::protocol("an NBD_REP_INFO reply shorter than 2 bytes"));
    };
    match u16::from_be_bytes(*kind) {
        info::EXPORT => {
            let Ok(b) = <[u8; 10]>::try_from(rest) else {
                return Err(HandshakeError::protocol(format!("NBD_INFO_EXPORT of {} bytes", data.len())));
            };
            let size = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            Ok(Info::Export { size, flags: u16::from_be_bytes([b[8], b[9]]) })
        }
        info::BLOCK_SIZE => {
            if rest.len() != 12 {
                return Err(HandshakeError::protocol(format!("NBD_INFO_BLOCK_SIZE of {} bytes", data.len())));
            }
            let sizes = BlockSizes { min: be32(rest), preferred: be32(&rest[4..]), max: be32(&rest[8..]) };
            check_block_sizes(sizes)?;
            Ok(Info::BlockSize(BlockSizes { preferred: sizes.preferred.max(sizes.min), ..sizes }))
        }
        _ => Ok(Info::Other),
    }
}

fn check_block_sizes(s: BlockSizes) -> Result<()> {
    let ok = s.min.is_power_of_two()
        && s.min <= MAX_MIN_BLOCK
        && s.max >= s.min
        && (s.max == u32::MAX || s.max.is_multiple_of(s.min));
    if ok {
        Ok(())
    } else {
        Err(HandshakeError::protocol(format!(
            "impossible block sizes: minimum {}, preferred {}, maximum {}",
            s.min, s.preferred, s.max
        )))
    }
}

/// `NBD_OPT_STARTTLS`, then the TLS handshake over the same stream: the stream inside TLS.
async fn start_tls(mut io: BoxedStream, tls: &NbdClientTls) -> Result<BoxedStream> {
    send_option(&mut io, opt::STARTTLS, &[]).await?;
    let reply = read_reply(&mut io, opt::STARTTLS).await?;
    match reply.reply {
        rep::ACK => {}
        rep::ERR_SHUTDOWN => {
            return Err(refusal(opt::STARTTLS, &reply, Asking { export: "", tls: false }));
        }
        r if rep::is_error(r) => {
            return Err(HandshakeError::refused(
                io::ErrorKind::Unsupported,
                format!(
                    "the server does not start TLS: it answered NBD_OPT_STARTTLS with {}{}; this \
                     connection requires TLS and never falls back to plaintext",
                    reply_name(r),
                    message_of(&reply.data)
                ),
            ));
        }
        r => return Err(unexpected(opt::STARTTLS, r)),
    }
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
    match connector.connect(tls.server_name.clone(), io).await {
        Ok(stream) => Ok(Box::new(stream)),
        Err(e) => Err(tls_failure(&e, tls)),
    }
}

/// What to do about the missing or refused client certificate, for errors where that may be the
/// cause.
fn client_certificate_hint(tls: &NbdClientTls) -> &'static str {
    if tls.has_client_certificate() {
        "the server may not trust this client's certificate"
    } else {
        "the server may require a client certificate: put client-cert.pem and client-key.pem in the \
         tls-certificates directory, or add cert=PATH and key=PATH"
    }
}

/// The error for a failed TLS handshake (or a TLS alert right after it). TLS errors (an
/// untrusted or misnamed certificate, an alert from the server) are permanent; a connection
/// that merely broke is not.
fn tls_failure(e: &io::Error, tls: &NbdClientTls) -> HandshakeError {
    use rustls::{AlertDescription as A, CertificateError as C};
    let Some(inner) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        let error = match e.kind() {
            io::ErrorKind::UnexpectedEof => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "the server closed the connection during the TLS handshake; {}",
                    client_certificate_hint(tls)
                ),
            ),
            kind if hung_up(kind) => io::Error::new(
                kind,
                format!("the TLS handshake failed ({e}); {}", client_certificate_hint(tls)),
            ),
            kind => io::Error::new(kind, format!("the TLS handshake failed: {e}")),
        };
        return HandshakeError { error, permanent: false };
    };
    let name = tls.server_name.to_str();
    let message = match inner {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            format!(
                "the server's TLS certificate is not valid for the name '{name}' ({inner}); give the \
                 name it was issued for with tls-hostname=NAME"
            )
        }
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => format!(
            "the server's TLS certificate is not signed by the CA this client trusts ({inner}); check \
             ca-cert.pem in the tls-certificates directory, or ca=PATH"
        ),
        rustls::Error::InvalidCertificate(_) => {
            format!("the server's TLS certificate is not acceptable: {inner}")
        }
        rustls::Error::AlertReceived(
            alert @ (A::CertificateRequired
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::HandshakeFailure),
        ) => format!(
            "the server refused the TLS connection (alert {alert:?}): {}",
            client_certificate_hint(tls)
        ),
        rustls::Error::AlertReceived(alert) => {
            format!("the server refused the TLS connection (alert {alert:?})")
        }
        other => format!("TLS with the server failed: {other}"),
    };
    HandshakeError::refused(io::ErrorKind::PermissionDenied, message)
}

/// Explains a failure of the options sent inside TLS: TLS alerts (a server refuses a client
/// certificate only after the client's side of the TLS handshake is over), and a server that
/// hangs up.
fn after_tls(e: HandshakeError, tls: &NbdClientTls) -> HandshakeError {
    if e.permanent {
        return e;
    }
    if e.error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()).is_some() {
        return tls_failure(&e.error, tls);
    }
    let kind = e.error.kind();
    if !hung_up(kind) {
        return e;
    }
    let message = format!(
        "the connection broke right after TLS started ({}); {}",
        e.error,
        client_certificate_hint(tls)
    );
    HandshakeError { error: io::Error::new(kind, message), permanent: false }
}

/// Whether an error kind is the server hanging up.
fn hung_up(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// `NBD_OPT_EXPORT_NAME`, which the server answers with the export or by hanging up.
async fn export_name<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    export: &str,
    no_zeroes: bool,
) -> Result<NbdExportInfo> {
    send_option(io, opt::EXPORT_NAME, export.as_bytes()).await?;
    let mut reply = [0u8; 10];
    if let Err(e) = io.read_exact(&mut reply).await {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            return Err(HandshakeError::refused(
                io::ErrorKind::NotFound,
                format!(
                    "the server closed the connection when asked for the export '{export}': it has no such export, or refused it"
                ),
            ));
        }
        return Err(e.into());
    }
    if !no_zeroes {
        let mut zeroes = [0u8; proto::EXPORT_NAME_PADDING];
        io.read_exact(&mut zeroes).await?;
    }
    let size =
        u64::from_be_bytes([reply[0], reply[1], reply[2], reply[3], reply[4], reply[5], reply[6], reply[7]]);
    Ok(NbdExportInfo::new(size, u16::from_be_bytes([reply[8], reply[9]])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_greeting, encode_info_block_size, encode_info_export, encode_option_reply};
    use tokio::io::AsyncReadExt;

    const FLAGS: u16 = transmission_flags::HAS_FLAGS | transmission_flags::SEND_FLUSH;

    /// Runs `negotiate` against a scripted server that sends `script` and records what the client
    /// sent.
    fn run(script: &[u8], export: &str) -> (Result<Negotiated>, Vec<u8>) {
        let rt = r3map_net::Io::shared();
        rt.block_on(async {
            let (client, mut server) = tokio::io::duplex(1 << 20);
            server.write_all(script).await.unwrap();
            server.shutdown().await.unwrap();
            let result = negotiate(Box::new(client), export, None).await.map(|(_, n)| n);
            let mut sent = Vec::new();
            server.read_to_end(&mut sent).await.unwrap();
            (result, sent)
        })
    }

    fn greeting(flags: u16) -> Vec<u8> {
        encode_greeting(flags).to_vec()
    }

    fn newstyle() -> Vec<u8> {
        greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES)
    }

    fn go_ok(size: u64, flags: u16, block: Option<(u32, u32, u32)>) -> Vec<u8> {
        let mut s = encode_option_reply(opt::GO, rep::INFO, &encode_info_export(size, flags));
        if let Some((min, pref, max)) = block {
            s.extend(encode_option_reply(opt::GO, rep::INFO, &encode_info_block_size(min, pref, max)));
        }
        s.extend(encode_option_reply(opt::GO, rep::ACK, &[]));
        s
    }

    fn meta(id: u32, name: &str) -> Vec<u8> {
        let mut data = id.to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        encode_option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &data)
    }

    fn failed(r: Result<Negotiated>) -> io::Error {
        r.expect_err("the handshake must fail").error
    }

    #[test]
    fn full_negotiation() {
        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        s.extend(meta(7, "base:allocation"));
        s.extend(encode_option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        s.extend(go_ok(1 << 20, FLAGS, Some((512, 4096, 1 << 20))));
        let (r, sent) = run(&s, "disk");
        let n = r.unwrap();
        assert_eq!(n.context, Some(7));
        assert_eq!(
            n.info,
            NbdExportInfo {
                size: 1 << 20,
                flags: FLAGS,
                min_block: 512,
                preferred_block: 4096,
                max_block: 1 << 20,
                structured_replies: true,
                block_status: true,
            }
        );
        assert_eq!(n.info.max_payload(), 1 << 20);
        assert_eq!(&sent[..4], &(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes());
        let header = OptionHeader::decode(&sent[4..20]).unwrap();
        assert_eq!(header, OptionHeader { option: opt::STRUCTURED_REPLY, len: 0 });
        let header = OptionHeader::decode(&sent[20..36]).unwrap();
        assert_eq!(header.option, opt::SET_META_CONTEXT);
        let meta_data = &sent[36..36 + header.len as usize];
        assert_eq!(meta_data, meta_context_request("disk", BASE_ALLOCATION));
        let rest = &sent[36 + header.len as usize..];
        let header = OptionHeader::decode(&rest[..16]).unwrap();
        assert_eq!(header.option, opt::GO);
        let request = InfoRequest::decode(&rest[16..]).unwrap();
        assert_eq!(request, InfoRequest { name: "disk".into(), infos: vec![info::BLOCK_SIZE] });
    }

    #[test]
    fn meta_context_request_layout() {
        let d = meta_context_request("ab", "x:y");
        assert_eq!(d, [&[0, 0, 0, 2][..], b"ab", &[0, 0, 0, 1], &[0, 0, 0, 3], b"x:y"].concat());
    }

    #[test]
    fn declined_options_cost_only_features() {
        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, b"no"));
        s.extend(go_ok(4096, FLAGS, None));
        let n = run(&s, "").0.unwrap();
        assert!(!n.info.structured_replies && !n.info.block_status);
        assert_eq!((n.info.min_block, n.info.max_payload()), (1, MAX_PAYLOAD));

        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        s.extend(encode_option_reply(opt::SET_META_CONTEXT, rep::ERR_UNSUP, &[]));
        s.extend(go_ok(4096, FLAGS, None));
        let n = run(&s, "").0.unwrap();
        assert!(n.info.structured_replies && !n.info.block_status);

        // A context the client did not ask for is not taken for base:allocation.
        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        s.extend(meta(3, "qemu:dirty-bitmap:x"));
        s.extend(encode_option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        s.extend(go_ok(4096, FLAGS, None));
        assert_eq!(run(&s, "").0.unwrap().context, None);
    }

    #[test]
    fn go_unsupported_falls_back_to_export_name() {
        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]));
        s.extend(encode_option_reply(opt::GO, rep::ERR_UNSUP, &[]));
        s.extend(proto::encode_export_name_reply(8192, FLAGS, true));
        let (r, sent) = run(&s, "old");
        let n = r.unwrap();
        assert_eq!((n.info.size, n.info.flags), (8192, FLAGS));
        assert!(sent.ends_with(b"old"), "the export name option comes last");
    }

    #[test]
    fn servers_without_fixed_newstyle_or_no_zeroes() {
        let mut s = greeting(0);
        s.extend(proto::encode_export_name_reply(512, FLAGS, false));
        let (r, sent) = run(&s, "e");
        assert_eq!(r.unwrap().info.size, 512);
        assert_eq!(&sent[..4], &[0, 0, 0, 0], "no client flags the server did not offer");
        assert_eq!(OptionHeader::decode(&sent[4..20]).unwrap().option, opt::EXPORT_NAME);

        let mut s = greeting(handshake_flags::FIXED_NEWSTYLE);
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]));
        s.extend(encode_option_reply(opt::GO, rep::ERR_UNSUP, &[]));
        s.extend(proto::encode_export_name_reply(512, FLAGS, false));
        let (r, sent) = run(&s, "");
        assert_eq!(r.unwrap().info.size, 512);
        assert_eq!(&sent[..4], &client_flags::FIXED_NEWSTYLE.to_be_bytes());
    }

    #[test]
    fn clear_errors() {
        let e = failed(run(b"HTTP/1.1 400 Bad Request\r\n", "").0);
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("not an NBD server") && e.to_string().contains("HTTP/1.1"), "{e}");

        let mut s = proto::NBDMAGIC.to_be_bytes().to_vec();
        s.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        let e = failed(run(&s, "").0);
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("old-style"), "{e}");

        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_TLS_REQD, b"TLS first"));
        let e = failed(run(&s, "").0);
        assert!(e.to_string().contains("requires TLS") && e.to_string().contains("TLS first"), "{e}");
        assert!(e.to_string().contains("use an nbds:// URI"), "{e}");

        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]));
        s.extend(encode_option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        s.extend(encode_option_reply(opt::GO, rep::ERR_UNKNOWN, b"no such thing"));
        let e = failed(run(&s, "missing").0);
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("no export named 'missing'"), "{e}");

        // A server that hangs up on NBD_OPT_EXPORT_NAME.
        let e = failed(run(&greeting(0), "gone").0);
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("'gone'"), "{e}");

        // Closed before the greeting.
        let e = run(&[], "").0.unwrap_err();
        assert!(!e.permanent);
        assert!(e.error.to_string().contains("before sending the NBD greeting"), "{}", e.error);
    }

    #[test]
    fn protocol_violations_in_the_handshake() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (encode_option_reply(opt::GO, rep::ACK, &[]), "while option 8"),
            (encode_option_reply(opt::STRUCTURED_REPLY, rep::SERVER, &[]), "unexpected reply type"),
            (
                {
                    let mut s = encode_option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
                    s.extend(encode_option_reply(opt::SET_META_CONTEXT, rep::META_CONTEXT, &[1, 2]));
                    s
                },
                "shorter than 4 bytes",
            ),
            (
                {
                    let mut s = encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]);
                    s.extend(encode_option_reply(opt::GO, rep::ACK, &[]));
                    s
                },
                "without NBD_INFO_EXPORT",
            ),
            (
                {
                    let mut s = encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]);
                    s.extend(go_ok(4096, FLAGS, Some((3, 4096, 4096))));
                    s
                },
                "impossible block sizes",
            ),
            (
                {
                    let mut s = encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_UNSUP, &[]);
                    s.extend(encode_option_reply(opt::GO, rep::INFO, &[0, 0, 1]));
                    s
                },
                "NBD_INFO_EXPORT of 3 bytes",
            ),
            (
                {
                    let mut h = encode_option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
                    h[16..20].copy_from_slice(&(proto::MAX_OPTION_DATA + 1).to_be_bytes());
                    h
                },
                "longer than the limit",
            ),
        ];
        for (replies, expected) in cases {
            let mut s = newstyle();
            s.extend(replies);
            let e = failed(run(&s, "").0);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            assert!(e.to_string().contains(expected), "{expected}: {e}");
        }
    }

    // TLS

    /// A CA, and TLS for a client trusting it (with a client certificate when `identity`) that
    /// checks the name `name`; a server configuration for `localhost` (requiring client
    /// certificates when `client_auth`).
    fn pki(name: &str, identity: bool, client_auth: bool) -> (NbdClientTls, Arc<rustls::ServerConfig>) {
        let ca = r3map_net::certs::Authority::new("handshake test CA").unwrap();
        let server = ca.server(&["localhost"]).unwrap();
        let client = ca.client("tester").unwrap();
        let ca_pem = ca.pem().cert.as_bytes();
        let identity = identity.then_some((client.cert.as_bytes(), client.key.as_bytes()));
        let tls = NbdClientTls::from_pem(ca_pem, identity, name).unwrap();
        let client_ca = client_auth.then_some(ca_pem);
        let config = r3map_net::server_tls(server.cert.as_bytes(), server.key.as_bytes(), client_ca).unwrap();
        (tls, config)
    }

    /// What a scripted TLS server saw: the plaintext before TLS, and what came inside TLS.
    #[derive(Debug, Default)]
    struct Seen {
        plain: Vec<u8>,
        inside: Vec<u8>,
    }

    /// Runs `negotiate` with `tls` against a server that greets with fixed newstyle, reads the
    /// client flags and `NBD_OPT_STARTTLS`, acknowledges it, accepts TLS with `config` and sends
    /// `script` inside it.
    fn run_tls(
        tls: &NbdClientTls,
        config: Arc<rustls::ServerConfig>,
        script: &[u8],
    ) -> (Result<Negotiated>, Seen) {
        let rt = r3map_net::Io::shared();
        rt.block_on(async {
            let (client, mut server) = tokio::io::duplex(1 << 20);
            let script = script.to_vec();
            let server = tokio::spawn(async move {
                let mut seen = Seen::default();
                server.write_all(&newstyle()).await.unwrap();
                let mut start = [0u8; 4 + 16];
                server.read_exact(&mut start).await.unwrap();
                seen.plain.extend_from_slice(&start);
                server.write_all(&encode_option_reply(opt::STARTTLS, rep::ACK, &[])).await.unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let Ok(mut stream) = acceptor.accept(server).await else {
                    return seen;
                };
                stream.write_all(&script).await.unwrap();
                stream.flush().await.unwrap();
                let _ = stream.read_to_end(&mut seen.inside).await;
                seen
            });
            let result = negotiate(Box::new(client), "disk", Some(tls)).await.map(|(io, n)| {
                drop(io);
                n
            });
            (result, server.await.unwrap())
        })
    }

    fn negotiation_script() -> Vec<u8> {
        let mut s = encode_option_reply(opt::STRUCTURED_REPLY, rep::ACK, &[]);
        s.extend(meta(2, "base:allocation"));
        s.extend(encode_option_reply(opt::SET_META_CONTEXT, rep::ACK, &[]));
        s.extend(go_ok(1 << 20, FLAGS, None));
        s
    }

    #[test]
    fn starttls_comes_first_and_negotiation_continues_inside_tls() {
        let (tls, config) = pki("localhost", false, false);
        let (r, seen) = run_tls(&tls, config, &negotiation_script());
        let n = r.unwrap();
        assert_eq!((n.info.size, n.context), (1 << 20, Some(2)));
        assert!(n.info.structured_replies && n.info.block_status);
        assert_eq!(&seen.plain[..4], &(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes());
        let header = OptionHeader::decode(&seen.plain[4..20]).unwrap();
        assert_eq!(header, OptionHeader { option: opt::STARTTLS, len: 0 });
        // The other options went inside TLS, starting over.
        let header = OptionHeader::decode(&seen.inside[..16]).unwrap();
        assert_eq!(header, OptionHeader { option: opt::STRUCTURED_REPLY, len: 0 });
        assert!(seen.inside.windows(4).any(|w| w == b"disk"), "the export is named inside TLS");
    }

    #[test]
    fn tls_failures_are_permanent_and_name_the_cause() {
        // A certificate for another name.
        let (tls, config) = pki("disk.example", false, false);
        let e = run_tls(&tls, config, &[]).0.unwrap_err();
        assert!(e.permanent);
        assert_eq!(e.error.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.error.to_string().contains("not valid for the name 'disk.example'"), "{}", e.error);
        // A certificate from another CA.
        let (_, config) = pki("localhost", false, false);
        let (tls, _) = pki("localhost", false, false);
        let e = run_tls(&tls, config, &[]).0.unwrap_err();
        assert!(e.permanent);
        assert!(e.error.to_string().contains("not signed by the CA this client trusts"), "{}", e.error);
        // A server that wants a client certificate refuses once the client's side is done.
        let (tls, config) = pki("localhost", false, true);
        let e = run_tls(&tls, config, &negotiation_script()).0.unwrap_err();
        assert!(e.permanent);
        assert_eq!(e.error.kind(), io::ErrorKind::PermissionDenied);
        let text = e.error.to_string();
        assert!(
            text.contains("CertificateRequired") && text.contains("may require a client certificate"),
            "{text}"
        );
        // With one, it is served.
        let (tls, config) = pki("localhost", true, true);
        assert!(tls.has_client_certificate());
        assert_eq!(run_tls(&tls, config, &negotiation_script()).0.unwrap().info.size, 1 << 20);
    }

    #[test]
    fn a_server_that_still_wants_tls_inside_tls_breaks_the_protocol() {
        let (tls, config) = pki("localhost", false, false);
        let script = encode_option_reply(opt::STRUCTURED_REPLY, rep::ERR_TLS_REQD, &[]);
        let e = run_tls(&tls, config, &script).0.unwrap_err();
        assert_eq!(e.error.kind(), io::ErrorKind::InvalidData);
        assert!(e.error.to_string().contains("still requires TLS"), "{}", e.error);
    }

    /// Runs `negotiate` with TLS against a scripted plaintext server.
    fn run_refused_tls(script: &[u8]) -> (Result<Negotiated>, Vec<u8>) {
        let (tls, _) = pki("localhost", false, false);
        let rt = r3map_net::Io::shared();
        rt.block_on(async {
            let (client, mut server) = tokio::io::duplex(1 << 20);
            server.write_all(script).await.unwrap();
            server.shutdown().await.unwrap();
            let result = negotiate(Box::new(client), "", Some(&tls)).await.map(|(_, n)| n);
            let mut sent = Vec::new();
            server.read_to_end(&mut sent).await.unwrap();
            (result, sent)
        })
    }

    #[test]
    fn tls_never_falls_back_to_plaintext() {
        for (reply, said) in [(rep::ERR_POLICY, &b"no TLS here"[..]), (rep::ERR_UNSUP, b"")] {
            let mut s = newstyle();
            s.extend(encode_option_reply(opt::STARTTLS, reply, said));
            s.extend(go_ok(4096, FLAGS, None));
            let (r, sent) = run_refused_tls(&s);
            let e = r.unwrap_err();
            assert!(e.permanent);
            assert_eq!(e.error.kind(), io::ErrorKind::Unsupported);
            let text = e.error.to_string();
            assert!(text.contains("does not start TLS") && text.contains(&reply_name(reply)), "{text}");
            assert!(text.contains("never falls back to plaintext"), "{text}");
            assert!(said.is_empty() || text.contains("no TLS here"), "{text}");
            assert_eq!(sent.len(), 4 + 16, "nothing follows the refused NBD_OPT_STARTTLS");
        }
        // A server without fixed newstyle cannot start TLS: nothing is asked of it.
        let (r, sent) = run_refused_tls(&greeting(handshake_flags::NO_ZEROES));
        let e = r.unwrap_err();
        assert_eq!(e.error.kind(), io::ErrorKind::Unsupported);
        assert!(e.error.to_string().contains("fixed newstyle"), "{}", e.error);
        assert_eq!(sent, client_flags::NO_ZEROES.to_be_bytes());
        // A server shutting down may be asked again later.
        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STARTTLS, rep::ERR_SHUTDOWN, &[]));
        assert!(!run_refused_tls(&s).0.unwrap_err().permanent);
        // A server that hangs up instead of answering.
        let e = run_refused_tls(&newstyle()).0.unwrap_err();
        assert!(!e.permanent);
        assert_eq!(e.error.kind(), io::ErrorKind::ConnectionAborted);
        // An answer that is neither.
        let mut s = newstyle();
        s.extend(encode_option_reply(opt::STARTTLS, rep::SERVER, &[]));
        let e = run_refused_tls(&s).0.unwrap_err();
        assert!(e.error.to_string().contains("unexpected reply type 2 to NBD_OPT_STARTTLS"), "{}", e.error);
    }

    #[test]
    fn broken_tls_connections_are_explained() {
        let (tls, _) = pki("localhost", false, false);
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let e = tls_failure(&reset, &tls);
        assert!(!e.permanent);
        assert!(e.error.to_string().contains("may require a client certificate"), "{}", e.error);
        let e = after_tls(HandshakeError::from(io::Error::from(io::ErrorKind::UnexpectedEof)), &tls);
        assert!(!e.permanent);
        assert_eq!(e.error.kind(), io::ErrorKind::ConnectionAborted);
        assert!(e.error.to_string().contains("right after TLS started"), "{}", e.error);
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::DecodeError),
        );
        let e = after_tls(HandshakeError::from(alert), &tls);
        assert!(e.permanent);
        assert!(e.error.to_string().contains("alert DecodeError"), "{}", e.error);
        let (with_cert, _) = pki("localhost", true, false);
        let e = tls_failure(&io::Error::from(io::ErrorKind::BrokenPipe), &with_cert);
        assert!(e.error.to_string().contains("may not trust this client's certificate"), "{}", e.error);
        let other = io::Error::from(io::ErrorKind::TimedOut);
        assert_eq!(after_tls(HandshakeError::from(other), &tls).error.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn payload_limits_respect_block_sizes() {
        let mut i = NbdExportInfo::new(1 << 30, FLAGS);
        assert_eq!(
            (i.max_payload(), i.max_unpayloaded(), i.max_unbounded()),
            (MAX_PAYLOAD, u32::MAX, u32::MAX)
        );
        (i.min_block, i.max_block) = (4096, 65536);
        assert_eq!((i.max_payload(), i.max_unpayloaded()), (65536, 65536));
        assert_eq!(i.max_unbounded(), u32::MAX - 4095);
        i.max_block = u32::MAX;
        assert_eq!((i.max_payload(), i.max_unpayloaded()), (MAX_PAYLOAD, u32::MAX - 4095));
        assert_eq!(NbdExportInfo::new(1, 0xff00).flags, 0, "flags without HAS_FLAGS mean nothing");
    }
}
