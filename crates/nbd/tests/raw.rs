//! The server driven over plain sockets with hand-made messages: misbehaving clients, error
//! replies, pipelining, and `serve_stream`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Running, export, memory};
use r3map_core::Backend;
use r3map_nbd::proto::{
    self, ChunkHeader, Command, InfoRequest, OptionHeader, OptionReplyHeader, Request, SimpleReply,
    client_flags, errno, opt, rep, reply_flags, reply_type, transmission_flags,
};
use r3map_nbd::{NbdExport, NbdServer};

const SIZE: u64 = 1 << 20;

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).expect("read");
    buf
}

/// Reads the greeting and sends the client flags.
fn greet(s: &mut TcpStream, flags: u32) {
    let g = read_n(s, proto::GREETING_LEN);
    assert_eq!(proto::decode_greeting(&g), Ok(3));
    s.write_all(&flags.to_be_bytes()).unwrap();
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let len = u32::try_from(data.len()).unwrap();
    s.write_all(&OptionHeader { option, len }.encode()).unwrap();
    s.write_all(data).unwrap();
}

fn option_reply(s: &mut TcpStream) -> (OptionReplyHeader, Vec<u8>) {
    let h = OptionReplyHeader::decode(&read_n(s, proto::OPTION_REPLY_HEADER_LEN)).expect("option reply");
    let data = read_n(s, h.len as usize);
    (h, data)
}

/// Negotiates (optionally structured replies) and enters transmission with `NBD_OPT_GO`;
/// returns the transmission flags.
fn go(s: &mut TcpStream, name: &str, structured: bool) -> u16 {
    greet(s, client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    if structured {
        send_option(s, opt::STRUCTURED_REPLY, &[]);
        assert_eq!(option_reply(s).0.reply, rep::ACK);
    }
    send_option(s, opt::GO, &InfoRequest { name: name.into(), infos: vec![] }.encode());
    let mut flags = None;
    loop {
        let (h, data) = option_reply(s);
        assert_eq!(h.option, opt::GO);
        match h.reply {
            rep::INFO => {
                if data[..2] == [0, 0] {
                    assert_eq!(u64::from_be_bytes(data[2..10].try_into().unwrap()), SIZE);
                    flags = Some(u16::from_be_bytes([data[10], data[11]]));
                }
            }
            rep::ACK => return flags.expect("NBD_INFO_EXPORT came before the ACK"),
            other => panic!("unexpected reply {other:#x}: {}", String::from_utf8_lossy(&data)),
        }
    }
}

fn request(s: &mut TcpStream, cmd: Command, cookie: u64, offset: u64, length: u32, flags: u16) {
    s.write_all(&Request { flags, kind: cmd.to_u16(), cookie, offset, length }.encode()).unwrap();
}

fn simple(s: &mut TcpStream) -> SimpleReply {
    SimpleReply::decode(&read_n(s, proto::SIMPLE_REPLY_LEN)).expect("simple reply")
}

/// Reads one structured chunk: header and payload.
fn chunk(s: &mut TcpStream) -> (ChunkHeader, Vec<u8>) {
    let h = ChunkHeader::decode(&read_n(s, proto::CHUNK_HEADER_LEN)).expect("chunk");
    let payload = read_n(s, h.len as usize);
    (h, payload)
}

/// Whether the server closed the connection: end of stream (or a reset) with nothing more sent.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn server() -> (Running, std::sync::Arc<r3map_core::Memory>) {
    let backend = memory(SIZE);
    let ro = NbdExport { read_only: true, ..export("ro", backend.clone()) };
    (Running::tcp(vec![export("disk", backend.clone()), ro]), backend)
}

#[test]
fn simple_replies_report_errors_and_data() {
    let (server, backend) = server();
    let mut s = connect(server.port);
    let flags = go(&mut s, "disk", false);
    use transmission_flags as f;
    assert_eq!(
        flags & (f::HAS_FLAGS | f::SEND_FLUSH | f::SEND_FUA | f::READ_ONLY),
        f::HAS_FLAGS | f::SEND_FLUSH | f::SEND_FUA
    );

    request(&mut s, Command::Write, 1, 4096, 4, proto::cmd_flags::FUA);
    s.write_all(b"abcd").unwrap();
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 1 });
    let mut check = [0u8; 4];
    backend.read_at(&mut check, 4096).unwrap();
    assert_eq!(&check, b"abcd");

    request(&mut s, Command::Read, 2, 4096, 4, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 2 });
    assert_eq!(read_n(&mut s, 4), b"abcd");

    // Out of range, oversized, unknown, bad flags: error replies, and the connection goes on.
    request(&mut s, Command::Read, 3, SIZE - 1, 2, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: errno::EINVAL, cookie: 3 });
    request(&mut s, Command::Read, 4, 0, proto::MAX_REQUEST + 1, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: errno::EOVERFLOW, cookie: 4 });
    s.write_all(&Request { flags: 0, kind: 77, cookie: 5, offset: 0, length: 0 }.encode()).unwrap();
    assert_eq!(simple(&mut s), SimpleReply { error: errno::EINVAL, cookie: 5 });
    request(&mut s, Command::Flush, 6, 0, 0, 1 << 12);
    assert_eq!(simple(&mut s), SimpleReply { error: errno::EINVAL, cookie: 6 });
    // A write past the end is refused and its data skipped, keeping the stream in step.
    request(&mut s, Command::Write, 7, SIZE - 2, 4, 0);
    s.write_all(b"wxyz").unwrap();
    assert_eq!(simple(&mut s), SimpleReply { error: errno::ENOSPC, cookie: 7 });
    request(&mut s, Command::Flush, 8, 0, 0, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 8 });
    request(&mut s, Command::Cache, 9, 0, 4096, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 9 });
    request(&mut s, Command::Trim, 10, 4096, 4, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 10 });
    request(&mut s, Command::WriteZeroes, 11, 0, 4096, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 11 });

    // Soft disconnect: no reply, the server closes.
    request(&mut s, Command::Disc, 12, 0, 0, 0);
    assert!(closed(&mut s));
    server.stop().expect("final flush");
}

#[test]
fn an_oversized_write_is_refused_and_skipped() {
    let (server, _) = server();
    let mut s = connect(server.port);
    go(&mut s, "disk", false);
    let len = proto::MAX_REQUEST + 1;
    request(&mut s, Command::Write, 1, 0, len, 0);
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&vec![0u8; len as usize]).unwrap());
    assert_eq!(simple(&mut s), SimpleReply { error: errno::EOVERFLOW, cookie: 1 });
    sender.join().unwrap();
    request(&mut s, Command::Flush, 2, 0, 0, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 2 });
}

#[test]
fn writes_to_a_read_only_export_get_eperm() {
    let (server, backend) = server();
    let mut s = connect(server.port);
    let flags = go(&mut s, "ro", false);
    assert_ne!(flags & transmission_flags::READ_ONLY, 0);
    assert_eq!(flags & transmission_flags::SEND_TRIM, 0);
    request(&mut s, Command::Write, 1, 0, 3, 0);
    s.write_all(b"xyz").unwrap();
    assert_eq!(simple(&mut s), SimpleReply { error: errno::EPERM, cookie: 1 });
    request(&mut s, Command::Trim, 2, 0, 4096, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: errno::EPERM, cookie: 2 });
    request(&mut s, Command::Read, 3, 0, 3, 0);
    assert_eq!(simple(&mut s).error, 0);
    assert_eq!(read_n(&mut s, 3), [0, 0, 0]);
    let mut check = [1u8; 3];
    backend.read_at(&mut check, 0).unwrap();
    assert_eq!(check, [0, 0, 0]);
}

#[test]
fn structured_replies_carry_data_and_errors() {
    let (server, backend) = server();
    backend.write_at(b"hello", 100).unwrap();
    let mut s = connect(server.port);
    go(&mut s, "", true);
    request(&mut s, Command::Read, 1, 100, 5, 0);
    let (h, payload) = chunk(&mut s);
    assert_eq!((h.kind, h.flags, h.cookie), (reply_type::OFFSET_DATA, reply_flags::DONE, 1));
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 100);
    assert_eq!(&payload[8..], b"hello");

    request(&mut s, Command::Read, 2, SIZE, 1, 0);
    let (h, payload) = chunk(&mut s);
    assert_eq!((h.kind, h.flags, h.cookie), (reply_type::ERROR, reply_flags::DONE, 2));
    let (error, message) = proto::decode_error_payload(&payload).unwrap();
    assert_eq!(error, errno::EINVAL);
    assert!(message.contains("beyond the end"), "{message}");

    request(&mut s, Command::Read, 3, 0, 0, 0);
    let (h, _) = chunk(&mut s);
    assert_eq!((h.kind, h.flags), (reply_type::NONE, reply_flags::DONE));
}

#[test]
fn pipelined_requests_are_all_answered() {
    let (server, backend) = server();
    let mut s = connect(server.port);
    go(&mut s, "disk", false);
    let mut writer = s.try_clone().unwrap();
    let n: u64 = 200;
    let sender = std::thread::spawn(move || {
        for i in 0..n {
            let mut buf = Vec::new();
            buf.extend_from_slice(
                &Request {
                    flags: 0,
                    kind: Command::Write.to_u16(),
                    cookie: i,
                    offset: i * 4096,
                    length: 4096,
                }
                .encode(),
            );
            buf.extend_from_slice(&[u8::try_from(i % 251).unwrap(); 4096]);
            writer.write_all(&buf).unwrap();
        }
    });
    let mut seen = vec![false; usize::try_from(n).unwrap()];
    for _ in 0..n {
        let r = simple(&mut s);
        assert_eq!(r.error, 0);
        let i = usize::try_from(r.cookie).unwrap();
        assert!(!seen[i], "cookie {i} answered twice");
        seen[i] = true;
    }
    sender.join().unwrap();
    for i in 0..n {
        let mut b = [0u8; 1];
        backend.read_at(&mut b, i * 4096 + 4095).unwrap();
        assert_eq!(u64::from(b[0]), i % 251);
    }
}

#[test]
fn options_are_answered_per_spec() {
    let (server, _) = server();
    let mut s = connect(server.port);
    greet(&mut s, client_flags::FIXED_NEWSTYLE);
    send_option(&mut s, 1234, b"whatever");
    let (h, _) = option_reply(&mut s);
    assert_eq!((h.option, h.reply), (1234, rep::ERR_UNSUP));
    send_option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(option_reply(&mut s).0.reply, rep::ERR_POLICY);
    send_option(&mut s, opt::LIST, b"x");
    assert_eq!(option_reply(&mut s).0.reply, rep::ERR_INVALID);
    send_option(&mut s, opt::LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (h, data) = option_reply(&mut s);
        if h.reply == rep::ACK {
            break;
        }
        assert_eq!(h.reply, rep::SERVER);
        let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
        names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
    }
    assert_eq!(names, ["disk", "ro"]);
    send_option(&mut s, opt::INFO, &InfoRequest { name: "missing".into(), infos: vec![] }.encode());
    assert_eq!(option_reply(&mut s).0.reply, rep::ERR_UNKNOWN);
    send_option(&mut s, opt::GO, &[0, 0, 0, 9, b'x']);
    assert_eq!(option_reply(&mut s).0.reply, rep::ERR_INVALID);
    // INFO with every information type, then still in negotiation.
    let infos = vec![proto::info::NAME, proto::info::BLOCK_SIZE, proto::info::DESCRIPTION];
    send_option(&mut s, opt::INFO, &InfoRequest { name: "ro".into(), infos }.encode());
    let mut kinds = Vec::new();
    loop {
        let (h, data) = option_reply(&mut s);
        if h.reply == rep::ACK {
            break;
        }
        kinds.push(u16::from_be_bytes([data[0], data[1]]));
    }
    assert_eq!(kinds, [proto::info::EXPORT, proto::info::NAME, proto::info::BLOCK_SIZE]);
    send_option(&mut s, opt::ABORT, &[]);
    assert_eq!(option_reply(&mut s).0.reply, rep::ACK);
    assert!(closed(&mut s));
}

#[test]
fn export_name_honours_no_zeroes() {
    let (server, _) = server();
    for (flags, len) in [(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES, 10), (0, 134)] {
        let mut s = connect(server.port);
        greet(&mut s, flags);
        send_option(&mut s, opt::EXPORT_NAME, b"disk");
        let reply = read_n(&mut s, len);
        assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), SIZE);
        request(&mut s, Command::Read, 1, 0, 1, 0);
        assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 1 });
        assert_eq!(read_n(&mut s, 1), [0]);
    }
    // An unknown name cannot be refused in-band: the server hangs up.
    let mut s = connect(server.port);
    greet(&mut s, client_flags::FIXED_NEWSTYLE);
    send_option(&mut s, opt::EXPORT_NAME, b"nope");
    assert!(closed(&mut s));
}

#[test]
fn bad_clients_are_dropped_and_the_server_keeps_serving() {
    let (server, _) = server();
    // Unknown client flags.
    let mut s = connect(server.port);
    greet(&mut s, 1 << 7);
    assert!(closed(&mut s));
    // Garbage instead of an option.
    let mut s = connect(server.port);
    greet(&mut s, client_flags::FIXED_NEWSTYLE);
    s.write_all(&[0xffu8; 64]).unwrap();
    assert!(closed(&mut s));
    // Option data over the limit.
    let mut s = connect(server.port);
    greet(&mut s, client_flags::FIXED_NEWSTYLE);
    s.write_all(&OptionHeader { option: opt::GO, len: u32::MAX }.encode()).unwrap();
    assert!(closed(&mut s));
    // Bad request magic in transmission, after a request that is still answered.
    let mut s = connect(server.port);
    go(&mut s, "disk", false);
    request(&mut s, Command::Flush, 1, 0, 0, 0);
    s.write_all(&[0x42u8; proto::REQUEST_LEN]).unwrap();
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 1 });
    assert!(closed(&mut s));
    // Random bytes from the first byte on.
    for seed in 0..16 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut s = connect(server.port);
        let mut junk = vec![0u8; rng.usize(1..512)];
        rng.fill(&mut junk);
        let _ = s.write_all(&junk);
        drop(s);
    }
    // A client that leaves halfway through a request.
    let mut s = connect(server.port);
    go(&mut s, "disk", false);
    request(&mut s, Command::Write, 1, 0, 4096, 0);
    s.write_all(&[1u8; 100]).unwrap();
    drop(s);
    // And a well-behaved client still gets served.
    let mut s = connect(server.port);
    go(&mut s, "disk", true);
    request(&mut s, Command::Read, 1, 0, 8, 0);
    let (h, payload) = chunk(&mut s);
    assert_eq!((h.kind, payload.len()), (reply_type::OFFSET_DATA, 16));
    server.stop().expect("final flush");
}

#[test]
fn serve_stream_serves_one_connected_socket() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let backend = memory(SIZE);
    let server = NbdServer::new(vec![export("", backend.clone())]).unwrap();
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = rt.spawn(async move {
        let stream = tokio::net::UnixStream::from_std(a).unwrap();
        server
            .serve_stream(stream, async {
                let _ = stop_rx.await;
            })
            .await
    });
    let mut b = b;
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(proto::decode_greeting(&read_exact(&mut b, proto::GREETING_LEN)), Ok(3));
    b.write_all(&client_flags::KNOWN.to_be_bytes()).unwrap();
    b.write_all(&OptionHeader { option: opt::EXPORT_NAME, len: 0 }.encode()).unwrap();
    assert_eq!(read_exact(&mut b, 10)[..8], SIZE.to_be_bytes());
    b.write_all(
        &Request { flags: 0, kind: Command::Write.to_u16(), cookie: 5, offset: 8, length: 2 }.encode(),
    )
    .unwrap();
    b.write_all(b"ok").unwrap();
    assert_eq!(SimpleReply::decode(&read_exact(&mut b, 16)), Ok(SimpleReply { error: 0, cookie: 5 }));
    let mut check = [0u8; 2];
    backend.read_at(&mut check, 8).unwrap();
    assert_eq!(&check, b"ok");
    // Shutdown ends the connection cleanly.
    stop_tx.send(()).unwrap();
    let result = rt.block_on(task).unwrap();
    assert!(result.is_ok(), "{result:?}");
    let mut rest = Vec::new();
    assert_eq!(b.read_to_end(&mut rest).unwrap(), 0);
}

fn read_exact(s: &mut std::os::unix::net::UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
    proto::MetaContextRequest { export: export.into(), queries: queries.iter().map(|&q| q.into()).collect() }
        .encode()
}

/// Replies to one meta context option: the (id, name) pairs, then the final reply type.
fn meta_replies(s: &mut TcpStream) -> (Vec<(u32, String)>, u32) {
    let mut contexts = Vec::new();
    loop {
        let (h, data) = option_reply(s);
        if h.reply != rep::META_CONTEXT {
            return (contexts, h.reply);
        }
        contexts.push(proto::decode_rep_meta_context(&data).expect("meta context reply"));
    }
}

#[test]
fn meta_contexts_are_negotiated_per_spec() {
    let (server, _backend) = server();
    let mut s = connect(server.port);
    greet(&mut s, client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    // Before structured replies: refused.
    send_option(&mut s, opt::SET_META_CONTEXT, &meta_request("disk", &["base:allocation"]));
    assert_eq!(meta_replies(&mut s), (vec![], rep::ERR_INVALID));
    send_option(&mut s, opt::STRUCTURED_REPLY, &[]);
    assert_eq!(option_reply(&mut s).0.reply, rep::ACK);
    // Listing: everything (no query), a namespace, an unknown name; the plain export has no
    // chunk states, so only the spec's context.
    send_option(&mut s, opt::LIST_META_CONTEXT, &meta_request("disk", &[]));
    assert_eq!(meta_replies(&mut s), (vec![(0, "base:allocation".into())], rep::ACK));
    send_option(&mut s, opt::LIST_META_CONTEXT, &meta_request("disk", &["base:"]));
    assert_eq!(meta_replies(&mut s), (vec![(0, "base:allocation".into())], rep::ACK));
    send_option(&mut s, opt::LIST_META_CONTEXT, &meta_request("disk", &["r3map:chunks", "x-y:z"]));
    assert_eq!(meta_replies(&mut s), (vec![], rep::ACK));
    send_option(&mut s, opt::LIST_META_CONTEXT, &meta_request("nope", &[]));
    assert_eq!(meta_replies(&mut s).1, rep::ERR_UNKNOWN);
    send_option(&mut s, opt::LIST_META_CONTEXT, &[0, 0, 0, 9, b'x']);
    assert_eq!(meta_replies(&mut s).1, rep::ERR_INVALID);
    // Setting numbers the selection from 1.
    send_option(&mut s, opt::SET_META_CONTEXT, &meta_request("disk", &["base:allocation"]));
    assert_eq!(meta_replies(&mut s), (vec![(1, "base:allocation".into())], rep::ACK));
    send_option(&mut s, opt::GO, &InfoRequest { name: "disk".into(), infos: vec![] }.encode());
    while option_reply(&mut s).0.reply != rep::ACK {}
    // A status query of the whole (empty) export: one hole descriptor, done.
    request(&mut s, Command::BlockStatus, 5, 0, u32::try_from(SIZE).unwrap(), 0);
    let (h, payload) = chunk(&mut s);
    assert_eq!((h.kind, h.flags, h.cookie), (reply_type::BLOCK_STATUS, reply_flags::DONE, 5));
    let (id, d) = proto::decode_block_status(&payload).unwrap();
    assert_eq!(id, 1);
    assert_eq!(d, [proto::BlockDescriptor { len: 1 << 20, flags: 3 }]);
    // Past the end: EINVAL.
    request(&mut s, Command::BlockStatus, 6, SIZE - 512, 1024, 0);
    let (h, payload) = chunk(&mut s);
    assert_eq!(h.kind, reply_type::ERROR);
    assert_eq!(proto::decode_error_payload(&payload).unwrap().0, errno::EINVAL);
}

#[test]
fn block_status_without_contexts_is_invalid() {
    let (server, _backend) = server();
    let mut s = connect(server.port);
    go(&mut s, "disk", true);
    request(&mut s, Command::BlockStatus, 1, 0, 4096, 0);
    let (h, payload) = chunk(&mut s);
    assert_eq!(h.kind, reply_type::ERROR);
    assert_eq!(proto::decode_error_payload(&payload).unwrap().0, errno::EINVAL);
}

#[test]
fn cache_pulls_chunks_of_a_lazy_export() {
    use r3map_core::pipeline::synced::SyncedOptions;
    use r3map_core::{Chunk, Synced};
    let remote = memory(SIZE);
    remote.write_at(&[4u8; 100], 300_000).unwrap();
    let options = SyncedOptions { chunk_size: 64 * 1024, ..SyncedOptions::default() };
    let synced = std::sync::Arc::new(Synced::new(remote, memory(SIZE), options).unwrap());
    let server = Running::tcp(vec![export("disk", synced.clone()).with_chunk_states(synced.clone())]);
    let mut s = connect(server.port);
    let flags = go(&mut s, "disk", false);
    assert_ne!(flags & transmission_flags::SEND_CACHE, 0);
    assert!(!synced.is_local(Chunk(4)));
    request(&mut s, Command::Cache, 1, 256 * 1024, 128 * 1024, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 1 });
    // Chunks 4 and 5 were pulled before the reply; their neighbours were not.
    assert!(synced.is_local(Chunk(4)) && synced.is_local(Chunk(5)));
    assert!(!synced.is_local(Chunk(3)) && !synced.is_local(Chunk(6)));
    let mut local = [0u8; 100];
    synced.local().read_at(&mut local, 300_000).unwrap();
    assert_eq!(local, [4u8; 100]);
}

#[test]
fn a_server_that_requires_tls_refuses_plaintext_options() {
    use r3map_nbd::{NbdTls, TlsMode};
    use r3map_net::certs::Authority;
    let ca = Authority::new("ca").unwrap();
    let pem = ca.server(&["localhost"]).unwrap();
    let config = r3map_net::server_tls(pem.cert.as_bytes(), pem.key.as_bytes(), None).unwrap();
    let tls = |mode| {
        NbdServer::new(vec![export("disk", memory(SIZE))])
            .unwrap()
            .with_tls(NbdTls { config: config.clone(), mode })
    };
    let server = Running::tcp_server(tls(TlsMode::Require));
    let mut s = connect(server.port);
    greet(&mut s, client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    for o in [opt::LIST, opt::STRUCTURED_REPLY, opt::GO] {
        send_option(&mut s, o, &[]);
        assert_eq!(option_reply(&mut s).0.reply, rep::ERR_TLS_REQD, "option {o}");
    }
    // STARTTLS with data is invalid; EXPORT_NAME without TLS ends the connection.
    send_option(&mut s, opt::STARTTLS, b"x");
    assert_eq!(option_reply(&mut s).0.reply, rep::ERR_INVALID);
    send_option(&mut s, opt::EXPORT_NAME, b"disk");
    assert!(closed(&mut s));
    drop(server);
    // Allowed mode: plaintext clients are served.
    let server = Running::tcp_server(tls(TlsMode::Allow));
    let mut s = connect(server.port);
    go(&mut s, "disk", false);
    request(&mut s, Command::Read, 1, 0, 512, 0);
    assert_eq!(simple(&mut s), SimpleReply { error: 0, cookie: 1 });
    // Without TLS configured, STARTTLS is refused by policy.
    let (plain, _) = self::server();
    let mut s = connect(plain.port);
    greet(&mut s, client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES);
    send_option(&mut s, opt::STARTTLS, &[]);
    assert_eq!(option_reply(&mut s).0.reply, rep::ERR_POLICY);
}

/// Memory whose reads wait at a gate: a test sees how many have arrived, and opens it.
struct Gated {
    inner: std::sync::Arc<r3map_core::Memory>,
    state: std::sync::Mutex<(usize, bool)>,
    changed: std::sync::Condvar,
}

impl Gated {
    fn new(inner: std::sync::Arc<r3map_core::Memory>) -> Self {
        Self { inner, state: std::sync::Mutex::new((0, false)), changed: std::sync::Condvar::new() }
    }

    /// Waits until `n` reads wait at the gate.
    fn wait_arrived(&self, n: usize) {
        let state = self.state.lock().unwrap();
        let (_state, timeout) = self
            .changed
            .wait_timeout_while(state, Duration::from_secs(60), |(arrived, _)| *arrived < n)
            .unwrap();
        assert!(!timeout.timed_out(), "{n} reads did not arrive in 60 s");
    }

    fn open(&self) {
        self.state.lock().unwrap().1 = true;
        self.changed.notify_all();
    }
}

impl Backend for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.0 += 1;
        self.changed.notify_all();
        drop(self.changed.wait_while(state, |(_, open)| !*open).unwrap());
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn shutdown_answers_the_requests_in_flight_then_closes() {
    let gated = std::sync::Arc::new(Gated::new(memory(SIZE)));
    gated.write_at(&[6u8; 512], 4096).unwrap();
    let mut server = Running::tcp(vec![export("disk", gated.clone())]);
    let mut s = connect(server.port);
    go(&mut s, "disk", false);
    for cookie in 1..=4 {
        request(&mut s, Command::Read, cookie, 4096, 512, 0);
    }
    // All four are running when the server is told to stop; only then do they finish.
    gated.wait_arrived(4);
    server.begin_stop();
    gated.open();
    let mut cookies = Vec::new();
    for _ in 0..4 {
        let reply = simple(&mut s);
        assert_eq!(reply.error, 0);
        assert_eq!(read_n(&mut s, 512), vec![6u8; 512]);
        cookies.push(reply.cookie);
    }
    cookies.sort_unstable();
    assert_eq!(cookies, [1, 2, 3, 4]);
    assert!(closed(&mut s));
    server.stop().expect("final flush");
}

/// A kernel-style socket: no handshake, simple replies, as the kernel's NBD client talks once
/// the device is attached.
#[test]
fn transmission_alone_on_a_socketpair_as_the_kernel_uses_it() {
    use std::os::unix::net::UnixStream;
    let backend = memory(SIZE);
    let server = NbdServer::new(vec![export("disk", backend.clone())]).unwrap();
    let (ours, mut kernel) = UnixStream::pair().unwrap();
    kernel.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let serving =
        rt.spawn(async move { server.serve_transmission(ours, "disk", std::future::pending()).await });
    let write = |s: &mut UnixStream, cookie: u64, offset: u64, data: &[u8]| {
        let length = u32::try_from(data.len()).unwrap();
        s.write_all(&Request { flags: 0, kind: Command::Write.to_u16(), cookie, offset, length }.encode())
            .unwrap();
        s.write_all(data).unwrap();
    };
    let reply = |s: &mut UnixStream| {
        let mut b = [0u8; proto::SIMPLE_REPLY_LEN];
        s.read_exact(&mut b).unwrap();
        SimpleReply::decode(&b).expect("a simple reply")
    };
    write(&mut kernel, 1, 4096, &[7u8; 8192]);
    assert_eq!(reply(&mut kernel), SimpleReply { error: 0, cookie: 1 });
    let mut b = [0u8; 16];
    backend.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [7u8; 16], "the write reached the export");
    kernel
        .write_all(
            &Request { flags: 0, kind: Command::Read.to_u16(), cookie: 2, offset: 4090, length: 12 }.encode(),
        )
        .unwrap();
    assert_eq!(reply(&mut kernel), SimpleReply { error: 0, cookie: 2 });
    let mut data = [0u8; 12];
    kernel.read_exact(&mut data).unwrap();
    assert_eq!(data, [0, 0, 0, 0, 0, 0, 7, 7, 7, 7, 7, 7]);
    // Past the end: an error reply, and the connection goes on.
    kernel
        .write_all(
            &Request { flags: 0, kind: Command::Read.to_u16(), cookie: 3, offset: SIZE, length: 1 }.encode(),
        )
        .unwrap();
    assert_eq!(reply(&mut kernel), SimpleReply { error: errno::EINVAL, cookie: 3 });
    kernel
        .write_all(
            &Request { flags: 0, kind: Command::Disc.to_u16(), cookie: 4, offset: 0, length: 0 }.encode(),
        )
        .unwrap();
    rt.block_on(serving).unwrap().expect("a clean disconnect");

    // An export that does not exist is refused before anything is read.
    let server = NbdServer::new(vec![export("disk", memory(SIZE))]).unwrap();
    let (ours, _kernel) = UnixStream::pair().unwrap();
    let err = rt.block_on(server.serve_transmission(ours, "nope", std::future::pending())).unwrap_err();
    assert!(err.to_string().contains("'nope'"), "{err}");
}
