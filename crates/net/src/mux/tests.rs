//! The engine against a toy protocol over in-memory streams, with the server's side played by
//! the test: every outcome follows from what the test sends and when.

use std::sync::Mutex as StdMutex;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::*;

/// A request: `[id u64][write u8][len u32]` and, for a write, `len` bytes. A reply:
/// `[id u64][status u8][len u32]` and `len` bytes.
#[derive(Debug, Clone)]
struct Toy {
    write: bool,
    len: u32,
    data: Option<Arc<[u8]>>,
}

impl Toy {
    fn read(len: u32) -> Self {
        Self { write: false, len, data: None }
    }

    fn write(data: &[u8]) -> Self {
        Self { write: true, len: u32::try_from(data.len()).unwrap(), data: Some(Arc::from(data)) }
    }
}

#[derive(Debug, Clone, Copy)]
struct ToySummary(bool, u32);

impl fmt::Display for ToySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} of {} bytes", if self.0 { "write" } else { "read" }, self.1)
    }
}

/// Connections the codec hands out on reconnection, in order.
struct ToyCodec {
    streams: StdMutex<VecDeque<BoxedIo>>,
    /// The session each connection agrees on: its number.
    opened: AtomicU64,
    /// Sessions from this number on describe another export.
    changed_from: u64,
}

impl ToyCodec {
    fn new(streams: Vec<DuplexStream>) -> Self {
        Self {
            streams: StdMutex::new(streams.into_iter().map(|s| Box::new(s) as BoxedIo).collect()),
            opened: AtomicU64::new(1),
            changed_from: u64::MAX,
        }
    }
}

impl Codec for ToyCodec {
    type Request = Toy;
    type Reply = Vec<u8>;
    type Session = u64;
    type ReadState = ();
    type Summary = ToySummary;
    type Payload = Arc<[u8]>;

    fn peer(&self) -> &str {
        "the toy server"
    }

    async fn connect(&self) -> Result<(BoxedIo, u64), ConnectError> {
        let next = lock(&self.streams).pop_front();
        match next {
            Some(s) => Ok((s, self.opened.fetch_add(1, Ordering::SeqCst) + 1)),
            None => Err(ConnectError { error: io::ErrorKind::ConnectionRefused.into(), permanent: false }),
        }
    }

    fn check_reconnect(&self, _first: &u64, now: &u64) -> io::Result<()> {
        if *now >= self.changed_from {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "another export"));
        }
        Ok(())
    }

    fn summary(&self, r: &Toy) -> ToySummary {
        ToySummary(r.write, r.len)
    }

    fn cost(&self, r: &Toy) -> u64 {
        u64::from(r.len)
    }

    fn encode(&self, id: u64, r: &Toy, header: &mut Vec<u8>) -> Option<Arc<[u8]>> {
        header.extend_from_slice(&id.to_be_bytes());
        header.push(u8::from(r.write));
        header.extend_from_slice(&r.len.to_be_bytes());
        r.data.clone()
    }

    fn goodbye(&self, id: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&id.to_be_bytes());
        out.push(2);
        out.extend_from_slice(&0u32.to_be_bytes());
    }

    async fn read<R: AsyncRead + Unpin + Send>(
        &self,
        rd: &mut R,
        _session: &u64,
        _state: &mut (),
        in_flight: &InFlight<Self>,
    ) -> Result<(), ReadEnd> {
        let mut h = [0u8; 13];
        rd.read_exact(&mut h).await?;
        let id = u64::from_be_bytes(h[..8].try_into().unwrap());
        let len = u32::from_be_bytes(h[9..].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        let result = if h[8] == 0 { Ok(data) } else { Err(io::Error::other("the toy failed")) };
        if in_flight.complete(id, result).is_none() {
            return Err(ReadEnd::Violation(format!("an answer to {id}, which nobody asked")));
        }
        Ok(())
    }
}

/// The server's end of a connection, driven by the test thread.
struct Server {
    rt: crate::Io,
    stream: DuplexStream,
}

/// A request as the server read it.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    id: u64,
    kind: u8,
    len: u32,
    data: Vec<u8>,
}

impl Server {
    fn new(stream: DuplexStream) -> Self {
        Self { rt: crate::Io::shared(), stream }
    }

    fn next(&mut self) -> Seen {
        self.rt.block_on(async {
            let mut h = [0u8; 13];
            self.stream.read_exact(&mut h).await.unwrap();
            let kind = h[8];
            let len = u32::from_be_bytes(h[9..].try_into().unwrap());
            let mut data = vec![0u8; if kind == 1 { len as usize } else { 0 }];
            self.stream.read_exact(&mut data).await.unwrap();
            Seen { id: u64::from_be_bytes(h[..8].try_into().unwrap()), kind, len, data }
        })
    }

    fn answer(&mut self, id: u64, data: &[u8]) {
        self.send(id, 0, data);
    }

    fn send(&mut self, id: u64, status: u8, data: &[u8]) {
        let mut out = id.to_be_bytes().to_vec();
        out.push(status);
        out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(data);
        self.rt.block_on(self.stream.write_all(&out)).unwrap();
    }

    /// Whether the client closed its end (after its goodbye, if `goodbye`).
    fn closed(&mut self) -> Vec<u8> {
        self.rt.block_on(async {
            let mut rest = Vec::new();
            self.stream.read_to_end(&mut rest).await.unwrap();
            rest
        })
    }
}

fn pair() -> (DuplexStream, Server) {
    let (client, server) = tokio::io::duplex(1 << 20);
    (client, Server::new(server))
}

fn options() -> MuxOptions {
    MuxOptions {
        timeout: Duration::from_secs(30),
        close_grace: Duration::from_millis(100),
        ..MuxOptions::default()
    }
}

fn mux(codec: ToyCodec, options: MuxOptions, first: Vec<DuplexStream>) -> Mux<ToyCodec> {
    let connected = first.into_iter().map(|s| Some((Box::new(s) as BoxedIo, 1))).collect();
    Mux::start(codec, options, &Io::shared(), connected)
}

#[test]
fn requests_are_pipelined_answered_in_any_order_and_dropping_says_goodbye() {
    let (client, mut server) = pair();
    let m = mux(ToyCodec::new(vec![]), options(), vec![client]);
    let read = m.submit(Class::Demand, Toy::read(3)).unwrap();
    let write = m.submit(Class::Demand, Toy::write(b"xy")).unwrap();
    let (a, b) = (server.next(), server.next());
    assert_eq!((a.kind, a.len), (0, 3));
    assert_eq!((b.kind, b.len, b.data.as_slice()), (1, 2, &b"xy"[..]));
    server.send(b.id, 1, b"");
    server.answer(a.id, b"abc");
    assert_eq!(m.wait(&read).unwrap(), b"abc");
    assert_eq!(m.wait(&write).unwrap_err().to_string(), "the toy failed");
    drop(m);
    let bye = server.closed();
    assert_eq!(bye.len(), 13, "one goodbye, then the end");
    assert_eq!(bye[8], 2);
}

#[test]
fn a_demand_request_overtakes_background_requests_held_by_their_budget() {
    let (client, mut server) = pair();
    let mut o = options();
    o.background = Budget { requests: 1, bytes: u64::MAX };
    let m = mux(ToyCodec::new(vec![]), o, vec![client]);
    let b1 = m.submit(Class::Background, Toy::read(1)).unwrap();
    let first = server.next();
    // The background budget is spent: these two wait, and the demand read goes past them.
    let b2 = m.submit(Class::Background, Toy::read(2)).unwrap();
    let b3 = m.submit(Class::Background, Toy::read(3)).unwrap();
    let d = m.submit(Class::Demand, Toy::read(4)).unwrap();
    let demand = server.next();
    assert_eq!(demand.len, 4, "the demand read is sent while a background one is in flight");
    server.answer(demand.id, b"dddd");
    assert_eq!(m.wait(&d).unwrap(), b"dddd");
    server.answer(first.id, b"1");
    let second = server.next();
    assert_eq!(second.len, 2, "then the background queue, in order");
    server.answer(second.id, b"22");
    let third = server.next();
    assert_eq!(third.len, 3);
    server.answer(third.id, b"333");
    assert_eq!(
        (m.wait(&b1).unwrap(), m.wait(&b2).unwrap(), m.wait(&b3).unwrap()),
        (b"1".to_vec(), b"22".to_vec(), b"333".to_vec())
    );
}

#[test]
fn the_byte_budget_holds_background_requests_but_never_a_lone_large_one() {
    let (client, mut server) = pair();
    let mut o = options();
    o.background = Budget { requests: usize::MAX, bytes: 10 };
    let m = mux(ToyCodec::new(vec![]), o, vec![client]);
    // Larger than the budget, but nothing else is in flight: sent.
    let big = m.submit(Class::Background, Toy::read(64)).unwrap();
    let first = server.next();
    assert_eq!(first.len, 64);
    let small = m.submit(Class::Background, Toy::read(4)).unwrap();
    let demand = m.submit(Class::Demand, Toy::read(1)).unwrap();
    assert_eq!(server.next().len, 1, "the small background read waits for budget; demand does not");
    server.answer(first.id, &[7; 64]);
    let next = server.next();
    assert_eq!(next.len, 4);
    server.answer(next.id, b"abcd");
    assert_eq!(m.wait(&big).unwrap(), vec![7; 64]);
    assert_eq!(m.wait(&small).unwrap(), b"abcd");
    drop(demand);
}

#[test]
fn split_lanes_keep_background_off_the_first_connection() {
    let (c0, mut s0) = pair();
    let (c1, mut s1) = pair();
    let (c2, mut s2) = pair();
    let m = mux(ToyCodec::new(vec![]), options(), vec![c0, c1, c2]);
    let bg: Vec<_> = (0..4).map(|i| m.submit(Class::Background, Toy::read(10 + i)).unwrap()).collect();
    let seen1 = [s1.next(), s1.next()];
    let seen2 = [s2.next(), s2.next()];
    // Connections 1 and 2 carry background requests: demand requests all take connection 0.
    let demand: Vec<_> = (0..3).map(|i| m.submit(Class::Demand, Toy::read(1 + i)).unwrap()).collect();
    for (i, t) in demand.iter().enumerate() {
        let r = s0.next();
        assert_eq!(r.len, u32::try_from(i).unwrap() + 1);
        s0.answer(r.id, &vec![0; r.len as usize]);
        m.wait(t).unwrap();
    }
    for (s, seen) in [(&mut s1, seen1), (&mut s2, seen2)] {
        for r in seen {
            s.answer(r.id, &vec![1; r.len as usize]);
        }
    }
    for t in &bg {
        m.wait(t).unwrap();
    }
    // Nothing in the background now: demand requests spread again.
    let spread: Vec<_> = (0..3).map(|_| m.submit(Class::Demand, Toy::read(1)).unwrap()).collect();
    for s in [&mut s0, &mut s1, &mut s2] {
        let r = s.next();
        s.answer(r.id, b"z");
    }
    for t in &spread {
        m.wait(t).unwrap();
    }
}

#[test]
fn unanswered_requests_are_sent_again_in_order_after_a_reconnection() {
    let (first, mut server) = pair();
    let (again, mut server2) = pair();
    let m = mux(ToyCodec::new(vec![again]), options(), vec![first]);
    let tickets: Vec<_> = (1..=3).map(|i| m.submit(Class::Demand, Toy::read(i)).unwrap()).collect();
    let seen: Vec<Seen> = (0..3).map(|_| server.next()).collect();
    server.answer(seen[1].id, b"22");
    assert_eq!(m.wait(&tickets[1]).unwrap(), b"22");
    drop(server);
    let resent: Vec<u32> = (0..2).map(|_| server2.next().len).collect();
    assert_eq!(resent, [1, 3], "the two unanswered reads, in the order they were sent");
    // Answered on the new connection under their new ids.
    let _ = (tickets, m);
}

#[test]
fn answers_on_a_reconnection_reach_their_callers() {
    let (first, server) = pair();
    let (again, mut server2) = pair();
    let m = mux(ToyCodec::new(vec![again]), options(), vec![first]);
    drop(server);
    let t = m.submit(Class::Demand, Toy::read(2)).unwrap();
    let r = server2.next();
    server2.answer(r.id, b"ok");
    assert_eq!(m.wait(&t).unwrap(), b"ok");
}

#[test]
fn a_reconnection_to_another_export_fails_what_waits() {
    let (first, server) = pair();
    let (again, _server2) = pair();
    let mut codec = ToyCodec::new(vec![again]);
    codec.changed_from = 2;
    let m = mux(codec, options(), vec![first]);
    drop(server);
    let e = m.call(Class::Demand, Toy::read(2)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("another export"), "{e}");
}

#[test]
fn a_protocol_violation_fails_the_requests_in_flight() {
    let (client, mut server) = pair();
    let m = mux(ToyCodec::new(vec![]), options(), vec![client]);
    let t = m.submit(Class::Demand, Toy::read(2)).unwrap();
    let r = server.next();
    server.answer(r.id + 100, b"??");
    let e = m.wait(&t).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("the toy server broke the protocol: an answer to"), "{e}");
}

#[test]
fn a_request_nobody_answers_times_out_with_the_deadline_in_its_message() {
    let (client, mut server) = pair();
    let mut o = options();
    o.timeout = Duration::from_millis(300);
    let m = mux(ToyCodec::new(vec![]), o, vec![client]);
    let e = m.call(Class::Demand, Toy::read(8)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(
        e.to_string().contains("no answer to the read of 8 bytes from the toy server within 300ms"),
        "{e}"
    );
    let _ = server.next();
}

#[test]
fn requests_wait_through_a_server_that_cannot_be_reached_until_their_deadline() {
    let (client, server) = pair();
    let mut o = options();
    o.timeout = Duration::from_millis(300);
    o.max_backoff = Duration::from_millis(50);
    let m = mux(ToyCodec::new(vec![]), o, vec![client]);
    drop(server);
    let started = Instant::now();
    let e = m.call(Class::Demand, Toy::read(8)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    // Either side of the deadline says the same.
    assert!(e.to_string().contains("within 300ms"), "{e}");
    assert!(started.elapsed() >= Duration::from_millis(300));
}
