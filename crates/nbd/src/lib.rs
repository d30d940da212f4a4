//! NBD (Network Block Device) for r3map: a server for any [`Backend`](r3map_core::Backend), so
//! that the kernel's `nbd` client, QEMU, `nbdcopy`, `nbdfuse`, fio and the rest of the NBD
//! ecosystem can use an r3map stack as a disk.
//!
//! # Negotiation
//! - Fixed newstyle (handshake flags `FIXED_NEWSTYLE | NO_ZEROES`) with `NBD_OPT_EXPORT_NAME`,
//!   `NBD_OPT_ABORT`, `NBD_OPT_LIST` (one reply per export), `NBD_OPT_INFO` and `NBD_OPT_GO`
//!   (`NBD_INFO_EXPORT`, `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`, `NBD_INFO_BLOCK_SIZE`),
//!   `NBD_OPT_STRUCTURED_REPLY`, `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`
//!   (see [`status`]), and `NBD_OPT_STARTTLS` when [`NbdTls`] is configured: the native
//!   protocol's rustls configuration, so the same certificates (and client certificates for
//!   authentication) work. [`TlsMode::Require`] refuses every other option on TCP with
//!   `NBD_REP_ERR_TLS_REQD` until the client has upgraded. Unknown options get
//!   `NBD_REP_ERR_UNSUP`. The empty export name is the first export.
//!
//! # Transmission
//! - `READ`, `WRITE` (with `FUA`: flushed before the reply), `FLUSH`, `TRIM` and `WRITE_ZEROES`
//!   (announced only when the backend's capabilities say they work), `CACHE` (pulls the range
//!   when the export has [`ChunkStates`], and answers once it is local), `BLOCK_STATUS` and
//!   `DISC`. Exports are announced with `CAN_MULTI_CONN`, since a flush goes to the shared
//!   backend and covers every connection's writes.
//! - Requests on one connection run concurrently and are answered in the order they complete. On
//!   plaintext TCP and Unix sockets each connection has up to [`DEFAULT_THREADS`] threads (see
//!   [`NbdServer::with_threads`]) that each read a request, run it and write its reply, as
//!   nbdkit does, with no hand-over between threads; TLS connections run each request on tokio's
//!   blocking pool and answer through one writer task.
//! - Structured replies when negotiated: reads are sent as `OFFSET_DATA` and `OFFSET_HOLE`
//!   chunks where the backend reports holes of 4 KiB or more (one data chunk with `DF`); errors
//!   as `ERROR` chunks carrying a message.
//! - A misbehaving client costs only its own connection: every decoder of its bytes returns an
//!   error instead of panicking, option data is bounded at 64 KiB and reads and writes at the
//!   export's maximum block size (32 MiB by default), out-of-range or oversized requests get error
//!   replies (`EINVAL`, `ENOSPC` for writes past the end, `EOVERFLOW` for oversized ones), writes
//!   to a read-only export `EPERM`, and a request with a bad magic closes the connection.
//! - Metrics through the `metrics` facade: `r3map_nbd_requests_total{op}`,
//!   `r3map_nbd_request_seconds{op}`, `r3map_nbd_errors_total{op}`,
//!   `r3map_nbd_bytes_total{direction}`, `r3map_nbd_refused_total`,
//!   `r3map_nbd_connections_total` and the `r3map_nbd_connections` gauge.
//!
//! # Not done
//! - Extended headers (`NBD_OPT_EXTENDED_HEADERS`, 64-bit lengths), `NBD_CMD_RESIZE`,
//!   `NBD_FLAG_SEND_DF` and `NBD_FLAG_SEND_FAST_ZERO` are not offered. The minimum and preferred
//!   block sizes are advice, not enforced.
//!
//! # Layout
//! - [`proto`]: constants and pure encoders and decoders of the wire format (no I/O).
//! - [`server`]: [`NbdServer`] (TCP, Unix sockets and single streams), [`NbdExport`] and the
//!   errors of the control path ([`ConfigError`], [`ConnectionError`]). The data path reports
//!   `io::Error`s, which become NBD error values ([`server::errno_of`]). Accepting, shutdown and
//!   the async transmission driver are [`r3map_net::serve`]'s; [`r3map_net::ServerHandle`] runs
//!   an `NbdServer` on an `Io` runtime as it runs the native one.
//! - [`status`]: metadata contexts (`base:allocation`, `r3map:chunks`) and [`ChunkStates`].
//! - `export` (re-exported from [`server`]): what is served, [`NbdExport`] and [`BlockSizes`].
//! - `exec`: request execution without I/O: a request checked against its connection, run on the
//!   backend, its reply encoded. The async driver in [`server`] and the threaded one (`threaded`,
//!   for plaintext and kernel sockets) both read requests and call it; no module imports one
//!   that imports it back.

pub mod client;
mod exec;
mod export;
pub mod kernel;
pub mod proto;
pub mod server;
pub mod status;
mod threaded;

pub use client::{NbdAddress, NbdBackend, NbdClientOptions, NbdClientTls, NbdExportInfo};
pub use server::{
    BlockSizes, ConfigError, ConnectionError, DEFAULT_THREADS, NbdExport, NbdServer, NbdTls, TlsMode,
};
pub use status::ChunkStates;
