//! The server: exposes [`Backend`]s (and migration [`Seeder`]s) to clients over TCP (TLS 1.3 by
//! default), plaintext TCP when asked for, and Unix sockets.
//!
//! The connections, their requests and shutdown run on [`serve`]: up to `max_in_flight` requests
//! per connection run at once on tokio's blocking pool, their replies go back in completion
//! order, and shutdown stops accepting, lets requests in flight finish, then flushes every
//! export. This file is the protocol: the TLS upgrade, the hello, decoding and running requests,
//! and their metrics. A malformed frame gets an error reply and closes that connection only.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use r3map_core::{Capabilities, Seeder, SharedBackend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use crate::errno;
use crate::frame_io::write_frame;
use crate::pool::BufPool;
use crate::proto::{
    self, ClientHello, ExportInfo, Op, REQUEST_HEADER_LEN, Refusal, ReplyHeader, RequestHeader, ServerHello,
    export_flags,
};
use crate::security::{BoxedIo, ServerSecurity, same_secret};
pub use crate::serve::ServerHandle;
use crate::serve::{self, Decoded, Handshake, Limits, Stop, Stream};

/// One named resource a server offers.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub backend: SharedBackend,
    /// Migration source operations (track, sync, close), when this export is one.
    pub seeder: Option<Arc<dyn Seeder>>,
    /// Chunk size announced to clients (a hint for their own chunking).
    pub chunk_size: u32,
    pub read_only: bool,
    /// The data is gone when this process ends (a memory backend); clients are told, with the
    /// export's instance number, so that they never take a restarted server for the old one.
    pub volatile: bool,
    /// Drawn at random when the export is made (see [`ExportInfo::instance`]).
    instance: u64,
    /// The last answers to the seeder operations, for a destination that asks again.
    answers: Arc<Mutex<SeederAnswers>>,
}

/// What the seeder answered last, so that a destination whose connection dropped before the
/// answer arrived can ask again and get the same chunk list (the source already cleared it).
#[derive(Debug, Default)]
struct SeederAnswers {
    /// The last pre-copy round: its number (the request's `offset`) and its encoded chunk list.
    round: Option<(u64, Vec<u8>)>,
    /// The encoded answer of the final `sync`.
    sync: Option<Vec<u8>>,
}

impl SeederAnswers {
    /// TRACK: a new migration; its track runs under the lock so that nothing interleaves.
    fn track(this: &Mutex<Self>, seeder: &dyn Seeder) -> io::Result<()> {
        let mut answers = this.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        seeder.track()?;
        *answers = Self::default();
        Ok(())
    }

    /// DIRTY round `round`: a repeated round number gets the stored answer; round 0 (a client
    /// that does not number its rounds) always takes a new set.
    fn round(this: &Mutex<Self>, seeder: &dyn Seeder, round: u64) -> io::Result<Vec<u8>> {
        let mut answers = this.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, payload)) = answers.round.as_ref().filter(|(n, _)| round != 0 && *n == round) {
            tracing::info!(round, "migration: a pre-copy round was asked for again");
            return Ok(payload.clone());
        }
        let payload = encode(&seeder.take_dirty()?);
        answers.round = Some((round, payload.clone()));
        Ok(payload)
    }

    /// SYNC: the first successful one suspends the source; later ones get the same answer
    /// (nothing was written at the source since).
    fn sync(this: &Mutex<Self>, seeder: &dyn Seeder) -> io::Result<Vec<u8>> {
        let mut answers = this.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(payload) = &answers.sync {
            tracing::info!("migration: the final sync was asked for again");
            return Ok(payload.clone());
        }
        let payload = encode(&seeder.sync()?);
        answers.sync = Some(payload.clone());
        Ok(payload)
    }
}

fn encode(chunks: &[r3map_core::Chunk]) -> Vec<u8> {
    let ids: Vec<u64> = chunks.iter().map(|c| c.0).collect();
    proto::encode_chunks(&ids)
}

impl Export {
    /// A writable export with a chunk size of 64 KiB and no seeder.
    pub fn new(name: impl Into<String>, backend: SharedBackend) -> Self {
        Self {
            name: name.into(),
            backend,
            seeder: None,
            chunk_size: 64 * 1024,
            read_only: false,
            volatile: false,
            instance: fastrand::u64(1..),
            answers: Arc::default(),
        }
    }

    /// Marks the export volatile (see [`Export::volatile`]).
    #[must_use]
    pub fn volatile(mut self) -> Self {
        self.volatile = true;
        self
    }

    #[must_use]
    pub fn with_seeder(mut self, seeder: Arc<dyn Seeder>) -> Self {
        self.seeder = Some(seeder);
        self
    }

    #[must_use]
    pub fn with_chunk_size(mut self, chunk_size: u32) -> Self {
        self.chunk_size = chunk_size;
        self
    }

    #[must_use]
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    fn info(&self, max_request: u32) -> ExportInfo {
        let caps: Capabilities = self.backend.capabilities();
        let mut flags = 0;
        if self.read_only || caps.read_only {
            flags |= export_flags::READ_ONLY;
        }
        if caps.trim {
            flags |= export_flags::TRIM;
        }
        if caps.write_zeroes {
            flags |= export_flags::WRITE_ZEROES;
        }
        if self.seeder.is_some() {
            flags |= export_flags::SEEDER;
        }
        if self.volatile {
            flags |= export_flags::VOLATILE;
        }
        ExportInfo {
            size: self.backend.size(),
            chunk_size: self.chunk_size,
            max_request,
            flags,
            instance: self.instance,
        }
    }
}

impl fmt::Debug for Export {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .field("seeder", &self.seeder.is_some())
            .field("chunk_size", &self.chunk_size)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Everything a server needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub exports: Vec<Export>,
    /// TLS for TCP listeners (Unix sockets are always plaintext).
    pub security: ServerSecurity,
    /// The shared secret clients must send; `None` accepts any client that passes TLS (use with
    /// mutual TLS or on a Unix socket).
    pub token: Option<String>,
    /// Largest request and reply payload.
    pub max_request: u32,
    /// Requests executed at once per connection.
    pub max_in_flight: usize,
    /// How long a client may take for the TLS handshake and, again, for its hello; one that takes
    /// longer is disconnected. Shutdown does not wait for it either way.
    pub handshake_timeout: Duration,
}

impl ServerConfig {
    /// One export, the given security, no token, 32 MiB requests, 64 in flight per connection,
    /// [`HANDSHAKE_TIMEOUT`] for the handshake.
    #[must_use]
    pub fn new(export: Export, security: ServerSecurity) -> Self {
        Self {
            exports: vec![export],
            security,
            token: None,
            max_request: proto::DEFAULT_MAX_REQUEST,
            max_in_flight: 64,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }
}

/// What a running server counts (also exported as `metrics` under `r3map_server_*`).
struct Inner {
    exports: HashMap<String, Export>,
    security: ServerSecurity,
    token: Option<String>,
    max_request: u32,
    max_in_flight: usize,
    handshake_timeout: Duration,
    pool: BufPool,
}

/// A server for one or more exports. Cheap to clone; serve it on as many listeners as you like.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server").field("exports", &self.inner.exports.values().collect::<Vec<_>>()).finish()
    }
}

/// Default [`ServerConfig::handshake_timeout`]: how long a client may take for the TLS handshake
/// and its hello.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client that does not read its replies may hold up shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl Server {
    /// # Errors
    /// `InvalidInput` for no exports, duplicate names, or a maximum request below 4 KiB.
    pub fn new(config: ServerConfig) -> io::Result<Self> {
        if config.exports.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "a server needs at least one export"));
        }
        if config.max_request < proto::MIN_MAX_REQUEST {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the maximum request size must be at least {} bytes", proto::MIN_MAX_REQUEST),
            ));
        }
        let mut exports = HashMap::new();
        for e in config.exports {
            if e.name.len() > proto::MAX_NAME {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "an export name is longer than 4096 bytes",
                ));
            }
            let name = e.name.clone();
            if exports.insert(name.clone(), e).is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the export name '{name}' is used twice"),
                ));
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                exports,
                security: config.security,
                token: config.token,
                max_request: config.max_request,
                max_in_flight: config.max_in_flight.max(1),
                handshake_timeout: config.handshake_timeout,
                pool: BufPool::new(256),
            }),
        })
    }

    /// Serves TCP connections from `listener` until `shutdown` completes, then finishes requests in
    /// flight and flushes every export.
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

    /// Serves Unix socket connections until `shutdown` completes, as [`Server::serve_tcp`].
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

    /// Flushes every export's backend.
    ///
    /// # Errors
    /// The first failed flush.
    pub async fn flush_all(&self) -> io::Result<()> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            r3map_core::flush_each(inner.exports.values().map(|e| (e.name.as_str(), &*e.backend)))
        })
        .await
        .map_err(io::Error::other)?
    }

    /// Serves one connection that is already established (and, for TCP, already through TLS).
    ///
    /// A client has [`ServerConfig::handshake_timeout`] to complete its hello; shutdown ends a
    /// handshake that is still going on.
    pub async fn serve_connection(&self, mut io: BoxedIo, peer: String, stop: Stop) {
        let export =
            match serve::handshake(self.inner.handshake_timeout, &stop, self.handshake(&mut io)).await {
                Handshake::Done(Ok(Some(export))) => export,
                Handshake::Done(Ok(None)) | Handshake::Stopped => return,
                Handshake::Done(Err(e)) => {
                    tracing::info!(%peer, error = %e, "handshake failed");
                    return;
                }
                Handshake::TimedOut => {
                    tracing::info!(%peer, "the client sent no hello in time");
                    return;
                }
            };
        tracing::debug!(%peer, export = %export.name, "client connected");
        metrics::counter!("r3map_server_connections_total").increment(1);
        if let Err(e) = self.transmission(io, export, stop).await {
            tracing::info!(%peer, error = %e, "connection ended with an error");
        }
    }

    /// Reads the client's hello and answers it. `Ok(None)`: refused (and told why).
    async fn handshake(&self, io: &mut BoxedIo) -> io::Result<Option<Export>> {
        let mut buf = Vec::with_capacity(128);
        let hello = loop {
            match ClientHello::decode(&buf) {
                Ok(Some((hello, _))) => break hello,
                Ok(None) => {}
                Err(e) => {
                    refuse(io, Refusal::BadHello, &e.to_string()).await?;
                    return Ok(None);
                }
            }
            if buf.len() > 2 * proto::MAX_NAME + 64 {
                refuse(io, Refusal::BadHello, "the hello is too long").await?;
                return Ok(None);
            }
            let mut byte = [0u8; 256];
            let n = io.read(&mut byte).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client left during the handshake",
                ));
            }
            buf.extend_from_slice(&byte[..n]);
        };
        if hello.version != proto::VERSION {
            let msg =
                format!("this server speaks protocol version {}, not {}", proto::VERSION, hello.version);
            refuse(io, Refusal::Version, &msg).await?;
            return Ok(None);
        }
        if let Some(token) = &self.inner.token
            && !same_secret(token.as_bytes(), hello.token.as_bytes())
        {
            metrics::counter!("r3map_server_refused_total", "reason" => "unauthorized").increment(1);
            refuse(io, Refusal::Unauthorized, "wrong or missing token").await?;
            return Ok(None);
        }
        let Some(export) = self.inner.exports.get(&hello.export) else {
            refuse(io, Refusal::UnknownExport, &format!("no export named '{}'", hello.export)).await?;
            return Ok(None);
        };
        let max_request = hello.max_request.min(self.inner.max_request);
        let reply = ServerHello::Accepted { version: proto::VERSION, info: export.info(max_request) };
        io.write_all(&reply.encode()).await?;
        io.flush().await?;
        Ok(Some(export.clone()))
    }

    async fn transmission(&self, io: BoxedIo, export: Export, stop: Stop) -> io::Result<()> {
        let (rd, wr) = tokio::io::split(io);
        let protocol = Arc::new(Transmission { export, inner: Arc::clone(&self.inner) });
        let budget = u32::try_from(self.inner.max_in_flight).unwrap_or(u32::MAX);
        serve::transmission(protocol, rd, wr, Limits { budget, grace: SHUTDOWN_GRACE }, stop).await
    }
}

impl serve::Service for Server {
    const NAME: &'static str = "r3map";

    /// Runs the TLS handshake where there is one, then [`Server::serve_connection`].
    async fn connection(&self, stream: Stream, peer: String, stop: Stop) {
        let io: BoxedIo = match (stream, &self.inner.security) {
            (Stream::Tcp(tcp), ServerSecurity::Tls(config)) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(config));
                match serve::handshake(self.inner.handshake_timeout, &stop, acceptor.accept(tcp)).await {
                    Handshake::Done(Ok(tls)) => Box::new(tls),
                    Handshake::Done(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Handshake::TimedOut => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        return;
                    }
                    Handshake::Stopped => return,
                }
            }
            // Unix sockets are always plaintext.
            (stream, _) => Box::new(stream),
        };
        self.serve_connection(io, peer, stop).await;
    }

    fn flush_all(&self) -> impl Future<Output = io::Result<()>> + Send {
        Server::flush_all(self)
    }
}

/// One connection's requests, as [`serve::transmission`] runs them.
struct Transmission {
    export: Export,
    inner: Arc<Inner>,
}

impl serve::Protocol for Transmission {
    const HEADER_LEN: usize = REQUEST_HEADER_LEN;
    type Request = (RequestHeader, Vec<u8>);
    type Reply = Reply;

    async fn decode<R: AsyncRead + Unpin + Send>(
        &self,
        header: &[u8],
        rd: &mut R,
    ) -> io::Result<Decoded<Self::Request, Reply>> {
        let h = match RequestHeader::decode(header, self.inner.max_request) {
            Ok(h) => h,
            Err(e) => {
                metrics::counter!("r3map_server_errors_total", "op" => "frame").increment(1);
                let id = header.get(8..16).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
                let reply = Reply::error(id, errno::EINVAL, format!("malformed frame: {e}"));
                return Ok(Decoded::Fatal(reply, e.into()));
            }
        };
        if h.op == Op::Disconnect {
            return Ok(Decoded::Disconnect);
        }
        let mut payload = Vec::new();
        if h.payload_len() > 0 {
            payload = self.inner.pool.take(h.payload_len());
            rd.read_exact(&mut payload).await?;
        }
        Ok(Decoded::Run((h, payload)))
    }

    fn execute(&self, (h, payload): Self::Request) -> Reply {
        let started = Instant::now();
        let reply = execute(&self.export, &self.inner.pool, h, payload);
        record(h.op, &reply, started);
        reply
    }

    async fn write<W: AsyncWrite + Unpin + Send>(&self, out: &mut W, reply: Reply) -> io::Result<()> {
        write_frame(out, &reply.header.encode(), &reply.payload).await?;
        if reply.pooled {
            self.inner.pool.put(reply.payload);
        }
        Ok(())
    }
}

/// A reply on its way to the writer.
struct Reply {
    header: ReplyHeader,
    payload: Vec<u8>,
    pooled: bool,
}

impl Reply {
    fn error(id: u64, code: u32, message: String) -> Self {
        let payload = message.into_bytes();
        let length = u32::try_from(payload.len()).unwrap_or(0);
        Self { header: ReplyHeader { status: code, id, length }, payload, pooled: false }
    }

    fn ok(id: u64, payload: Vec<u8>, pooled: bool) -> Self {
        let length = u32::try_from(payload.len()).expect("payloads are bounded by the maximum request");
        Self { header: ReplyHeader { status: 0, id, length }, payload, pooled }
    }
}

fn execute(export: &Export, pool: &BufPool, h: RequestHeader, payload: Vec<u8>) -> Reply {
    let backend = &export.backend;
    let writable = || {
        if export.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the export '{}' is read-only", export.name),
            ))
        } else {
            Ok(())
        }
    };
    let seeder = || {
        export.seeder.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the export '{}' is not a migration source", export.name),
            )
        })
    };
    let result: io::Result<(Vec<u8>, bool)> = match h.op {
        Op::Read => {
            let mut buf = pool.take(h.length as usize);
            match backend.read_at(&mut buf, h.offset) {
                Ok(()) => Ok((buf, true)),
                Err(e) => {
                    pool.put(buf);
                    Err(e)
                }
            }
        }
        Op::Write => {
            let r = writable().and_then(|()| backend.write_at(&payload, h.offset));
            pool.put(payload);
            r.map(|()| (Vec::new(), false))
        }
        Op::Flush => backend.flush().map(|()| (Vec::new(), false)),
        Op::Trim => writable()
            .and_then(|()| backend.trim(h.offset, u64::from(h.length)))
            .map(|()| (Vec::new(), false)),
        Op::WriteZeroes => writable()
            .and_then(|()| backend.write_zeroes(h.offset, u64::from(h.length)))
            .map(|()| (Vec::new(), false)),
        Op::Track => {
            seeder().and_then(|s| SeederAnswers::track(&export.answers, &**s)).map(|()| (Vec::new(), false))
        }
        Op::Sync => seeder().and_then(|s| SeederAnswers::sync(&export.answers, &**s)).map(|p| (p, false)),
        Op::Dirty => {
            seeder().and_then(|s| SeederAnswers::round(&export.answers, &**s, h.offset)).map(|p| (p, false))
        }
        Op::Close => seeder().and_then(|s| s.close()).map(|()| (Vec::new(), false)),
        Op::Disconnect => Ok((Vec::new(), false)),
    };
    match result {
        Ok((payload, pooled)) => Reply::ok(h.id, payload, pooled),
        Err(e) => Reply::error(h.id, errno::from_io(&e), e.to_string()),
    }
}

/// Counts a request in the metrics. Each operation's label is a literal, so that its metric keys
/// are statics (a key built from a runtime string allocates on every request).
fn record(op: Op, reply: &Reply, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    let failed = reply.header.status != 0;
    macro_rules! per_op {
        ($op:literal) => {{
            metrics::counter!("r3map_server_requests_total", "op" => $op).increment(1);
            metrics::histogram!("r3map_server_request_seconds", "op" => $op).record(seconds);
            if failed {
                metrics::counter!("r3map_server_errors_total", "op" => $op).increment(1);
            }
        }};
    }
    match op {
        Op::Read => per_op!("read"),
        Op::Write => per_op!("write"),
        Op::Flush => per_op!("flush"),
        Op::Trim => per_op!("trim"),
        Op::WriteZeroes => per_op!("write_zeroes"),
        Op::Track => per_op!("track"),
        Op::Sync => per_op!("sync"),
        Op::Close => per_op!("close"),
        Op::Disconnect => per_op!("disconnect"),
        Op::Dirty => per_op!("dirty"),
    }
    if !failed && op == Op::Read {
        metrics::counter!("r3map_server_bytes_total", "direction" => "read")
            .increment(u64::from(reply.header.length));
    }
}

async fn refuse(io: &mut BoxedIo, reason: Refusal, message: &str) -> io::Result<()> {
    let hello = ServerHello::Refused { version: proto::VERSION, reason, message: message.to_owned() };
    io.write_all(&hello.encode()).await?;
    io.flush().await?;
    io.shutdown().await
}
