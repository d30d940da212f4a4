//! [`Transport`]: the export as a [`Backend`] that sends requests as they are, cut only at the
//! server's maximum sizes. Requests must already respect the minimum block size;
//! [`NbdBackend`](super::NbdBackend) puts an [`Aligned`](r3map_core::Aligned) layer in front when
//! the server has one above 1.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use r3map_core::backend::len64;
use r3map_core::geometry::to_usize;
use r3map_core::{Backend, Capabilities, Extent, check_range};
use r3map_net::Io;
use r3map_net::mux::{Class, Mux, MuxOptions, Ticket};

use super::connection::{Call, Nbd, Target};
use super::handshake::NbdExportInfo;
use super::options::{NbdAddress, NbdClientOptions};
use super::reply::{Expect, Reply, STATE_HOLE, STATE_ZERO};
use crate::proto::{Command, transmission_flags as tf};

/// Pieces of one call in flight at once.
const MAX_PIECES_IN_FLIGHT: usize = 64;
/// Payload bytes of one call in flight at once.
const MAX_BYTES_IN_FLIGHT: u64 = 128 * 1024 * 1024;
/// How long dropping the client waits for its connections to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The connections to one export, as a [`Mux`] on the runtime the client was opened on.
pub(crate) struct Transport {
    mux: Mux<Nbd>,
    info: NbdExportInfo,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let target = &self.mux.codec().target;
        f.debug_struct("Transport")
            .field("server", &target.peer)
            .field("export", &target.export)
            .field("info", &self.info)
            .field("connections", &self.mux.connections())
            .field("tls", &target.tls.is_some())
            .field("timeout", &self.mux.timeout())
            .finish_non_exhaustive()
    }
}

/// Requests of more than this many bytes are background transfers; smaller ones are demand
/// requests, sent first (see [`r3map_net::mux`]).
const SMALL_REQUEST: u64 = 1 << 20;

impl Transport {
    /// Opens the connections; see [`NbdBackend::connect`](super::NbdBackend::connect).
    pub(crate) fn connect(address: NbdAddress, options: NbdClientOptions, io: &Io) -> io::Result<Self> {
        let target = Target {
            peer: Arc::from(address.to_string()),
            address,
            export: options.export,
            connect_timeout: options.connect_timeout,
            tls: options.tls,
        };
        let mux_options = MuxOptions {
            connections: options.connections.max(1),
            timeout: options.timeout,
            max_backoff: options.max_backoff,
            close_grace: CLOSE_GRACE,
            ..MuxOptions::default()
        };
        let peer = Arc::clone(&target.peer);
        let mux = Mux::open(Nbd::new(target), mux_options, io, |first| {
            if first.info.has(tf::CAN_MULTI_CONN) {
                return usize::MAX;
            }
            if options.connections > 1 {
                tracing::debug!(
                    server = %peer,
                    connections = options.connections,
                    "the NBD server does not announce CAN_MULTI_CONN; using one connection"
                );
            }
            1
        })?;
        let info = mux.session().info;
        Ok(Self { mux, info })
    }

    fn target(&self) -> &Target {
        &self.mux.codec().target
    }

    pub(crate) fn info(&self) -> NbdExportInfo {
        self.info
    }

    pub(crate) fn address(&self) -> &NbdAddress {
        &self.mux.codec().target.address
    }

    pub(crate) fn export(&self) -> &str {
        &self.mux.codec().target.export
    }

    pub(crate) fn connections(&self) -> usize {
        self.mux.connections()
    }

    pub(crate) fn tls(&self) -> bool {
        self.mux.codec().target.tls.is_some()
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
                    self.target().export,
                    self.target().peer
                ),
            ));
        }
        Ok(())
    }

    fn unsupported(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("the NBD server at {} does not support {what} on this export", self.target().peer),
        )
    }

    fn submit(
        &self,
        cmd: Command,
        offset: u64,
        length: u32,
        payload: Option<Arc<[u8]>>,
    ) -> io::Result<Ticket<Nbd>> {
        let expect = Expect { cmd, offset, length };
        let class = if u64::from(length) > SMALL_REQUEST && matches!(cmd, Command::Read | Command::Write) {
            Class::Background
        } else {
            Class::Demand
        };
        self.mux.submit(class, Call { expect, flags: 0, payload })
    }

    fn wait(&self, ticket: &Ticket<Nbd>) -> io::Result<Reply> {
        self.mux.wait(ticket)
    }

    fn call(&self, cmd: Command, offset: u64, length: u32) -> io::Result<Reply> {
        let ticket = self.submit(cmd, offset, length, None)?;
        self.wait(&ticket)
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
        let mut in_flight: VecDeque<(u64, u64, Ticket<Nbd>)> = VecDeque::new();
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
