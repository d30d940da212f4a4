//! `r3map serve`: exports one backend over TCP (TLS 1.3, or plaintext when asked for) and/or a
//! Unix socket, over NBD (TCP with STARTTLS, and/or a Unix socket) for the kernel, QEMU and
//! libnbd, with optional Prometheus metrics; also the server behind `ram-ul`.
//!
//! Security is a choice the user makes, never a default: a TCP listener needs either a TLS
//! certificate and key or `--insecure-plaintext`. A Unix socket is protected by its file's
//! permissions and needs no TLS. Clients authenticate with a token, a client certificate
//! (`--tls-client-ca`), or both.
//!
//! Shutdown: the first SIGINT or SIGTERM stops accepting connections, lets the requests in
//! flight finish, flushes the backend and exits 0; a second one exits at once with 130 (SIGINT)
//! or 143 (SIGTERM), without waiting or flushing.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs as _};
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, Weak};

use r3map::{OpenOptions, Opened};
use r3map_core::{Aligned, Backend as _, Chunked, Seeder as _, SharedBackend};
use r3map_grpc::{GrpcExport, GrpcSecurity, ServerTls, TlsIdentity};
use r3map_migrate::{Source, SourceHooks};
use r3map_nbd::{BlockSizes, NbdExport, NbdServer, NbdTls, TlsMode};
use r3map_net::proto::MIN_MAX_REQUEST;
use r3map_net::security::read_pem;
use r3map_net::{Export, Server, ServerConfig, ServerSecurity, server_tls};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::watch;

use crate::backend_url;
use crate::units::{human, parse_size};

/// The long help of `serve`'s BACKEND-URL (and `migrate seed`'s).
fn backend_help() -> String {
    backend_url::help(
        "What to serve (quote it in the shell: `?` and `&` are special there):",
        "A file of another size than ?size asks for is an error, never emptied unless truncate=true \
         says so; memory is lost when the server stops. A server or NBD URL is served on (a protocol \
         gateway). Directories and stores take their chunk size from --chunk-size unless the URL \
         gives one; store credentials go in the URL or, for S3, the environment.",
    )
}

/// Where TCP listens unless told otherwise: every interface, port 1337.
pub const DEFAULT_LISTEN: &str = ":1337";

/// The flags of `r3map serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to serve: a backend URL (quote it in the shell: `?` and `&` are special there).
    #[arg(value_name = "BACKEND-URL", long_help = backend_help())]
    pub backend: String,
    /// TCP address to listen on: HOST:PORT, `[IPV6]:PORT`, or :PORT for every interface. Defaults
    /// to `[::]:1337` (every interface, IPv4 and IPv6), unless only --unix is given.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Serve on a Unix socket at PATH. Without --listen, only the socket is served; with it, both.
    /// Access is governed by the socket file's permissions; no TLS is used on it.
    #[arg(long, value_name = "PATH")]
    pub unix: Option<PathBuf>,
    /// The export name clients ask for (the path of their URL).
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub export: String,
    /// Refuse writes, trims and zeroing; files and block devices are opened read-only.
    #[arg(long)]
    pub read_only: bool,
    /// The chunk size announced to clients, the unit of --chunking and --seeder tracking, and the
    /// chunk size of a dir:// backend that names none.
    #[arg(long, default_value = "64KiB", value_parser = parse_size, value_name = "SIZE")]
    pub chunk_size: u64,
    /// Server-side chunking: the backend only ever sees whole, aligned chunks (any request is
    /// widened to chunks by read-modify-write on the server, so clients need no chunking of their
    /// own, which costs them round trips).
    #[arg(long)]
    pub chunking: bool,
    /// Serve as a migration source: record the chunks written between a client's `track` and
    /// `sync` (the seeder operations of a live migration).
    #[arg(long)]
    pub seeder: bool,
    #[command(flatten)]
    pub nbd: NbdArgs,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Serving the export over NBD too.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "NBD (for the kernel's nbd client, QEMU, nbdcopy, nbdfuse, fio...)")]
pub struct NbdArgs {
    /// Serve the export over NBD on TCP at ADDR (HOST:PORT, [IPV6]:PORT or :PORT; NBD's usual
    /// port is 10809). Clients use `nbd://HOST:PORT/EXPORT` (`nbds://` with TLS). With
    /// --tls-cert, clients must start TLS (NBD_OPT_STARTTLS); NBD has no token, so authenticate
    /// clients with --tls-client-ca. Without --listen or --unix, only NBD is served.
    #[arg(long, value_name = "ADDR")]
    pub nbd: Option<String>,
    /// Serve NBD on a Unix socket at PATH (`nbd+unix:///EXPORT?socket=PATH`); TLS is offered
    /// there but not required.
    #[arg(long, value_name = "PATH")]
    pub nbd_unix: Option<PathBuf>,
    /// The minimum block size announced to NBD clients (a power of two, at most 64 KiB) [default:
    /// 1, any alignment works]
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub nbd_min_block: Option<u64>,
    /// The preferred block size announced to NBD clients [default: 4 KiB, or the chunk size with
    /// --chunking]
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub nbd_preferred_block: Option<u64>,
    /// The largest read or write NBD clients may send (at most 32 MiB) [default: --max-request,
    /// up to 32 MiB]
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub nbd_max_block: Option<u64>,
    /// Requests one NBD connection runs at once, each on its own thread (started as needed).
    /// Raise it for a backend with a long latency per call (a remote): a connection moves at most
    /// this many requests per round trip [default: 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub nbd_threads: Option<u16>,
}

impl NbdArgs {
    fn any(&self) -> bool {
        self.nbd.is_some() || self.nbd_unix.is_some()
    }

    /// The block sizes these flags announce.
    ///
    /// # Errors
    /// Sizes the NBD spec does not allow.
    pub fn block_sizes(&self, chunking: Option<u64>, max_request: u64) -> anyhow::Result<BlockSizes> {
        let to32 = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| anyhow!("the NBD {what} block size {v} is too large"))
        };
        let min = to32(self.nbd_min_block.unwrap_or(1), "minimum")?;
        let default_preferred = chunking.unwrap_or(4096).clamp(u64::from(min).max(512), 32 << 20);
        let preferred = to32(self.nbd_preferred_block.unwrap_or(default_preferred), "preferred")?;
        let default_max = max_request.min(u64::from(r3map_nbd::proto::MAX_REQUEST));
        let default_max = default_max - default_max % u64::from(min);
        let max = to32(self.nbd_max_block.unwrap_or(default_max), "maximum")?;
        BlockSizes::new(min, preferred, max).map_err(|e| anyhow!("{e}"))
    }
}

/// Flags `r3map serve` and `ram-ul` share: limits, security, metrics.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Largest request (and reply) payload; larger client requests are split by the client.
    #[arg(long, default_value = "32MiB", value_parser = parse_size, value_name = "SIZE")]
    pub max_request: u64,
    /// Serve Prometheus metrics (`r3map_server_*`: requests, bytes, errors, latency,
    /// connections) over HTTP on ADDR (HOST:PORT or :PORT), at /metrics. Port 0 takes a free
    /// port; the address bound is printed with the others.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Also serve the Go r3map's gRPC services on ADDR (HOST:PORT or :PORT): the mount service
    /// (`com.pojtinger.felicitas.r3map.mount.v1.Backend`) and, with --seeder, the migration one
    /// (`...migration.v1.Seeder`), so Go r3map peers and any gRPC client can use the export.
    /// gRPC clients send no token: it needs TLS with --tls-client-ca, or --insecure-plaintext.
    #[arg(long, value_name = "ADDR")]
    pub grpc: Option<String>,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// How clients are authenticated and connections protected.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Security (a TCP listener needs TLS or --insecure-plaintext)")]
pub struct SecurityArgs {
    /// The server's certificate chain (PEM) for TLS 1.3 on TCP. `r3map certs` makes one.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. Clients without one are
    /// refused during the TLS handshake.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// A shared secret every client must send. It shows in the process list: prefer --token-file
    /// or the R3MAP_TOKEN environment variable (used when neither flag is given).
    #[arg(long, value_name = "TOKEN", conflicts_with = "token_file")]
    pub token: Option<String>,
    /// Read the shared secret from a file (a trailing newline is ignored).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Serve TCP without encryption: anyone on the path can read the data and the token. Only for
    /// trusted networks and tests.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure_plaintext: bool,
}

/// The security a server runs with, checked and loaded.
#[derive(Debug, Clone)]
pub struct Security {
    pub server: ServerSecurity,
    pub token: Option<String>,
    /// Clients must present a certificate.
    pub client_certs: bool,
}

impl SecurityArgs {
    /// Loads the certificates and the token, and checks a TCP listener (`tcp`) has a security
    /// choice.
    ///
    /// # Errors
    /// No choice for TCP, unreadable or unusable PEM, an unreadable or empty token.
    pub fn resolve(&self, tcp: bool) -> anyhow::Result<Security> {
        if tcp && self.tls_cert.is_none() && !self.insecure_plaintext {
            bail!(
                "refusing to serve TCP without a choice of security. Choose one of:\n  \
                 --tls-cert PEM --tls-key PEM    TLS 1.3 (`r3map certs` makes a CA and certificates);\n  \
                 \x20                               add --tls-client-ca PEM to require client certificates\n  \
                 --insecure-plaintext            no encryption, for trusted networks only\n  \
                 --unix PATH (and no --listen)   a Unix socket only, which needs no TLS\n\
                 and consider --token-file PATH (or R3MAP_TOKEN), so clients must also know a secret"
            );
        }
        let server = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let ca = self.tls_client_ca.as_deref().map(read_pem).transpose()?;
                let config =
                    server_tls(&read_pem(cert)?, &read_pem(key)?, ca.as_deref()).with_context(|| {
                        format!("cannot use {} and {} for TLS", cert.display(), key.display())
                    })?;
                ServerSecurity::Tls(config)
            }
            (None, None) => ServerSecurity::Plaintext,
            _ => bail!("--tls-cert and --tls-key go together"),
        };
        let token = if let Some(t) = &self.token {
            Some(t.clone())
        } else if let Some(path) = &self.token_file {
            let t = fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            Some(t.trim_end_matches(['\n', '\r']).to_owned())
        } else {
            std::env::var("R3MAP_TOKEN").ok().filter(|t| !t.is_empty())
        };
        if token.as_deref() == Some("") {
            bail!("the token is empty; give a secret, or no token at all");
        }
        Ok(Security { server, token, client_certs: self.tls_client_ca.is_some() })
    }
}

impl SecurityArgs {
    /// The gRPC listener's security: the same certificate, and client certificates, since gRPC
    /// clients cannot send a token.
    ///
    /// # Errors
    /// TLS without client certificates and without --insecure-plaintext; unreadable PEM.
    pub fn grpc(&self) -> anyhow::Result<GrpcSecurity> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                let Some(ca) = &self.tls_client_ca else {
                    bail!(
                        "--grpc needs --tls-client-ca: gRPC clients send no token, so they must be \
                         authenticated by certificate (or use --insecure-plaintext on a trusted network)"
                    );
                };
                Ok(GrpcSecurity::Tls(ServerTls {
                    identity: TlsIdentity::from_pem(read_pem(cert)?, read_pem(key)?),
                    client_ca_pem: Some(read_pem(ca)?),
                }))
            }
            _ if self.insecure_plaintext => Ok(GrpcSecurity::Plaintext),
            _ => bail!("--grpc needs TLS (--tls-cert, --tls-key, --tls-client-ca) or --insecure-plaintext"),
        }
    }
}

impl Security {
    /// `TLS 1.3, client certificates, token`, `plaintext, no token`, ...
    fn tcp_mode(&self) -> String {
        let mut s = match self.server {
            ServerSecurity::Tls(_) if self.client_certs => "TLS 1.3, client certificates".to_owned(),
            ServerSecurity::Tls(_) => "TLS 1.3".to_owned(),
            ServerSecurity::Plaintext => "plaintext".to_owned(),
        };
        s.push_str(if self.token.is_some() { ", token" } else { ", no token" });
        s
    }

    /// `STARTTLS required, client certificates`, `plaintext`, ...
    fn nbd_mode(&self) -> &'static str {
        match self.server {
            ServerSecurity::Tls(_) if self.client_certs => "STARTTLS required, client certificates",
            ServerSecurity::Tls(_) => "STARTTLS required, no client authentication",
            ServerSecurity::Plaintext => "plaintext, no client authentication",
        }
    }
}

/// A server to run: what `r3map serve` and `ram-ul` have parsed from their flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// TCP address (`HOST:PORT`, `[V6]:PORT`, `:PORT`), if TCP is served.
    pub listen: Option<String>,
    pub unix: Option<PathBuf>,
    pub export: String,
    pub read_only: bool,
    pub chunk_size: u64,
    pub chunking: bool,
    pub seeder: bool,
    /// What a migration source does beyond serving (`r3map migrate seed`).
    pub migration: MigrationOptions,
    pub nbd: NbdArgs,
    pub common: CommonArgs,
}

/// A migration source's behaviour (with `seeder`).
#[derive(Debug, Clone, Default)]
pub struct MigrationOptions {
    /// Stop serving (cleanly) once the destination closes the migration.
    pub exit_when_closed: bool,
    /// A demo application: once the destination starts tracking, keep rewriting this share
    /// (0..=100) of the resource with random data, until the destination's final sync suspends
    /// it.
    pub invalidate_percent: Option<f64>,
}

impl Args {
    /// The server these flags describe.
    #[must_use]
    pub fn config(&self) -> Config {
        let listen = match (&self.listen, &self.unix) {
            (Some(l), _) => Some(l.clone()),
            (None, None) if !self.nbd.any() => Some(DEFAULT_LISTEN.to_owned()),
            (None, _) => None,
        };
        Config {
            listen,
            unix: self.unix.clone(),
            export: self.export.clone(),
            read_only: self.read_only,
            chunk_size: self.chunk_size,
            chunking: self.chunking,
            seeder: self.seeder,
            migration: MigrationOptions::default(),
            nbd: self.nbd.clone(),
            common: self.common.clone(),
        }
    }
}

/// `r3map serve`.
///
/// # Errors
/// As [`run`].
pub fn run_args(args: &Args) -> anyhow::Result<()> {
    let options =
        OpenOptions { read_only: args.read_only, chunk_size: args.chunk_size, ..OpenOptions::default() };
    let url = args.backend.clone();
    run(&args.config(), move || Ok(r3map::open(&url, &options)?))
}

/// Runs a server until SIGINT or SIGTERM: checks the flags, binds the listeners, then calls
/// `open_backend` (so nothing is created or deleted when the flags or addresses are wrong), and
/// serves. Returns after a clean shutdown (requests finished, backend flushed).
///
/// # Errors
/// Bad flags, addresses that cannot be bound, a backend that cannot be opened, a failed final
/// flush.
pub fn run(config: &Config, open_backend: impl FnOnce() -> anyhow::Result<Opened>) -> anyhow::Result<()> {
    if config.listen.is_none() && config.unix.is_none() && !config.nbd.any() {
        bail!("nothing to serve on: give --listen ADDR, --unix PATH, --nbd ADDR or --nbd-unix PATH");
    }
    let security = config.common.security.resolve(config.listen.is_some() || config.nbd.nbd.is_some())?;
    if config.nbd.nbd.is_some() && security.token.is_some() && !security.client_certs {
        bail!(
            "NBD clients cannot send the token, so --nbd would serve without it: add --tls-client-ca \
             (with --tls-cert) so NBD clients are authenticated by certificate, or serve NBD only on \
             --nbd-unix"
        );
    }
    let chunking = config.chunking.then_some(config.chunk_size);
    let block_sizes = config.nbd.block_sizes(chunking, config.common.max_request)?;
    let grpc_security = config.common.grpc.as_ref().map(|_| config.common.security.grpc()).transpose()?;
    let chunk_size = u32::try_from(config.chunk_size)
        .ok()
        .filter(|&c| c > 0)
        .ok_or_else(|| anyhow!("the chunk size must be between 1 byte and 4 GiB"))?;
    let max_request = u32::try_from(config.common.max_request)
        .ok()
        .filter(|&m| m >= MIN_MAX_REQUEST)
        .ok_or_else(|| anyhow!("the maximum request must be between {MIN_MAX_REQUEST} bytes and 4 GiB"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("r3map-serve")
        .build()
        .context("cannot start the async runtime")?;
    let limits = Limits { chunk_size, max_request, block_sizes };
    runtime.block_on(serve(config, security, grpc_security, limits, open_backend))
}

/// Checked sizes of a server.
struct Limits {
    chunk_size: u32,
    max_request: u32,
    block_sizes: BlockSizes,
}

async fn serve(
    config: &Config,
    security: Security,
    grpc_security: Option<GrpcSecurity>,
    limits: Limits,
    open_backend: impl FnOnce() -> anyhow::Result<Opened>,
) -> anyhow::Result<()> {
    let Limits { chunk_size, max_request, block_sizes } = limits;
    // Catch the signals before anything else, so one that arrives during start-up is not fatal.
    let mut sigint = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;

    let tcp = match &config.listen {
        Some(addr) => Some(bind_tcp(addr).await?),
        None => None,
    };
    let (unix, socket_file) = match &config.unix {
        Some(path) => {
            let (listener, file) = SocketFile::bind(path)?;
            (Some(listener), Some(file))
        }
        None => (None, None),
    };
    let grpc = match &config.common.grpc {
        Some(addr) => Some(bind_tcp(addr).await?),
        None => None,
    };
    let nbd_tcp = match &config.nbd.nbd {
        Some(addr) => Some(bind_tcp(addr).await?),
        None => None,
    };
    let (nbd_unix, nbd_socket_file) = match &config.nbd.nbd_unix {
        Some(path) => {
            let (listener, file) = SocketFile::bind(path)?;
            (Some(listener), Some(file))
        }
        None => (None, None),
    };
    let metrics = match &config.common.metrics {
        Some(addr) => {
            let listener = bind_tcp(addr).await.with_context(|| format!("cannot serve metrics on {addr}"))?;
            let bound = listener.local_addr().context("cannot read the metrics address")?;
            crate::prometheus::serve(listener)?;
            Some(bound)
        }
        None => None,
    };

    // Opening blocks (a file created, a server or store connected to): this worker is handed
    // over to blocking meanwhile, so the runtime's other tasks go on.
    let opened = tokio::task::block_in_place(open_backend)?;
    let description = opened.description.clone();
    let migration_closed = Arc::new(tokio::sync::Notify::new());
    let (export, summary) = export(config, opened, chunk_size, &migration_closed)?;
    let nbd_server = if config.nbd.any() {
        let nbd_export = NbdExport {
            read_only: export.read_only,
            description: Some(description),
            block_sizes,
            ..NbdExport::new(config.export.clone(), Arc::clone(&export.backend))
        };
        let mut nbd = NbdServer::new(vec![nbd_export])
            .context("cannot set up the NBD server")?
            .with_threads(config.nbd.nbd_threads.map_or(r3map_nbd::DEFAULT_THREADS, usize::from));
        if let ServerSecurity::Tls(tls) = &security.server {
            nbd = nbd.with_tls(NbdTls { config: Arc::clone(tls), mode: TlsMode::Require });
        }
        Some(nbd)
    } else {
        None
    };
    let grpc_export = grpc_security.map(|security| GrpcExport {
        backend: Arc::clone(&export.backend),
        seeder: export.seeder.clone(),
        max_read: u64::from(max_request),
        read_only: export.read_only,
        security,
        shutdown_grace: r3map_grpc::DEFAULT_SHUTDOWN_GRACE,
    });
    let mut server_config = ServerConfig::new(export, security.server.clone());
    server_config.token.clone_from(&security.token);
    server_config.max_request = max_request;
    let server = Server::new(server_config).context("cannot set up the server")?;

    let mut line = format!("serving {summary}");
    let mut places = Vec::new();
    if let Some(l) = &tcp {
        let addr = l.local_addr().context("cannot read the listening address")?;
        places.push(format!("{addr} [{}]", security.tcp_mode()));
        warn_about(&security, addr);
    }
    if let Some(path) = &config.unix {
        let token = if security.token.is_some() { "token" } else { "no token" };
        places.push(format!("unix:{} [{token}]", path.display()));
    }
    if let Some(l) = &grpc {
        let addr = l.local_addr().context("cannot read the gRPC listening address")?;
        places.push(format!("gRPC {addr}"));
    }
    if let Some(l) = &nbd_tcp {
        let addr = l.local_addr().context("cannot read the NBD listening address")?;
        places.push(format!("NBD {addr} [{}]", security.nbd_mode()));
        if matches!(security.server, ServerSecurity::Plaintext) {
            tracing::warn!(%addr, "NBD in plaintext: anyone who can reach this address can read and write the export");
        } else if !security.client_certs {
            tracing::warn!(
                %addr,
                "NBD over TLS without client certificates: anyone who can reach this address can read and \
                 write the export (add --tls-client-ca)"
            );
        }
    }
    if let Some(path) = &config.nbd.nbd_unix {
        places.push(format!("NBD unix:{}", path.display()));
    }
    let _ = write!(line, " on {}", places.join(" and "));
    if let Some(addr) = metrics {
        let _ = write!(line, "; metrics at http://{addr}/metrics");
    }
    // Not `println!`: a closed standard output must not bring a running server down.
    let _ = writeln!(std::io::stdout().lock(), "{line}");

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            first = next_signal(&mut sigint, &mut sigterm) => tracing::info!(
                "{}: stopping: no new connections, finishing the requests in flight, then flushing \
                 (send it again to exit at once)",
                first.0
            ),
            () = migration_closed.notified() => tracing::info!(
                "the migration is closed: stopping: finishing the requests in flight, then flushing"
            ),
        }
        let _ = stop_tx.send(true);
        let second = next_signal(&mut sigint, &mut sigterm).await;
        tracing::error!("{} again: exiting at once, without finishing requests or flushing", second.0);
        std::process::exit(second.1);
    });

    let serve_tcp = async {
        match tcp {
            Some(listener) => server.serve_tcp(listener, stopped(stop_rx.clone())).await,
            None => Ok(()),
        }
    };
    let serve_unix = async {
        match unix {
            Some(listener) => server.serve_unix(listener, stopped(stop_rx.clone())).await,
            None => Ok(()),
        }
    };
    let serve_grpc = async {
        match (grpc, grpc_export) {
            (Some(listener), Some(export)) => {
                r3map_grpc::serve(listener, export, stopped(stop_rx.clone())).await
            }
            _ => Ok(()),
        }
    };
    let serve_nbd_tcp = async {
        match (nbd_tcp, &nbd_server) {
            (Some(listener), Some(nbd)) => nbd.serve_tcp(listener, stopped(stop_rx.clone())).await,
            _ => Ok(()),
        }
    };
    let serve_nbd_unix = async {
        match (nbd_unix, &nbd_server) {
            (Some(listener), Some(nbd)) => nbd.serve_unix(listener, stopped(stop_rx.clone())).await,
            _ => Ok(()),
        }
    };
    let (tcp_result, unix_result, grpc_result, nbd_tcp_result, nbd_unix_result) =
        tokio::join!(serve_tcp, serve_unix, serve_grpc, serve_nbd_tcp, serve_nbd_unix);
    drop(socket_file);
    drop(nbd_socket_file);
    tcp_result
        .and(unix_result)
        .and(grpc_result)
        .and(nbd_tcp_result)
        .and(nbd_unix_result)
        .context("the final flush of the backend failed")?;
    tracing::info!("stopped: every request in flight finished and the backend is flushed");
    Ok(())
}

/// Wraps the backend as the flags say and describes the export.
fn export(
    config: &Config,
    opened: Opened,
    chunk_size: u32,
    migration_closed: &Arc<tokio::sync::Notify>,
) -> anyhow::Result<(Export, String)> {
    let cs = u64::from(chunk_size);
    let size = opened.backend.size();
    let mut backend: SharedBackend = opened.backend;
    let mut traits = vec![format!("{} chunks", human(cs))];
    if config.chunking {
        backend = Arc::new(Aligned::new(Chunked::new(backend, cs)?, cs)?);
        traits.push("server-side chunking".to_owned());
    }
    let mut export = if config.seeder {
        let source = migration_source(backend, cs, &config.migration, migration_closed)?;
        traits.push("migration source".to_owned());
        Export::new(config.export.clone(), source.clone()).with_seeder(source)
    } else {
        Export::new(config.export.clone(), backend)
    };
    export = export.with_chunk_size(chunk_size);
    if opened.volatile {
        // Clients then refuse a restarted server instead of reading its empty memory as theirs.
        export = export.volatile();
    }
    if config.read_only {
        export = export.read_only();
        traits.push("read-only".to_owned());
    } else {
        traits.push("read-write".to_owned());
    }
    let summary = format!(
        "export '{}': {} of {} ({})",
        config.export,
        human(size),
        opened.description,
        traits.join(", ")
    );
    Ok((export, summary))
}

/// The export of a migration source, with the hooks `options` ask for.
fn migration_source(
    backend: SharedBackend,
    chunk_size: u64,
    options: &MigrationOptions,
    closed: &Arc<tokio::sync::Notify>,
) -> anyhow::Result<Arc<Source<SharedBackend>>> {
    // The demo application writes through the source, so its writes are tracked; the hooks reach
    // it (and the source) through slots filled once both exist.
    let source_slot: Arc<OnceLock<Weak<Source<SharedBackend>>>> = Arc::new(OnceLock::new());
    let app = Arc::new(Invalidator::default());
    let mut hooks = SourceHooks::default();
    if let Some(percent) = options.invalidate_percent {
        let (slot, app_start) = (Arc::clone(&source_slot), Arc::clone(&app));
        hooks.after_track = Some(Box::new(move || {
            if let Some(source) = slot.get().and_then(Weak::upgrade) {
                app_start.start(source, percent);
            }
            Ok(())
        }));
        let app_stop = Arc::clone(&app);
        hooks.before_sync = Some(Box::new(move || {
            app_stop.suspend();
            Ok(())
        }));
    }
    if options.exit_when_closed {
        let closed = Arc::clone(closed);
        hooks.before_close = Some(Box::new(move || {
            closed.notify_one();
            Ok(())
        }));
    }
    let source = Arc::new(Source::new(backend, chunk_size, hooks)?);
    let _ = source_slot.set(Arc::downgrade(&source));
    Ok(source)
}

/// The demo application of `r3map migrate seed --invalidate`: random data written over a share
/// of the resource while the destination copies it.
#[derive(Default)]
struct Invalidator {
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<u64>>>,
}

impl Invalidator {
    fn start(&self, source: Arc<Source<SharedBackend>>, percent: f64) {
        let stop = Arc::clone(&self.stop);
        let handle = std::thread::spawn(move || {
            let size = source.size();
            let chunk = source.chunk_size();
            let chunks = size.div_ceil(chunk);
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
            let target = ((chunks as f64) * percent.clamp(0.0, 100.0) / 100.0).round() as u64;
            let mut rng = fastrand::Rng::new();
            let mut picked: Vec<u64> = (0..chunks).collect();
            rng.shuffle(&mut picked);
            picked.truncate(r3map_core::geometry::to_usize(target));
            let mut buf = vec![0u8; r3map_core::geometry::to_usize(chunk)];
            let mut written = 0;
            // Like a running application, it keeps rewriting its working set until suspended.
            'passes: while !picked.is_empty() {
                for &c in &picked {
                    if stop.load(Ordering::SeqCst) {
                        break 'passes;
                    }
                    let off = c * chunk;
                    let n = r3map_core::geometry::to_usize(chunk.min(size - off));
                    rng.fill(&mut buf[..n]);
                    if let Err(e) = source.write_at(&buf[..n], off) {
                        tracing::warn!(error = %e, "the demo application's write failed");
                        break 'passes;
                    }
                    written += n as u64;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            written
        });
        *self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(handle);
        tracing::info!(percent, "demo application: writing random data while the destination copies");
    }

    /// Stops the writes and waits for the one in progress (the source's suspend).
    fn suspend(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let handle = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(h) = handle {
            let written = h.join().unwrap_or(0);
            tracing::info!(invalidated = %human(written), "demo application suspended");
        }
    }
}

fn warn_about(security: &Security, addr: SocketAddr) {
    let open = security.token.is_none() && !security.client_certs;
    match security.server {
        ServerSecurity::Plaintext if open => tracing::warn!(
            %addr,
            "plaintext without a token: anyone who can reach this address can read and write the export"
        ),
        ServerSecurity::Plaintext if security.token.is_some() => {
            tracing::warn!(%addr, "plaintext: the token and the data cross the network unencrypted");
        }
        ServerSecurity::Tls(_) if open => tracing::warn!(
            %addr,
            "TLS without a token or client certificates: anyone who can reach this address can read and \
             write the export (add --token-file or --tls-client-ca)"
        ),
        _ => {}
    }
}

/// Waits for SIGINT or SIGTERM; returns its name and the exit code for a second one.
async fn next_signal(sigint: &mut Signal, sigterm: &mut Signal) -> (&'static str, i32) {
    tokio::select! {
        _ = sigint.recv() => ("SIGINT", 130),
        _ = sigterm.recv() => ("SIGTERM", 143),
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Parses `:PORT` (every interface) or anything `ToSocketAddrs` takes, returning the addresses to
/// try in order.
fn addresses(addr: &str) -> anyhow::Result<Vec<SocketAddr>> {
    if let Some(port) = addr.strip_prefix(':') {
        let port: u16 = port.parse().map_err(|_| anyhow!("'{addr}' has no valid port"))?;
        return Ok(vec![(Ipv6Addr::UNSPECIFIED, port).into(), (Ipv4Addr::UNSPECIFIED, port).into()]);
    }
    let found: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| {
            format!("'{addr}' is not an address to listen on (use HOST:PORT, [IPV6]:PORT or :PORT)")
        })?
        .collect();
    if found.is_empty() {
        bail!("'{addr}' resolves to no address");
    }
    Ok(found)
}

async fn bind_tcp(addr: &str) -> anyhow::Result<TcpListener> {
    let mut last = None;
    for a in addresses(addr)? {
        match TcpListener::bind(a).await {
            Ok(l) => return Ok(l),
            // Another server has the port: trying another address family would only hide that.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                return Err(e).with_context(|| format!("cannot listen on {addr}: the port is in use"));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(|| anyhow!("no address"), anyhow::Error::from))
        .with_context(|| format!("cannot listen on {addr}"))
}

/// The file of a bound Unix socket, removed when this is dropped (when the server stops).
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
}

impl SocketFile {
    /// Binds `path`, replacing a stale socket file but nothing else.
    fn bind(path: &Path) -> anyhow::Result<(UnixListener, Self)> {
        let shown = path.display();
        if let Ok(meta) = fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                bail!("{shown} exists and is not a socket; refusing to replace it");
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another server is listening on {shown}");
            }
            fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {shown}"))?;
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("cannot listen on the Unix socket {shown}"))?;
        Ok((listener, Self { path: path.to_owned() }))
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        let all = addresses(":1337").unwrap();
        assert_eq!(all[0], "[::]:1337".parse().unwrap());
        assert_eq!(all[1], "0.0.0.0:1337".parse().unwrap());
        assert_eq!(addresses("127.0.0.1:9").unwrap(), vec!["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(addresses("[::1]:9").unwrap(), vec!["[::1]:9".parse().unwrap()]);
        assert!(addresses(":http").unwrap_err().to_string().contains("no valid port"));
        assert!(addresses("nonsense").unwrap_err().to_string().contains("not an address"));
    }

    fn security() -> SecurityArgs {
        SecurityArgs {
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            token: None,
            token_file: None,
            insecure_plaintext: false,
        }
    }

    #[test]
    fn tcp_needs_a_security_choice() {
        let e = security().resolve(true).unwrap_err().to_string();
        assert!(
            e.contains("--tls-cert") && e.contains("--insecure-plaintext") && e.contains("--unix"),
            "{e}"
        );
        // A Unix socket alone needs none.
        assert!(matches!(security().resolve(false).unwrap().server, ServerSecurity::Plaintext));
        let plain = SecurityArgs { insecure_plaintext: true, token: Some("t".into()), ..security() };
        let s = plain.resolve(true).unwrap();
        assert_eq!(s.tcp_mode(), "plaintext, token");
    }

    #[test]
    fn tokens_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        fs::write(&path, "s3cret\n").unwrap();
        let args = SecurityArgs { insecure_plaintext: true, token_file: Some(path.clone()), ..security() };
        assert_eq!(args.resolve(true).unwrap().token.as_deref(), Some("s3cret"));
        fs::write(&path, "\n").unwrap();
        assert!(args.resolve(true).unwrap_err().to_string().contains("token is empty"));
        let missing = SecurityArgs { token_file: Some(dir.path().join("nope")), ..args };
        assert!(missing.resolve(true).unwrap_err().to_string().contains("cannot read the token file"));
    }

    #[test]
    fn bad_tls_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        fs::write(&cert, "not pem").unwrap();
        let args = SecurityArgs { tls_cert: Some(cert.clone()), tls_key: Some(cert), ..security() };
        let e = format!("{:#}", args.resolve(true).unwrap_err());
        assert!(e.contains("cert.pem"), "{e}");
    }

    #[test]
    fn stale_sockets_are_replaced_and_other_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let _guard = r3map_net::Io::shared().handle().enter();
        let path = dir.path().join("sock");
        let (listener, file) = SocketFile::bind(&path).unwrap();
        let e = SocketFile::bind(&path).err().unwrap().to_string();
        assert!(e.contains("another server is listening"), "{e}");
        // A socket nobody listens on any more is stale.
        drop(listener);
        std::mem::forget(file);
        assert!(path.exists());
        let second = SocketFile::bind(&path).unwrap();
        drop(second);
        assert!(!path.exists());
        let file = dir.path().join("file");
        fs::write(&file, "keep").unwrap();
        assert!(SocketFile::bind(&file).err().unwrap().to_string().contains("not a socket"));
        assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
    }
}
