//! The NBD protocol's part of a client connection, for the [`Mux`] that runs the connections
//! (pipelining, request classes, deadlines, reconnection): connecting and negotiating, writing
//! requests, and reading replies, whose chunks (structured replies) are gathered per cookie.
//!
//! Every NBD command the client sends is safe to repeat after a reconnection. A server that
//! breaks the protocol fails every pending request instead: what it sent cannot be trusted.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use r3map_net::mux::{Codec, ConnectError, InFlight, ReadEnd};
use r3map_net::security::BoxedIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::handshake::{HandshakeError, Negotiated, negotiate};
use super::options::{NbdAddress, NbdClientTls};
use super::reply::{Assembly, Expect, Payload, Reply, Violation, server_error};
use crate::proto::{
    self, ChunkHeader, Command, Request, SimpleReply, errno, reply_flags, transmission_flags,
};

/// A request as the connection keeps it until answered.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub expect: Expect,
    pub flags: u16,
    /// The data of a write, kept for sending again after a reconnection.
    pub payload: Option<Arc<[u8]>>,
}

/// How to reach the server; shared by the connections.
#[derive(Debug)]
pub(crate) struct Target {
    pub address: NbdAddress,
    /// The address as shown in messages.
    pub peer: Arc<str>,
    pub export: String,
    pub connect_timeout: Duration,
    /// TLS on every connection (and every reconnection), when given.
    pub tls: Option<NbdClientTls>,
}

impl Target {
    /// Connects and negotiates the export (starting TLS first when the target has it).
    pub(crate) async fn connect(&self) -> Result<(BoxedIo, Negotiated), HandshakeError> {
        let attempt = async {
            let io: BoxedIo = match &self.address {
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

/// The NBD codec: how to reach the server, and what replies look like.
#[derive(Debug)]
pub(crate) struct Nbd {
    pub target: Target,
    /// `the NBD server at HOST:PORT`, for messages.
    pub described: String,
}

impl Nbd {
    pub(crate) fn new(target: Target) -> Self {
        Self { described: format!("the NBD server at {}", target.peer), target }
    }
}

impl Codec for Nbd {
    type Request = Call;
    type Reply = Reply;
    type Session = Negotiated;
    type ReadState = HashMap<u64, Assembly>;
    type Summary = Expect;
    type Payload = Arc<[u8]>;

    fn peer(&self) -> &str {
        &self.described
    }

    async fn connect(&self) -> Result<(BoxedIo, Negotiated), ConnectError> {
        self.target.connect().await.map_err(|e| ConnectError { error: e.error, permanent: e.permanent })
    }

    fn check_reconnect(&self, first: &Negotiated, now: &Negotiated) -> io::Result<()> {
        if now.info == first.info {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the export on the NBD server at {} changed while reconnecting: it was {:?}, it is {:?}",
                self.target.peer, first.info, now.info
            ),
        ))
    }

    fn summary(&self, call: &Call) -> Expect {
        call.expect
    }

    fn cost(&self, call: &Call) -> u64 {
        match call.expect.cmd {
            Command::Read | Command::Write => u64::from(call.expect.length),
            _ => 0,
        }
    }

    fn encode(&self, cookie: u64, call: &Call, header: &mut Vec<u8>) -> Option<Arc<[u8]>> {
        let request = Request {
            flags: call.flags,
            kind: call.expect.cmd.to_u16(),
            cookie,
            offset: call.expect.offset,
            length: call.expect.length,
        };
        header.extend_from_slice(&request.encode());
        call.payload.clone()
    }

    fn goodbye(&self, cookie: u64, out: &mut Vec<u8>) {
        let bye = Request { flags: 0, kind: Command::Disc.to_u16(), cookie, offset: 0, length: 0 };
        out.extend_from_slice(&bye.encode());
    }

    async fn read<R: AsyncRead + Unpin + Send>(
        &self,
        rd: &mut R,
        session: &Negotiated,
        assemblies: &mut HashMap<u64, Assembly>,
        in_flight: &InFlight<Self>,
    ) -> Result<(), ReadEnd> {
        let ctx = ReaderContext {
            codec: self,
            in_flight,
            structured: session.info.structured_replies,
            context: session.context,
        };
        match read_reply(rd, &ctx, assemblies).await {
            Ok(()) => Ok(()),
            Err(Stop::Io(e)) => Err(ReadEnd::Closed(e)),
            Err(Stop::Violation(v)) => Err(ReadEnd::Violation(v.0)),
            Err(Stop::Shutdown) => Err(ReadEnd::Shutdown),
        }
    }
}

/// What the reader knows about the connection.
struct ReaderContext<'a> {
    codec: &'a Nbd,
    in_flight: &'a InFlight<Nbd>,
    structured: bool,
    /// The id of `base:allocation` on this connection.
    context: Option<u32>,
}

impl ReaderContext<'_> {
    fn peer(&self) -> &str {
        &self.codec.target.peer
    }

    /// The request a reply's cookie names.
    fn expected(&self, cookie: u64) -> Result<Expect, Violation> {
        self.in_flight
            .summary(self.codec, cookie)
            .ok_or_else(|| Violation(format!("a reply for cookie {cookie}, which no request is waiting for")))
    }

    fn complete(&self, cookie: u64, result: io::Result<Reply>) {
        let _ = self.in_flight.complete(cookie, result);
    }
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

async fn read_reply<R: AsyncRead + Unpin>(
    rd: &mut R,
    ctx: &ReaderContext<'_>,
    assemblies: &mut HashMap<u64, Assembly>,
) -> Result<(), Stop> {
    let mut magic = [0u8; 4];
    rd.read_exact(&mut magic).await?;
    match u32::from_be_bytes(magic) {
        proto::SIMPLE_REPLY_MAGIC => {
            let mut header = [0u8; proto::SIMPLE_REPLY_LEN];
            header[..4].copy_from_slice(&magic);
            rd.read_exact(&mut header[4..]).await?;
            simple_reply(rd, SimpleReply::decode(&header)?, ctx, assemblies).await
        }
        proto::STRUCTURED_REPLY_MAGIC if ctx.structured => {
            let mut header = [0u8; proto::CHUNK_HEADER_LEN];
            header[..4].copy_from_slice(&magic);
            rd.read_exact(&mut header[4..]).await?;
            chunk(rd, &ChunkHeader::decode(&header)?, ctx, assemblies).await
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
    ctx: &ReaderContext<'_>,
    assemblies: &HashMap<u64, Assembly>,
) -> Result<(), Stop> {
    let expect = ctx.expected(reply.cookie)?;
    if assemblies.contains_key(&reply.cookie) {
        return Err(
            Violation(format!("a simple reply in the middle of the structured reply to {expect}")).into()
        );
    }
    let result = if reply.error != 0 {
        Err(server_error(ctx.peer(), &expect, reply.error, ""))
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
    ctx.complete(reply.cookie, result);
    if reply.error == errno::ESHUTDOWN {
        return Err(Stop::Shutdown);
    }
    Ok(())
}

async fn chunk<R: AsyncRead + Unpin>(
    rd: &mut R,
    h: &ChunkHeader,
    ctx: &ReaderContext<'_>,
    assemblies: &mut HashMap<u64, Assembly>,
) -> Result<(), Stop> {
    let expect = ctx.expected(h.cookie)?;
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
    ctx.complete(h.cookie, assembly.finish(ctx.peer())?);
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
    let codec = Nbd::new(Target {
        address: NbdAddress::Unix("/fuzzer".into()),
        peer: Arc::from("fuzzer"),
        export: String::new(),
        connect_timeout: Duration::from_secs(1),
        tls: None,
    });
    let in_flight = InFlight::default();
    let mut answers = Vec::new();
    for (cookie, (expect, flags)) in (1u64..).zip(sample_requests(&negotiated)) {
        let payload = (expect.cmd == Command::Write).then(|| Arc::from(vec![0u8; expect.length as usize]));
        let request = Request {
            flags,
            kind: expect.cmd.to_u16(),
            cookie,
            offset: expect.offset,
            length: expect.length,
        };
        let _ = wr.write_all(&request.encode()).await;
        let rx = in_flight.expect(&codec, cookie, Call { expect, flags, payload });
        answers.push((expect, rx));
    }
    let _ = r3map_net::mux::read_replies(&codec, rd, &negotiated, &in_flight).await;
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
    use r3map_net::Io;
    use r3map_net::mux::{Class, Mux, MuxOptions};
    use tokio::io::DuplexStream;

    use super::*;
    use crate::proto::{
        encode_error_chunk, encode_none, encode_offset_data_prefix, encode_offset_hole, reply_type,
    };

    const PEER: &str = "test";

    fn call(cmd: Command, offset: u64, length: u32) -> Call {
        Call { expect: Expect { cmd, offset, length }, flags: 0, payload: None }
    }

    /// Feeds `bytes` to a reader with `calls` pending under cookies 1, 2, ...; returns why it
    /// stopped and each call's result (`None` when it got none).
    fn feed(
        structured: bool,
        calls: Vec<(Command, u64, u32)>,
        bytes: &[u8],
    ) -> (ReadEnd, Vec<Option<io::Result<Reply>>>) {
        let codec = codec();
        let in_flight = InFlight::default();
        let mut receivers = Vec::new();
        for (cookie, (cmd, offset, length)) in (1u64..).zip(calls) {
            receivers.push(in_flight.expect(&codec, cookie, call(cmd, offset, length)));
        }
        let mut session = negotiated();
        session.info.structured_replies = structured;
        session.context = Some(1);
        let rt = r3map_net::Io::shared();
        let end = rt.block_on(r3map_net::mux::read_replies(&codec, bytes, &session, &in_flight));
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

    fn closed(end: &ReadEnd) -> bool {
        matches!(end, ReadEnd::Closed(e) if e.to_string().contains("closed the connection"))
    }

    fn violated(end: &ReadEnd, text: &str) -> bool {
        matches!(end, ReadEnd::Violation(v) if v.contains(text))
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
        assert!(matches!(end, ReadEnd::Shutdown), "{end:?}");
        let e = results[0].as_ref().unwrap().as_ref().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let (end, _) = feed(false, vec![(Command::Flush, 0, 0)], &simple(1, errno::ESHUTDOWN));
        assert!(matches!(end, ReadEnd::Shutdown), "{end:?}");
    }

    fn codec() -> Nbd {
        Nbd::new(Target {
            address: NbdAddress::Unix("/nonexistent/nbd.sock".into()),
            peer: Arc::from(PEER),
            export: String::new(),
            connect_timeout: Duration::from_secs(1),
            tls: None,
        })
    }

    /// A client on one connection already open, its other end `server`.
    fn client(timeout: Duration) -> (Mux<Nbd>, DuplexStream) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let options = MuxOptions {
            timeout,
            max_backoff: Duration::from_millis(100),
            close_grace: Duration::from_secs(5),
            ..MuxOptions::default()
        };
        let first = Some((Box::new(client) as BoxedIo, negotiated()));
        (Mux::start(codec(), options, &Io::shared(), vec![first]), server)
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

    #[test]
    fn requests_are_pipelined_and_dropping_says_goodbye() {
        let rt = r3map_net::Io::shared();
        let (mux, mut server) = client(Duration::from_secs(10));
        let flushed = mux.submit(Class::Demand, call(Command::Flush, 0, 0)).unwrap();
        let mut write = call(Command::Write, 8, 3);
        write.payload = Some(Arc::from(&b"abc"[..]));
        let written = mux.submit(Class::Demand, write).unwrap();
        rt.block_on(async {
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
        });
        assert_eq!(mux.wait(&written).unwrap(), Reply::Done);
        assert_eq!(mux.wait(&flushed).unwrap_err().kind(), io::ErrorKind::Other);
        // Dropping the client sends NBD_CMD_DISC and closes; it waits for the server to hang up,
        // so the server's side runs on a thread of its own.
        let bye = std::thread::spawn(move || {
            rt.block_on(async {
                let bye = next_request(&mut server).await;
                let mut rest = Vec::new();
                server.read_to_end(&mut rest).await.unwrap();
                (bye, rest)
            })
        });
        drop(mux);
        let (bye, rest) = bye.join().unwrap();
        assert_eq!((bye.command(), bye.offset, bye.length), (Some(Command::Disc), 0, 0));
        assert!(rest.is_empty(), "nothing follows NBD_CMD_DISC");
    }

    #[test]
    fn an_unanswered_request_times_out_without_hanging() {
        let rt = r3map_net::Io::shared();
        let (mux, mut server) = client(Duration::from_millis(300));
        let read = mux.submit(Class::Demand, call(Command::Read, 0, 4096)).unwrap();
        let request = rt.block_on(next_request(&mut server));
        assert_eq!(request.command(), Some(Command::Read));
        let e = mux.wait(&read).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            e.to_string()
                .contains("no answer to the read of 4096 bytes at offset 0 from the NBD server at test"),
            "{e}"
        );
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
