//! [`Mux`]: the multiplexed client every protocol's client is built on. A protocol brings only
//! its [`Codec`] (how to connect and negotiate, how a request is written, how a reply is read);
//! everything between the caller and the bytes is here, written once:
//!
//! - **Pipelining**: requests are written as they come, each under a fresh id, and replies are
//!   matched to them by id in whatever order they arrive.
//! - **Request classes** ([`Class`]): *demand* requests (someone waits for them: a page fault, a
//!   read of a mounted file) and *background* ones (a pull, a push). Each class has its own queue
//!   and its own in-flight budget on every connection ([`MuxOptions::demand`],
//!   [`MuxOptions::background`]); the writer always sends waiting demand requests first, and a
//!   background request waits in its queue while its class's budget is spent, so that a demand
//!   request never waits behind queued background requests in the client. With
//!   [`Lanes::Split`] and two connections or more, background requests keep off the first
//!   connection and demand requests take a connection without background requests in flight, so
//!   that their replies do not queue behind background bytes on the connection either.
//! - **Deadlines**: a caller waits for its answer until the request's deadline
//!   ([`MuxOptions::timeout`]), through reconnections, and gets `TimedOut` after, never stale or
//!   made-up data. A connection on which a request goes unanswered past its deadline is given up,
//!   so that the others are sent again on a fresh one.
//! - **Reconnection with backoff**: when a connection breaks, the requests without an answer go
//!   back to the front of their queues in the order they were sent, and the connection is opened
//!   again (with exponential backoff, only while something waits), checked to reach the same
//!   export ([`Codec::check_reconnect`]) and used again. Every request a codec sends must be safe
//!   to repeat. A server that breaks the protocol fails every request in flight on that connection
//!   instead: what it sent cannot be trusted.
//! - **Closing**: dropping the client says goodbye on every connection ([`Codec::goodbye`]) and
//!   waits a moment ([`MuxOptions::close_grace`]) for the server to hang up.
//!
//! The public API is blocking, like every `Backend`; each connection is a task on the runtime of
//! the [`Io`] the client is opened on, so it may be called from any thread, a tokio worker
//! included.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use crate::runtime::{self, Io};
use crate::security::BoxedIo;

/// First wait before reconnecting; doubled after each failure up to [`MuxOptions::max_backoff`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// A session shorter than this is followed by a wait before reconnecting.
const SHORT_SESSION: Duration = Duration::from_secs(1);
/// How often a connection checks for requests left unanswered past their deadline.
const WATCHDOG: Duration = Duration::from_millis(250);
/// Buffer sizes of a connection's reader and writer.
const IO_BUFFER: usize = 256 * 1024;

/// Who waits for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Someone waits for the answer now (a fault, a read of a mounted file): sent first.
    Demand,
    /// Work done ahead of need (a background pull, a push): sent when no demand request waits.
    Background,
}

impl Class {
    const ALL: [Self; 2] = [Self::Demand, Self::Background];

    const fn index(self) -> usize {
        match self {
            Self::Demand => 0,
            Self::Background => 1,
        }
    }
}

/// How much of one class may be in flight (sent, not yet answered) on one connection. A request
/// is sent when nothing of its class is in flight, whatever its size, so that none waits forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub requests: usize,
    /// Payload bytes ([`Codec::cost`]).
    pub bytes: u64,
}

impl Budget {
    /// No limit.
    pub const UNLIMITED: Self = Self { requests: usize::MAX, bytes: u64::MAX };
}

/// Which connections a class may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// Every request on any connection, in turn.
    Shared,
    /// With two connections or more, background requests never take the first one, and demand
    /// requests take a connection without background requests in flight (the first one always
    /// qualifies); small demand requests still spread over every connection while nothing
    /// runs in the background.
    Split,
}

/// How a [`Mux`] runs its connections.
#[derive(Debug, Clone)]
pub struct MuxOptions {
    /// Connections to open (the codec may allow fewer: see [`Mux::open`]).
    pub connections: usize,
    /// How long a request may wait for its answer, through reconnections, before it fails.
    pub timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// In-flight budget of demand requests, per connection.
    pub demand: Budget,
    /// In-flight budget of background requests, per connection.
    pub background: Budget,
    pub lanes: Lanes,
    /// How long dropping the client waits for its connections to say goodbye.
    pub close_grace: Duration,
}

impl Default for MuxOptions {
    fn default() -> Self {
        Self {
            connections: 1,
            timeout: Duration::from_secs(30),
            max_backoff: Duration::from_secs(2),
            demand: Budget::UNLIMITED,
            background: Budget { requests: 1024, bytes: 512 << 20 },
            lanes: Lanes::Split,
            close_grace: Duration::from_secs(1),
        }
    }
}

/// A failed connection attempt; `permanent` failures (refused credentials, an unknown export)
/// fail every waiting request at once instead of being retried until their deadline.
#[derive(Debug)]
pub struct ConnectError {
    pub error: io::Error,
    pub permanent: bool,
}

/// Why a connection's reader stopped.
#[derive(Debug)]
pub enum ReadEnd {
    /// The stream ended or failed: the requests in flight are sent again on a new connection.
    Closed(io::Error),
    /// The server broke the protocol: the requests in flight fail.
    Violation(String),
    /// The server said it is shutting down: the connection is opened again.
    Shutdown,
}

impl From<io::Error> for ReadEnd {
    fn from(e: io::Error) -> Self {
        Self::Closed(e)
    }
}

/// What a protocol brings to a [`Mux`]: its handshake and its framing.
pub trait Codec: Sized + Send + Sync + 'static {
    /// A request as the caller gives it, kept until answered (and sent again after a
    /// reconnection).
    type Request: Send + 'static;
    /// What an answer carries back.
    type Reply: Send + 'static;
    /// What one connection's handshake agreed on.
    type Session: Clone + Send + Sync + 'static;
    /// A reader's state between replies on one connection (multi-part replies being assembled).
    type ReadState: Default + Send + 'static;
    /// What a request is, for messages (`read of 4096 bytes at offset 0`).
    type Summary: Copy + fmt::Display + Send + Sync + 'static;
    /// The data a request carries, shared with the writer while it is sent.
    type Payload: AsRef<[u8]> + Send + Sync + 'static;

    /// Who the server is, for messages (`the NBD server at host:port`).
    fn peer(&self) -> &str;

    /// Opens a connection and runs the handshake, within the codec's own connect timeout.
    fn connect(&self) -> impl Future<Output = Result<(BoxedIo, Self::Session), ConnectError>> + Send;

    /// Whether a connection opened again reached the export the first one did; an error fails
    /// the waiting requests.
    ///
    /// # Errors
    /// Why `now` is not the export `first` was.
    fn check_reconnect(&self, first: &Self::Session, now: &Self::Session) -> io::Result<()>;

    fn summary(&self, request: &Self::Request) -> Self::Summary;

    /// The bytes a request moves, counted against its class's budget.
    fn cost(&self, request: &Self::Request) -> u64;

    /// Encodes `request`'s header under `id` into `header` (empty on entry) and returns the
    /// payload that follows it on the wire, if any.
    fn encode(&self, id: u64, request: &Self::Request, header: &mut Vec<u8>) -> Option<Self::Payload>;

    /// Encodes the goodbye sent when the client closes (under an id no request had).
    fn goodbye(&self, id: u64, out: &mut Vec<u8>);

    /// Reads one reply frame and hands what it completes to [`InFlight::complete`].
    fn read<R: AsyncRead + Unpin + Send>(
        &self,
        rd: &mut R,
        session: &Self::Session,
        state: &mut Self::ReadState,
        in_flight: &InFlight<Self>,
    ) -> impl Future<Output = Result<(), ReadEnd>> + Send;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A background request counted on its connection's lane until it is answered or fails.
struct LaneSlot(Option<Arc<AtomicUsize>>);

impl Drop for LaneSlot {
    fn drop(&mut self) {
        if let Some(count) = &self.0 {
            count.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// One request on its way, and where its answer goes.
struct Call<C: Codec> {
    request: C::Request,
    class: Class,
    cost: u64,
    /// Before `reply`: fields drop in order, and a caller that hears its request is gone
    /// (the sender dropped) must find it off its connection's count already.
    _lane: LaneSlot,
    reply: std_mpsc::SyncSender<io::Result<C::Reply>>,
    deadline: Instant,
}

impl<C: Codec> Call<C> {
    fn fail(self, e: &io::Error) {
        // As in `InFlight::complete`: off the lane before the caller hears.
        let Self { reply, _lane, .. } = self;
        drop(_lane);
        let _ = reply.send(Err(io::Error::new(e.kind(), e.to_string())));
    }
}

/// The requests sent on one connection and not yet answered, by id.
pub struct InFlight<C: Codec> {
    calls: Mutex<HashMap<u64, Call<C>>>,
    bytes: [AtomicU64; 2],
    count: [AtomicUsize; 2],
    /// Signalled when an answer frees budget.
    freed: Notify,
}

impl<C: Codec> fmt::Debug for InFlight<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InFlight").field("requests", &lock(&self.calls).len()).finish_non_exhaustive()
    }
}

impl<C: Codec> Default for InFlight<C> {
    fn default() -> Self {
        Self {
            calls: Mutex::new(HashMap::new()),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            count: [AtomicUsize::new(0), AtomicUsize::new(0)],
            freed: Notify::new(),
        }
    }
}

impl<C: Codec> InFlight<C> {
    /// What the request sent under `id` is, if one was.
    pub fn summary(&self, codec: &C, id: u64) -> Option<C::Summary> {
        lock(&self.calls).get(&id).map(|call| codec.summary(&call.request))
    }

    /// Whether a request was sent under `id` and is still unanswered.
    pub fn contains(&self, id: u64) -> bool {
        lock(&self.calls).contains_key(&id)
    }

    /// Hands `result` to whoever waits for request `id` and returns the request (a codec may
    /// reuse its buffers); `None` when no request waits under that id.
    pub fn complete(&self, id: u64, result: io::Result<C::Reply>) -> Option<C::Request> {
        let call = lock(&self.calls).remove(&id)?;
        let c = call.class.index();
        self.bytes[c].fetch_sub(call.cost, Ordering::Relaxed);
        self.count[c].fetch_sub(1, Ordering::Relaxed);
        self.freed.notify_one();
        // The lane's count goes down before the caller hears: a caller that submits again at
        // once must see this request gone from its connection.
        let Call { request, reply, _lane, .. } = call;
        drop(_lane);
        let _ = reply.send(result);
        Some(request)
    }

    /// Records `request` as sent under `id` and returns where its answer arrives: for driving a
    /// codec's reader without connections (fuzzing, tests).
    #[doc(hidden)]
    pub fn expect(
        &self,
        codec: &C,
        id: u64,
        request: C::Request,
    ) -> std_mpsc::Receiver<io::Result<C::Reply>> {
        let (reply, rx) = std_mpsc::sync_channel(1);
        let cost = codec.cost(&request);
        let call = Call {
            request,
            class: Class::Demand,
            cost,
            reply,
            deadline: Instant::now() + Duration::from_secs(3600),
            _lane: LaneSlot(None),
        };
        self.insert(id, call);
        rx
    }

    fn insert(&self, id: u64, call: Call<C>) {
        let c = call.class.index();
        self.bytes[c].fetch_add(call.cost, Ordering::Relaxed);
        self.count[c].fetch_add(1, Ordering::Relaxed);
        lock(&self.calls).insert(id, call);
    }

    fn fits(&self, call: &Call<C>, budget: Budget) -> bool {
        let c = call.class.index();
        let (count, bytes) = (self.count[c].load(Ordering::Relaxed), self.bytes[c].load(Ordering::Relaxed));
        count == 0 || (count < budget.requests && bytes.saturating_add(call.cost) <= budget.bytes)
    }

    /// A request left unanswered past its deadline, if any.
    fn overdue(&self, codec: &C) -> Option<C::Summary> {
        let now = Instant::now();
        lock(&self.calls).values().find(|c| c.deadline <= now).map(|c| codec.summary(&c.request))
    }

    /// Everything unanswered, in the order it was sent.
    fn drain(&self) -> Vec<Call<C>> {
        let mut calls: Vec<(u64, Call<C>)> = lock(&self.calls).drain().collect();
        calls.sort_by_key(|(id, _)| *id);
        calls.into_iter().map(|(_, call)| call).collect()
    }
}

/// Reads replies with `codec` until the connection ends or the server breaks the protocol.
#[doc(hidden)]
pub async fn read_replies<C: Codec, R: AsyncRead + Unpin + Send>(
    codec: &C,
    mut rd: R,
    session: &C::Session,
    in_flight: &InFlight<C>,
) -> ReadEnd {
    let mut state = C::ReadState::default();
    loop {
        match codec.read(&mut rd, session, &mut state, in_flight).await {
            Ok(()) => {}
            Err(ReadEnd::Closed(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return ReadEnd::Closed(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!("{} closed the connection", codec.peer()),
                ));
            }
            Err(end) => return end,
        }
    }
}

/// The last problem the connections had, for the messages of requests that time out.
#[derive(Debug, Default)]
struct Health(Mutex<Option<String>>);

impl Health {
    fn set(&self, problem: String) {
        *lock(&self.0) = Some(problem);
    }

    fn clear(&self) {
        *lock(&self.0) = None;
    }

    /// `" (last problem: ...)"`, or nothing when all is well.
    fn suffix(&self) -> String {
        lock(&self.0).as_ref().map(|p| format!(" (last problem: {p})")).unwrap_or_default()
    }
}

/// What the connection tasks share.
struct Shared<C: Codec> {
    codec: C,
    options: MuxOptions,
    health: Health,
}

impl<C: Codec> Shared<C> {
    fn budget(&self, class: Class) -> Budget {
        match class {
            Class::Demand => self.options.demand,
            Class::Background => self.options.background,
        }
    }

    fn late(&self, summary: C::Summary, why: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer to the {summary} from {} within {:?}: {why}{}",
                self.codec.peer(),
                self.options.timeout,
                self.health.suffix()
            ),
        )
    }
}

/// One connection as the client sees it.
struct Lane<C: Codec> {
    tx: mpsc::UnboundedSender<Call<C>>,
    /// Background requests submitted on it and not yet answered.
    background: Arc<AtomicUsize>,
}

/// A request sent, waiting for its answer.
pub struct Ticket<C: Codec> {
    rx: std_mpsc::Receiver<io::Result<C::Reply>>,
    summary: C::Summary,
    deadline: Instant,
}

impl<C: Codec> fmt::Debug for Ticket<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket").field("request", &format_args!("{}", self.summary)).finish_non_exhaustive()
    }
}

/// A client over one or more connections to a server. See the module docs.
pub struct Mux<C: Codec> {
    shared: Arc<Shared<C>>,
    session: C::Session,
    lanes: Vec<Lane<C>>,
    turn: AtomicUsize,
    /// One message per connection task when it ends.
    finished: Mutex<std_mpsc::Receiver<()>>,
}

impl<C: Codec> fmt::Debug for Mux<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mux")
            .field("peer", &self.shared.codec.peer())
            .field("connections", &self.lanes.len())
            .field("options", &self.shared.options)
            .finish_non_exhaustive()
    }
}

impl<C: Codec> Mux<C> {
    /// Opens the first connection (its error, and the session it agrees on, are the client's),
    /// then as many more as `connections(&session)` allows of [`MuxOptions::connections`], all at
    /// once: a read someone waits for must not pay for a handshake. One that fails now, or
    /// reaches another export, is opened on its first request.
    ///
    /// # Errors
    /// What the first connection attempt reports.
    pub fn open(
        codec: C,
        options: MuxOptions,
        io: &Io,
        connections: impl FnOnce(&C::Session) -> usize,
    ) -> io::Result<Self> {
        let codec = Arc::new(codec);
        let first = {
            let codec = Arc::clone(&codec);
            io.block_on(async move { codec.connect().await }).map_err(|e| e.error)?
        };
        let wanted = connections(&first.1).min(options.connections).max(1);
        let others = {
            let codec = Arc::clone(&codec);
            let session = first.1.clone();
            io.block_on(async move {
                let tasks: Vec<_> = (1..wanted)
                    .map(|_| {
                        let codec = Arc::clone(&codec);
                        tokio::spawn(async move { codec.connect().await })
                    })
                    .collect();
                let mut others = Vec::with_capacity(tasks.len());
                for task in tasks {
                    others.push(match task.await {
                        Ok(Ok((stream, now))) if codec.check_reconnect(&session, &now).is_ok() => {
                            Some((stream, now))
                        }
                        _ => None,
                    });
                }
                others
            })
        };
        let codec = Arc::into_inner(codec).expect("the connect tasks have ended");
        let mut connected = vec![Some(first)];
        connected.extend(others);
        Ok(Self::start(codec, options, io, connected))
    }

    /// A client over connections already open (the first is required: its session is the
    /// client's); a `None` is opened on its first request.
    ///
    /// # Panics
    /// When the first connection is missing.
    pub fn start(
        codec: C,
        options: MuxOptions,
        io: &Io,
        connected: Vec<Option<(BoxedIo, C::Session)>>,
    ) -> Self {
        let session = connected.first().and_then(|c| c.as_ref()).expect("the first connection").1.clone();
        let shared = Arc::new(Shared { codec, options, health: Health::default() });
        let (done_tx, done_rx) = std_mpsc::channel();
        let mut lanes = Vec::with_capacity(connected.len());
        for first in connected {
            let (tx, rx) = mpsc::unbounded_channel();
            let (shared, session, done) = (Arc::clone(&shared), session.clone(), done_tx.clone());
            io.handle().spawn(async move {
                run(shared, session, first, rx).await;
                let _ = done.send(());
            });
            lanes.push(Lane { tx, background: Arc::default() });
        }
        Self { shared, session, lanes, turn: AtomicUsize::new(0), finished: Mutex::new(done_rx) }
    }

    /// What the first connection's handshake agreed on.
    pub fn session(&self) -> &C::Session {
        &self.session
    }

    pub fn codec(&self) -> &C {
        &self.shared.codec
    }

    pub fn connections(&self) -> usize {
        self.lanes.len()
    }

    pub fn timeout(&self) -> Duration {
        self.shared.options.timeout
    }

    /// The connection a request of `class` goes on.
    fn lane(&self, class: Class) -> usize {
        let n = self.lanes.len();
        let turn = self.turn.fetch_add(1, Ordering::Relaxed);
        if n < 2 {
            return 0;
        }
        match (self.shared.options.lanes, class) {
            (Lanes::Shared, _) => turn % n,
            (Lanes::Split, Class::Background) => 1 + turn % (n - 1),
            (Lanes::Split, Class::Demand) => (0..n)
                .map(|k| (turn + k) % n)
                .find(|&i| self.lanes[i].background.load(Ordering::Relaxed) == 0)
                .unwrap_or(0),
        }
    }

    /// Queues `request` and returns where its answer arrives.
    ///
    /// # Errors
    /// `NotConnected` when the client is closing.
    pub fn submit(&self, class: Class, request: C::Request) -> io::Result<Ticket<C>> {
        let (reply, rx) = std_mpsc::sync_channel(1);
        let codec = &self.shared.codec;
        let (summary, cost) = (codec.summary(&request), codec.cost(&request));
        let deadline = Instant::now() + self.shared.options.timeout;
        let lane = &self.lanes[self.lane(class)];
        let slot = (class == Class::Background).then(|| {
            lane.background.fetch_add(1, Ordering::Relaxed);
            Arc::clone(&lane.background)
        });
        let call = Call { request, class, cost, reply, deadline, _lane: LaneSlot(slot) };
        lane.tx.send(call).map_err(|_| self.closed())?;
        Ok(Ticket { rx, summary, deadline })
    }

    /// Waits for the answer to `ticket` until its deadline.
    ///
    /// # Errors
    /// The server's error, `TimedOut` past the deadline, `NotConnected` when the client closed.
    pub fn wait(&self, ticket: &Ticket<C>) -> io::Result<C::Reply> {
        let left = ticket.deadline.saturating_duration_since(Instant::now());
        match runtime::blocking(|| ticket.rx.recv_timeout(left)) {
            Ok(r) => r,
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                Err(self.shared.late(ticket.summary, "the server did not answer in time"))
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => Err(self.closed()),
        }
    }

    /// Sends `request` and waits for its answer.
    ///
    /// # Errors
    /// As [`Mux::submit`] and [`Mux::wait`].
    pub fn call(&self, class: Class, request: C::Request) -> io::Result<C::Reply> {
        let ticket = self.submit(class, request)?;
        self.wait(&ticket)
    }

    fn closed(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotConnected,
            format!("the client of {} is closed", self.shared.codec.peer()),
        )
    }
}

impl<C: Codec> Drop for Mux<C> {
    fn drop(&mut self) {
        // Without their senders, the connections say goodbye and end.
        let tasks = self.lanes.len();
        self.lanes.clear();
        if matches!(
            tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()),
            Ok(tokio::runtime::RuntimeFlavor::CurrentThread)
        ) {
            // That thread may be the one the connections run on: they end on their own.
            return;
        }
        let deadline = Instant::now() + self.shared.options.close_grace;
        let finished = lock(&self.finished);
        for _ in 0..tasks {
            let left = deadline.saturating_duration_since(Instant::now());
            if runtime::blocking(|| finished.recv_timeout(left)).is_err() {
                break;
            }
        }
    }
}

/// The two queues of one connection.
struct Queues<C: Codec>([VecDeque<Call<C>>; 2]);

impl<C: Codec> Queues<C> {
    fn new() -> Self {
        Self([VecDeque::new(), VecDeque::new()])
    }

    fn push(&mut self, call: Call<C>) {
        self.0[call.class.index()].push_back(call);
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(VecDeque::is_empty)
    }

    fn len(&self) -> usize {
        self.0.iter().map(VecDeque::len).sum()
    }

    /// Puts unanswered requests (in the order sent) back in front of what waits.
    fn requeue(&mut self, calls: Vec<Call<C>>) {
        for call in calls.into_iter().rev() {
            self.0[call.class.index()].push_front(call);
        }
    }

    /// The next request to send: demand first, each class within its budget.
    fn next(&mut self, in_flight: &InFlight<C>, shared: &Shared<C>) -> Option<Call<C>> {
        for class in Class::ALL {
            let queue = &mut self.0[class.index()];
            if queue.front().is_some_and(|call| in_flight.fits(call, shared.budget(class))) {
                return queue.pop_front();
            }
        }
        None
    }

    /// Fails the requests whose deadline passed while they waited.
    fn expire(&mut self, shared: &Shared<C>, why: &str) {
        let now = Instant::now();
        for queue in &mut self.0 {
            let (keep, expired): (VecDeque<Call<C>>, VecDeque<Call<C>>) =
                queue.drain(..).partition(|c| c.deadline > now);
            *queue = keep;
            for call in expired {
                let e = shared.late(shared.codec.summary(&call.request), why);
                call.fail(&e);
            }
        }
    }

    fn fail_all(&mut self, e: &io::Error) {
        for queue in &mut self.0 {
            for call in queue.drain(..) {
                call.fail(e);
            }
        }
    }
}

/// One connection, across reconnections, until the client is dropped.
async fn run<C: Codec>(
    shared: Arc<Shared<C>>,
    expected: C::Session,
    mut first: Option<(BoxedIo, C::Session)>,
    mut rx: mpsc::UnboundedReceiver<Call<C>>,
) {
    let codec = &shared.codec;
    let mut queues = Queues::new();
    let mut backoff = INITIAL_BACKOFF;
    let mut id = 0u64;
    let mut connected_before = first.is_some();
    loop {
        let (stream, session) = if let Some(connected) = first.take() {
            connected
        } else {
            // Reconnect only when something waits.
            if queues.is_empty() {
                match rx.recv().await {
                    Some(call) => queues.push(call),
                    None => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(call) => queues.push(call),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            queues.expire(&shared, "the server could not be reached before its deadline");
            if queues.is_empty() {
                continue;
            }
            match codec.connect().await {
                Ok((stream, session)) => match codec.check_reconnect(&expected, &session) {
                    Ok(()) => {
                        if connected_before {
                            tracing::info!(server = %codec.peer(), "reconnected");
                        }
                        connected_before = true;
                        shared.health.clear();
                        (stream, session)
                    }
                    Err(e) => {
                        tracing::error!(server = %codec.peer(), error = %e, "refusing the reconnected export");
                        shared.health.set(e.to_string());
                        queues.fail_all(&e);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(shared.options.max_backoff);
                        continue;
                    }
                },
                Err(e) => {
                    tracing::warn!(server = %codec.peer(), error = %e.error, retry_in = ?backoff, "reconnecting failed");
                    shared.health.set(e.error.to_string());
                    if e.permanent {
                        queues.fail_all(&e.error);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(shared.options.max_backoff);
                    continue;
                }
            }
        };
        let started = Instant::now();
        match session_on(&shared, stream, session, &mut rx, &mut queues, &mut id).await {
            Ended::ClientGone => return,
            Ended::Broken { pending, problem } => {
                tracing::warn!(server = %codec.peer(), problem = %problem, requests = pending.len() + queues.len(), "connection lost; reconnecting");
                shared.health.set(problem);
                queues.requeue(pending);
            }
            Ended::Violation { pending, violation } => {
                let e = io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} broke the protocol: {violation}", codec.peer()),
                );
                tracing::error!(error = %e, "closing the connection");
                shared.health.set(e.to_string());
                for call in pending {
                    call.fail(&e);
                }
            }
        }
        if started.elapsed() < SHORT_SESSION {
            // A server that takes connections and drops them at once gets them more slowly.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(shared.options.max_backoff);
        } else {
            backoff = INITIAL_BACKOFF;
        }
    }
}

/// How a session on one connection ended.
enum Ended<C: Codec> {
    /// The client was dropped; the server was told goodbye.
    ClientGone,
    /// The connection broke; `pending` (in the order sent) had no answer.
    Broken { pending: Vec<Call<C>>, problem: String },
    /// The server broke the protocol.
    Violation { pending: Vec<Call<C>>, violation: String },
}

/// Why the writer stopped.
enum WriterEnd {
    ClientGone,
    Broken(io::Error),
    Reader(ReadEnd),
}

/// Runs one connection until it ends.
async fn session_on<C: Codec>(
    shared: &Arc<Shared<C>>,
    stream: BoxedIo,
    session: C::Session,
    rx: &mut mpsc::UnboundedReceiver<Call<C>>,
    queues: &mut Queues<C>,
    id: &mut u64,
) -> Ended<C> {
    let (rd, wr) = tokio::io::split(stream);
    let in_flight: Arc<InFlight<C>> = Arc::default();
    let mut reader = tokio::spawn(reader(Arc::clone(shared), rd, session, Arc::clone(&in_flight)));
    let ended = write_requests(shared, wr, rx, queues, &in_flight, id, &mut reader).await;
    let reason = match ended {
        WriterEnd::Reader(end) => end,
        WriterEnd::ClientGone => {
            // The server hangs up once it has seen the goodbye.
            if tokio::time::timeout(shared.options.close_grace, &mut reader).await.is_err() {
                reader.abort();
            }
            return Ended::ClientGone;
        }
        WriterEnd::Broken(e) => {
            reader.abort();
            match reader.await {
                Ok(ReadEnd::Violation(v)) => ReadEnd::Violation(v),
                _ => ReadEnd::Closed(e),
            }
        }
    };
    let pending = in_flight.drain();
    match reason {
        ReadEnd::Violation(violation) => Ended::Violation { pending, violation },
        ReadEnd::Closed(e) => Ended::Broken { pending, problem: e.to_string() },
        ReadEnd::Shutdown => {
            Ended::Broken { pending, problem: format!("{} is shutting down", shared.codec.peer()) }
        }
    }
}

async fn reader<C: Codec>(
    shared: Arc<Shared<C>>,
    rd: ReadHalf<BoxedIo>,
    session: C::Session,
    in_flight: Arc<InFlight<C>>,
) -> ReadEnd {
    read_replies(&shared.codec, BufReader::with_capacity(IO_BUFFER, rd), &session, &in_flight).await
}

/// Sends requests until the client goes, the connection breaks or the reader stops.
async fn write_requests<C: Codec>(
    shared: &Shared<C>,
    wr: WriteHalf<BoxedIo>,
    rx: &mut mpsc::UnboundedReceiver<Call<C>>,
    queues: &mut Queues<C>,
    in_flight: &InFlight<C>,
    id: &mut u64,
    reader: &mut JoinHandle<ReadEnd>,
) -> WriterEnd {
    let codec = &shared.codec;
    let mut out = BufWriter::with_capacity(IO_BUFFER, wr);
    let mut watchdog = tokio::time::interval(WATCHDOG);
    let mut header = Vec::with_capacity(64);
    let reader_end = |r: Result<ReadEnd, tokio::task::JoinError>| {
        WriterEnd::Reader(r.unwrap_or_else(|e| ReadEnd::Closed(io::Error::other(e.to_string()))))
    };
    let overdue = |in_flight: &InFlight<C>| {
        in_flight.overdue(codec).map(|late| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} did not answer the {late} in time", codec.peer()),
            )
        })
    };
    loop {
        // Whatever arrived meanwhile takes its place in the queues first, so that a demand
        // request overtakes the background ones that came before it.
        while let Ok(call) = rx.try_recv() {
            queues.push(call);
        }
        let Some(call) = queues.next(in_flight, shared) else {
            if let Err(e) = out.flush().await {
                return WriterEnd::Broken(e);
            }
            tokio::select! {
                biased;
                r = &mut *reader => return reader_end(r),
                _ = watchdog.tick() => {
                    if let Some(e) = overdue(in_flight) {
                        return WriterEnd::Broken(e);
                    }
                }
                () = in_flight.freed.notified() => {}
                call = rx.recv() => match call {
                    Some(call) => queues.push(call),
                    None => {
                        header.clear();
                        codec.goodbye(*id + 1, &mut header);
                        let _ = out.write_all(&header).await;
                        let _ = out.flush().await;
                        let _ = out.shutdown().await;
                        return WriterEnd::ClientGone;
                    }
                },
            }
            continue;
        };
        if call.deadline <= Instant::now() {
            let e = shared.late(codec.summary(&call.request), "it could not be sent before its deadline");
            call.fail(&e);
            continue;
        }
        *id += 1;
        header.clear();
        let payload = codec.encode(*id, &call.request, &mut header);
        // Recorded before it is sent: the answer may arrive before the write returns.
        in_flight.insert(*id, call);
        let send = async {
            out.write_all(&header).await?;
            if let Some(p) = &payload {
                out.write_all(p.as_ref()).await?;
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
                    if let Some(e) = overdue(in_flight) {
                        return WriterEnd::Broken(e);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
