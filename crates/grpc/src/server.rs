//! The server: a [`Backend`](r3map_core::Backend) (and optionally a [`Seeder`]) exported as the
//! Go r3map's `Backend` and `Seeder` gRPC services.
//!
//! # Semantics
//! - `ReadAt` with `Length < 0` or `Length > max_read` is `INVALID_ARGUMENT` (the original's
//!   `ErrMaxChunkSizeExceeded`), `Off < 0` too.
//! - `ReadAt` past the end. The original answered with whatever `io.ReaderAt` did (a short read
//!   and `EOF`, which its gRPC layer turned into an error). Here a read that **starts inside** the
//!   backend and crosses its end is answered with the bytes that exist: `N < Length` and `P` holds
//!   `N` bytes. A read of at least one byte that **starts at or past** the end is `OUT_OF_RANGE`.
//!   An empty read at any offset up to the size answers `N = 0`. (Our client checks ranges itself
//!   and treats any `N < Length` as an error, so it never relies on short reads.)
//! - `WriteAt` with any byte past the end is `OUT_OF_RANGE` and writes nothing; on a read-only
//!   export it is `PERMISSION_DENIED`. The reply's `Length` is the number of bytes written, always
//!   all of them.
//! - `Backend.Sync` flushes the backend.
//! - `Seeder.ReadAt` reads the export's backend like `Backend.ReadAt`; `Seeder.Track` and
//!   `Seeder.Close` call the seeder; `Seeder.Sync` calls [`Seeder::sync`] and answers the **byte
//!   offsets** of the dirty chunks (index × chunk size), as the original did.
//! - Errors of the backend or seeder map to codes by [`io::ErrorKind`] (`InvalidInput` →
//!   `INVALID_ARGUMENT`, `PermissionDenied` → `PERMISSION_DENIED`, `Unsupported` →
//!   `UNIMPLEMENTED`, `NotFound` → `NOT_FOUND`, `TimedOut` → `DEADLINE_EXCEEDED`, connection
//!   kinds → `UNAVAILABLE`, the rest → `INTERNAL`), with the error's message.
//! - Messages up to `max_read` bytes of payload pass in both directions (tonic's default limit is
//!   4 MiB); a `WriteAt` with a larger payload is refused by the decoder.
//!
//! Backend and seeder calls block, so each runs on tokio's blocking pool.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use r3map_core::{Seeder, SharedBackend, check_range};
use r3map_net::Io;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic::{Request, Response, Status};

use crate::proto::migration::seeder_server::SeederServer;
use crate::proto::mount::backend_server::BackendServer;
use crate::proto::{migration, mount};
use crate::status::{io_from_transport, status_from_io};
use crate::tls::GrpcSecurity;
use crate::{CONNECTION_WINDOW, DEFAULT_MAX_READ, MESSAGE_OVERHEAD, STREAM_WINDOW};

/// What a server exports, and how.
#[derive(Clone)]
pub struct GrpcExport {
    /// Served by the `Backend` service, and read by the `Seeder` service's `ReadAt`.
    pub backend: SharedBackend,
    /// When set, the `Seeder` service is mounted too and calls this for `Track`, `Sync` and
    /// `Close`. Usually a [`Tracked`](r3map_core::Tracked) wrapping `backend` (the same `Arc`).
    pub seeder: Option<Arc<dyn Seeder>>,
    /// The largest `ReadAt` answered and the largest `WriteAt` payload accepted, in bytes: at most
    /// `i32::MAX`. Default [`DEFAULT_MAX_READ`] (32 MiB, the original's `MaxChunkSize`).
    pub max_read: u64,
    /// Refuse every `WriteAt` with `PERMISSION_DENIED`.
    pub read_only: bool,
    /// Plaintext or TLS.
    pub security: GrpcSecurity,
    /// How long a shutdown waits for calls in flight and for clients to close their connections
    /// before it stops waiting (a client that never answers the server's `GOAWAY` would otherwise
    /// hold it forever). Default [`DEFAULT_SHUTDOWN_GRACE`] (30 s).
    pub shutdown_grace: Duration,
}

/// Default [`GrpcExport::shutdown_grace`]: 30 s.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

impl GrpcExport {
    /// Exports `backend` read-write over plaintext, without the `Seeder` service, answering reads
    /// of up to 32 MiB.
    #[must_use]
    pub fn new(backend: SharedBackend) -> Self {
        Self {
            backend,
            seeder: None,
            max_read: DEFAULT_MAX_READ,
            read_only: false,
            security: GrpcSecurity::Plaintext,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    fn checked_max_read(&self) -> io::Result<usize> {
        let max = usize::try_from(self.max_read).ok().filter(|&m| m > 0 && i32::try_from(m).is_ok());
        max.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("max_read must be between 1 and {} bytes, not {}", i32::MAX, self.max_read),
            )
        })
    }
}

impl fmt::Debug for GrpcExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcExport")
            .field("size", &self.backend.size())
            .field("seeder", &self.seeder.as_ref().map(|s| format!("chunk size {}", s.chunk_size())))
            .field("max_read", &self.max_read)
            .field("read_only", &self.read_only)
            .field("security", &self.security)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

/// Serves `export` on `listener` until `shutdown` completes, then stops accepting, lets the calls
/// in flight finish and the clients close their connections (for at most
/// [`shutdown_grace`](GrpcExport::shutdown_grace)), and flushes the backend.
///
/// # Errors
/// `InvalidInput` for a `max_read` out of range or TLS material that does not parse; a transport
/// error of the server; the final flush's error.
pub async fn serve(
    listener: TcpListener,
    export: GrpcExport,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let (backend, grace) = (export.backend.clone(), export.shutdown_grace);
    let router = router(export)?;
    run(router, listener, backend, grace, shutdown).await
}

fn router(export: GrpcExport) -> io::Result<Router> {
    let limit = export.checked_max_read()? + MESSAGE_OVERHEAD;
    let mut server = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    if let GrpcSecurity::Tls(tls) = &export.security {
        server = server.tls_config(tls.to_tonic()).map_err(|e| {
            let e = io_from_transport(&e, "the server's TLS settings are not usable");
            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
        })?;
    }
    let shared =
        Arc::new(Shared { backend: export.backend, max_read: export.max_read, read_only: export.read_only });
    let backend = BackendServer::new(BackendService(Arc::clone(&shared)))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let seeder = export.seeder.map(|seeder| {
        SeederServer::new(SeederService { shared, seeder })
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    });
    Ok(server.add_service(backend).add_optional_service(seeder))
}

async fn run(
    router: Router,
    listener: TcpListener,
    backend: SharedBackend,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (fired, shutting_down) = oneshot::channel::<()>();
    let serving = router.serve_with_incoming_shutdown(incoming, async {
        shutdown.await;
        let _ = fired.send(());
    });
    tokio::select! {
        served = serving => served.map_err(|e| io_from_transport(&e, "the gRPC server failed"))?,
        () = async {
            // Only reached when the serving future has not finished `grace` after the signal.
            if shutting_down.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        } => tracing::warn!(?grace, "clients still connected after the shutdown grace period; stopping"),
    }
    blocking(move || backend.flush()).await.map_err(|e| {
        io::Error::new(e.kind(), format!("the final flush after the gRPC server stopped failed: {e}"))
    })
}

/// Runs a blocking backend call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(format!("a backend call panicked or was cancelled: {e}"))))
}

async fn blocking_status<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, Status> {
    blocking(f).await.map_err(|e| {
        tracing::debug!(error = %e, "gRPC call failed");
        status_from_io(&e)
    })
}

struct Shared {
    backend: SharedBackend,
    max_read: u64,
    read_only: bool,
}

impl Shared {
    async fn read(&self, length: i32, off: i64) -> Result<(i32, Bytes), Status> {
        let Ok(len) = u64::try_from(length) else {
            return Err(Status::invalid_argument(format!("ReadAt length {length} is negative")));
        };
        if len > self.max_read {
            return Err(Status::invalid_argument(format!(
                "max chunk size exceeded: ReadAt of {len} bytes is larger than this server's limit of {} \
                 bytes; split the read",
                self.max_read
            )));
        }
        let Ok(off) = u64::try_from(off) else {
            return Err(Status::invalid_argument(format!("ReadAt offset {off} is negative")));
        };
        let size = self.backend.size();
        if off > size || (len > 0 && off == size) {
            return Err(Status::out_of_range(format!(
                "ReadAt of {len} bytes at offset {off} starts at or beyond the end of the backend \
                 ({size} bytes)"
            )));
        }
        let n = len.min(size - off);
        if n == 0 {
            return Ok((0, Bytes::new()));
        }
        // n <= len <= i32::MAX, so both conversions hold.
        let n_i32 = i32::try_from(n).map_err(|_| Status::internal("read length out of range"))?;
        let n_usize = usize::try_from(n).map_err(|_| Status::internal("read length out of range"))?;
        let backend = Arc::clone(&self.backend);
        let buf = blocking_status(move || {
            let mut buf = vec![0u8; n_usize];
            backend.read_at(&mut buf, off)?;
            Ok(buf)
        })
        .await?;
        Ok((n_i32, Bytes::from(buf)))
    }

    async fn write(&self, p: Bytes, off: i64) -> Result<i32, Status> {
        let Ok(off) = u64::try_from(off) else {
            return Err(Status::invalid_argument(format!("WriteAt offset {off} is negative")));
        };
        if self.read_only {
            return Err(Status::permission_denied("this export is read-only"));
        }
        let Ok(length) = i32::try_from(p.len()) else {
            return Err(Status::invalid_argument(format!("WriteAt of {} bytes is too large", p.len())));
        };
        check_range(off, r3map_core::backend::len64(&p), self.backend.size())
            .map_err(|e| Status::out_of_range(format!("WriteAt: {e}")))?;
        if p.is_empty() {
            return Ok(0);
        }
        let backend = Arc::clone(&self.backend);
        blocking_status(move || backend.write_at(&p, off)).await?;
        Ok(length)
    }

    async fn sync(&self) -> Result<(), Status> {
        let backend = Arc::clone(&self.backend);
        blocking_status(move || backend.flush()).await
    }
}

struct BackendService(Arc<Shared>);

#[tonic::async_trait]
impl mount::backend_server::Backend for BackendService {
    async fn read_at(&self, req: Request<mount::ReadAtArgs>) -> Result<Response<mount::ReadAtReply>, Status> {
        let args = req.into_inner();
        let (n, p) = self.0.read(args.length, args.off).await?;
        Ok(Response::new(mount::ReadAtReply { n, p }))
    }

    async fn write_at(
        &self,
        req: Request<mount::WriteAtArgs>,
    ) -> Result<Response<mount::WriteAtReply>, Status> {
        let args = req.into_inner();
        let length = self.0.write(args.p, args.off).await?;
        Ok(Response::new(mount::WriteAtReply { length }))
    }

    async fn sync(&self, _req: Request<mount::SyncArgs>) -> Result<Response<mount::SyncReply>, Status> {
        self.0.sync().await?;
        Ok(Response::new(mount::SyncReply {}))
    }
}

struct SeederService {
    shared: Arc<Shared>,
    seeder: Arc<dyn Seeder>,
}

#[tonic::async_trait]
impl migration::seeder_server::Seeder for SeederService {
    async fn read_at(
        &self,
        req: Request<migration::ReadAtArgs>,
    ) -> Result<Response<migration::ReadAtReply>, Status> {
        let args = req.into_inner();
        let (n, p) = self.shared.read(args.length, args.off).await?;
        Ok(Response::new(migration::ReadAtReply { n, p }))
    }

    async fn track(
        &self,
        _req: Request<migration::TrackArgs>,
    ) -> Result<Response<migration::TrackReply>, Status> {
        let seeder = Arc::clone(&self.seeder);
        blocking_status(move || seeder.track()).await?;
        Ok(Response::new(migration::TrackReply {}))
    }

    async fn sync(
        &self,
        _req: Request<migration::SyncArgs>,
    ) -> Result<Response<migration::SyncReply>, Status> {
        let seeder = Arc::clone(&self.seeder);
        let chunk_size = seeder.chunk_size();
        let chunks = blocking_status(move || seeder.sync()).await?;
        let dirty_offsets = chunks
            .into_iter()
            .map(|chunk| {
                chunk.0.checked_mul(chunk_size).and_then(|off| i64::try_from(off).ok()).ok_or_else(|| {
                    Status::internal(format!(
                        "the offset of {chunk} (chunk size {chunk_size}) does not fit in an int64"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Response::new(migration::SyncReply { dirty_offsets }))
    }

    async fn close(
        &self,
        _req: Request<migration::CloseArgs>,
    ) -> Result<Response<migration::CloseReply>, Status> {
        let seeder = Arc::clone(&self.seeder);
        blocking_status(move || seeder.close()).await?;
        Ok(Response::new(migration::CloseReply {}))
    }
}

/// A server running as a task on the process's shared runtime ([`Io::shared`]), for callers with
/// no runtime of their own. Dropping it shuts it down like [`shutdown`](GrpcServer::shutdown) and
/// logs an error.
pub struct GrpcServer {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<io::Result<()>>>,
    io: Io,
}

impl GrpcServer {
    /// Binds `addr` (port 0 picks a free port) and serves `export` there.
    ///
    /// [`shutdown`](GrpcServer::shutdown) and drop wait for the server to finish.
    ///
    /// # Errors
    /// Binding fails; `InvalidInput` for a `max_read` out of range or TLS material that does not
    /// parse.
    pub fn start(addr: SocketAddr, export: GrpcExport) -> io::Result<Self> {
        let (backend, grace) = (export.backend.clone(), export.shutdown_grace);
        let router = router(export)?;
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        Self::spawn(router, listener, backend, grace)
    }

    /// Serves `export` on a listener the caller bound, with whatever socket options it needs (the
    /// server takes it over and closes it at shutdown); otherwise as [`start`](GrpcServer::start).
    ///
    /// # Errors
    /// The listener cannot be used by tokio; `InvalidInput` for a `max_read` out of range or TLS
    /// material that does not parse.
    pub fn start_listener(listener: std::net::TcpListener, export: GrpcExport) -> io::Result<Self> {
        let (backend, grace) = (export.backend.clone(), export.shutdown_grace);
        let router = router(export)?;
        Self::spawn(router, listener, backend, grace)
    }

    fn spawn(
        router: Router,
        std_listener: std::net::TcpListener,
        backend: SharedBackend,
        grace: Duration,
    ) -> io::Result<Self> {
        std_listener.set_nonblocking(true)?;
        let local_addr = std_listener.local_addr()?;
        let io = Io::shared();
        let listener = {
            let _guard = io.handle().enter();
            TcpListener::from_std(std_listener)?
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = io.handle().spawn(run(router, listener, backend, grace, async {
            // A dropped sender stops the server too.
            let _ = stopped.await;
        }));
        Ok(Self { local_addr, stop: Some(stop), task: Some(task), io })
    }

    /// The address the server listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, waits for the calls in flight and for clients to close their connections
    /// (at most [`shutdown_grace`](GrpcExport::shutdown_grace)) and flushes the backend.
    ///
    /// # Errors
    /// The server's transport error or the final flush's error.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => self
                .io
                .block_on(task)
                .unwrap_or_else(|_| Err(io::Error::other("the gRPC server task panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::error!(error = %e, addr = %self.local_addr, "the gRPC server stopped with an error");
        }
    }
}

impl fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcServer")
            .field("local_addr", &self.local_addr)
            .field("running", &self.task.is_some())
            .finish()
    }
}
