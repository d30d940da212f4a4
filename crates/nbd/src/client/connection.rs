//! Connections in the transmission phase: one writer sending requests as they come, one reader
//! matching replies to them by cookie, and reconnection when the connection breaks.
//!
//! A connection is a task on the client's runtime. Requests arrive on a channel and wait in a
//! queue; the writer gives each a fresh cookie, records it as pending and sends it. The reader
//! takes replies in whatever order the server sends them, gathers the chunks of structured
//! replies and hands each result to the caller blocked on its channel.
//!
//! When the connection breaks (the server closed it, a write failed, or a request went unanswered
//! past its deadline), requests without an answer go back to the front of the queue in the order
//! they were first sent, and the task reconnects with exponential backoff as long as something is
//! waiting. Every NBD command the client sends is safe to repeat. A request whose deadline passes
//! fails with `TimedOut`. A server that breaks the protocol fails every pending request instead:
//! what it sent cannot be trusted.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::handshake::{BoxedStream, HandshakeError, Negotiated, negotiate};
use super::options::{NbdAddress, NbdClientTls};
use super::reply::{Assembly, Expect, Payload, Reply, Violation, server_error};
use crate::proto::{
    self, ChunkHeader, Command, Request, SimpleReply, errno, reply_flags, transmission_flags,
};

/// First wait before reconnecting; doubled after each failure up to the configured maximum.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// A session shorter than this is followed by a wait before reconnecting.
const SHORT_SESSION: Duration = Duration::from_secs(1);
/// How often a connection checks for requests left unanswered past their deadline.
const WATCHDOG: Duration = Duration::from_millis(250);
/// How long a closing connection waits for the server to hang up after `NBD_CMD_DISC`.
const DISCONNECT_GRACE: Duration = Duration::from_millis(500);
/// Buffer sizes of a connection's reader and writer.
const IO_BUFFER: usize = 256 * 1024;

/// One request on its way, and where its answer goes.
#[derive(Debug)]
pub(crate) struct Call {
    pub expect: Expect,
    pub flags: u16,
    /// The data of a write, kept for sending again after a reconnection.
    pub payload: Option<Arc<[u8]>>,
    pub reply: std_mpsc::SyncSender<io::Result<Reply>>,
    pub deadline: Instant,
}

impl Call {
    fn fail(self, e: &io::Error) {
        let _ = self.reply.send(Err(io::Error::new(e.kind(), e.to_string())));
    }
}

type Pending = Arc<Mutex<HashMap<u64, Call>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The last problem a connection had, for error messages of requests that time out.
#[derive(Debug, Default)]
pub(crate) struct Health(Mutex<Option<String>>);

impl Health {
    fn set(&self, problem: String) {
        *lock(&self.0) = Some(problem);
    }

    fn clear(&self) {
        *lock(&self.0) = None;
    }

    /// `" (last problem: ...)"`, or nothing when all is well.
    pub(crate) fn suffix(&self) -> String {
        lock(&self.0).as_ref().map(|p| format!(" (last problem: {p})")).unwrap_or_default()
    }
}

/// How to reach the server; shared by the connections.
#[derive(Debug)]
pub(crate) struct Target {
    pub address: NbdAddress,
    /// The address as shown in messages.
    pub peer: Arc<str>,
    pub export: String,
    pub connect_timeout: Duration,
    pub max_backoff: Duration,
    /// TLS on every connection (and every reconnection), when given.
    pub tls: Option<NbdClientTls>,
}

impl Target {
    /// Connects and negotiates the export (starting TLS first when the target has it).
    pub(crate) async fn connect(&self) -> Result<(BoxedStream, Negotiated), HandshakeError> {
        let attempt = async {
            let io: BoxedStream = match &self.address {
                NbdAddress::Tcp { host, port } => {
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                    tcp.set_nodelay(true)?;
                    Box::new(tcp)
                }
                NbdAddress::Unix(path) => Box::new(tokio::net::UnixStream::connect(path).await?),
            };
            negotiate(io, &self.export, self.tls.as_ref()).await
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(e)) => Err(HandshakeError {
                error: io::Error::new(
                    e.error.kind(),
                    format!("connecting to the NBD server at {}: {}", self.peer, e.error),
                ),
                permanent: e.permanent,
            }),
            Err(_) => Err(HandshakeError {
                error: io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "connecting to the NBD server at {} took longer than {:?} (is it an NBD server?)",
                        self.peer, self.connect_timeout
                    ),
                ),
                permanent: false,
            }),
        }
    }
}

/// One connection, across reconnections, until the client is dropped.
pub(crate) async fn run(
    target: Arc<Target>,
    first: (BoxedStream, Negotiated),
    mut rx: mpsc::UnboundedReceiver<Call>,
    health: Arc<Health>,
) {
    let expected = first.1.info;
    let mut first = Some(first);
    let mut queue: VecDeque<Call> = VecDeque::new();
    let mut backoff = INITIAL_BACKOFF;
    let mut cookie = 0u64;
    loop {
        let (io, negotiated) = if let Some(connected) = first.take() {
            connected
        } else {
            // Reconnect only when something waits.
            if queue.is_empty() {
                match rx.recv().await {
                    Some(call) => queue.push_back(call),
                    None => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(call) => queue.push_back(call),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            expire(&mut queue, &target.peer, &health);
            if queue.is_empty() {
                continue;
            }
            match target.connect().await {
                Ok((io, negotiated)) if negotiated.info == expected => {
                    tracing::info!(server = %target.peer, "reconnected to the NBD server");
                    health.clear();
                    (io, negotiated)
                }
                Ok((_, negotiated)) => {
                    let e = io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the export on the NBD server at {} changed while reconnecting: it was {expected:?}, it is {:?}",
                            target.peer, negotiated.info
                        ),
                    );
                    tracing::error!(error = %e, "refusing the reconnected export");
                    health.set(e.to_string());
                    fail_all(&mut queue, &e);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(target.max_backoff);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e.error, retry_in = ?backoff, "reconnecting to the NBD server failed");
                    health.set(e.error.to_string());
                    if e.permanent {
                        fail_all(&mut queue, &e.error);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(target.max_backoff);
                    continue;
                }
            }
        };
        let started = Instant::now();
        let ended = session(io, negotiated, &target.peer, &mut rx, &mut queue, &mut cookie).await;
        match ended {
            Ended::ClientGone => return,
            Ended::Broken { pending, problem } => {
                tracing::warn!(server = %target.peer, problem = %problem, requests = pending.len(), "NBD connection lost; reconnecting");
                health.set(problem);
                // Unanswered requests go again first, in the order they were sent.
                for call in pending.into_iter().rev() {
                    queue.push_front(call);
                }
            }
            Ended::Violation { pending, violation } => {
                let e = io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the NBD server at {} broke the protocol: {violation}", target.peer),
                );
                tracing::error!(error = %e, "closing the NBD connection");
                health.set(e.to_string());
                for call in pending {
                    call.fail(&e);
                }
            }
        }
        if started.elapsed() < SHORT_SESSION {
            // A server that takes connections and drops them at once gets them more slowly.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(target.max_backoff);
        } else {
            backoff = INITIAL_BACKOFF;
        }
    }
}

fn expire(queue: &mut VecDeque<Call>, peer: &str, health: &Health) {
    let now = Instant::now();
    let (keep, expired): (VecDeque<Call>, VecDeque<Call>) = queue.drain(..).partition(|c| c.deadline > now);
    *queue = keep;
    for call in expired {
        let e = io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "{} could not reach the NBD server at {peer} before its deadline{}",
                call.expect,
                health.suffix()
            ),
        );
        call.fail(&e);
    }
}

fn fail_all(queue: &mut VecDeque<Call>, e: &io::Error) {
    for call in queue.drain(..) {
        call.fail(e);
    }
}

/// How a session on one connection ended.
enum Ended {
    /// The client was dropped; the server was told goodbye.
    ClientGone,
    /// The connection broke; `pending` (in the order sent) had no answer.
    Broken { pending: Vec<Call>, problem: String },
    /// The server broke the protocol.
    Violation { pending: Vec<Call>, violation: Violation },
}

/// Why the reader stopped.
#[derive(Debug)]
pub(crate) enum ReaderEnd {
    Closed(io::Error),
    Violation(Violation),
    /// The server said it is shutting down (`ESHUTDOWN`); the client must disconnect.
    Shutdown,
}

/// Why the writer stopped.
enum WriterEnd {
    ClientGone,
    Broken(io::Error),
    Reader(ReaderEnd),
}

/// Runs the transmission phase on one connection until it ends.
async fn session(
    io: BoxedStream,
    negotiated: Negotiated,
    peer: &Arc<str>,
    rx: &mut mpsc::UnboundedReceiver<Call>,
    queue: &mut VecDeque<Call>,
    cookie: &mut u64,
) -> Ended {
    let (rd, wr) = tokio::io::split(io);
    let pending: Pending = Arc::default();
    let context = ReaderContext {
        peer: Arc::clone(peer),
        structured: negotiated.info.structured_replies,
        context: negotiated.context,
    };
    let mut reader =
        tokio::spawn(read_replies(BufReader::with_capacity(IO_BUFFER, rd), Arc::clone(&pending), context));
    let ended = write_requests(wr, rx, queue, &pending, cookie, &mut reader, peer).await;
    let reason = match ended {
        WriterEnd::Reader(end) => end,
        WriterEnd::ClientGone => {
            // The server hangs up once it has seen NBD_CMD_DISC.
            if tokio::time::timeout(DISCONNECT_GRACE, &mut reader).await.is_err() {
                reader.abort();
            }
            return Ended::ClientGone;
        }
        WriterEnd::Broken(e) => {
            reader.abort();
            match reader.await {
                Ok(ReaderEnd::Violation(v)) => ReaderEnd::Violation(v),
                _ => ReaderEnd::Closed(e),
            }
        }
    };
    let mut unanswered: Vec<(u64, Call)> = lock(&pending).drain().collect();
    unanswered.sort_by_key(|(cookie, _)| *cookie);
    let pending = unanswered.into_iter().map(|(_, call)| call).collect();
    match reason {
        ReaderEnd::Violation(violation) => Ended::Violation { pending, violation },
        ReaderEnd::Closed(e) => Ended::Broken { pending, problem: e.to_string() },
        ReaderEnd::Shutdown => {
            Ended::Broken { pending, problem: format!("the NBD server at {peer} is shutting down") }
        }
    }
}

/// Sends requests until the client goes, the connection breaks or the reader stops.
async fn write_requests<W: AsyncWrite + Unpin>(
    wr: W,
    rx: &mut mpsc::UnboundedReceiver<Call>,
    queue: &mut VecDeque<Call>,
    pending: &Pending,
    cookie: &mut u64,
    reader: &mut JoinHandle<ReaderEnd>,
    peer: &str,
) -> WriterEnd {
    let mut out = BufWriter::with_capacity(IO_BUFFER, wr);
    let mut watchdog = tokio::time::interval(WATCHDOG);
    let reader_end = |r: Result<ReaderEnd, tokio::task::JoinError>| {
        WriterEnd::Reader(r.unwrap_or_else(|e| ReaderEnd::Closed(io::Error::other(e.to_string()))))
    };
    loop {
        let call = if let Some(call) = queue.pop_front() {
            call
        } else {
            if let Err(e) = out.flush().await {
                return WriterEnd::Broken(e);
            }
            tokio::select! {
                biased;
                r = &mut *reader => return reader_end(r),
                _ = watchdog.tick() => {
                    if let Some(e) = overdue(pending, peer) {
                        return WriterEnd::Broken(e);
                    }
                    continue;
                }
                call = rx.recv() => match call {
                    Some(call) => call,
                    None => {
                        disconnect(&mut out, *cookie + 1).await;
                        return WriterEnd::ClientGone;
                    }
                },
            }
        };
        if call.deadline <= Instant::now() {
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} could not be sent to the NBD server at {peer} before its deadline", call.expect),
            );
            call.fail(&e);
            continue;
        }
        *cookie += 1;
        let request = Request {
            flags: call.flags,
            kind: call.expect.cmd.to_u16(),
            cookie: *cookie,
            offset: call.expect.offset,
            length: call.expect.length,
        };
        let payload = call.payload.clone();
        lock(pending).insert(*cookie, call);
        let send = async {
            out.write_all(&request.encode()).await?;
            if let Some(p) = &payload {
                out.write_all(p).await?;
            }
            Ok::<(), io::Error>(())
        };
        tokio::pin!(send);
        // A server that stops reading must not hold the writer forever.
        loop {
            tokio::select! {
                biased;
                r = &mut send => match r {
                    Ok(()) => break,
                    Err(e) => return WriterEnd::Broken(e),
                },
                r = &mut *reader => return reader_end(r),
                _ = watchdog.tick() => {
                    if let Some(e) = overdue(pending, peer) {
                        return WriterEnd::Broken(e);
                    }
                }
            }
        }
    }
}

/// An error when some request went unanswered past its deadline: the connection is then given
/// up, so that the others are sent again on a fresh one.
fn overdue(pending: &Pending, peer: &str) -> Option<io::Error> {
    let now = Instant::now();
    let late = lock(pending).values().find(|c| c.deadline <= now).map(|c| c.expect)?;
    Some(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("the NBD server at {peer} did not answer the {late} in time"),
    ))
}

/// Sends `NBD_CMD_DISC` and closes the sending side.
async fn disconnect<W: AsyncWrite + Unpin>(out: &mut BufWriter<W>, cookie: u64) {
    let bye = Request { flags: 0, kind: Command::Disc.to_u16(), cookie, offset: 0, length: 0 };
    let _ = out.write_all(&bye.encode()).await;
    let _ = out.flush().await;
    let _ = out.shutdown().await;
}

/// What the reader knows about the connection.
#[derive(Debug, Clone)]
pub(crate) struct ReaderContext {
    pub peer: Arc<str>,
    pub structured: bool,
    /// The id of `base:allocation` on this connection.
    pub context: Option<u32>,
}

/// Why reading one reply stopped the reader.
enum Stop {
    Io(io::Error),
    Violation(Violation),
    Shutdown,
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<Violation> for Stop {
    fn from(v: Violation) -> Self {
        Self::Violation(v)
    }
}

impl From<proto::ProtoError> for Stop {
    fn from(e: proto::ProtoError) -> Self {
        Self::Violation(Violation(e.to_string()))
    }
}

/// Reads replies until the connection ends or the server breaks the protocol.
pub(crate) async fn read_replies<R: AsyncRead + Unpin>(
    mut rd: R,
    pending: Pending,
    ctx: ReaderContext,
) -> ReaderEnd {
    let mut assemblies: HashMap<u64, Assembly> = HashMap::new();
    loop {
        match read_reply(&mut rd, &pending, &ctx, &mut assemblies).await {
            Ok(()) => {}
            Err(Stop::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return ReaderEnd::Closed(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("the NBD server at {} closed the connection", ctx.peer),
                ));
            }
            Err(Stop::Io(e)) => return ReaderEnd::Closed(e),
            Err(Stop::Violation(v)) => return ReaderEnd::Violation(v),
            Err(Stop::Shutdown) => return ReaderEnd::Shutdown,
        }
    }
}

/// The request a reply's cookie names.
fn expected(pending: &Pending, cookie: u64) -> Result<Expect, Violation> {
    lock(pending)
        .get(&cookie)
        .map(|c| c.expect)
        .ok_or_else(|| Violation(format!("a reply for cookie {cookie}, which no request is waiting for")))
}

fn complete(pending: &Pending, cookie: u64, result: io::Result<Reply>) {
    if let Some(call) = lock(pending).remove(&cookie) {
        let _ = call.reply.send(result);
    }
}

async fn read_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    pending: &Pending,
    ctx: &ReaderContext,
    assemblies: &mut HashMap<u64, Assembly>,
) -> Result<(), Stop> {
    let mut magic = [0u8; 4];
    rd.read_exact(&mut magic).await?;
    match u32::from_be_bytes(magic) {
        proto::SIMPLE_REPLY_MAGIC => {
            let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
            header[..4].copy_from_slice(&magic);
            rd.read_exact(&mut header[4..]).await?;
            simple_reply(rd, SimpleReply::decode(&header)?, pending, ctx, assemblies).await
        }
        proto::STRUCTURED_REPLY_MAGIC if ctx.structured => {
            let mut header = [0u8; proto::CHUNK_HEADER_LEN];
            header[..4].copy_from_slice(&magic);
            rd.read_exact(&mut header[4..]).await?;
            chunk(rd, &ChunkHeader::decode(&header)?, pending, ctx, assemblies).await
        }
        proto::STRUCTURED_REPLY_MAGIC => {
            Err(Violation("a structured reply chunk, although structured replies were not negotiated".into())
                .into())
        }
        other => Err(Violation(format!("a reply with the bad magic {other:#010x}")).into()),
    }
}

async fn simple_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    reply: SimpleReply,
    pending: &Pending,
    ctx: &ReaderContext,
    assemblies: &HashMap<u64, Assembly>,
) -> Result<(), Stop> {
    let expect = expected(pending, reply.cookie)?;
    if assemblies.contains_key(&reply.cookie) {
        return Err(
            Violation(format!("a simple reply in the middle of the structured reply to {expect}")).into()
        );
    }
    let result = if reply.error != 0 {
        Err(server_error(&ctx.peer, &expect, reply.error, ""))
    } else {
        match expect.cmd {
            Command::Read if ctx.structured => {
                return Err(Violation(format!(
                    "a simple reply with data to {expect}, although structured replies were negotiated"
                ))
                .into());
            }
            Command::Read => {
                let mut data = vec![0u8; expect.length as usize];
                rd.read_exact(&mut data).await?;
                Ok(Reply::Data(data))
            }
            Command::BlockStatus => {
                return Err(Violation(format!("a simple reply to {expect}, which needs block status")).into());
            }
            _ => Ok(Reply::Done),
        }
    };
    complete(pending, reply.cookie, result);
    if reply.error == errno::ESHUTDOWN {
        return Err(Stop::Shutdown);
    }
    Ok(())
}

async fn chunk<R: AsyncRead + Unpin>(
    rd: &mut R,
    h: &ChunkHeader,
    pending: &Pending,
    ctx: &ReaderContext,
    assemblies: &mut HashMap<u64, Assembly>,
) -> Result<(), Stop> {
    let expect = expected(pending, h.cookie)?;
    let assembly = assemblies.entry(h.cookie).or_insert_with(|| Assembly::new(expect));
    match assembly.begin(h)? {
        Payload::Data(len) => {
            let mut offset = [0u8; 8];
            rd.read_exact(&mut offset).await?;
            let slot = assembly.data_slot(u64::from_be_bytes(offset), len)?;
            rd.read_exact(slot).await?;
        }
        Payload::Whole => {
            let mut payload = vec![0u8; h.len as usize];
            rd.read_exact(&mut payload).await?;
            assembly.chunk(h.kind, &payload, ctx.context)?;
        }
    }
    if h.flags & reply_flags::DONE == 0 {
        return Ok(());
    }
    let Some(assembly) = assemblies.remove(&h.cookie) else {
        return Ok(());
    };
    let shutdown = assembly.error_value() == Some(errno::ESHUTDOWN);
    complete(pending, h.cookie, assembly.finish(&ctx.peer)?);
    if shutdown {
        return Err(Stop::Shutdown);
    }
    Ok(())
}

/// Plays the client's side of a whole session over `stream`, whose other end is a server (or a
/// fuzzer pretending to be one): the handshake, then a few requests of every kind, whose replies
/// are read until the stream ends or the server breaks the protocol. Exposed for fuzzing.
#[doc(hidden)]
pub async fn fuzz_session<S>(stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok((io, negotiated)) = negotiate(Box::new(stream), "", None).await else {
        return;
    };
    let (rd, mut wr) = tokio::io::split(io);
    let pending: Pending = Arc::default();
    let mut answers = Vec::new();
    for (cookie, (expect, flags)) in (1u64..).zip(sample_requests(&negotiated)) {
        let (reply, rx) = std_mpsc::sync_channel(1);
        let payload = (expect.cmd == Command::Write).then(|| Arc::from(vec![0u8; expect.length as usize]));
        let request = Request {
            flags,
            kind: expect.cmd.to_u16(),
            cookie,
            offset: expect.offset,
            length: expect.length,
        };
        let _ = wr.write_all(&request.encode()).await;
        let call = Call { expect, flags, payload, reply, deadline: Instant::now() + Duration::from_secs(60) };
        lock(&pending).insert(cookie, call);
        answers.push((expect, rx));
    }
    let context = ReaderContext {
        peer: Arc::from("fuzzer"),
        structured: negotiated.info.structured_replies,
        context: negotiated.context,
    };
    let _ = read_replies(rd, pending, context).await;
    for (expect, rx) in answers {
        if let Ok(Ok(reply)) = rx.try_recv() {
            let fits = match reply {
                Reply::Data(d) => expect.cmd == Command::Read && d.len() == expect.length as usize,
                Reply::Extents(e) => expect.cmd == Command::BlockStatus && !e.is_empty(),
                Reply::Done => !matches!(expect.cmd, Command::Read | Command::BlockStatus),
            };
            assert!(fits, "a reply that does not fit {expect} was accepted");
        }
    }
}

/// Requests of every kind within the export, for [`fuzz_session`].
fn sample_requests(n: &Negotiated) -> Vec<(Expect, u16)> {
    let size = n.info.size;
    let len = |max: u32| u32::try_from(size.min(u64::from(max))).unwrap_or(max);
    let at = |cmd, offset, length| (Expect { cmd, offset, length }, 0);
    let mut requests = vec![at(Command::Flush, 0, 0)];
    if size > 0 {
        requests.push(at(Command::Read, 0, len(65536)));
        requests.push(at(Command::Read, size - u64::from(len(4096)), len(4096)));
        requests.push(at(Command::Write, 0, len(512)));
        requests.push(at(Command::Cache, 0, len(4096)));
        if n.info.flags & transmission_flags::SEND_WRITE_ZEROES != 0 {
            requests.push(at(Command::WriteZeroes, 0, len(4096)));
        }
        if n.context.is_some() {
            requests.push(at(Command::BlockStatus, 0, len(u32::MAX)));
        }
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        encode_error_chunk, encode_none, encode_offset_data_prefix, encode_offset_hole, reply_type,
    };

    const PEER: &str = "test";

    fn call(cmd: Command, offset: u64, length: u32) -> (Call, std_mpsc::Receiver<io::Result<Reply>>) {
        let (reply, rx) = std_mpsc::sync_channel(1);
        let call = Call {
            expect: Expect { cmd, offset, length },
            flags: 0,
            payload: None,
            reply,
            deadline: Instant::now() + Duration::from_secs(10),
        };
        (call, rx)
    }

    /// Feeds `bytes` to a reader with `calls` pending under cookies 1, 2, ...; returns why it
    /// stopped and each call's result (`None` when it got none).
    fn feed(
        structured: bool,
        calls: Vec<(Command, u64, u32)>,
        bytes: &[u8],
    ) -> (ReaderEnd, Vec<Option<io::Result<Reply>>>) {
        let pending: Pending = Arc::default();
        let mut receivers = Vec::new();
        for (cookie, (cmd, offset, length)) in (1u64..).zip(calls) {
            let (c, rx) = call(cmd, offset, length);
            lock(&pending).insert(cookie, c);
            receivers.push(rx);
        }
        let ctx = ReaderContext { peer: Arc::from(PEER), structured, context: Some(1) };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let end = rt.block_on(read_replies(bytes, Arc::clone(&pending), ctx));
        (end, receivers.into_iter().map(|rx| rx.try_recv().ok()).collect())
    }

    fn data_chunk(cookie: u64, offset: u64, data: &[u8], done: bool) -> Vec<u8> {
        let mut out = vec![0u8; proto::OFFSET_DATA_PREFIX];
        encode_offset_data_prefix(&mut out, cookie, offset, data.len(), done);
        out.extend_from_slice(data);
        out
    }

    fn simple(cookie: u64, error: u32) -> Vec<u8> {
        SimpleReply { error, cookie }.encode().to_vec()
    }

    fn closed(end: &ReaderEnd) -> bool {
        matches!(end, ReaderEnd::Closed(e) if e.to_string().contains("closed the connection"))
    }

    fn violated(end: &ReaderEnd, text: &str) -> bool {
        matches!(end, ReaderEnd::Violation(v) if v.0.contains(text))
    }

    #[test]
    fn simple_replies_in_any_order() {
        let mut bytes = simple(2, 0);
        bytes.extend(simple(1, 0));
        bytes.extend_from_slice(b"abcd");
        bytes.extend(simple(3, errno::EPERM));
        let (end, results) =
            feed(false, vec![(Command::Read, 0, 4), (Command::Flush, 0, 0), (Command::Write, 0, 1)], &bytes);
        assert!(closed(&end), "{end:?}");
        let mut results = results.into_iter();
        assert_eq!(results.next().unwrap().unwrap().unwrap(), Reply::Data(b"abcd".to_vec()));
        assert_eq!(results.next().unwrap().unwrap().unwrap(), Reply::Done);
        let e = results.next().unwrap().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            e.to_string().contains("write of 1 bytes at offset 0 failed on the NBD server at test"),
            "{e}"
        );
    }

    #[test]
    fn structured_chunks_interleave_between_requests() {
        let mut bytes = data_chunk(1, 4, b"4567", false);
        bytes.extend(data_chunk(2, 100, b"xy", true));
        bytes.extend(encode_offset_hole(1, 0, 4, false));
        bytes.extend(encode_none(1));
        bytes.extend(encode_error_chunk(3, errno::EIO, "media error"));
        let calls = vec![(Command::Read, 0, 8), (Command::Read, 100, 2), (Command::Trim, 0, 4096)];
        let (end, results) = feed(true, calls, &bytes);
        assert!(closed(&end), "{end:?}");
        let mut results = results.into_iter();
        assert_eq!(results.next().unwrap().unwrap().unwrap(), Reply::Data(b"\0\0\0\x004567".to_vec()));
        assert_eq!(results.next().unwrap().unwrap().unwrap(), Reply::Data(b"xy".to_vec()));
        let e = results.next().unwrap().unwrap().unwrap_err();
        assert!(e.to_string().ends_with("EIO (input/output error): media error"), "{e}");
    }

    #[test]
    fn block_status_replies() {
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0, 3]);
        let len = u32::try_from(payload.len()).unwrap();
        let mut bytes =
            ChunkHeader { flags: reply_flags::DONE, kind: reply_type::BLOCK_STATUS, cookie: 1, len }
                .encode()
                .to_vec();
        bytes.extend(payload);
        let (_, results) = feed(true, vec![(Command::BlockStatus, 0, 1 << 20)], &bytes);
        assert_eq!(results[0].as_ref().unwrap().as_ref().unwrap(), &Reply::Extents(vec![(4096, 3)]));
    }

    #[test]
    fn violations_stop_the_reader() {
        let cases: Vec<(bool, Vec<u8>, &str)> = vec![
            (false, simple(9, 0), "cookie 9"),
            (false, vec![0xde, 0xad, 0xbe, 0xef], "bad magic 0xdeadbeef"),
            (false, encode_none(1).to_vec(), "not negotiated"),
            (true, simple(1, 0), "structured replies were negotiated"),
            (true, data_chunk(1, 4096, b"x", true), "outside"),
            (true, encode_none(1).to_vec(), "described only 0 bytes"),
            (true, [data_chunk(1, 0, b"ab", false), simple(1, 5)].concat(), "middle of the structured reply"),
        ];
        for (structured, bytes, text) in cases {
            let (end, results) = feed(structured, vec![(Command::Read, 0, 2)], &bytes);
            assert!(violated(&end, text), "{text}: {end:?}");
            assert!(results[0].is_none(), "{text}: the request is left for the connection to fail");
        }
    }

    #[test]
    fn oversized_chunks_are_refused_before_reading_them() {
        let h = ChunkHeader { flags: 0, kind: reply_type::OFFSET_DATA, cookie: 1, len: u32::MAX }.encode();
        let (end, _) = feed(true, vec![(Command::Read, 0, 4096)], &h);
        assert!(violated(&end, "at most 4104 fit"), "{end:?}");
        let h = ChunkHeader { flags: 0, kind: reply_type::ERROR, cookie: 1, len: u32::MAX }.encode();
        let (end, _) = feed(true, vec![(Command::Flush, 0, 0)], &h);
        assert!(violated(&end, "bytes (at most"), "{end:?}");
    }

    #[test]
    fn shutdown_errors_end_the_session() {
        let (end, results) =
            feed(true, vec![(Command::Flush, 0, 0)], &encode_error_chunk(1, errno::ESHUTDOWN, "bye"));
        assert!(matches!(end, ReaderEnd::Shutdown), "{end:?}");
        let e = results[0].as_ref().unwrap().as_ref().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let (end, _) = feed(false, vec![(Command::Flush, 0, 0)], &simple(1, errno::ESHUTDOWN));
        assert!(matches!(end, ReaderEnd::Shutdown), "{end:?}");
    }

    fn target() -> Arc<Target> {
        Arc::new(Target {
            address: NbdAddress::Unix("/nonexistent/nbd.sock".into()),
            peer: Arc::from(PEER),
            export: String::new(),
            connect_timeout: Duration::from_secs(1),
            max_backoff: Duration::from_millis(100),
            tls: None,
        })
    }

    fn negotiated() -> Negotiated {
        let info = super::super::NbdExportInfo {
            size: 1 << 20,
            flags: transmission_flags::HAS_FLAGS | transmission_flags::SEND_FLUSH,
            min_block: 1,
            preferred_block: 4096,
            max_block: u32::MAX,
            structured_replies: false,
            block_status: false,
        };
        Negotiated { info, context: None }
    }

    async fn next_request<R: AsyncRead + Unpin>(server: &mut R) -> Request {
        let mut header = [0u8; proto::REQUEST_LEN];
        server.read_exact(&mut header).await.unwrap();
        Request::decode(&header).unwrap()
    }

    async fn answer(rx: std_mpsc::Receiver<io::Result<Reply>>) -> io::Result<Reply> {
        tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)).expect("an answer"))
            .await
            .unwrap()
    }

    #[test]
    fn requests_are_pipelined_and_dropping_says_goodbye() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let (client, mut server) = tokio::io::duplex(1 << 16);
            let (tx, rx) = mpsc::unbounded_channel();
            let task = tokio::spawn(run(target(), (Box::new(client), negotiated()), rx, Arc::default()));
            let (flush, flushed) = call(Command::Flush, 0, 0);
            let (mut write, written) = call(Command::Write, 8, 3);
            write.payload = Some(Arc::from(&b"abc"[..]));
            tx.send(flush).unwrap();
            tx.send(write).unwrap();
            // Both are sent before either is answered.
            let first = next_request(&mut server).await;
            let second = next_request(&mut server).await;
            assert_eq!((first.command(), second.command()), (Some(Command::Flush), Some(Command::Write)));
            assert_eq!((second.offset, second.length), (8, 3));
            let mut payload = [0u8; 3];
            server.read_exact(&mut payload).await.unwrap();
            assert_eq!(&payload, b"abc");
            // Answered in the other order.
            server.write_all(&simple(second.cookie, 0)).await.unwrap();
            server.write_all(&simple(first.cookie, errno::EIO)).await.unwrap();
            assert_eq!(answer(written).await.unwrap(), Reply::Done);
            assert_eq!(answer(flushed).await.unwrap_err().kind(), io::ErrorKind::Other);
            drop(tx);
            let bye = next_request(&mut server).await;
            assert_eq!((bye.command(), bye.offset, bye.length), (Some(Command::Disc), 0, 0));
            let mut rest = Vec::new();
            server.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty(), "nothing follows NBD_CMD_DISC");
            drop(server);
            tokio::time::timeout(Duration::from_secs(5), task).await.expect("the connection ends").unwrap();
        });
    }

    #[test]
    fn an_unanswered_request_times_out_without_hanging() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let (client, mut server) = tokio::io::duplex(1 << 16);
            let (tx, rx) = mpsc::unbounded_channel();
            let _task = tokio::spawn(run(target(), (Box::new(client), negotiated()), rx, Arc::default()));
            let (mut c, answered) = call(Command::Read, 0, 4096);
            c.deadline = Instant::now() + Duration::from_millis(300);
            tx.send(c).unwrap();
            let request = next_request(&mut server).await;
            assert_eq!(request.command(), Some(Command::Read));
            let started = Instant::now();
            let e = answer(answered).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
            assert!(e.to_string().contains("did not answer the read of 4096 bytes"), "{e}");
            assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        });
    }

    #[test]
    fn a_truncated_reply_is_a_closed_connection() {
        let mut bytes = data_chunk(1, 0, b"abcd", true);
        bytes.truncate(bytes.len() - 1);
        let (end, results) = feed(true, vec![(Command::Read, 0, 4)], &bytes);
        assert!(closed(&end), "{end:?}");
        assert!(results[0].is_none(), "the read is left to be sent again");
    }
}
