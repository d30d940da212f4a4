//! Request execution without I/O: a transmission request is checked against the connection it
//! arrived on ([`check`]), run on the export's backend ([`execute`]), and its reply encoded into a
//! buffer. The async driver (`server`) and the threaded driver (`threaded`) both read requests,
//! call these, and write what they return; neither knows how a command is carried out.

use std::io;
use std::time::{Duration, Instant};

use r3map_core::Capabilities;

use crate::export::NbdExport;
use crate::proto::{self, BlockDescriptor, Command, Request, SimpleReply, cmd_flags, errno};
use crate::status::{self, Context};

/// How long replies in flight may take to reach a client once shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What one connection serves, settled by negotiation.
pub(crate) struct Conn {
    pub(crate) export: NbdExport,
    pub(crate) structured: bool,
    pub(crate) contexts: Vec<Context>,
}

/// A refusal decided before the backend is called.
pub(crate) struct Refusal {
    pub(crate) error: u32,
    pub(crate) message: String,
}

fn refuse(error: u32, message: impl Into<String>) -> Refusal {
    Refusal { error, message: message.into() }
}

/// The NBD error for a backend error: the native protocol's mapping, narrowed to the values
/// the NBD spec allows (`EFBIG` counts as `ENOSPC`, as the spec asks).
#[must_use]
pub fn errno_of(e: &io::Error) -> u32 {
    if e.kind() == io::ErrorKind::FileTooLarge {
        return errno::ENOSPC;
    }
    match r3map_net::errno::from_io(e) {
        c @ (errno::EPERM
        | errno::EIO
        | errno::ENOMEM
        | errno::EINVAL
        | errno::ENOSPC
        | errno::EOVERFLOW
        | errno::ENOTSUP
        | errno::ESHUTDOWN) => c,
        _ => errno::EIO,
    }
}

/// Checks a request against the connection; what is returned is sent as the error reply.
pub(crate) fn check(req: &Request, conn: &Conn, size: u64, caps: Capabilities) -> Result<Command, Refusal> {
    let export = &conn.export;
    let Some(cmd) = req.command() else {
        return Err(refuse(errno::EINVAL, format!("unknown command {}", req.kind)));
    };
    let allowed = match cmd {
        Command::Read => cmd_flags::FUA | cmd_flags::DF,
        Command::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        Command::BlockStatus => cmd_flags::FUA | cmd_flags::REQ_ONE,
        _ => cmd_flags::FUA,
    };
    if req.flags & !allowed != 0 {
        return Err(refuse(
            errno::EINVAL,
            format!("flags {:#x} are not valid for {}", req.flags, cmd.name()),
        ));
    }
    let read_only = export.read_only(caps);
    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && read_only {
        return Err(refuse(errno::EPERM, format!("the export '{}' is read-only", export.name)));
    }
    let max = export.block_sizes.max;
    if matches!(cmd, Command::Read | Command::Write) && req.length > max {
        return Err(refuse(
            errno::EOVERFLOW,
            format!("a request of {} bytes is larger than the limit of {max}", req.length),
        ));
    }
    let in_range = req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= size);
    match cmd {
        Command::Read
        | Command::Write
        | Command::Trim
        | Command::WriteZeroes
        | Command::Cache
        | Command::BlockStatus
            if !in_range =>
        {
            // Writes past the end are "no space" (the spec's choice); everything else is invalid.
            let error = if matches!(cmd, Command::Write | Command::WriteZeroes) {
                errno::ENOSPC
            } else {
                errno::EINVAL
            };
            Err(refuse(
                error,
                format!(
                    "{} of {} bytes at offset {} is beyond the end of the export ({size} bytes)",
                    cmd.name(),
                    req.length,
                    req.offset
                ),
            ))
        }
        Command::Trim if !caps.trim => Err(refuse(errno::ENOTSUP, "this export does not support trim")),
        Command::WriteZeroes if !caps.write_zeroes => {
            Err(refuse(errno::ENOTSUP, "this export does not support write zeroes"))
        }
        Command::BlockStatus if conn.contexts.is_empty() => Err(refuse(
            errno::EINVAL,
            "block status needs metadata contexts selected with NBD_OPT_SET_META_CONTEXT",
        )),
        Command::BlockStatus if req.length == 0 => Err(refuse(errno::EINVAL, "block status of zero bytes")),
        Command::Resize | Command::Disc => {
            Err(refuse(errno::EINVAL, format!("{} is not supported by this server", cmd.name())))
        }
        _ => Ok(cmd),
    }
}

/// Copies `bytes` to the front of `out` (growing it when needed, never shrinking it, so a reused
/// buffer is not zeroed again); the reply is `out[..bytes.len()]`.
fn put(out: &mut Vec<u8>, bytes: &[u8]) -> usize {
    if out.len() < bytes.len() {
        out.resize(bytes.len(), 0);
    }
    out[..bytes.len()].copy_from_slice(bytes);
    bytes.len()
}

/// Runs a checked request on the backend and encodes its reply into `out`, counting it in the
/// metrics; the reply is `out[..n]` for the `n` returned. `out` is a buffer reused from request
/// to request: it only ever grows, so large reads neither allocate nor zero memory again.
pub(crate) fn execute(conn: &Conn, cmd: Command, req: &Request, payload: &[u8], out: &mut Vec<u8>) -> usize {
    let started = Instant::now();
    let (n, ok) = run(conn, cmd, req, payload, out);
    record(cmd, started.elapsed().as_secs_f64(), ok);
    n
}

/// Counts a request in the metrics. Each operation's label is a literal, so its metric keys are
/// statics: a key built from a runtime string allocates, twice per request, and a server that
/// serves swap must not allocate per request.
fn record(cmd: Command, seconds: f64, ok: bool) {
    macro_rules! per_op {
        ($op:literal) => {{
            metrics::counter!("r3map_nbd_requests_total", "op" => $op).increment(1);
            metrics::histogram!("r3map_nbd_request_seconds", "op" => $op).record(seconds);
            if !ok {
                metrics::counter!("r3map_nbd_errors_total", "op" => $op).increment(1);
            }
        }};
    }
    match cmd {
        Command::Read => per_op!("read"),
        Command::Write => per_op!("write"),
        Command::Disc => per_op!("disc"),
        Command::Flush => per_op!("flush"),
        Command::Trim => per_op!("trim"),
        Command::Cache => per_op!("cache"),
        Command::WriteZeroes => per_op!("write_zeroes"),
        Command::BlockStatus => per_op!("block_status"),
        Command::Resize => per_op!("resize"),
    }
}

/// The reply to a checked request (its length in `out`), and whether it succeeded.
fn run(conn: &Conn, cmd: Command, req: &Request, payload: &[u8], out: &mut Vec<u8>) -> (usize, bool) {
    let export = &conn.export;
    let backend = &export.backend;
    let fua = req.flags & cmd_flags::FUA != 0;
    let len = u64::from(req.length);
    let result = match cmd {
        Command::Read => return read_reply(conn, req, out),
        Command::BlockStatus => return (put(out, &block_status_reply(conn, req)), true),
        Command::Write => {
            let r = backend.write_at(payload, req.offset);
            if r.is_ok() {
                metrics::counter!("r3map_nbd_bytes_total", "direction" => "write").increment(len);
            }
            r
        }
        Command::Flush => backend.flush(),
        Command::Trim => backend.trim(req.offset, len),
        Command::WriteZeroes => backend.write_zeroes(req.offset, len),
        // Exports without chunk states either hold the data already or fetch it on the first
        // read: there is nothing to prefetch.
        Command::Cache => match &export.chunk_states {
            Some(states) => states.prefetch(req.offset, len),
            None => Ok(()),
        },
        Command::Disc | Command::Resize => Ok(()),
    };
    let result = result.and_then(|()| {
        if fua && matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes) {
            backend.flush()
        } else {
            Ok(())
        }
    });
    match result {
        Ok(()) => (put(out, &SimpleReply { error: 0, cookie: req.cookie }.encode()), true),
        Err(e) => {
            tracing::debug!(command = cmd.name(), offset = req.offset, length = req.length, error = %e, "NBD request failed");
            (put(out, &error_reply(req.cookie, errno_of(&e), &e.to_string(), conn.structured)), false)
        }
    }
}

/// One `BLOCK_STATUS` chunk per selected context, the last one marked done.
fn block_status_reply(conn: &Conn, req: &Request) -> Vec<u8> {
    let max = if req.flags & cmd_flags::REQ_ONE != 0 { 1 } else { status::MAX_DESCRIPTORS };
    let mut out = Vec::new();
    for (i, context) in conn.contexts.iter().enumerate() {
        let descriptors: Vec<BlockDescriptor> = match (context, &conn.export.chunk_states) {
            (Context::Chunks, Some(states)) => status::chunks(&**states, req.offset, req.length, max),
            // Only offered with chunk states; report plain data if that ever changes.
            (Context::Chunks, None) => vec![BlockDescriptor { len: req.length, flags: 0 }],
            (Context::Allocation, _) => {
                status::allocation(&*conn.export.backend, req.offset, req.length, max)
            }
        };
        let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let done = i + 1 == conn.contexts.len();
        out.extend_from_slice(&proto::encode_block_status(req.cookie, id, &descriptors, done));
    }
    out
}

/// A read's reply into `out` (its length, and whether it succeeded): simple, or structured with
/// `OFFSET_HOLE` chunks where the backend reports holes (unless the client asked for one chunk
/// with `DF`).
fn read_reply(conn: &Conn, req: &Request, out: &mut Vec<u8>) -> (usize, bool) {
    let backend = &conn.export.backend;
    let len = req.length as usize;
    let structured = conn.structured;
    if structured && len == 0 {
        return (put(out, &proto::encode_none(req.cookie)), true);
    }
    let layout = if structured && req.flags & cmd_flags::DF == 0 {
        status::read_layout(&**backend, req.offset, u64::from(req.length))
    } else {
        None
    };
    let result = match layout {
        Some(runs) => read_runs(&**backend, req.cookie, &runs).map(|chunks| put(out, &chunks)),
        None => {
            let prefix = if structured { proto::OFFSET_DATA_PREFIX } else { proto::SIMPLE_REPLY_LEN };
            let n = prefix + len;
            if out.len() < n {
                out.resize(n, 0);
            }
            backend.read_at(&mut out[prefix..n], req.offset).map(|()| {
                if structured {
                    proto::encode_offset_data_prefix(out, req.cookie, req.offset, len, true);
                } else {
                    SimpleReply { error: 0, cookie: req.cookie }.encode_into(out);
                }
                n
            })
        }
    };
    match result {
        Ok(n) => {
            metrics::counter!("r3map_nbd_bytes_total", "direction" => "read")
                .increment(u64::from(req.length));
            (n, true)
        }
        Err(e) => {
            tracing::debug!(offset = req.offset, length = req.length, error = %e, "NBD read failed");
            (put(out, &error_reply(req.cookie, errno_of(&e), &e.to_string(), structured)), false)
        }
    }
}

/// Structured read chunks for runs of data and holes, the last one marked done.
fn read_runs(
    backend: &dyn r3map_core::Backend,
    cookie: u64,
    runs: &[(std::ops::Range<u64>, bool)],
) -> io::Result<Vec<u8>> {
    let data: usize = runs
        .iter()
        .filter(|(_, hole)| !hole)
        .map(|(r, _)| r3map_core::geometry::to_usize(r.end - r.start))
        .sum();
    let mut out = Vec::with_capacity(data + runs.len() * proto::OFFSET_DATA_PREFIX);
    for (i, (range, hole)) in runs.iter().enumerate() {
        let done = i + 1 == runs.len();
        let n = range.end - range.start;
        if *hole {
            // Runs lie within one request, whose length is a u32.
            let n = u32::try_from(n).map_err(io::Error::other)?;
            out.extend_from_slice(&proto::encode_offset_hole(cookie, range.start, n, done));
        } else {
            let n = r3map_core::geometry::to_usize(n);
            let at = out.len();
            out.resize(at + proto::OFFSET_DATA_PREFIX + n, 0);
            backend.read_at(&mut out[at + proto::OFFSET_DATA_PREFIX..], range.start)?;
            proto::encode_offset_data_prefix(&mut out[at..], cookie, range.start, n, done);
        }
    }
    Ok(out)
}

pub(crate) fn error_reply(cookie: u64, error: u32, message: &str, structured: bool) -> Vec<u8> {
    if structured {
        proto::encode_error_chunk(cookie, error, message)
    } else {
        SimpleReply { error, cookie }.encode().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::transmission_flags;
    use crate::proto::{ChunkHeader, reply_flags, reply_type};
    use crate::status::ChunkStates;
    use r3map_core::Memory;
    use std::sync::Arc;

    fn export(read_only: bool) -> NbdExport {
        let memory = Memory::with_page_size(1 << 20, 64 * 1024).unwrap();
        NbdExport { read_only, ..NbdExport::new("d", Arc::new(memory)) }
    }

    fn conn(read_only: bool, structured: bool, contexts: Vec<Context>) -> Conn {
        Conn { export: export(read_only), structured, contexts }
    }

    /// A read's reply on its own.
    fn read(conn: &Conn, r: &Request) -> (Vec<u8>, bool) {
        let mut out = Vec::new();
        let (n, ok) = read_reply(conn, r, &mut out);
        out.truncate(n);
        (out, ok)
    }

    fn req(kind: Command, offset: u64, length: u32, flags: u16) -> Request {
        Request { flags, kind: kind.to_u16(), cookie: 1, offset, length }
    }

    #[test]
    fn flags_follow_capabilities() {
        use transmission_flags as f;
        let w = export(false).transmission_flags();
        assert_ne!(w & f::SEND_TRIM, 0);
        assert_ne!(w & f::SEND_WRITE_ZEROES, 0);
        assert_eq!(w & f::READ_ONLY, 0);
        let r = export(true).transmission_flags();
        assert_ne!(r & f::READ_ONLY, 0);
        assert_eq!(r & f::SEND_TRIM, 0);
    }

    #[test]
    fn requests_are_checked() {
        let e = conn(false, true, vec![]);
        let size = e.export.backend.size();
        let caps = e.export.backend.capabilities();
        let err = |r: Request| check(&r, &e, size, caps).err().map(|r| r.error);
        assert_eq!(err(req(Command::Read, 0, 4096, 0)), None);
        assert_eq!(err(req(Command::Read, size, 1, 0)), Some(errno::EINVAL));
        assert_eq!(err(req(Command::Read, u64::MAX, 2, 0)), Some(errno::EINVAL));
        assert_eq!(err(req(Command::Write, size - 1, 2, 0)), Some(errno::ENOSPC));
        assert_eq!(err(req(Command::Read, 0, proto::MAX_REQUEST + 1, 0)), Some(errno::EOVERFLOW));
        assert_eq!(err(req(Command::Read, 0, 1, 1 << 9)), Some(errno::EINVAL));
        assert_eq!(err(Request { kind: 99, ..req(Command::Read, 0, 1, 0) }), Some(errno::EINVAL));
        assert_eq!(err(req(Command::BlockStatus, 0, 4096, 0)), Some(errno::EINVAL));
        let with_meta = conn(false, true, vec![Context::Allocation]);
        assert!(
            check(&req(Command::BlockStatus, 0, 4096, cmd_flags::REQ_ONE), &with_meta, size, caps).is_ok()
        );
        assert_eq!(
            check(&req(Command::BlockStatus, 0, 0, 0), &with_meta, size, caps).err().map(|r| r.error),
            Some(errno::EINVAL)
        );
        assert_eq!(
            check(&req(Command::BlockStatus, size, 1, 0), &with_meta, size, caps).err().map(|r| r.error),
            Some(errno::EINVAL)
        );
        let ro = conn(true, false, vec![]);
        assert_eq!(
            check(&req(Command::Write, 0, 1, 0), &ro, size, caps).err().map(|r| r.error),
            Some(errno::EPERM)
        );
    }

    #[test]
    fn errors_map_to_nbd_values() {
        let e = |k| errno_of(&io::Error::new(k, "x"));
        assert_eq!(e(io::ErrorKind::PermissionDenied), errno::EPERM);
        assert_eq!(e(io::ErrorKind::InvalidInput), errno::EINVAL);
        assert_eq!(e(io::ErrorKind::StorageFull), errno::ENOSPC);
        assert_eq!(e(io::ErrorKind::Unsupported), errno::ENOTSUP);
        assert_eq!(e(io::ErrorKind::Other), errno::EIO);
    }

    #[test]
    fn structured_read_errors_are_chunks() {
        let e = conn(false, true, vec![]);
        let r = Request { offset: 2 << 20, ..req(Command::Read, 0, 16, 0) };
        let (reply, ok) = read(&e, &r);
        assert!(!ok);
        let h = ChunkHeader::decode(&reply[..proto::CHUNK_HEADER_LEN]).unwrap();
        assert_eq!(h.kind, reply_type::ERROR);
        assert_eq!(h.flags, reply_flags::DONE);
        let (reply, _) = read(&e, &req(Command::Read, 0, 0, 0));
        assert_eq!(ChunkHeader::decode(&reply).unwrap().kind, reply_type::NONE);
    }

    /// Splits a structured reply into its chunks' headers and payloads.
    fn chunks(mut reply: &[u8]) -> Vec<(ChunkHeader, Vec<u8>)> {
        let mut out = Vec::new();
        while !reply.is_empty() {
            let h = ChunkHeader::decode(&reply[..proto::CHUNK_HEADER_LEN]).unwrap();
            let end = proto::CHUNK_HEADER_LEN + h.len as usize;
            out.push((h, reply[proto::CHUNK_HEADER_LEN..end].to_vec()));
            reply = &reply[end..];
        }
        out
    }

    #[test]
    fn structured_reads_send_holes() {
        let e = conn(false, true, vec![]);
        e.export.backend.write_at(&[7; 10], 70_000).unwrap();
        let (reply, ok) = read(&e, &req(Command::Read, 0, 256 * 1024, 0));
        assert!(ok);
        let kinds: Vec<_> = chunks(&reply).iter().map(|(h, _)| (h.kind, h.flags)).collect();
        assert_eq!(
            kinds,
            [
                (reply_type::OFFSET_HOLE, 0),
                (reply_type::OFFSET_DATA, 0),
                (reply_type::OFFSET_HOLE, reply_flags::DONE)
            ]
        );
        let data = &chunks(&reply)[1].1;
        assert_eq!(u64::from_be_bytes(data[..8].try_into().unwrap()), 65_536);
        assert_eq!(&data[8 + 70_000 - 65_536..][..10], &[7; 10]);
        // With DF, one data chunk carries the zeroes.
        let (reply, _) = read(&e, &req(Command::Read, 0, 256 * 1024, cmd_flags::DF));
        assert_eq!(chunks(&reply).len(), 1);
        // Simple replies carry data as before.
        let plain = conn(false, false, vec![]);
        let (reply, _) = read(&plain, &req(Command::Read, 0, 4096, 0));
        assert_eq!(reply.len(), proto::SIMPLE_REPLY_LEN + 4096);
    }

    #[test]
    fn block_status_answers_every_context() {
        use crate::proto::decode_block_status;
        let states: Arc<dyn ChunkStates> = Arc::new(AllRemote);
        let mut e = conn(false, true, vec![Context::Allocation, Context::Chunks]);
        e.export.chunk_states = Some(states);
        let reply = block_status_reply(&e, &req(Command::BlockStatus, 0, 1 << 20, 0));
        let c = chunks(&reply);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].0.flags, 0);
        assert_eq!(c[1].0.flags, reply_flags::DONE);
        let (id, d) = decode_block_status(&c[0].1).unwrap();
        assert_eq!((id, d.len()), (1, 1));
        assert_eq!(d[0].flags, proto::meta::STATE_HOLE | proto::meta::STATE_ZERO);
        let (id, d) = decode_block_status(&c[1].1).unwrap();
        assert_eq!((id, d[0].len, d[0].flags), (2, 1 << 20, status::CHUNK_REMOTE));
    }

    struct AllRemote;

    impl ChunkStates for AllRemote {
        fn chunk_size(&self) -> u64 {
            4096
        }
        fn chunk_flags(&self, _: u64) -> u32 {
            status::CHUNK_REMOTE
        }
        fn prefetch(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
    }
}
