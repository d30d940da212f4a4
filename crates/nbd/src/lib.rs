//! An NBD (Network Block Device) server for any [`Backend`](r3map_core::Backend), so that the
//! kernel's `nbd` client, QEMU, `nbdcopy`, `nbdfuse` and the rest of the NBD ecosystem can use an
//! r3map stack as a disk.
//!
//! # What it does
//! - Fixed newstyle negotiation (handshake flags `FIXED_NEWSTYLE | NO_ZEROES`), with
//!   `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO`, `NBD_OPT_GO`
//!   (`NBD_INFO_EXPORT`, `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`, `NBD_INFO_BLOCK_SIZE`) and
//!   `NBD_OPT_STRUCTURED_REPLY`. Any other option is answered with `NBD_REP_ERR_UNSUP`;
//!   `NBD_OPT_STARTTLS` with `NBD_REP_ERR_POLICY`. The empty export name is the first export.
//! - Transmission: `READ`, `WRITE` (with `FUA`: flushed before the reply), `FLUSH`, `TRIM` and
//!   `WRITE_ZEROES` (announced only when the backend's capabilities say they work), `CACHE`
//!   (accepted and does nothing: the backends either hold the data already or fetch it on the
//!   first read) and `DISC`. Exports are announced with `CAN_MULTI_CONN`, since a flush goes to the
//!   shared backend and covers every connection's writes.
//! - Requests on one connection run concurrently on tokio's blocking pool and are answered in
//!   the order they complete, through one writer per connection.
//! - Structured replies when negotiated: a read is answered with one `OFFSET_DATA` chunk, errors
//!   with an `ERROR` chunk carrying a message.
//! - A misbehaving client costs only its own connection: every decoder of its bytes returns an
//!   error instead of panicking, option data is bounded at 64 KiB and reads and writes at 32 MiB,
//!   out-of-range or oversized requests get error replies (`EINVAL`, `ENOSPC` for writes past the
//!   end, `EOVERFLOW` for oversized ones), writes to a read-only export `EPERM`, and a request with
//!   a bad magic closes the connection.
//!
//! # What it does not do yet
//! - Not yet: TLS (`NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`).
//! - Not yet: metadata contexts (`NBD_OPT_LIST_META_CONTEXT`, `NBD_OPT_SET_META_CONTEXT`) and
//!   `NBD_CMD_BLOCK_STATUS`, although [`Backend::extents`](r3map_core::Backend::extents) could
//!   answer `base:allocation`.
//! - Not yet: `OFFSET_HOLE` chunks in structured reads (every read is sent as data).
//! - Not yet: extended headers (`NBD_OPT_EXTENDED_HEADERS`, 64-bit lengths), `NBD_CMD_RESIZE`,
//!   `NBD_FLAG_SEND_DF` and `NBD_FLAG_SEND_FAST_ZERO`.
//! - Not yet: metrics, and a real prefetch for `NBD_CMD_CACHE`.
//!
//! # Layout
//! - [`proto`]: constants and pure encoders and decoders of the wire format (no I/O).
//! - [`server`]: [`NbdServer`] (TCP, Unix sockets and single streams), [`NbdExport`] and the
//!   errors of the control path ([`ConfigError`], [`ConnectionError`]). The data path reports
//!   `io::Error`s, which become NBD error values ([`server::errno_of`]).

pub mod proto;
pub mod server;

pub use server::{ConfigError, ConnectionError, NbdExport, NbdServer};
