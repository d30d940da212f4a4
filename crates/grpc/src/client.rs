//! The client: [`GrpcBackend`] (a [`Backend`] over the `Backend` service), [`GrpcSeeder`] (a
//! [`Seeder`] over the `Seeder` service) and [`GrpcSeederSource`] (the seeder's data, read-only).
//!
//! A client's calls run on the runtime of [`GrpcClientOptions::io`] (the process's shared one
//! unless the caller gives its own) and block until they are answered, so the API is the
//! blocking one of the rest of r3map; it may be called from any thread, a tokio worker included.
//!
//! One HTTP/2 connection carries every call of a client (it reconnects by itself after a failure);
//! calls from many threads are multiplexed on it. Reads larger than `max_read` are split into
//! several `ReadAt` calls issued at once, writes larger than `max_write` likewise.
//!
//! The protocol has no `Size` call (the original dropped it), so the caller gives the size, as the
//! Go client did; ranges are checked against it before anything is sent.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::try_join_all;
use r3map_core::backend::len64;
use r3map_core::{Backend, Capabilities, Chunk, Seeder, check_range};
use r3map_net::Io;
use tonic::transport::{Channel, Endpoint};
use tonic::{Response, Status};

use crate::proto::migration::seeder_client::SeederClient;
use crate::proto::mount::backend_client::BackendClient;
use crate::proto::{migration, mount};
use crate::status::{io_from_status, io_from_transport};
use crate::tls::{ClientTls, check_scheme};
use crate::{CONNECTION_WINDOW, DEFAULT_MAX_READ, MESSAGE_OVERHEAD, STREAM_WINDOW};

/// Default [`GrpcClientOptions::max_write`]: 32 MiB.
pub const DEFAULT_MAX_WRITE: u64 = 32 * 1024 * 1024;

/// Default [`GrpcClientOptions::timeout`]: 30 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a client connects and how it cuts its calls.
#[derive(Clone, Debug)]
pub struct GrpcClientOptions {
    /// The largest `ReadAt` sent, in bytes (1 to `i32::MAX`); larger reads are split. Default
    /// 32 MiB, the original's `MaxChunkSize`. A Go server built with gRPC's default limits
    /// answers at most 4 MiB per message: use 4 MiB minus a little there.
    pub max_read: u64,
    /// The largest `WriteAt` payload sent, in bytes (1 to `i32::MAX`); larger writes are split.
    /// Default 32 MiB; the same 4 MiB caveat applies to Go servers with default limits.
    pub max_write: u64,
    /// Deadline of each call (and of connecting), sent to the server as `grpc-timeout`. Default
    /// 30 s.
    pub timeout: Duration,
    /// TLS settings for an `https://` endpoint; `None` for `http://` (plaintext).
    pub tls: Option<ClientTls>,
    /// The runtime the connection runs on; `None` is [`Io::shared`].
    pub io: Option<Io>,
}

impl Default for GrpcClientOptions {
    fn default() -> Self {
        Self {
            max_read: DEFAULT_MAX_READ,
            max_write: DEFAULT_MAX_WRITE,
            timeout: DEFAULT_TIMEOUT,
            tls: None,
            io: None,
        }
    }
}

/// Which service's `ReadAt` a read goes to.
#[derive(Clone, Copy, Debug)]
enum Via {
    Backend,
    Seeder,
}

/// A connection and the runtime that drives it, shared by the clients made from it.
struct Conn {
    endpoint: String,
    io: Io,
    channel: Channel,
    max_read: usize,
    max_write: usize,
    timeout: Duration,
}

/// Slack on top of the per-call deadline for our own timer, so tonic's deadline (which the server
/// sees too) normally fires first.
const TIMER_SLACK: Duration = Duration::from_secs(1);

fn limit(name: &str, value: u64) -> io::Result<usize> {
    usize::try_from(value).ok().filter(|&v| v > 0 && i32::try_from(v).is_ok()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name} must be between 1 and {} bytes, not {value}", i32::MAX),
        )
    })
}

impl Conn {
    fn connect(endpoint: &str, options: GrpcClientOptions) -> io::Result<Self> {
        let max_read = limit("max_read", options.max_read)?;
        let max_write = limit("max_write", options.max_write)?;
        if options.timeout.is_zero() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the call timeout must not be zero"));
        }
        check_scheme(endpoint, options.tls.as_ref())?;
        let invalid = |e: &tonic::transport::Error, what: &str| {
            let e = io_from_transport(e, what);
            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
        };
        let mut ep = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| invalid(&e, &format!("{endpoint} is not a valid endpoint")))?
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        if let Some(tls) = options.tls {
            ep = ep
                .tls_config(tls.into_tonic())
                .map_err(|e| invalid(&e, "the client's TLS settings are not usable"))?;
        }
        let io = options.io.unwrap_or_else(Io::shared);
        let channel = io.block_on(async {
            match tokio::time::timeout(options.timeout + TIMER_SLACK, ep.connect()).await {
                Ok(Ok(channel)) => Ok(channel),
                Ok(Err(e)) => Err(io_from_transport(&e, &format!("cannot connect to {endpoint}"))),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("cannot connect to {endpoint} within {:?}", options.timeout),
                )),
            }
        })?;
        Ok(Self { endpoint: endpoint.to_owned(), io, channel, max_read, max_write, timeout: options.timeout })
    }

    fn block_on<T: Send>(&self, f: impl Future<Output = io::Result<T>> + Send) -> io::Result<T> {
        self.io.block_on(f)
    }

    fn mount(&self) -> BackendClient<Channel> {
        BackendClient::new(self.channel.clone())
            .max_decoding_message_size(self.max_read + MESSAGE_OVERHEAD)
            .max_encoding_message_size(self.max_write + MESSAGE_OVERHEAD)
    }

    fn migration(&self) -> SeederClient<Channel> {
        SeederClient::new(self.channel.clone())
            .max_decoding_message_size(self.max_read + MESSAGE_OVERHEAD)
            .max_encoding_message_size(self.max_write + MESSAGE_OVERHEAD)
    }

    /// Awaits one call under our own deadline and turns its status into an [`io::Error`] that
    /// says what was asked of whom.
    async fn call<T>(
        &self,
        what: impl Fn() -> String,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> io::Result<T> {
        match tokio::time::timeout(self.timeout + TIMER_SLACK, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(io_from_status(&status, &format!("{} on {}", what(), self.endpoint))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} on {} got no answer within {:?}", what(), self.endpoint, self.timeout),
            )),
        }
    }

    /// Fills `buf` from `off`, in `max_read` pieces issued at once. The range is checked by the
    /// caller.
    fn read(&self, via: Via, buf: &mut [u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.block_on(async {
            let mut pos = off;
            let mut parts = Vec::with_capacity(buf.len().div_ceil(self.max_read));
            for part in buf.chunks_mut(self.max_read) {
                let part_off = pos;
                pos += len64(part);
                parts.push(self.read_part(via, part, part_off));
            }
            try_join_all(parts).await.map(drop)
        })
    }

    async fn read_part(&self, via: Via, part: &mut [u8], off: u64) -> io::Result<()> {
        let want = part.len();
        let length = i32::try_from(want).map_err(|_| too_large("ReadAt", want))?;
        let off_i64 = offset(off)?;
        let what = || format!("ReadAt of {want} bytes at offset {off}");
        let (n, p) = match via {
            Via::Backend => {
                let args = mount::ReadAtArgs { length, off: off_i64 };
                let reply = self.call(what, self.mount().read_at(args)).await?;
                (reply.n, reply.p)
            }
            Via::Seeder => {
                let args = migration::ReadAtArgs { length, off: off_i64 };
                let reply = self.call(what, self.migration().read_at(args)).await?;
                (reply.n, reply.p)
            }
        };
        check_read_reply(n, &p, want, off, &self.endpoint)?;
        part.copy_from_slice(&p);
        Ok(())
    }

    /// Writes `buf` at `off` with the `Backend` service, in `max_write` pieces issued at once.
    fn write(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.block_on(async {
            let mut pos = off;
            let mut parts = Vec::with_capacity(buf.len().div_ceil(self.max_write));
            for part in buf.chunks(self.max_write) {
                let part_off = pos;
                pos += len64(part);
                parts.push(self.write_part(part, part_off));
            }
            try_join_all(parts).await.map(drop)
        })
    }

    async fn write_part(&self, part: &[u8], off: u64) -> io::Result<()> {
        let want = part.len();
        let args = mount::WriteAtArgs { off: offset(off)?, p: Bytes::copy_from_slice(part) };
        let what = || format!("WriteAt of {want} bytes at offset {off}");
        let reply = self.call(what, self.mount().write_at(args)).await?;
        if usize::try_from(reply.length).ok() != Some(want) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} answered a WriteAt of {want} bytes at offset {off} with Length = {}, not {want}",
                    self.endpoint, reply.length
                ),
            ));
        }
        Ok(())
    }
}

fn offset(off: u64) -> io::Result<i64> {
    i64::try_from(off).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("offset {off} does not fit the protocol's int64"))
    })
}

fn too_large(verb: &str, len: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("a {verb} of {len} bytes does not fit the protocol's int32"),
    )
}

/// A `ReadAt` reply must carry exactly what was asked: never zero-fill what did not arrive.
fn check_read_reply(n: i32, p: &[u8], want: usize, off: u64, endpoint: &str) -> io::Result<()> {
    match usize::try_from(n) {
        Ok(n) if n == want && p.len() == want => Ok(()),
        Ok(n) if n < want && p.len() >= n => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "{endpoint} returned {n} of {want} bytes at offset {off}: the remote resource ends before \
                 the size this client was given"
            ),
        )),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{endpoint} answered a ReadAt of {want} bytes at offset {off} with N = {n} and {} bytes of \
                 data",
                p.len()
            ),
        )),
    }
}

/// A [`Backend`] whose bytes live behind a gRPC `Backend` service (ours or the Go r3map's).
///
/// `trim`, `write_zeroes` and `extents` are unsupported (the protocol has no such calls).
pub struct GrpcBackend {
    conn: Conn,
    size: u64,
}

impl GrpcBackend {
    /// Connects to `endpoint` (`http://host:port`, or `https://host:port` with
    /// [`GrpcClientOptions::tls`]) and presents its `Backend` service as a backend of `size`
    /// bytes..
    ///
    /// # Errors
    /// `InvalidInput` for bad options or an endpoint whose scheme does not match the TLS settings;
    /// the connection error (`ConnectionRefused`, `TimedOut`, a TLS failure) when the server
    /// cannot be reached.
    pub fn connect(endpoint: &str, size: u64, options: GrpcClientOptions) -> io::Result<Self> {
        Ok(Self { conn: Conn::connect(endpoint, options)?, size })
    }

    /// The endpoint this backend talks to.
    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.conn.endpoint
    }
}

impl fmt::Debug for GrpcBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcBackend")
            .field("endpoint", &self.conn.endpoint)
            .field("size", &self.size)
            .field("max_read", &self.conn.max_read)
            .field("max_write", &self.conn.max_write)
            .field("timeout", &self.conn.timeout)
            .finish()
    }
}

impl Backend for GrpcBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.conn.read(Via::Backend, buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.conn.write(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.conn
            .block_on(self.conn.call(|| "Sync".to_owned(), self.conn.mount().sync(mount::SyncArgs {})))?;
        Ok(())
    }
}

/// A [`Seeder`] behind a gRPC `Seeder` service (ours or the Go r3map's): what a migration
/// destination calls on the source.
pub struct GrpcSeeder {
    conn: Arc<Conn>,
    chunk_size: u64,
}

impl GrpcSeeder {
    /// Connects to the `Seeder` service at `endpoint`, whose dirty offsets are multiples of
    /// `chunk_size`..
    ///
    /// # Errors
    /// `InvalidInput` for a zero chunk size or bad options; the connection error.
    pub fn connect(endpoint: &str, chunk_size: u64, options: GrpcClientOptions) -> io::Result<Self> {
        if chunk_size == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "the chunk size must not be zero"));
        }
        Ok(Self { conn: Arc::new(Conn::connect(endpoint, options)?), chunk_size })
    }

    /// The source's data, `size` bytes, read with the `Seeder` service's `ReadAt` over the same
    /// connection.
    #[must_use]
    pub fn source(&self, size: u64) -> GrpcSeederSource {
        GrpcSeederSource { conn: Arc::clone(&self.conn), size }
    }

    /// The endpoint this seeder talks to.
    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.conn.endpoint
    }

    fn offsets_to_chunks(&self, offsets: Vec<i64>) -> io::Result<Vec<Chunk>> {
        let mut chunks = offsets
            .into_iter()
            .map(|off| match u64::try_from(off) {
                Ok(off) if off % self.chunk_size == 0 => Ok(Chunk(off / self.chunk_size)),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} reported dirty offset {off}, which is not a multiple of the chunk size {}",
                        self.conn.endpoint, self.chunk_size
                    ),
                )),
            })
            .collect::<io::Result<Vec<_>>>()?;
        chunks.sort_unstable();
        chunks.dedup();
        Ok(chunks)
    }
}

impl fmt::Debug for GrpcSeeder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcSeeder")
            .field("endpoint", &self.conn.endpoint)
            .field("chunk_size", &self.chunk_size)
            .field("timeout", &self.conn.timeout)
            .finish()
    }
}

impl Seeder for GrpcSeeder {
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn track(&self) -> io::Result<()> {
        let conn = &self.conn;
        conn.block_on(conn.call(|| "Track".to_owned(), conn.migration().track(migration::TrackArgs {})))?;
        Ok(())
    }

    /// Returns the dirty chunks in ascending order (the offsets the server sends are sorted and
    /// deduplicated).
    fn sync(&self) -> io::Result<Vec<Chunk>> {
        let conn = &self.conn;
        let reply =
            conn.block_on(conn.call(|| "Sync".to_owned(), conn.migration().sync(migration::SyncArgs {})))?;
        self.offsets_to_chunks(reply.dirty_offsets)
    }

    fn close(&self) -> io::Result<()> {
        let conn = &self.conn;
        conn.block_on(conn.call(|| "Close".to_owned(), conn.migration().close(migration::CloseArgs {})))?;
        Ok(())
    }
}

/// The data of a [`GrpcSeeder`]'s source as a read-only [`Backend`] (the `Seeder` service has no
/// `WriteAt`): what a migration destination pulls from.
pub struct GrpcSeederSource {
    conn: Arc<Conn>,
    size: u64,
}

impl fmt::Debug for GrpcSeederSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcSeederSource")
            .field("endpoint", &self.conn.endpoint)
            .field("size", &self.size)
            .finish()
    }
}

impl Backend for GrpcSeederSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        self.conn.read(Via::Seeder, buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        check_range(off, len64(buf), self.size)?;
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the Seeder service is read-only: it has no WriteAt",
        ))
    }

    /// Nothing to flush: the source is never written through this backend.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { read_only: true, ..Capabilities::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_replies_must_be_exact() {
        assert!(check_read_reply(4, &[1, 2, 3, 4], 4, 0, "e").is_ok());
        let short = check_read_reply(2, &[1, 2], 4, 8, "e").unwrap_err();
        assert_eq!(short.kind(), io::ErrorKind::UnexpectedEof, "{short}");
        assert!(short.to_string().contains("returned 2 of 4 bytes at offset 8"), "{short}");
        // The Go server sends P of the full length even when N is short.
        assert_eq!(
            check_read_reply(2, &[1, 2, 0, 0], 4, 8, "e").unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        for (n, p) in [(4, &[1u8, 2][..]), (-1, &[][..]), (5, &[0; 5][..]), (4, &[0; 5][..]), (2, &[1][..])] {
            let err = check_read_reply(n, p, 4, 0, "e").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "N = {n}, {} bytes: {err}", p.len());
        }
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(limit("max_read", 1).unwrap(), 1);
        assert!(limit("max_read", 0).is_err());
        let err = limit("max_write", 1 << 31).unwrap_err();
        assert!(err.to_string().starts_with("max_write must be between 1 and"), "{err}");
        assert!(offset(u64::MAX).is_err());
    }
}
