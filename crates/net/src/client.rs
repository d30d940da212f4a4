//! [`RemoteBackend`]: a [`Backend`] served by an r3map server, with many requests in flight per
//! connection, optional several connections, and reconnection.
//!
//! The connections are a [`Mux`] (pipelining, request classes, deadlines, reconnection with
//! backoff, resend): this module brings the r3map protocol's handshake and framing to it, and the
//! `Backend` on top. The public API is blocking, like every `Backend`; the connections run on the
//! runtime of [`ClientOptions::io`] (the process's shared one unless the caller gives its own), so
//! it may be called from any thread, a tokio worker included.
//!
//! Every request is safe to repeat after a reconnection: positional writes, trims and flushes are
//! idempotent, and the server keeps its last answers to `take_dirty` (numbered rounds) and `sync`,
//! so a round or the final sync asked for again gets the chunk list it would have had. Every
//! request has a deadline (`timeout`): a caller waits for the answer, through reconnections, until
//! then, and gets `TimedOut` after, never stale or made-up data.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use r3map_core::backend::len64;
use r3map_core::{Backend, Capabilities, Chunk, Seeder, check_range};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::errno;
use crate::mux::{Class, Codec, ConnectError, InFlight, Mux, MuxOptions, ReadEnd, Ticket};
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
        // Messages never show the token.
        let shown = crate::params::shown(url);
        let bad = |msg: String| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("bad server URL '{shown}': {msg}"))
        };
        let u = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let mut params = crate::params::Params::parse(url)?;
        let ca = params.path("ca")?;
        let cert = params.path("cert")?;
        let key = params.path("key")?;
        let token = params.take("token");
        let server_name = params.take("server-name");
        let socket = params.path("socket")?;
        let connections = params.take("connections");
        let timeout = params.take("timeout");
        params.finish()?;
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
                let ca = ca.ok_or_else(|| {
                    bad("TLS needs the CA that signed the server's certificate: add ?ca=PATH (or use r3map+plain:// on a trusted network)".into())
                })?;
                let ca = read_pem(&ca)?;
                let identity = match (cert, key) {
                    (Some(c), Some(k)) => Some((read_pem(&c)?, read_pem(&k)?)),
                    (None, None) => None,
                    _ => return Err(bad("cert and key go together".into())),
                };
                let config = client_tls(&ca, identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())))?;
                (tcp()?, ClientSecurity::Tls { config, server_name })
            }
            "r3map+plain" => (tcp()?, ClientSecurity::Plaintext),
            "r3map+unix" => {
                let socket = socket.ok_or_else(|| bad("a Unix socket URL needs ?socket=PATH".into()))?;
                (Address::Unix(socket), ClientSecurity::Plaintext)
            }
            other => {
                return Err(bad(format!("unknown scheme '{other}' (use r3map, r3map+plain or r3map+unix)")));
            }
        };
        let mut options = Self::new(security);
        options.export = export;
        options.token = token;
        if let Some(n) = connections {
            options.connections =
                n.parse().ok().filter(|&n| n > 0).ok_or_else(|| bad(format!("connections={n}")))?;
        }
        if let Some(t) = timeout {
            options.timeout = Duration::from_secs(t.parse().map_err(|_| bad(format!("timeout={t}")))?);
        }
        Ok((address, options))
    }
}

/// Requests of more than this many bytes are background transfers (a pull's or a push's); smaller
/// ones are demand requests, sent first (see [`r3map_net::mux`](crate::mux)).
const SMALL_REQUEST: u64 = 1 << 20;

/// A request as the connection keeps it: its header (the id is the connection's) and the data
/// of a write.
#[derive(Debug)]
struct Request {
    header: RequestHeader,
    payload: Pooled,
}

/// A payload buffer from the client's pool, shared with the writer while it is sent.
#[derive(Debug, Clone)]
struct Pooled(Arc<Vec<u8>>);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// What a request is, for messages.
#[derive(Debug, Clone, Copy)]
struct Summary {
    op: Op,
    offset: u64,
    length: u32,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.op {
            Op::Read | Op::Write | Op::Trim | Op::WriteZeroes => {
                write!(f, "{} of {} bytes at offset {}", self.op.name(), self.length, self.offset)
            }
            op => f.write_str(op.name()),
        }
    }
}

/// The r3map protocol's part of a connection: its handshake and framing.
struct Native {
    target: Target,
    pool: Arc<BufPool>,
    peer: String,
}

impl Codec for Native {
    type Request = Request;
    type Reply = Vec<u8>;
    type Session = ExportInfo;
    type ReadState = ();
    type Summary = Summary;
    type Payload = Pooled;

    fn peer(&self) -> &str {
        &self.peer
    }

    async fn connect(&self) -> Result<(BoxedIo, ExportInfo), ConnectError> {
        self.target.connect().await.map_err(|error| ConnectError {
            permanent: matches!(
                error.kind(),
                io::ErrorKind::PermissionDenied | io::ErrorKind::NotFound | io::ErrorKind::Unsupported
            ),
            error,
        })
    }

    fn check_reconnect(&self, first: &ExportInfo, now: &ExportInfo) -> io::Result<()> {
        if first.flags & export_flags::VOLATILE != 0 && now.instance != first.instance {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "the server at {} restarted, and its export keeps nothing across a restart \
                     (memory, or storage emptied on start): the data written before is gone",
                    self.target.address
                ),
            ));
        }
        if now.size != first.size || now.chunk_size != first.chunk_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the export changed on reconnect (size {} → {}, chunk size {} → {})",
                    first.size, now.size, first.chunk_size, now.chunk_size
                ),
            ));
        }
        Ok(())
    }

    fn summary(&self, r: &Request) -> Summary {
        Summary { op: r.header.op, offset: r.header.offset, length: r.header.length }
    }

    fn cost(&self, r: &Request) -> u64 {
        match r.header.op {
            Op::Read | Op::Write => u64::from(r.header.length),
            _ => 0,
        }
    }

    fn encode(&self, id: u64, r: &Request, header: &mut Vec<u8>) -> Option<Pooled> {
        header.extend_from_slice(&RequestHeader { id, ..r.header }.encode());
        (r.header.op == Op::Write).then(|| r.payload.clone())
    }

    fn goodbye(&self, id: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(
            &RequestHeader { op: Op::Disconnect, flags: 0, id, offset: 0, length: 0 }.encode(),
        );
    }

    async fn read<R: AsyncRead + Unpin + Send>(
        &self,
        rd: &mut R,
        session: &ExportInfo,
        (): &mut (),
        in_flight: &InFlight<Self>,
    ) -> Result<(), ReadEnd> {
        let mut header = [0u8; REPLY_HEADER_LEN];
        rd.read_exact(&mut header).await?;
        let h = ReplyHeader::decode(&header, session.max_request)
            .map_err(|e| ReadEnd::Violation(format!("a malformed reply header: {e}")))?;
        let mut payload = self.pool.take(h.length as usize);
        rd.read_exact(&mut payload).await?;
        if !in_flight.contains(h.id) {
            return Err(ReadEnd::Violation(format!("an answer to request {}, which was never sent", h.id)));
        }
        let result = if h.status == 0 {
            Ok(payload)
        } else {
            let message = String::from_utf8_lossy(&payload).into_owned();
            self.pool.put(payload);
            Err(errno::to_io(h.status, &message))
        };
        if let Some(request) = in_flight.complete(h.id, result)
            && let Ok(p) = Arc::try_unwrap(request.payload.0)
        {
            self.pool.put(p);
        }
        Ok(())
    }
}

/// A `Backend` on an r3map server. See the module docs.
pub struct RemoteBackend {
    address: Address,
    info: ExportInfo,
    mux: Mux<Native>,
    /// Number of the last pre-copy round asked for (sent with DIRTY, so that a round asked for
    /// again after a lost answer gets the same chunks).
    round: AtomicU64,
    pool: Arc<BufPool>,
}

impl fmt::Debug for RemoteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteBackend")
            .field("address", &self.address)
            .field("info", &self.info)
            .field("connections", &self.mux.connections())
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

    /// Connects: every connection at once, since a read someone waits for must not pay for a
    /// handshake; the first connection's outcome is the client's (its error, the export it
    /// describes), and another that fails now is opened on its first request.
    ///
    /// # Errors
    /// Unreachable server, TLS failure, refused credentials (`PermissionDenied`), unknown export
    /// (`NotFound`), or a timeout.
    pub fn connect(address: Address, options: ClientOptions) -> io::Result<Self> {
        let io = options.io.clone().unwrap_or_else(Io::shared);
        let mux_options = MuxOptions {
            connections: options.connections.max(1),
            timeout: options.timeout,
            max_backoff: options.max_backoff,
            close_grace: Duration::from_millis(500),
            ..MuxOptions::default()
        };
        let pool = Arc::new(BufPool::new(64));
        let codec = Native {
            peer: format!("the r3map server at {address}"),
            target: Target { address: address.clone(), options },
            pool: Arc::clone(&pool),
        };
        let mux = Mux::open(codec, mux_options, &io, |_| usize::MAX)?;
        let info = *mux.session();
        Ok(Self { address, info, mux, round: AtomicU64::new(0), pool })
    }

    /// What the server said about the export.
    #[must_use]
    pub fn info(&self) -> ExportInfo {
        self.info
    }

    /// Sends a request; a large transfer goes as background, so that small reads someone waits
    /// for are sent first (and, with two connections or more, on another connection).
    fn send(&self, op: Op, offset: u64, length: u32, payload: Vec<u8>) -> io::Result<Ticket<Native>> {
        let bytes = u64::from(length).max(len64(&payload));
        let class = if bytes > SMALL_REQUEST { Class::Background } else { Class::Demand };
        let request = Request {
            header: RequestHeader { op, flags: 0, id: 0, offset, length },
            payload: Pooled(Arc::new(payload)),
        };
        self.mux.submit(class, request)
    }

    fn call(&self, op: Op, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        let ticket = self.send(op, offset, length, Vec::new())?;
        self.mux.wait(&ticket)
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
        let mut first_error = None;
        for (r, start, len, sent) in waits {
            match self.mux.wait(&sent) {
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
        let mut result = Ok(());
        for sent in waits {
            if let Err(e) = self.mux.wait(&sent) {
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
}
