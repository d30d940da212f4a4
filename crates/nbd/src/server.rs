//! The server: fixed newstyle negotiation, then transmission with requests run concurrently.
//!
//! Each connection has a reader that decodes requests and starts each backend call at once on
//! tokio's blocking pool (backends are blocking), and one writer task that sends the replies in
//! the order they complete. A connection holds at most [`MAX_IN_FLIGHT_BYTES`] of request and
//! reply buffers. Shutdown stops accepting, lets requests in flight finish, then flushes every
//! export.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use r3map_core::{Capabilities, SharedBackend};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;

use crate::proto::{
    self, Command, InfoRequest, OptionHeader, ProtoError, Request, SimpleReply, cmd_flags, errno,
    handshake_flags, info, opt, rep, transmission_flags,
};

/// How long a client may take from connecting to entering transmission.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most options one client may send before the server gives up on it.
pub const MAX_OPTIONS: usize = 128;
/// Request and reply bytes one connection may hold at once; further requests wait to be read.
pub const MAX_IN_FLIGHT_BYTES: u32 = 128 * 1024 * 1024;
/// How long replies in flight may take to reach a client once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Block sizes announced with `NBD_INFO_BLOCK_SIZE`: any alignment works, 4 KiB is preferred.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;

/// Unit of the per-connection in-flight budget.
const BUDGET_UNIT: u32 = 64 * 1024;

/// One named export.
#[derive(Clone)]
pub struct NbdExport {
    /// The name clients ask for; the empty name (the default export) maps to the first export.
    pub name: String,
    pub backend: SharedBackend,
    /// Refuse writes, trims and zeroing (also set when the backend reports itself read-only).
    pub read_only: bool,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
}

impl NbdExport {
    /// A writable export without a description.
    pub fn new(name: impl Into<String>, backend: SharedBackend) -> Self {
        Self { name: name.into(), backend, read_only: false, description: None }
    }

    fn read_only(&self, caps: Capabilities) -> bool {
        self.read_only || caps.read_only
    }

    /// The transmission flags this export is announced with.
    #[must_use]
    pub fn transmission_flags(&self) -> u16 {
        use transmission_flags as f;
        let caps = self.backend.capabilities();
        // Flushes go to the shared backend, which makes every completed write durable whichever
        // connection sent it: that is what CAN_MULTI_CONN promises.
        let mut flags = f::HAS_FLAGS | f::SEND_FLUSH | f::SEND_FUA | f::SEND_CACHE | f::CAN_MULTI_CONN;
        if self.read_only(caps) {
            flags |= f::READ_ONLY;
        } else {
            if caps.trim {
                flags |= f::SEND_TRIM;
            }
            if caps.write_zeroes {
                flags |= f::SEND_WRITE_ZEROES;
            }
        }
        flags
    }
}

impl fmt::Debug for NbdExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdExport")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .field("read_only", &self.read_only)
            .field("description", &self.description)
            .finish()
    }
}

/// A server configuration that cannot work.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("an NBD server needs at least one export")]
    NoExports,
    #[error("the export name '{0}' is used twice")]
    DuplicateName(String),
    #[error("an export name is longer than {} bytes", proto::MAX_NAME)]
    NameTooLong,
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
}

/// An NBD server for one or more exports. Cheap to clone; serve it on as many listeners as you
/// like.
#[derive(Clone)]
pub struct NbdServer {
    exports: Arc<Vec<NbdExport>>,
}

impl fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdServer").field("exports", &self.exports).finish()
    }
}

/// What negotiation settled on.
struct Session {
    export: usize,
    structured: bool,
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
        Ok(Self { exports: Arc::new(exports) })
    }

    /// The exports, in the order given.
    #[must_use]
    pub fn exports(&self) -> &[NbdExport] {
        &self.exports
    }

    /// Serves TCP connections until `shutdown` completes, then finishes requests in flight and
    /// flushes every export.
    ///
    /// # Errors
    /// A failed final flush.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let accept = || async {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((stream, peer.to_string()))
        };
        self.serve(accept, shutdown).await
    }

    /// Serves Unix socket connections until `shutdown` completes, as [`NbdServer::serve_tcp`].
    ///
    /// # Errors
    /// A failed final flush.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let accept = || async {
            let (stream, _) = listener.accept().await?;
            Ok((stream, "unix".to_owned()))
        };
        self.serve(accept, shutdown).await
    }

    /// Serves one connected stream until the client disconnects or `shutdown` completes (requests
    /// in flight still finish). Does not flush the exports beyond what the client asks for.
    ///
    /// # Errors
    /// What ended the connection, when it was not a clean disconnect.
    pub async fn serve_stream<S>(
        &self,
        stream: S,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let conn = self.connection(stream, stop_rx);
        tokio::pin!(conn, shutdown);
        tokio::select! {
            r = &mut conn => r,
            () = &mut shutdown => {
                let _ = stop_tx.send(true);
                conn.await
            }
        }
    }

    async fn serve<F, Fut, S>(&self, accept: F, shutdown: impl Future<Output = ()>) -> io::Result<()>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = io::Result<(S, String)>>,
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = accept() => match accepted {
                    Ok((stream, peer)) => {
                        let server = self.clone();
                        let stop = stop_rx.clone();
                        connections.spawn(async move {
                            tracing::debug!(%peer, "NBD client connected");
                            match server.connection(stream, stop).await {
                                Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
                                Err(e) => tracing::info!(%peer, error = %e, "NBD connection ended with an error"),
                            }
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving the clients we have.
                        tracing::warn!(error = %e, "accepting an NBD connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        tracing::info!(
            connections = connections.len(),
            "NBD server shutting down: finishing requests in flight"
        );
        let _ = stop_tx.send(true);
        while connections.join_next().await.is_some() {}
        self.flush_all().await
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

    async fn connection<S>(&self, stream: S, mut stop: watch::Receiver<bool>) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let mut wr = BufWriter::with_capacity(256 * 1024, wr);
        let negotiated = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.negotiate(&mut rd, &mut wr)) => r,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        let session = match negotiated {
            Ok(Ok(Some(s))) => s,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ConnectionError::HandshakeTimeout),
        };
        let export = self.exports[session.export].clone();
        tracing::debug!(export = %export.name, structured = session.structured, "NBD transmission");
        transmission(rd, wr, export, session.structured, stop).await.map_err(ConnectionError::from)
    }

    /// Runs option haggling. `Ok(None)`: the client aborted or left.
    async fn negotiate<R, W>(&self, rd: &mut R, wr: &mut W) -> Result<Option<Session>, ConnectionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        wr.write_all(&proto::encode_greeting(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES))
            .await?;
        wr.flush().await?;
        let mut flags = [0u8; 4];
        rd.read_exact(&mut flags).await?;
        let client = proto::decode_client_flags(&flags)?;
        let no_zeroes = client & proto::client_flags::NO_ZEROES != 0;
        let mut structured = false;
        for _ in 0..MAX_OPTIONS {
            let mut header = [0u8; proto::OPTION_HEADER_LEN];
            match rd.read_exact(&mut header).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
                Err(e) => return Err(e.into()),
            }
            let h = OptionHeader::decode(&header)?;
            let mut data = vec![0u8; h.len as usize];
            rd.read_exact(&mut data).await?;
            match h.option {
                opt::EXPORT_NAME => {
                    let name = proto::decode_name(&data)?;
                    let Some(index) = self.find(&name) else {
                        // This option cannot fail in-band: hanging up is the answer.
                        return Err(ConnectionError::UnknownExport(name));
                    };
                    let e = &self.exports[index];
                    let reply =
                        proto::encode_export_name_reply(e.backend.size(), e.transmission_flags(), no_zeroes);
                    wr.write_all(&reply).await?;
                    wr.flush().await?;
                    return Ok(Some(Session { export: index, structured }));
                }
                opt::ABORT => {
                    // The client may hang up without reading the acknowledgement.
                    let _ = send_reply(wr, h.option, rep::ACK, &[]).await;
                    return Ok(None);
                }
                opt::LIST => {
                    if data.is_empty() {
                        for e in self.exports.iter() {
                            let d = proto::encode_rep_server(&e.name, e.description.as_deref());
                            send_reply(wr, h.option, rep::SERVER, &d).await?;
                        }
                        send_reply(wr, h.option, rep::ACK, &[]).await?;
                    } else {
                        send_error(wr, h.option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                    }
                }
                opt::STRUCTURED_REPLY => {
                    if data.is_empty() {
                        structured = true;
                        send_reply(wr, h.option, rep::ACK, &[]).await?;
                    } else {
                        let msg = "NBD_OPT_STRUCTURED_REPLY takes no data";
                        send_error(wr, h.option, rep::ERR_INVALID, msg).await?;
                    }
                }
                opt::STARTTLS => {
                    send_error(wr, h.option, rep::ERR_POLICY, "this server does not offer TLS").await?;
                }
                opt::INFO | opt::GO => {
                    if let Some(index) = self.info(wr, h.option, &data).await?
                        && h.option == opt::GO
                    {
                        return Ok(Some(Session { export: index, structured }));
                    }
                }
                other => {
                    let msg = format!("option {other} is not supported by this server");
                    send_error(wr, other, rep::ERR_UNSUP, &msg).await?;
                }
            }
        }
        Err(ConnectionError::TooManyOptions)
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
                    proto::encode_info_block_size(MIN_BLOCK, PREFERRED_BLOCK, proto::MAX_REQUEST)
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

/// One request, checked and ready for the backend.
struct Job {
    cmd: Command,
    req: Request,
    payload: Vec<u8>,
}

/// A refusal decided before the backend is called.
struct Refusal {
    error: u32,
    message: String,
}

fn refuse(error: u32, message: impl Into<String>) -> Refusal {
    Refusal { error, message: message.into() }
}

/// The NBD error for a backend error.
#[must_use]
pub fn errno_of(e: &io::Error) -> u32 {
    use io::ErrorKind as K;
    match e.kind() {
        K::PermissionDenied | K::ReadOnlyFilesystem => errno::EPERM,
        K::InvalidInput => errno::EINVAL,
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => errno::ENOSPC,
        K::Unsupported => errno::ENOTSUP,
        K::OutOfMemory => errno::ENOMEM,
        _ => errno::EIO,
    }
}

/// Checks a request against the export; what is returned is sent as the error reply.
fn check(req: &Request, export: &NbdExport, size: u64, caps: Capabilities) -> Result<Command, Refusal> {
    let Some(cmd) = req.command() else {
        return Err(refuse(errno::EINVAL, format!("unknown command {}", req.kind)));
    };
    let allowed = match cmd {
        Command::Read => cmd_flags::FUA | cmd_flags::DF,
        Command::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        _ => cmd_flags::FUA,
    };
    if req.flags & !allowed != 0 {
        return Err(refuse(
            errno::EINVAL,
            format!("flags {:#x} are not valid for {}", req.flags, cmd.name()),
        ));
    }
    let read_only = export.read_only(caps);
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && read_only {
        return Err(refuse(errno::EPERM, format!("the export '{}' is read-only", export.name)));
    }
    if matches!(cmd, Command::Read | Command::Write) && req.length > proto::MAX_REQUEST {
        return Err(refuse(
            errno::EOVERFLOW,
            format!("a request of {} bytes is larger than the limit of {}", req.length, proto::MAX_REQUEST),
        ));
    }
    let in_range = req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= size);
    match cmd {
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes | Command::Cache
            if !in_range =>
        {
            // Writes past the end are "no space" (the spec's choice); everything else is invalid.
            let error = if matches!(cmd, Command::Write | Command::WriteZeroes) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            Err(refuse(
                error,
                format!(
                    "{} of {} bytes at offset {} is beyond the end of the export ({size} bytes)",
                    cmd.name(),
                    req.length,
                    req.offset
                ),
            ))
        }
        Command::Trim if !caps.trim => Err(refuse(errno::ENOTSUP, "this export does not support trim")),
        Command::WriteZeroes if !caps.write_zeroes => {
            Err(refuse(errno::ENOTSUP, "this export does not support write zeroes"))
        }
        Command::BlockStatus | Command::Resize | Command::Disc => {
            Err(refuse(errno::EINVAL, format!("{} is not supported by this server", cmd.name())))
        }
        _ => Ok(cmd),
    }
}

/// Runs a checked request on the backend and encodes its reply.
fn execute(export: &NbdExport, job: Job, structured: bool) -> Vec<u8> {
    let backend = &export.backend;
    let Job { cmd, req, payload } = job;
    let fua = req.flags & cmd_flags::FUA != 0;
    let len = u64::from(req.length);
    let result = match cmd {
        Command::Read => return read_reply(export, &req, structured),
        Command::Write => backend.write_at(&payload, req.offset),
        Command::Flush => backend.flush(),
        Command::Trim => backend.trim(req.offset, len),
        Command::WriteZeroes => backend.write_zeroes(req.offset, len),
        // CACHE asks the server to prefetch; the backends here either hold the data already or
        // fetch it on the first read, so it succeeds without doing anything.
        Command::Cache | Command::Disc | Command::BlockStatus | Command::Resize => Ok(()),
    };
    let result = result.and_then(|()| {
        if fua && matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes) {
            backend.flush()
        } else {
            Ok(())
        }
    });
    match result {
        Ok(()) => SimpleReply { error: 0, cookie: req.cookie }.encode().to_vec(),
        Err(e) => {
            tracing::debug!(command = cmd.name(), offset = req.offset, length = req.length, error = %e, "NBD request failed");
            error_reply(req.cookie, errno_of(&e), &e.to_string(), structured)
        }
    }
}

fn read_reply(export: &NbdExport, req: &Request, structured: bool) -> Vec<u8> {
    let len = req.length as usize;
    if structured && len == 0 {
        return proto::encode_none(req.cookie).to_vec();
    }
    let prefix = if structured { proto::OFFSET_DATA_PREFIX } else { proto::SIMPLE_REPLY_LEN };
    let mut out = vec![0u8; prefix + len];
    match export.backend.read_at(&mut out[prefix..], req.offset) {
        Ok(()) => {
            if structured {
                proto::encode_offset_data_prefix(&mut out, req.cookie, req.offset, len, true);
            } else {
                SimpleReply { error: 0, cookie: req.cookie }.encode_into(&mut out);
            }
            out
        }
        Err(e) => {
            tracing::debug!(offset = req.offset, length = req.length, error = %e, "NBD read failed");
            error_reply(req.cookie, errno_of(&e), &e.to_string(), structured)
        }
    }
}

fn error_reply(cookie: u64, error: u32, message: &str, structured: bool) -> Vec<u8> {
    if structured {
        proto::encode_error_chunk(cookie, error, message)
    } else {
        SimpleReply { error, cookie }.encode().to_vec()
    }
}

/// How much of the in-flight budget a request of `len` bytes takes.
fn cost(len: u32) -> u32 {
    1 + len / BUDGET_UNIT
}

async fn transmission<R, W>(
    mut rd: R,
    wr: W,
    export: NbdExport,
    structured: bool,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let size = export.backend.size();
    let caps = export.backend.capabilities();
    let export = Arc::new(export);
    // Each reply travels with its share of the budget, released once it is written, so a
    // client that stops reading stops the server from reading its requests too.
    let (tx, rx) = mpsc::unbounded_channel::<(Vec<u8>, OwnedSemaphorePermit)>();
    let writer = tokio::spawn(write_replies(wr, rx));
    let budget_total = MAX_IN_FLIGHT_BYTES / BUDGET_UNIT;
    let budget = Arc::new(Semaphore::new(budget_total as usize));
    let mut header = [0u8; proto::REQUEST_LEN];
    let result: io::Result<()> = loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break Ok(()),
            read = rd.read_exact(&mut header) => {
                if let Err(e) = read {
                    // A client that hangs up between requests is done with us.
                    break if e.kind() == io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e) };
                }
            }
        }
        let req = match Request::decode(&header) {
            Ok(r) => r,
            Err(e) => {
                // Without the magic the stream cannot be followed: hang up.
                break Err(io::Error::new(io::ErrorKind::InvalidData, format!("bad request: {e}")));
            }
        };
        if req.command() == Some(Command::Disc) {
            break Ok(());
        }
        let checked = check(&req, &export, size, caps);
        let mut payload = Vec::new();
        if req.command() == Some(Command::Write) {
            if checked.is_ok() {
                payload = vec![0u8; req.length as usize];
                if let Err(e) = rd.read_exact(&mut payload).await {
                    break Err(e);
                }
            } else {
                // Keep the stream in step: the data of a refused write is read and dropped.
                let mut skip = (&mut rd).take(u64::from(req.length));
                if let Err(e) = tokio::io::copy(&mut skip, &mut tokio::io::sink()).await {
                    break Err(e);
                }
            }
        }
        let cmd = match checked {
            Ok(cmd) => cmd,
            Err(r) => {
                tracing::debug!(kind = req.kind, offset = req.offset, length = req.length, message = %r.message, "NBD request refused");
                let Some(permit) = acquire(&budget, 1, &mut stop).await else {
                    break Ok(());
                };
                let _ = tx.send((error_reply(req.cookie, r.error, &r.message, structured), permit));
                continue;
            }
        };
        let units = cost(if matches!(cmd, Command::Read | Command::Write) { req.length } else { 0 });
        let Some(permit) = acquire(&budget, units, &mut stop).await else {
            break Ok(());
        };
        let export = Arc::clone(&export);
        let tx = tx.clone();
        tokio::task::spawn_blocking(move || {
            let reply = execute(&export, Job { cmd, req, payload }, structured);
            let _ = tx.send((reply, permit));
        });
    };
    // Let requests in flight finish and their replies go out; on shutdown, a client that does
    // not read its replies gets SHUTDOWN_GRACE to do so.
    let drained = tokio::select! {
        r = budget.acquire_many(budget_total) => r.is_ok(),
        () = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => false,
    };
    drop(tx);
    if !drained {
        writer.abort();
        return result;
    }
    let written = writer.await.map_err(io::Error::other)?;
    result.and(written)
}

/// Takes `units` of the budget, or `None` once shutdown starts.
async fn acquire(
    budget: &Arc<Semaphore>,
    units: u32,
    stop: &mut watch::Receiver<bool>,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        p = Arc::clone(budget).acquire_many_owned(units) => p.ok(),
        _ = stop.wait_for(|s| *s) => None,
    }
}

async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<(Vec<u8>, OwnedSemaphorePermit)>,
) -> io::Result<()> {
    let mut out = wr;
    let mut failed = None;
    while let Some((reply, _permit)) = rx.recv().await {
        if failed.is_some() {
            // Keep draining so senders never block; the connection is gone.
            continue;
        }
        let r = async {
            out.write_all(&reply).await?;
            if rx.is_empty() {
                out.flush().await?;
            }
            Ok::<(), io::Error>(())
        }
        .await;
        if let Err(e) = r {
            failed = Some(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    out.flush().await?;
    let _ = out.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ChunkHeader, reply_flags, reply_type};
    use r3map_core::Memory;

    fn export(read_only: bool) -> NbdExport {
        NbdExport { read_only, ..NbdExport::new("d", Arc::new(Memory::new(1 << 20))) }
    }

    fn req(kind: Command, offset: u64, length: u32, flags: u16) -> Request {
        Request { flags, kind: kind.to_u16(), cookie: 1, offset, length }
    }

    #[test]
    fn config_is_checked() {
        assert!(matches!(NbdServer::new(vec![]), Err(ConfigError::NoExports)));
        assert!(matches!(
            NbdServer::new(vec![export(false), export(true)]),
            Err(ConfigError::DuplicateName(_))
        ));
    }

    #[test]
    fn flags_follow_capabilities() {
        use transmission_flags as f;
        let w = export(false).transmission_flags();
        assert_ne!(w & f::SEND_TRIM, 0);
        assert_ne!(w & f::SEND_WRITE_ZEROES, 0);
        assert_eq!(w & f::READ_ONLY, 0);
        let r = export(true).transmission_flags();
        assert_ne!(r & f::READ_ONLY, 0);
        assert_eq!(r & f::SEND_TRIM, 0);
    }

    #[test]
    fn requests_are_checked() {
        let e = export(false);
        let size = e.backend.size();
        let caps = e.backend.capabilities();
        let err = |r: Request| check(&r, &e, size, caps).err().map(|r| r.error);
        assert_eq!(err(req(Command::Read, 0, 4096, 0)), None);
        assert_eq!(err(req(Command::Read, size, 1, 0)), Some(errno::EINVAL));
        assert_eq!(err(req(Command::Read, u64::MAX, 2, 0)), Some(errno::EINVAL));
        assert_eq!(err(req(Command::Write, size - 1, 2, 0)), Some(errno::ENOSPC));
        assert_eq!(err(req(Command::Read, 0, proto::MAX_REQUEST + 1, 0)), Some(errno::EOVERFLOW));
        assert_eq!(err(req(Command::Read, 0, 1, 1 << 9)), Some(errno::EINVAL));
        assert_eq!(err(Request { kind: 99, ..req(Command::Read, 0, 1, 0) }), Some(errno::EINVAL));
        let ro = export(true);
        assert_eq!(
            check(&req(Command::Write, 0, 1, 0), &ro, size, caps).err().map(|r| r.error),
            Some(errno::EPERM)
        );
    }

    #[test]
    fn errors_map_to_nbd_values() {
        let e = |k| errno_of(&io::Error::new(k, "x"));
        assert_eq!(e(io::ErrorKind::PermissionDenied), errno::EPERM);
        assert_eq!(e(io::ErrorKind::InvalidInput), errno::EINVAL);
        assert_eq!(e(io::ErrorKind::StorageFull), errno::ENOSPC);
        assert_eq!(e(io::ErrorKind::Unsupported), errno::ENOTSUP);
        assert_eq!(e(io::ErrorKind::Other), errno::EIO);
    }

    #[test]
    fn structured_read_errors_are_chunks() {
        let e = export(false);
        let r = Request { offset: 2 << 20, ..req(Command::Read, 0, 16, 0) };
        let reply = read_reply(&e, &r, true);
        let h = ChunkHeader::decode(&reply[..proto::CHUNK_HEADER_LEN]).unwrap();
        assert_eq!(h.kind, reply_type::ERROR);
        assert_eq!(h.flags, reply_flags::DONE);
        let reply = read_reply(&e, &req(Command::Read, 0, 0, 0), true);
        assert_eq!(ChunkHeader::decode(&reply).unwrap().kind, reply_type::NONE);
    }
}
