//! The server: fixed newstyle negotiation, then transmission with requests run concurrently.
//!
//! Accepting, the connection set and shutdown (stop accepting, let requests in flight finish,
//! then flush every export) are [`r3map_net::serve`]'s. After negotiation, a plaintext socket is
//! served by the threaded driver (`threaded`); any other stream (TLS, or one handed in) by
//! [`serve::transmission`] with NBD's codec: requests run at once on tokio's blocking pool and
//! are answered in the order they complete, and a connection holds at most
//! [`MAX_IN_FLIGHT_BYTES`] of request and reply buffers. This file is negotiation, the codec and
//! the configuration; running a request is `exec`'s.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use r3map_core::Capabilities;
use r3map_net::serve::{self, Decoded, Handshake, Limits, Stop, Stopper};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};

use crate::exec::{Conn, check, error_reply, execute};
pub use crate::exec::{SHUTDOWN_GRACE, errno_of};
pub use crate::export::{BlockSizes, ConfigError, MIN_BLOCK, NbdExport, PREFERRED_BLOCK};
use crate::proto::{
    self, Command, InfoRequest, MetaContextRequest, OptionHeader, ProtoError, Request, handshake_flags, info,
    opt, rep,
};
use crate::status::{self, Context};
use crate::threaded::{self, Socket};

/// How long a client may take from connecting to entering transmission.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most options one client may send before the server gives up on it.
pub const MAX_OPTIONS: usize = 128;
/// Request and reply bytes one connection may hold at once; further requests wait to be read.
pub const MAX_IN_FLIGHT_BYTES: u32 = 128 * 1024 * 1024;
/// Threads a plaintext connection uses by default: requests it runs at once. On a backend that
/// answers from memory more threads only add context switches (16 ran 10-20 % slower than 8 on
/// two cores); a backend with a long latency per call wants more, see
/// [`NbdServer::with_threads`].
pub const DEFAULT_THREADS: usize = 8;

/// Request and reply buffers each thread of a kernel connection allocates before it serves
/// ([`NbdServer::serve_transmission`]): requests up to this size then allocate nothing. The
/// kernel's swap requests are single pages or short runs of them. A larger request is served
/// too: its thread grows its buffers once and keeps them (up to 4 MiB).
pub const KERNEL_BUFFER: usize = 256 * 1024;

/// Unit of the per-connection in-flight budget.
const BUDGET_UNIT: u32 = 64 * 1024;

/// Whether clients must upgrade to TLS with `NBD_OPT_STARTTLS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// Every option but `STARTTLS` and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until the
    /// client has upgraded (on TCP; Unix sockets and handed-over streams offer TLS without
    /// requiring it, as the native protocol does).
    Require,
    /// Clients may upgrade or not.
    Allow,
}

/// TLS for `NBD_OPT_STARTTLS`: a rustls configuration (from
/// [`r3map_net::server_tls`], so the native protocol's certificates work here too, with client
/// certificates for authentication) and the policy.
#[derive(Clone)]
pub struct NbdTls {
    pub config: Arc<rustls::ServerConfig>,
    pub mode: TlsMode,
}

impl fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdTls").field("mode", &self.mode).finish_non_exhaustive()
    }
}

/// Why a connection ended before or outside a clean disconnect.
#[derive(Debug, Error)]
pub enum ConnectionError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("the client broke the protocol: {0}")]
    Protocol(#[from] ProtoError),
    #[error("the client asked for the export '{0}', which does not exist")]
    UnknownExport(String),
    #[error("the client sent more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("the client did not finish the handshake within {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout,
    #[error("the client chose an export without starting TLS, which this server requires")]
    TlsRequired,
    #[error("the TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// An NBD server for one or more exports. Cheap to clone; serve it on as many listeners as you
/// like.
#[derive(Clone)]
pub struct NbdServer {
    exports: Arc<Vec<NbdExport>>,
    tls: Option<NbdTls>,
    threads: usize,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.exports)
            .field("tls", &self.tls)
            .field("threads", &self.threads)
            .finish()
    }
}

/// What negotiation settled on.
struct Session {
    export: usize,
    structured: bool,
    /// The selected metadata contexts; context id `i + 1` is `contexts[i]`.
    contexts: Vec<Context>,
}

/// Option haggling state that `NBD_OPT_STARTTLS` resets.
#[derive(Default)]
struct Haggle {
    structured: bool,
    /// The export `NBD_OPT_SET_META_CONTEXT` named and what it selected.
    meta: Option<(usize, Vec<Context>)>,
}

impl Haggle {
    fn session(self, export: usize) -> Session {
        let contexts = match self.meta {
            Some((e, contexts)) if e == export => contexts,
            _ => Vec::new(),
        };
        Session { export, structured: self.structured, contexts }
    }
}

/// Any stream a connection can run over.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// What a connection runs over: the plaintext socket it was accepted on (which the threaded
/// driver takes over after negotiation), or another stream (TLS over one of those, or what
/// [`NbdServer::serve_stream`] was given), which the async driver serves.
enum Link {
    Plain(serve::Stream),
    Other(Box<dyn Stream>),
}

impl Link {
    /// The plaintext socket, in blocking mode, for the threaded driver; `Err` gives back any
    /// other stream.
    fn into_plain_socket(self) -> io::Result<Result<Socket, Link>> {
        Ok(Ok(match self {
            Self::Plain(serve::Stream::Tcp(tcp)) => {
                let s = tcp.into_std()?;
                s.set_nonblocking(false)?;
                Socket::Tcp(s)
            }
            Self::Plain(serve::Stream::Unix(unix)) => {
                let s = unix.into_std()?;
                s.set_nonblocking(false)?;
                Socket::Unix(s)
            }
            other @ Self::Other(_) => return Ok(Err(other)),
        }))
    }
}

/// Runs `$body` with `$s` bound to the stream inside `$link`, pinned.
macro_rules! on_link {
    ($link:expr, $s:ident => $body:expr) => {
        match $link.get_mut() {
            Link::Plain(p) => {
                let $s = std::pin::Pin::new(p);
                $body
            }
            Link::Other(o) => {
                let $s = std::pin::Pin::new(o);
                $body
            }
        }
    };
}

impl AsyncRead for Link {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        on_link!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Link {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        on_link!(self, s => s.poll_write(cx, buf))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        on_link!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        on_link!(self, s => s.poll_shutdown(cx))
    }
}

/// How a negotiation ended.
enum Negotiated {
    Transmit(Session, Link),
    /// The client aborted or hung up.
    Left,
}

impl NbdServer {
    /// # Errors
    /// No exports, a name used twice or a name longer than 4096 bytes.
    pub fn new(exports: Vec<NbdExport>) -> Result<Self, ConfigError> {
        if exports.is_empty() {
            return Err(ConfigError::NoExports);
        }
        for (i, e) in exports.iter().enumerate() {
            if e.name.len() > proto::MAX_NAME {
                return Err(ConfigError::NameTooLong);
            }
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(ConfigError::DuplicateName(e.name.clone()));
            }
        }
        Ok(Self { exports: Arc::new(exports), tls: None, threads: DEFAULT_THREADS })
    }

    /// How many requests of one plaintext connection run at once, each on its own thread
    /// (started as they are needed; at least 1). Raise it for backends with a long latency per
    /// call: a connection moves at most `threads` requests per round trip of the backend.
    #[must_use]
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Offers TLS with `NBD_OPT_STARTTLS` (and requires it on TCP when `tls.mode` says so).
    #[must_use]
    pub fn with_tls(mut self, tls: NbdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The exports, in the order given.
    #[must_use]
    pub fn exports(&self) -> &[NbdExport] {
        &self.exports
    }

    /// Serves TCP connections until `shutdown` completes, then finishes requests in flight and
    /// flushes every export. With [`TlsMode::Require`], clients must start TLS first.
    ///
    /// # Errors
    /// A failed final flush.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        serve::serve(self, listener.into(), shutdown).await
    }

    /// Serves Unix socket connections until `shutdown` completes, as [`NbdServer::serve_tcp`].
    /// TLS is offered when configured, never required: the socket file's permissions guard it.
    ///
    /// # Errors
    /// A failed final flush.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        serve::serve(self, listener.into(), shutdown).await
    }

    /// Serves one connected stream until the client disconnects or `shutdown` completes (requests
    /// in flight still finish). Does not flush the exports beyond what the client asks for. TLS
    /// is offered when configured, never required.
    ///
    /// # Errors
    /// What ended the connection, when it was not a clean disconnect.
    pub async fn serve_stream<S>(
        &self,
        stream: S,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let stopper = Stopper::new();
        let conn = self.serve_link(Link::Other(Box::new(stream)), stopper.token(), false);
        tokio::pin!(conn, shutdown);
        tokio::select! {
            r = &mut conn => r,
            () = &mut shutdown => {
                stopper.stop();
                conn.await
            }
        }
    }

    /// Serves the transmission phase alone on `socket` for the export `export`: what the kernel's
    /// NBD client expects of a socket handed to it (by netlink or ioctl) together with the
    /// device's size and flags, since it never negotiates. Replies are simple ones (the kernel
    /// asks for no structured replies). Runs until the client sends `DISC`, the socket closes, or
    /// `shutdown` completes (requests in flight still finish).
    ///
    /// Every thread of the connection starts, with buffers of [`KERNEL_BUFFER`] bytes, before
    /// the first request is read: the kernel may be swapping to this process because memory is
    /// short, so serving its requests must not need new memory.
    ///
    /// # Errors
    /// `UnknownExport`; what ended the connection, when it was not a clean disconnect.
    pub async fn serve_transmission(
        &self,
        socket: std::os::unix::net::UnixStream,
        export: &str,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ConnectionError> {
        let Some(export) = self.exports.iter().find(|e| e.name == export).cloned() else {
            return Err(ConnectionError::UnknownExport(export.to_owned()));
        };
        socket.set_nonblocking(false)?;
        let conn = Conn { export, structured: false, contexts: Vec::new() };
        let stopper = Stopper::new();
        let start = threaded::Start::Eager { buffer: KERNEL_BUFFER };
        let serve = threaded::transmission(
            threaded::Socket::Unix(socket),
            conn,
            self.threads,
            start,
            stopper.token(),
        );
        tokio::pin!(serve, shutdown);
        tokio::select! {
            r = &mut serve => r.map_err(ConnectionError::from),
            () = &mut shutdown => {
                stopper.stop();
                serve.await.map_err(ConnectionError::from)
            }
        }
    }

    /// Flushes every export's backend.
    ///
    /// # Errors
    /// The first failed flush.
    pub async fn flush_all(&self) -> io::Result<()> {
        let exports = Arc::clone(&self.exports);
        tokio::task::spawn_blocking(move || {
            r3map_core::flush_each(exports.iter().map(|e| (e.name.as_str(), &*e.backend)))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Negotiates on `stream`, then serves transmission on it.
    async fn serve_link(&self, stream: Link, stop: Stop, require_tls: bool) -> Result<(), ConnectionError> {
        let (session, stream) =
            match serve::handshake(HANDSHAKE_TIMEOUT, &stop, self.negotiate(stream, require_tls)).await {
                Handshake::Done(Ok(Negotiated::Transmit(s, stream))) => (s, stream),
                Handshake::Done(Ok(Negotiated::Left)) | Handshake::Stopped => return Ok(()),
                Handshake::Done(Err(e)) => return Err(e),
                Handshake::TimedOut => return Err(ConnectionError::HandshakeTimeout),
            };
        let export = self.exports[session.export].clone();
        tracing::debug!(
            export = %export.name,
            structured = session.structured,
            contexts = ?session.contexts,
            "NBD transmission"
        );
        let conn = Conn { export, structured: session.structured, contexts: session.contexts };
        // Plaintext sockets are served by threads that each read, run and answer a request;
        // TLS streams by async tasks around the blocking pool.
        let stream = match stream.into_plain_socket()? {
            Ok(socket) => {
                return threaded::transmission(socket, conn, self.threads, threaded::Start::Lazy, stop)
                    .await
                    .map_err(ConnectionError::from);
            }
            Err(stream) => stream,
        };
        let (rd, wr) = tokio::io::split(stream);
        let rd = BufReader::with_capacity(256 * 1024, rd);
        let size = conn.export.backend.size();
        let caps = conn.export.backend.capabilities();
        let protocol = Arc::new(Transmission { conn, size, caps });
        let limits = Limits { budget: MAX_IN_FLIGHT_BYTES / BUDGET_UNIT, grace: SHUTDOWN_GRACE };
        serve::transmission(protocol, rd, wr, limits, stop).await.map_err(ConnectionError::from)
    }

    /// Runs option haggling on an unbuffered stream (nothing may be read ahead of a TLS upgrade).
    async fn negotiate(&self, mut io: Link, require_tls: bool) -> Result<Negotiated, ConnectionError> {
        io.write_all(&proto::encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES))
            .await?;
        io.flush().await?;
        let mut flags = [0u8; 4];
        io.read_exact(&mut flags).await?;
        let client = proto::decode_client_flags(&flags)?;
        let no_zeroes = client & proto::client_flags::NO_ZEROES != 0;
        let mut state = Haggle::default();
        let mut tls_active = false;
        for _ in 0..MAX_OPTIONS {
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            match io.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Negotiated::Left),
                Err(e) => return Err(e.into()),
            }
            let h = OptionHeader::decode(&header)?;
            let mut data = vec![0u8; h.len as usize];
            io.read_exact(&mut data).await?;
            let o = h.option;
            if require_tls && !tls_active && !matches!(o, opt::STARTTLS | opt::ABORT) {
                if o == opt::EXPORT_NAME {
                    return Err(ConnectionError::TlsRequired);
                }
                send_error(
                    &mut io,
                    o,
                    rep::ERR_TLS_REQD,
                    "this server requires TLS: send NBD_OPT_STARTTLS first",
                )
                .await?;
                continue;
            }
            match o {
                opt::EXPORT_NAME => {
                    let name = proto::decode_name(&data)?;
                    let Some(index) = self.find(&name) else {
                        // This option cannot fail in-band: hanging up is the answer.
                        return Err(ConnectionError::UnknownExport(name));
                    };
                    let e = &self.exports[index];
                    let reply =
                        proto::encode_export_name_reply(e.backend.size(), e.transmission_flags(), no_zeroes);
                    io.write_all(&reply).await?;
                    io.flush().await?;
                    return Ok(Negotiated::Transmit(state.session(index), io));
                }
                opt::ABORT => {
                    // The client may hang up without reading the acknowledgement.
                    let _ = send_reply(&mut io, o, rep::ACK, &[]).await;
                    return Ok(Negotiated::Left);
                }
                opt::LIST => {
                    if data.is_empty() {
                        for e in self.exports.iter() {
                            let d = proto::encode_rep_server(&e.name, e.description.as_deref());
                            send_reply(&mut io, o, rep::SERVER, &d).await?;
                        }
                        send_reply(&mut io, o, rep::ACK, &[]).await?;
                    } else {
                        send_error(&mut io, o, rep::ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    }
                }
                opt::STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        let msg = "NBD_OPT_STRUCTURED_REPLY takes no data";
                        send_error(&mut io, o, rep::ERR_INVALID, msg).await?;
                    } else if state.structured {
                        let msg = "structured replies are already negotiated";
                        send_error(&mut io, o, rep::ERR_INVALID, msg).await?;
                    } else {
                        state.structured = true;
                        send_reply(&mut io, o, rep::ACK, &[]).await?;
                    }
                }
                opt::STARTTLS => {
                    let refusal = match &self.tls {
                        None => Some((rep::ERR_POLICY, "this server does not offer TLS")),
                        Some(_) if tls_active => Some((rep::ERR_INVALID, "TLS is already running")),
                        Some(_) if !data.is_empty() => {
                            Some((rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data"))
                        }
                        Some(_) => None,
                    };
                    if let Some((reply, msg)) = refusal {
                        send_error(&mut io, o, reply, msg).await?;
                        continue;
                    }
                    send_reply(&mut io, o, rep::ACK, &[]).await?;
                    io = self.start_tls(io).await?;
                    tls_active = true;
                    // What was haggled in plaintext does not carry over.
                    state = Haggle::default();
                }
                opt::INFO | opt::GO => {
                    if let Some(index) = self.info(&mut io, o, &data).await?
                        && o == opt::GO
                    {
                        return Ok(Negotiated::Transmit(state.session(index), io));
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    self.meta_context(&mut io, o, &data, &mut state).await?;
                }
                other => {
                    let msg = format!("option {other} is not supported by this server");
                    send_error(&mut io, other, rep::ERR_UNSUP, &msg).await?;
                }
            }
        }
        Err(ConnectionError::TooManyOptions)
    }

    async fn start_tls(&self, io: Link) -> Result<Link, ConnectionError> {
        let Some(tls) = &self.tls else {
            return Err(ConnectionError::Tls(io::Error::other("TLS is not configured")));
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
        let stream = acceptor.accept(io).await.map_err(ConnectionError::Tls)?;
        Ok(Link::Other(Box::new(stream)))
    }

    /// Answers `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    async fn meta_context(
        &self,
        io: &mut Link,
        option: u32,
        data: &[u8],
        state: &mut Haggle,
    ) -> io::Result<()> {
        let setting = option == opt::SET_META_CONTEXT;
        if setting {
            // A failed or refused SET leaves nothing selected.
            state.meta = None;
        }
        if !state.structured {
            let msg = "metadata contexts need structured replies: send NBD_OPT_STRUCTURED_REPLY first";
            return send_error(io, option, rep::ERR_INVALID, msg).await;
        }
        let request = match MetaContextRequest::decode(data) {
            Ok(r) => r,
            Err(e) => return send_error(io, option, rep::ERR_INVALID, &e.to_string()).await,
        };
        let Some(index) = self.find(&request.export) else {
            let msg = format!("no export named '{}'", request.export);
            return send_error(io, option, rep::ERR_UNKNOWN, &msg).await;
        };
        let selected = status::select(self.exports[index].contexts(), &request.queries, !setting);
        for (i, c) in selected.iter().enumerate() {
            // Listed contexts have id 0, as the spec asks; selected ones are numbered from 1.
            let id = if setting { u32::try_from(i + 1).unwrap_or(u32::MAX) } else { 0 };
            send_reply(io, option, rep::META_CONTEXT, &proto::encode_rep_meta_context(id, c.name())).await?;
        }
        send_reply(io, option, rep::ACK, &[]).await?;
        if setting {
            state.meta = Some((index, selected));
        }
        Ok(())
    }

    /// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`; `Some(index)` when it was answered with success.
    async fn info<W: AsyncWrite + Unpin>(
        &self,
        wr: &mut W,
        option: u32,
        data: &[u8],
    ) -> io::Result<Option<usize>> {
        let request = match InfoRequest::decode(data) {
            Ok(r) => r,
            Err(e) => {
                send_error(wr, option, rep::ERR_INVALID, &e.to_string()).await?;
                return Ok(None);
            }
        };
        let Some(index) = self.find(&request.name) else {
            let msg = format!("no export named '{}'", request.name);
            send_error(wr, option, rep::ERR_UNKNOWN, &msg).await?;
            return Ok(None);
        };
        let e = &self.exports[index];
        send_reply(
            wr,
            option,
            rep::INFO,
            &proto::encode_info_export(e.backend.size(), e.transmission_flags()),
        )
        .await?;
        let mut sent = Vec::new();
        for &kind in &request.infos {
            if sent.contains(&kind) {
                continue;
            }
            sent.push(kind);
            let payload = match kind {
                info::NAME => proto::encode_info_string(info::NAME, &e.name),
                info::DESCRIPTION => match &e.description {
                    Some(d) => proto::encode_info_string(info::DESCRIPTION, d),
                    None => continue,
                },
                info::BLOCK_SIZE => {
                    let b = e.block_sizes;
                    proto::encode_info_block_size(b.min, b.preferred, b.max)
                }
                _ => continue,
            };
            send_reply(wr, option, rep::INFO, &payload).await?;
        }
        send_reply(wr, option, rep::ACK, &[]).await?;
        Ok(Some(index))
    }

    /// The export a client means by `name`: the empty name is the first export.
    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }
}

async fn send_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> io::Result<()> {
    wr.write_all(&proto::encode_option_reply(option, reply, data)).await?;
    wr.flush().await
}

async fn send_error<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    message: &str,
) -> io::Result<()> {
    tracing::debug!(option, reply, message, "NBD option refused");
    send_reply(wr, option, reply, message.as_bytes()).await
}

// ---------------------------------------------------------------------------------------------
// Transmission

impl serve::Service for NbdServer {
    const NAME: &'static str = "NBD";

    async fn connection(&self, stream: serve::Stream, peer: String, stop: Stop) {
        // TLS is required on TCP only: a Unix socket's file permissions guard it.
        let require_tls = matches!(stream, serve::Stream::Tcp(_))
            && self.tls.as_ref().is_some_and(|t| t.mode == TlsMode::Require);
        tracing::debug!(%peer, "NBD client connected");
        metrics::counter!("r3map_nbd_connections_total").increment(1);
        metrics::gauge!("r3map_nbd_connections").increment(1);
        match self.serve_link(Link::Plain(stream), stop, require_tls).await {
            Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
            Err(e) => tracing::info!(%peer, error = %e, "NBD connection ended with an error"),
        }
        metrics::gauge!("r3map_nbd_connections").decrement(1);
    }

    fn flush_all(&self) -> impl Future<Output = io::Result<()>> + Send {
        NbdServer::flush_all(self)
    }
}

/// How much of the in-flight budget a request of `len` bytes takes.
fn cost(len: u32) -> u32 {
    1 + len / BUDGET_UNIT
}

/// Transmission on a stream the threaded driver cannot take (TLS, or one handed in), as
/// [`serve::transmission`] runs it.
struct Transmission {
    conn: Conn,
    size: u64,
    caps: Capabilities,
}

impl serve::Protocol for Transmission {
    const HEADER_LEN: usize = proto::REQUEST_LEN;
    type Request = (Command, Request, Vec<u8>);
    type Reply = Vec<u8>;

    async fn decode<R: AsyncRead + Unpin + Send>(
        &self,
        header: &[u8],
        rd: &mut R,
    ) -> io::Result<Decoded<Self::Request, Vec<u8>>> {
        // Without the magic the stream cannot be followed: hang up.
        let req = Request::decode(header)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("bad request: {e}")))?;
        if req.command() == Some(Command::Disc) {
            return Ok(Decoded::Disconnect);
        }
        let checked = check(&req, &self.conn, self.size, self.caps);
        let mut payload = Vec::new();
        if req.command() == Some(Command::Write) {
            if checked.is_ok() {
                payload = vec![0u8; req.length as usize];
                rd.read_exact(&mut payload).await?;
            } else {
                // Keep the stream in step: the data of a refused write is read and dropped.
                tokio::io::copy(&mut rd.take(u64::from(req.length)), &mut tokio::io::sink()).await?;
            }
        }
        Ok(match checked {
            Ok(cmd) => Decoded::Run((cmd, req, payload)),
            Err(r) => {
                tracing::debug!(kind = req.kind, offset = req.offset, length = req.length, message = %r.message, "NBD request refused");
                metrics::counter!("r3map_nbd_refused_total").increment(1);
                Decoded::Answer(error_reply(req.cookie, r.error, &r.message, self.conn.structured))
            }
        })
    }

    fn cost(&self, (cmd, req, _): &Self::Request) -> u32 {
        cost(if matches!(cmd, Command::Read | Command::Write) { req.length } else { 0 })
    }

    fn execute(&self, (cmd, req, payload): Self::Request) -> Vec<u8> {
        let mut reply = Vec::new();
        let n = execute(&self.conn, cmd, &req, &payload, &mut reply);
        reply.truncate(n);
        reply
    }

    async fn write<W: AsyncWrite + Unpin + Send>(&self, out: &mut W, reply: Vec<u8>) -> io::Result<()> {
        out.write_all(&reply).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use r3map_core::Memory;

    fn export(name: &str) -> NbdExport {
        NbdExport::new(name, Arc::new(Memory::new(4096)))
    }

    #[test]
    fn serves_under_the_shared_server_handle() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let server = NbdServer::new(vec![export("disk")]).unwrap();
        let handle = r3map_net::ServerHandle::start_unix(server, &path).unwrap();
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut greeting = [0u8; proto::GREETING_LEN];
        client.read_exact(&mut greeting).unwrap();
        let flags = proto::decode_greeting(&greeting).unwrap();
        assert_eq!(flags, handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        drop(client);
        handle.shutdown().unwrap();
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn config_is_checked() {
        assert!(matches!(NbdServer::new(vec![]), Err(ConfigError::NoExports)));
        assert!(matches!(NbdServer::new(vec![export("a"), export("a")]), Err(ConfigError::DuplicateName(_))));
    }
}
