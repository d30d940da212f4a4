//! [`RemoteBackend`]: a [`Backend`] served by an r3map server, with many requests in flight per
//! connection, optional several connections, and reconnection.
//!
//! The public API is blocking, like every `Backend`; inside, each connection is a tokio task on the
//! runtime of [`ClientOptions::io`] (the process's shared one unless the caller gives its own), so
//! it may be called from any thread, a tokio worker included. A connection writes requests as they come, and a reader hands replies back by id in whatever
//! order they arrive.
//!
//! Reconnection: when a connection breaks, requests that had no answer yet are sent again on the
//! next connection, in their original order, once it is up (reconnecting with exponential backoff).
//! Every request is safe to repeat: positional writes, trims and flushes are idempotent, and the
//! server keeps its last answers to `take_dirty` (numbered rounds) and `sync`, so a round or the
//! final sync asked for again gets the chunk list it would have had. Every request has a
//! deadline (`timeout`): a caller waits for the answer, through reconnections, until then, and gets
//! `TimedOut` after, never stale or made-up data.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use r3map_core::backend::len64;
use r3map_core::{Backend, Capabilities, Chunk, Seeder, check_range};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::mpsc;

use crate::errno;
use crate::frame_io::write_frame;
use crate::pool::BufPool;
use crate::proto::{
    self, ClientHello, ExportInfo, Op, REPLY_HEADER_LEN, Refusal, ReplyHeader, RequestHeader, ServerHello,
    export_flags,
};
use crate::runtime::Io;
use crate::security::{BoxedIo, ClientSecurity, client_tls, read_pem};

/// The port r3map listens on unless told otherwise (as the original's `ram-ul`).
pub const DEFAULT_PORT: u16 = 1337;
/// The export a URL without a path names.
pub const DEFAULT_EXPORT: &str = "default";

/// Where a server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Self::Tcp { host, port } => write!(f, "{host}:{port}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub export: String,
    pub token: Option<String>,
    /// TLS or plaintext for TCP (Unix sockets are always plaintext).
    pub security: ClientSecurity,
    /// Connections to open; requests are spread over them.
    pub connections: usize,
    /// How long a request may wait for its answer, through reconnections, before it fails.
    pub timeout: Duration,
    /// How long one connection attempt (TCP, TLS, hello) may take.
    pub connect_timeout: Duration,
    /// Largest request and reply payload this client sends or accepts.
    pub max_request: u32,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// The runtime the connections run on; `None` is [`Io::shared`].
    pub io: Option<Io>,
}

impl ClientOptions {
    /// Options for the export `default` with the given security and no token.
    #[must_use]
    pub fn new(security: ClientSecurity) -> Self {
        Self {
            export: DEFAULT_EXPORT.to_owned(),
            token: None,
            security,
            connections: 1,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_request: proto::DEFAULT_MAX_REQUEST,
            max_backoff: Duration::from_secs(2),
            io: None,
        }
    }

    /// Parses a server URL:
    /// - `r3map://HOST[:PORT]/EXPORT?ca=PATH[&token=T][&cert=PATH&key=PATH][&server-name=N]`: TLS 1.3;
    /// - `r3map+plain://HOST[:PORT]/EXPORT[?token=T]`: plaintext TCP, for trusted networks;
    /// - `r3map+unix:///EXPORT?socket=PATH[&token=T]`: a Unix socket.
    ///
    /// Common parameters: `connections=N`, `timeout=SECONDS`. The port defaults to 1337 and the
    /// export to `default`.
    ///
    /// # Errors
    /// `InvalidInput` saying what is wrong with the URL; errors reading the PEM files.
    pub fn from_url(url: &str) -> io::Result<(Address, Self)> {
        let bad = |msg: String| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("bad server URL '{url}': {msg}"))
        };
        let u = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let params: HashMap<String, String> =
            u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
        for key in params.keys() {
            if !["ca", "token", "cert", "key", "server-name", "socket", "connections", "timeout"]
                .contains(&key.as_str())
            {
                return Err(bad(format!("unknown parameter '{key}'")));
            }
        }
        let export = match u.path().trim_start_matches('/') {
            "" => DEFAULT_EXPORT.to_owned(),
            p => p.to_owned(),
        };
        let tcp = || -> io::Result<Address> {
            let host = u.host_str().ok_or_else(|| bad("no host".into()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            Ok(Address::Tcp { host, port: u.port().unwrap_or(DEFAULT_PORT) })
        };
        let (address, security) = match u.scheme() {
            "r3map" => {
                let ca = params.get("ca").ok_or_else(|| {
                    bad("TLS needs the CA that signed the server's certificate: add ?ca=PATH (or use r3map+plain:// on a trusted network)".into())
                })?;
                let ca = read_pem(ca.as_ref())?;
                let identity = match (params.get("cert"), params.get("key")) {
                    (Some(c), Some(k)) => Some((read_pem(c.as_ref())?, read_pem(k.as_ref())?)),
                    (None, None) => None,
                    _ => return Err(bad("cert and key go together".into())),
                };
                let config = client_tls(&ca, identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())))?;
                (tcp()?, ClientSecurity::Tls { config, server_name: params.get("server-name").cloned() })
            }
            "r3map+plain" => (tcp()?, ClientSecurity::Plaintext),
            "r3map+unix" => {
                let socket =
                    params.get("socket").ok_or_else(|| bad("a Unix socket URL needs ?socket=PATH".into()))?;
                (Address::Unix(PathBuf::from(socket)), ClientSecurity::Plaintext)
            }
            other => {
                return Err(bad(format!("unknown scheme '{other}' (use r3map, r3map+plain or r3map+unix)")));
            }
        };
        let mut options = Self::new(security);
        options.export = export;
        options.token = params.get("token").cloned();
        if let Some(n) = params.get("connections") {
            options.connections =
                n.parse().ok().filter(|&n| n > 0).ok_or_else(|| bad(format!("connections={n}")))?;
        }
        if let Some(t) = params.get("timeout") {
            options.timeout = Duration::from_secs(t.parse().map_err(|_| bad(format!("timeout={t}")))?);
        }
        Ok((address, options))
    }
}

/// One request on its way, and where its answer goes.
struct Request {
    header: RequestHeader,
    payload: Arc<Vec<u8>>,
    reply: std_mpsc::SyncSender<io::Result<Vec<u8>>>,
    deadline: Instant,
}

impl Request {
    fn fail(self, e: io::Error) {
        let _ = self.reply.send(Err(e));
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the client is closed")
}

/// Requests of at most this many bytes are small: with two connections or more, they keep off
/// the connections that carry larger transfers (see [`RemoteBackend::lane`]).
const SMALL_REQUEST: u64 = 1 << 20;

/// [`RemoteBackend::lane`] for the connections whose large requests in flight are `bulk`, on the
/// caller's `turn` (a counter that spreads requests round the connections).
fn pick_lane(bulk: &[AtomicUsize], turn: usize, bytes: u64) -> usize {
    let n = bulk.len();
    if n < 2 {
        return 0;
    }
    if bytes > SMALL_REQUEST {
        return 1 + turn % (n - 1);
    }
    (0..n).map(|k| (turn + k) % n).find(|&i| bulk[i].load(Ordering::Relaxed) == 0).unwrap_or(0)
}

/// A request on its way: where its answer arrives, and its place among the large transfers in
/// flight, given back when the caller is done with it.
struct Sent<'a> {
    rx: std_mpsc::Receiver<io::Result<Vec<u8>>>,
    _bulk: Option<BulkSlot<'a>>,
}

/// One large request counted on its connection until dropped.
struct BulkSlot<'a>(&'a AtomicUsize);

impl Drop for BulkSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A `Backend` on an r3map server. See the module docs.
pub struct RemoteBackend {
    address: Address,
    info: ExportInfo,
    conns: Vec<mpsc::UnboundedSender<Request>>,
    next: AtomicUsize,
    /// Large requests in flight on each connection (see [`RemoteBackend::lane`]).
    bulk: Vec<AtomicUsize>,
    /// Number of the last pre-copy round asked for (sent with DIRTY, so that a round asked for
    /// again after a lost answer gets the same chunks).
    round: AtomicU64,
    pool: Arc<BufPool>,
    timeout: Duration,
    /// The connection tasks: they end once `conns` is dropped.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    io: Io,
}

impl fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteBackend")
            .field("address", &self.address)
            .field("info", &self.info)
            .field("connections", &self.conns.len())
            .finish()
    }
}

struct Target {
    address: Address,
    options: ClientOptions,
}

/// Connects to the socket at `path`. A missing socket file is `ConnectionRefused`, as a socket
/// nobody listens on is: a server being restarted removes and re-creates it, so it is a reason to
/// try again, not the `NotFound` of an export the server does not have.
async fn connect_unix(path: &std::path::Path) -> io::Result<tokio::net::UnixStream> {
    tokio::net::UnixStream::connect(path).await.map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "nothing listens at {} (there is no socket file): is the server running?",
                    path.display()
                ),
            )
        } else {
            e
        }
    })
}

impl Target {
    async fn connect(&self) -> io::Result<(BoxedIo, ExportInfo)> {
        let attempt = async {
            let mut io: BoxedIo = match &self.address {
                Address::Tcp { host, port } => {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    match &self.options.security {
                        ClientSecurity::Tls { config, server_name } => {
                            let name = server_name.clone().unwrap_or_else(|| host.clone());
                            let name = ServerName::try_from(name.clone()).map_err(|e| {
                                io::Error::new(
                                    io::ErrorKind::InvalidInput,
                                    format!("'{name}' is not a server name: {e}"),
                                )
                            })?;
                            let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
                            Box::new(connector.connect(name, tcp).await?)
                        }
                        ClientSecurity::Plaintext => Box::new(tcp),
                    }
                }
                Address::Unix(path) => Box::new(connect_unix(path).await?),
            };
            let hello = ClientHello {
                version: proto::VERSION,
                export: self.options.export.clone(),
                token: self.options.token.clone().unwrap_or_default(),
                max_request: self.options.max_request,
            };
            io.write_all(&hello.encode()).await?;
            io.flush().await?;
            let mut buf = Vec::with_capacity(64);
            let reply = loop {
                if let Some((reply, _)) = ServerHello::decode(&buf)? {
                    break reply;
                }
                let mut chunk = [0u8; 256];
                let n = io.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the server closed the connection during the handshake",
                    ));
                }
                buf.extend_from_slice(&chunk[..n]);
            };
            match reply {
                ServerHello::Accepted { info, .. } => Ok((io, info)),
                ServerHello::Refused { reason, message, .. } => {
                    let kind = match reason {
                        Refusal::Unauthorized => io::ErrorKind::PermissionDenied,
                        Refusal::UnknownExport => io::ErrorKind::NotFound,
                        Refusal::Version => io::ErrorKind::Unsupported,
                        Refusal::BadHello => io::ErrorKind::InvalidData,
                    };
                    Err(io::Error::new(kind, format!("the server refused the connection: {message}")))
                }
            }
        };
        match tokio::time::timeout(self.options.connect_timeout, attempt).await {
            Ok(r) => r.map_err(|e| io::Error::new(e.kind(), format!("connecting to {}: {e}", self.address))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting to {} took longer than {:?}", self.address, self.options.connect_timeout),
            )),
        }
    }
}

impl RemoteBackend {
    /// Connects to the URL's server (see [`ClientOptions::from_url`]).
    ///
    /// # Errors
    /// A bad URL, or as [`RemoteBackend::connect`].
    pub fn open(url: &str) -> io::Result<Self> {
        let (address, options) = ClientOptions::from_url(url)?;
        Self::connect(address, options)
    }

    /// Connects (the first connection now, so errors show here; the others in the background).
    ///
    /// # Errors
    /// Unreachable server, TLS failure, refused credentials (`PermissionDenied`), unknown export
    /// (`NotFound`), or a timeout.
    pub fn connect(address: Address, options: ClientOptions) -> io::Result<Self> {
        let runtime = options.io.clone().unwrap_or_else(Io::shared);
        let target = Arc::new(Target { address: address.clone(), options });
        // Every connection is opened now, all at once, rather than the others on their first
        // request: a read someone waits for must not pay for a handshake (two round trips), and
        // opening them side by side costs the round trips of one. The first connection's outcome
        // is the client's (its error, the export it describes); another that fails here is
        // opened on its first request.
        let ((first, info), others) = runtime.block_on(async {
            let mut tasks: Vec<_> = (0..target.options.connections.max(1))
                .map(|_| {
                    let target = Arc::clone(&target);
                    tokio::spawn(async move { target.connect().await })
                })
                .collect();
            let first = tasks.remove(0).await.map_err(io::Error::other)??;
            let mut others = Vec::with_capacity(tasks.len());
            for t in tasks {
                others.push(match t.await {
                    Ok(Ok((io, now))) if now.size == first.1.size && now.instance == first.1.instance => {
                        Some(io)
                    }
                    _ => None,
                });
            }
            io::Result::Ok((first, others))
        })?;
        let pool = Arc::new(BufPool::new(64));
        let mut conns = Vec::new();
        let mut tasks = Vec::new();
        for io in std::iter::once(Some(first)).chain(others) {
            let (tx, rx) = mpsc::unbounded_channel();
            tasks.push(runtime.handle().spawn(connection(
                Arc::clone(&target),
                info,
                io,
                rx,
                Arc::clone(&pool),
            )));
            conns.push(tx);
        }
        Ok(Self {
            address,
            info,
            conns,
            next: AtomicUsize::new(0),
            bulk: (0..target.options.connections.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            round: AtomicU64::new(0),
            pool,
            timeout: target.options.timeout,
            tasks,
            io: runtime,
        })
    }

    /// What the server said about the export.
    #[must_use]
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    fn send(&self, op: Op, offset: u64, length: u32, payload: Vec<u8>) -> io::Result<Sent<'_>> {
        let (reply, rx) = std_mpsc::sync_channel(1);
        let bytes = u64::from(length).max(len64(&payload));
        let request = Request {
            header: RequestHeader { op, flags: 0, id: 0, offset, length },
            payload: Arc::new(payload),
            reply,
            deadline: Instant::now() + self.timeout,
        };
        let i = self.lane(bytes);
        let bulk = (bytes > SMALL_REQUEST).then(|| {
            self.bulk[i].fetch_add(1, Ordering::Relaxed);
            BulkSlot(&self.bulk[i])
        });
        self.conns[i].send(request).map_err(|_| closed())?;
        Ok(Sent { rx, _bulk: bulk })
    }

    /// The connection a request of `bytes` goes on. With one connection, that one. With more, a
    /// large transfer (a background pull's, say) never takes the first connection, and a small
    /// request takes a connection without a large transfer in flight (the first one always
    /// qualifies): so a read someone waits for is never queued behind megabytes of another
    /// request's data, while small requests still spread over every connection when nothing
    /// large is going on.
    fn lane(&self, bytes: u64) -> usize {
        pick_lane(&self.bulk, self.next.fetch_add(1, Ordering::Relaxed), bytes)
    }

    fn wait(&self, rx: &std_mpsc::Receiver<io::Result<Vec<u8>>>, op: Op) -> io::Result<Vec<u8>> {
        self.wait_until(rx, op, Instant::now() + self.timeout)
    }

    /// Waits for an answer until `deadline` (shared by the requests of one call, so that a call of
    /// many requests waits `timeout` in all, not `timeout` for each).
    fn wait_until(
        &self,
        rx: &std_mpsc::Receiver<io::Result<Vec<u8>>>,
        op: Op,
        deadline: Instant,
    ) -> io::Result<Vec<u8>> {
        match crate::runtime::blocking(|| rx.recv_timeout(deadline.saturating_duration_since(Instant::now())))
        {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer to a {} from {} within {:?}", op.name(), self.address, self.timeout),
            )),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(closed()),
        }
    }

    fn call(&self, op: Op, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        let sent = self.send(op, offset, length, Vec::new())?;
        self.wait(&sent.rx, op)
    }

    fn writable(&self) -> io::Result<()> {
        if self.info.flags & export_flags::READ_ONLY != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the export on {} is read-only", self.address),
            ));
        }
        Ok(())
    }

    /// Sends a ranged operation without payload in pieces the protocol can carry.
    fn ranged(&self, op: Op, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.info.size)?;
        let piece = 1u64 << 30;
        let mut pos = off;
        let end = off + len;
        while pos < end {
            let n = (end - pos).min(piece);
            self.call(op, pos, u32::try_from(n).expect("a piece fits in u32"))?;
            pos += n;
        }
        Ok(())
    }
}

impl Drop for RemoteBackend {
    fn drop(&mut self) {
        // Without their senders, the connections answer what they hold, say goodbye and end.
        self.conns.clear();
        let tasks = std::mem::take(&mut self.tasks);
        if tokio::runtime::Handle::try_current().is_err() {
            // From blocking code, give them a moment to do so; inside a runtime, they end on
            // their own.
            self.io.block_on(async {
                let _ = tokio::time::timeout(Duration::from_millis(500), async {
                    for t in tasks {
                        let _ = t.await;
                    }
                })
                .await;
            });
        }
    }
}

impl Backend for RemoteBackend {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.read_many(&mut [(off, buf)])
    }

    /// Sends a request for every piece of every read first, then collects the answers: they are
    /// all in flight together, one round trip for the batch.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        for (off, buf) in reads.iter() {
            check_range(*off, len64(buf), self.info.size)?;
        }
        let max = (self.info.max_request as usize).max(1);
        let mut waits = Vec::with_capacity(reads.iter().map(|(_, b)| b.len().div_ceil(max)).sum());
        for (r, (off, buf)) in reads.iter().enumerate() {
            for (i, piece) in buf.chunks(max).enumerate() {
                let length = u32::try_from(piece.len()).expect("pieces are at most max_request");
                let sent = self.send(Op::Read, off + (i * max) as u64, length, Vec::new())?;
                waits.push((r, i * max, piece.len(), sent));
            }
        }
        let deadline = Instant::now() + self.timeout;
        let mut first_error = None;
        for (r, start, len, sent) in waits {
            match self.wait_until(&sent.rx, Op::Read, deadline) {
                Ok(data) if data.len() == len => {
                    reads[r].1[start..start + len].copy_from_slice(&data);
                    self.pool.put(data);
                }
                Ok(data) => {
                    first_error.get_or_insert(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the server sent {} bytes for a read of {len}", data.len()),
                    ));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.writable()?;
        check_range(off, len64(buf), self.info.size)?;
        let max = self.info.max_request as usize;
        let mut waits = Vec::new();
        for (i, piece) in buf.chunks(max).enumerate() {
            let mut payload = self.pool.take(piece.len());
            payload.copy_from_slice(piece);
            let length = u32::try_from(piece.len()).expect("pieces are at most max_request");
            waits.push(self.send(Op::Write, off + (i * max) as u64, length, payload)?);
        }
        let deadline = Instant::now() + self.timeout;
        let mut result = Ok(());
        for sent in waits {
            if let Err(e) = self.wait_until(&sent.rx, Op::Write, deadline) {
                result = result.and(Err(e));
            }
        }
        result
    }

    fn flush(&self) -> io::Result<()> {
        self.call(Op::Flush, 0, 0).map(drop)
    }

    fn capabilities(&self) -> Capabilities {
        let f = self.info.flags;
        Capabilities {
            trim: f & export_flags::TRIM != 0 && f & export_flags::READ_ONLY == 0,
            write_zeroes: f & export_flags::WRITE_ZEROES != 0 && f & export_flags::READ_ONLY == 0,
            extents: false,
            read_only: f & export_flags::READ_ONLY != 0,
        }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.capabilities().trim {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the remote export does not support trim",
            ));
        }
        self.ranged(Op::Trim, off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.capabilities().write_zeroes {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the remote export does not support write_zeroes",
            ));
        }
        self.ranged(Op::WriteZeroes, off, len)
    }
}

/// The remote export's migration operations (the server must export a seeder).
impl Seeder for RemoteBackend {
    fn chunk_size(&self) -> u64 {
        u64::from(self.info.chunk_size)
    }

    fn track(&self) -> io::Result<()> {
        self.call(Op::Track, 0, 0).map(drop)
    }

    fn sync(&self) -> io::Result<Vec<Chunk>> {
        let payload = self.call(Op::Sync, 0, 0)?;
        Ok(proto::decode_chunks(&payload)?.into_iter().map(Chunk).collect())
    }

    fn take_dirty(&self) -> io::Result<Vec<Chunk>> {
        let round = self.round.fetch_add(1, Ordering::SeqCst) + 1;
        let payload = self.call(Op::Dirty, round, 0)?;
        Ok(proto::decode_chunks(&payload)?.into_iter().map(Chunk).collect())
    }

    fn close(&self) -> io::Result<()> {
        self.call(Op::Close, 0, 0).map(drop)
    }
}

type Pending = Arc<Mutex<HashMap<u64, Request>>>;

enum SessionEnd {
    /// The client was dropped and nothing is left to send.
    Closed,
    Broken(io::Error),
}

/// One connection, across reconnections.
async fn connection(
    target: Arc<Target>,
    info: ExportInfo,
    mut first: Option<BoxedIo>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    pool: Arc<BufPool>,
) {
    let mut queue: VecDeque<Request> = VecDeque::new();
    let mut backoff = Duration::from_millis(50);
    let mut next_id = 1u64;
    // A connection that could not be opened with the others opens on its first request: only
    // later ones are reconnections.
    let mut connected_before = first.is_some();
    loop {
        let io = if let Some(io) = first.take() {
            io
        } else {
            // Reconnect only when there is something to send.
            if queue.is_empty() {
                match rx.recv().await {
                    Some(r) => queue.push_back(r),
                    None => return,
                }
            }
            // Everything waiting counts for the deadlines, not only what has been taken so far.
            while let Ok(r) = rx.try_recv() {
                queue.push_back(r);
            }
            expire(&mut queue, &target);
            if queue.is_empty() {
                continue;
            }
            match target.connect().await {
                Ok((_, now)) if info.flags & export_flags::VOLATILE != 0 && now.instance != info.instance => {
                    let e = io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!(
                            "the server at {} restarted, and its export keeps nothing across a restart \
                             (memory, or storage emptied on start): the data written before is gone",
                            target.address
                        ),
                    );
                    tracing::error!(address = %target.address, "{e}");
                    fail_all(&mut queue, &e);
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                Ok((io, now)) if now.size == info.size && now.chunk_size == info.chunk_size => {
                    backoff = Duration::from_millis(50);
                    if connected_before {
                        tracing::info!(address = %target.address, "reconnected");
                    } else {
                        tracing::debug!(address = %target.address, "connected");
                    }
                    connected_before = true;
                    io
                }
                Ok((_, now)) => {
                    let msg = format!("the export changed on reconnect (size {} → {})", info.size, now.size);
                    fail_all(&mut queue, &io::Error::new(io::ErrorKind::InvalidData, msg));
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(address = %target.address, error = %e, retry_in = ?backoff, "reconnecting failed");
                    if matches!(
                        e.kind(),
                        io::ErrorKind::PermissionDenied
                            | io::ErrorKind::NotFound
                            | io::ErrorKind::Unsupported
                    ) {
                        fail_all(&mut queue, &e);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(target.options.max_backoff);
                    continue;
                }
            }
        };
        let max_payload = info.max_request;
        let (rd, wr) = tokio::io::split(io);
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let mut reader =
            Some(tokio::spawn(read_replies(rd, Arc::clone(&pending), Arc::clone(&pool), max_payload)));
        let end = write_requests(wr, &mut rx, &mut queue, &pending, &mut next_id, &mut reader).await;
        if let Some(reader) = reader {
            reader.abort();
            let _ = reader.await;
        }
        // Whatever was sent without an answer goes again, first and in order.
        let mut unanswered: Vec<Request> =
            pending.lock().expect("pending lock").drain().map(|(_, r)| r).collect();
        unanswered.sort_by_key(|r| r.header.id);
        for r in unanswered.into_iter().rev() {
            queue.push_front(r);
        }
        match end {
            SessionEnd::Closed if queue.is_empty() => return,
            SessionEnd::Closed => {}
            SessionEnd::Broken(e) => {
                tracing::warn!(address = %target.address, error = %e, requests = queue.len(), "connection lost; reconnecting");
            }
        }
    }
}

/// Fails the requests whose deadline passed while they waited for a connection.
fn expire(queue: &mut VecDeque<Request>, target: &Target) {
    let now = Instant::now();
    let (keep, expired): (VecDeque<Request>, VecDeque<Request>) =
        queue.drain(..).partition(|r| r.deadline > now);
    *queue = keep;
    for r in expired {
        r.fail(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{} could not be reached within {:?}, the request's deadline",
                target.address, target.options.timeout
            ),
        ));
    }
}

fn fail_all(queue: &mut VecDeque<Request>, e: &io::Error) {
    for r in queue.drain(..) {
        r.fail(io::Error::new(e.kind(), e.to_string()));
    }
}

async fn write_requests(
    wr: WriteHalf<BoxedIo>,
    rx: &mut mpsc::UnboundedReceiver<Request>,
    queue: &mut VecDeque<Request>,
    pending: &Pending,
    next_id: &mut u64,
    reader: &mut Option<tokio::task::JoinHandle<io::Error>>,
) -> SessionEnd {
    let mut out = BufWriter::with_capacity(256 * 1024, wr);
    loop {
        let request = if let Some(r) = queue.pop_front() {
            r
        } else {
            if let Err(e) = out.flush().await {
                return SessionEnd::Broken(e);
            }
            let Some(running) = reader.as_mut() else {
                return SessionEnd::Broken(io::Error::other("the reply reader stopped"));
            };
            tokio::select! {
                biased;
                e = running => {
                    *reader = None;
                    return SessionEnd::Broken(e.unwrap_or_else(|j| io::Error::other(j.to_string())));
                }
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => {
                        // Nobody is left to wait for answers still due: say goodbye.
                        let bye = RequestHeader { op: Op::Disconnect, flags: 0, id: 0, offset: 0, length: 0 };
                        let _ = out.write_all(&bye.encode()).await;
                        let _ = out.flush().await;
                        return SessionEnd::Closed;
                    }
                },
            }
        };
        if request.deadline <= Instant::now() {
            request.fail(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request's deadline passed before it could be sent",
            ));
            continue;
        }
        let mut header = request.header;
        header.id = *next_id;
        *next_id += 1;
        let payload = Arc::clone(&request.payload);
        pending.lock().expect("pending lock").insert(header.id, Request { header, ..request });
        let sent = async {
            let body: &[u8] = if header.op == Op::Write { &payload } else { &[] };
            write_frame(&mut out, &header.encode(), body).await
        };
        if let Err(e) = sent.await {
            return SessionEnd::Broken(e);
        }
    }
}

async fn read_replies(
    mut rd: ReadHalf<BoxedIo>,
    pending: Pending,
    pool: Arc<BufPool>,
    max_payload: u32,
) -> io::Error {
    let mut header = [0u8; REPLY_HEADER_LEN];
    loop {
        if let Err(e) = rd.read_exact(&mut header).await {
            return e;
        }
        let h = match ReplyHeader::decode(&header, max_payload) {
            Ok(h) => h,
            Err(e) => return e.into(),
        };
        let mut payload = pool.take(h.length as usize);
        if let Err(e) = rd.read_exact(&mut payload).await {
            return e;
        }
        let Some(request) = pending.lock().expect("pending lock").remove(&h.id) else {
            return io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the server answered request {} that was never sent", h.id),
            );
        };
        if let Ok(p) = Arc::try_unwrap(request.payload) {
            pool.put(p);
        }
        let result = if h.status == 0 {
            Ok(payload)
        } else {
            let message = String::from_utf8_lossy(&payload).into_owned();
            pool.put(payload);
            Err(errno::to_io(h.status, &message))
        };
        let _ = request.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_socket_file_is_refused_not_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone.sock");
        let e = Io::shared().block_on(connect_unix(&path)).unwrap_err();
        // Not NotFound: the reconnect loop fails every waiting request at once on that.
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("gone.sock") && e.to_string().contains("server running"), "{e}");
    }

    fn lanes(counts: &[usize]) -> Vec<AtomicUsize> {
        counts.iter().map(|&c| AtomicUsize::new(c)).collect()
    }

    #[test]
    fn one_connection_takes_everything() {
        let bulk = lanes(&[3]);
        for turn in 0..4 {
            assert_eq!(pick_lane(&bulk, turn, 1), 0);
            assert_eq!(pick_lane(&bulk, turn, 64 << 20), 0);
        }
    }

    #[test]
    fn large_transfers_keep_off_the_first_connection() {
        let bulk = lanes(&[0, 0, 0, 0]);
        let picked: Vec<usize> = (0..6).map(|turn| pick_lane(&bulk, turn, SMALL_REQUEST + 1)).collect();
        assert_eq!(picked, [1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn small_requests_spread_while_nothing_large_is_in_flight_then_avoid_it() {
        let idle = lanes(&[0, 0, 0]);
        let picked: Vec<usize> = (0..3).map(|turn| pick_lane(&idle, turn, 4096)).collect();
        assert_eq!(picked, [0, 1, 2]);
        // Connections 1 and 2 carry large transfers: every small request takes connection 0.
        let busy = lanes(&[0, 2, 1]);
        assert!((0..6).all(|turn| pick_lane(&busy, turn, SMALL_REQUEST) == 0));
        // Only connection 1 is busy: small requests use 0 and 2.
        let one = lanes(&[0, 1, 0]);
        let picked: Vec<usize> = (0..3).map(|turn| pick_lane(&one, turn, 4096)).collect();
        assert_eq!(picked, [0, 2, 2]);
    }
}
