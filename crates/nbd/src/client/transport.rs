//! [`Transport`]: the export as a [`Backend`] that sends requests as they are, cut only at the
//! server's maximum sizes. Requests must already respect the minimum block size;
//! [`NbdBackend`](super::NbdBackend) puts an [`Aligned`](r3map_core::Aligned) layer in front when
//! the server has one above 1.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use r3map_core::backend::len64;
use r3map_core::geometry::to_usize;
use r3map_core::{Backend, Capabilities, Extent, check_range};
use r3map_net::Io;
use tokio::sync::mpsc;

use super::connection::{self, Call, Health, Target};
use super::handshake::{BoxedStream, HandshakeError, NbdExportInfo, Negotiated};
use super::options::{NbdAddress, NbdClientOptions};
use super::reply::{Expect, Reply, STATE_HOLE, STATE_ZERO};
use crate::proto::{Command, transmission_flags as tf};

/// Pieces of one call in flight at once.
const MAX_PIECES_IN_FLIGHT: usize = 64;
/// Payload bytes of one call in flight at once.
const MAX_BYTES_IN_FLIGHT: u64 = 128 * 1024 * 1024;
/// How long dropping the client waits for its connections to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The connections to one export, as tasks on the runtime the client was opened on.
pub(crate) struct Transport {
    target: Arc<Target>,
    info: NbdExportInfo,
    conns: Vec<mpsc::UnboundedSender<Call>>,
    next: AtomicUsize,
    timeout: Duration,
    health: Arc<Health>,
    /// One message per connection task when it ends.
    finished: Mutex<std_mpsc::Receiver<()>>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("server", &self.target.peer)
            .field("export", &self.target.export)
            .field("info", &self.info)
            .field("connections", &self.conns.len())
            .field("tls", &self.target.tls.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A request sent, waiting for its answer.
struct Waiter {
    rx: std_mpsc::Receiver<io::Result<Reply>>,
    expect: Expect,
    deadline: Instant,
}

/// Runs `future` on `runtime` and waits for it from this (blocking) thread, which may itself be
/// a thread of another runtime.
fn run_on<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    future: impl Future<Output = T> + Send + 'static,
) -> io::Result<T> {
    let (tx, rx) = std_mpsc::channel();
    runtime.spawn(async move {
        let _ = tx.send(future.await);
    });
    r3map_net::runtime::blocking(|| rx.recv())
        .map_err(|_| io::Error::other("the NBD client's runtime stopped"))
}

/// Opens `wanted` connections (one unless the server allows several) and negotiates the export
/// on each; never an empty list.
fn open_connections(
    runtime: &tokio::runtime::Handle,
    target: &Arc<Target>,
    wanted: usize,
) -> io::Result<Vec<(BoxedStream, Negotiated)>> {
    let connect = || {
        let target = Arc::clone(target);
        run_on(runtime, async move { target.connect().await })?.map_err(|e: HandshakeError| e.error)
    };
    let first = connect()?;
    let info = first.1.info;
    let mut wanted = wanted.max(1);
    if wanted > 1 && !info.has(tf::CAN_MULTI_CONN) {
        tracing::debug!(
            server = %target.peer,
            connections = wanted,
            "the NBD server does not announce CAN_MULTI_CONN; using one connection"
        );
        wanted = 1;
    }
    let mut connected = vec![first];
    while connected.len() < wanted {
        let more = connect()?;
        if more.1.info != info {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the NBD server at {} described the export differently on another connection",
                    target.peer
                ),
            ));
        }
        connected.push(more);
    }
    Ok(connected)
}

impl Transport {
    /// Opens the connections; see [`NbdBackend::connect`](super::NbdBackend::connect).
    pub(crate) fn connect(address: NbdAddress, options: NbdClientOptions, io: &Io) -> io::Result<Self> {
        let runtime = io.handle();
        let target = Arc::new(Target {
            peer: Arc::from(address.to_string()),
            address,
            export: options.export,
            connect_timeout: options.connect_timeout,
            max_backoff: options.max_backoff,
            tls: options.tls,
        });
        let connected = open_connections(runtime, &target, options.connections)?;
        let info = connected[0].1.info;
        let health = Arc::new(Health::default());
        let (done_tx, done_rx) = std_mpsc::channel();
        let mut conns = Vec::with_capacity(connected.len());
        for first in connected {
            let (tx, rx) = mpsc::unbounded_channel();
            let (target, health, done) = (Arc::clone(&target), Arc::clone(&health), done_tx.clone());
            runtime.spawn(async move {
                connection::run(target, first, rx, health).await;
                let _ = done.send(());
            });
            conns.push(tx);
        }
        Ok(Self {
            target,
            info,
            conns,
            next: AtomicUsize::new(0),
            timeout: options.timeout,
            health,
            finished: Mutex::new(done_rx),
        })
    }

    pub(crate) fn info(&self) -> NbdExportInfo {
        self.info
    }

    pub(crate) fn address(&self) -> &NbdAddress {
        &self.target.address
    }

    pub(crate) fn export(&self) -> &str {
        &self.target.export
    }

    pub(crate) fn connections(&self) -> usize {
        self.conns.len()
    }

    pub(crate) fn tls(&self) -> bool {
        self.target.tls.is_some()
    }

    pub(crate) fn read_only(&self) -> bool {
        self.info.has(tf::READ_ONLY)
    }

    /// `PermissionDenied` on a read-only export, without asking the server.
    pub(crate) fn writable(&self) -> io::Result<()> {
        if self.read_only() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "the export '{}' on the NBD server at {} is read-only",
                    self.target.export, self.target.peer
                ),
            ));
        }
        Ok(())
    }

    fn unsupported(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the NBD server at {} does not support {what} on this export", self.target.peer),
        )
    }

    fn submit(
        &self,
        cmd: Command,
        offset: u64,
        length: u32,
        payload: Option<Arc<[u8]>>,
    ) -> io::Result<Waiter> {
        let (reply, rx) = std_mpsc::sync_channel(1);
        let expect = Expect { cmd, offset, length };
        let deadline = Instant::now() + self.timeout;
        let call = Call { expect, flags: 0, payload, reply, deadline };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        self.conns[i].send(call).map_err(|_| self.closed())?;
        Ok(Waiter { rx, expect, deadline })
    }

    fn closed(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotConnected,
            format!("the client of the NBD server at {} is closed", self.target.peer),
        )
    }

    fn wait(&self, w: &Waiter) -> io::Result<Reply> {
        let left = w.deadline.saturating_duration_since(Instant::now());
        match r3map_net::runtime::blocking(|| w.rx.recv_timeout(left)) {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no answer to the {} from the NBD server at {} within {:?}{}",
                    w.expect,
                    self.target.peer,
                    self.timeout,
                    self.health.suffix()
                ),
            )),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(self.closed()),
        }
    }

    fn call(&self, cmd: Command, offset: u64, length: u32) -> io::Result<Reply> {
        let w = self.submit(cmd, offset, length, None)?;
        self.wait(&w)
    }

    /// Sends `cmd` over `off..off + len` in pieces of at most `piece` bytes, many in flight at
    /// once, and hands each answer to `each` with the piece's start relative to `off`. With
    /// `payload`, each piece carries its part of it. The first error is returned once every piece
    /// sent has been answered; no piece is sent after it.
    fn pieces(
        &self,
        cmd: Command,
        off: u64,
        len: u64,
        piece: u32,
        payload: Option<&[u8]>,
        mut each: impl FnMut(u64, Reply) -> io::Result<()>,
    ) -> io::Result<()> {
        let carries_data = matches!(cmd, Command::Read | Command::Write);
        let mut in_flight: VecDeque<(u64, u64, Waiter)> = VecDeque::new();
        let mut bytes = 0u64;
        let mut pos = 0u64;
        let mut first_error = None;
        loop {
            let room = in_flight.len() < MAX_PIECES_IN_FLIGHT
                && (in_flight.is_empty() || bytes < MAX_BYTES_IN_FLIGHT);
            if pos < len && first_error.is_none() && room {
                let n = (len - pos).min(u64::from(piece));
                let data = payload.map(|p| Arc::from(&p[to_usize(pos)..to_usize(pos + n)]));
                let length = u32::try_from(n).expect("pieces are at most a u32");
                match self.submit(cmd, off + pos, length, data) {
                    Ok(w) => {
                        let cost = if carries_data { n } else { 0 };
                        bytes += cost;
                        in_flight.push_back((pos, cost, w));
                    }
                    Err(e) => first_error = Some(e),
                }
                pos += n;
                continue;
            }
            let Some((rel, cost, w)) = in_flight.pop_front() else {
                break;
            };
            bytes -= cost;
            if let Err(e) = self.wait(&w).and_then(|reply| each(rel, reply)) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Sends a command without payload or data in its answer over a range.
    fn ranged(&self, cmd: Command, off: u64, len: u64, piece: u32) -> io::Result<()> {
        self.pieces(cmd, off, len, piece, None, |_, _| Ok(()))
    }

    /// `InvalidInput` unless the range respects the minimum block size (only the export's end may
    /// cut a block).
    fn check_aligned(&self, off: u64, len: u64) -> io::Result<()> {
        let min = u64::from(self.info.min_block);
        if off.is_multiple_of(min) && (len.is_multiple_of(min) || off + len == self.info.size) {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{len} bytes at offset {off} are not aligned to the server's minimum block size of {min}"
            ),
        ))
    }

    fn check(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.info.size)?;
        self.check_aligned(off, len)
    }

    /// `NBD_CMD_CACHE` over a range widened to whole blocks; nothing unless the server has it.
    pub(crate) fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.info.size)?;
        if len == 0 || !self.info.has(tf::SEND_CACHE) {
            return Ok(());
        }
        let min = u64::from(self.info.min_block);
        let start = off / min * min;
        let end = (off + len).div_ceil(min).saturating_mul(min).min(self.info.size);
        self.ranged(Command::Cache, start, end - start, self.info.max_unpayloaded())
    }

    /// `NBD_CMD_TRIM` over the whole blocks inside a range; nothing unless the server has it.
    pub(crate) fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        check_range(off, len, self.info.size)?;
        self.writable()?;
        if len == 0 || !self.info.has(tf::SEND_TRIM) {
            return Ok(());
        }
        let min = u64::from(self.info.min_block);
        let start = off.div_ceil(min) * min;
        let end = if off + len == self.info.size { off + len } else { (off + len) / min * min };
        if end <= start {
            return Ok(());
        }
        self.ranged(Command::Trim, start, end - start, self.info.max_unbounded())
    }

    /// Zeroes a range with `NBD_CMD_WRITE_ZEROES`, letting the server punch holes.
    fn zero(&self, off: u64, len: u64) -> io::Result<()> {
        self.check(off, len)?;
        self.writable()?;
        self.ranged(Command::WriteZeroes, off, len, self.info.max_unpayloaded())
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        // Closing the channels makes each connection send NBD_CMD_DISC and end.
        let tasks = self.conns.len();
        self.conns.clear();
        let deadline = Instant::now() + CLOSE_GRACE;
        let finished = self.finished.lock().unwrap_or_else(PoisonError::into_inner);
        for _ in 0..tasks {
            let left = deadline.saturating_duration_since(Instant::now());
            if r3map_net::runtime::blocking(|| finished.recv_timeout(left)).is_err() {
                break;
            }
        }
    }
}

/// The data or extents an answer must carry.
fn unexpected(reply: &Reply, wanted: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("the NBD server answered {wanted} with {reply:?}"))
}

impl Backend for Transport {
    fn size(&self) -> u64 {
        self.info.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let len = len64(buf);
        self.check(off, len)?;
        self.pieces(Command::Read, off, len, self.info.max_payload(), None, |rel, reply| match reply {
            Reply::Data(data) => {
                let start = to_usize(rel);
                let Some(target) = buf.get_mut(start..start + data.len()) else {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the NBD server sent {} bytes past the end of a read", data.len()),
                    ));
                };
                target.copy_from_slice(&data);
                Ok(())
            }
            other => Err(unexpected(&other, "a read")),
        })
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check(off, len64(buf))?;
        self.writable()?;
        self.pieces(Command::Write, off, len64(buf), self.info.max_payload(), Some(buf), |_, _| Ok(()))
    }

    fn flush(&self) -> io::Result<()> {
        if !self.info.has(tf::SEND_FLUSH) {
            return Ok(());
        }
        self.call(Command::Flush, 0, 0).map(drop)
    }

    fn capabilities(&self) -> Capabilities {
        let zeroes = self.info.has(tf::SEND_WRITE_ZEROES) && !self.read_only();
        Capabilities {
            // NBD_CMD_TRIM does not promise that the range reads as zeroes afterwards; a write of
            // zeroes that may punch a hole does.
            trim: zeroes,
            write_zeroes: zeroes,
            extents: self.info.block_status,
            read_only: self.read_only(),
        }
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.capabilities().trim {
            return Err(self.unsupported("trim (it needs NBD_CMD_WRITE_ZEROES)"));
        }
        self.zero(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.capabilities().write_zeroes {
            return Err(self.unsupported("NBD_CMD_WRITE_ZEROES"));
        }
        self.zero(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        if !self.info.block_status {
            return Err(self.unsupported("block status (base:allocation)"));
        }
        self.check(off, len)?;
        let end = off + len;
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = off;
        // The server may describe less than asked: ask again from where its answer stopped.
        while pos < end {
            let n = u32::try_from((end - pos).min(u64::from(self.info.max_unbounded()))).unwrap_or(u32::MAX);
            let reply = self.call(Command::BlockStatus, pos, n)?;
            let Reply::Extents(descriptors) = reply else {
                return Err(unexpected(&reply, "a block status query"));
            };
            for (length, flags) in descriptors {
                if pos >= end {
                    break;
                }
                let length = u64::from(length).min(end - pos);
                // A hole that might not read as zeroes is data for a Backend.
                let hole = flags & (STATE_HOLE | STATE_ZERO) == STATE_HOLE | STATE_ZERO;
                match extents.last_mut() {
                    Some(last) if last.hole == hole => last.len += length,
                    _ => extents.push(Extent { len: length, hole }),
                }
                pos += length;
            }
        }
        Ok(extents)
    }
}
