//! The Cassandra store: against a real Cassandra or ScyllaDB server when `R3MAP_CASSANDRA_URL`
//! names one (none can be installed by the test), and the connection failures everywhere, against
//! closed ports and small fake nodes that speak just enough of the CQL protocol.

#![cfg(feature = "cassandra")]

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use r3map_core::{Backend, SharedBackend, conformance};
use r3map_stores::cassandra::{CassandraStore, OPEN_TIMEOUT};
use r3map_stores::{ChunkStore, Stored, StoredOptions};

const SKIP: &str = "skipped: set R3MAP_CASSANDRA_URL to a Cassandra or ScyllaDB server to run this test";

/// The store of `R3MAP_CASSANDRA_URL`, or `None` (after saying so) when it is not set.
fn server() -> Option<CassandraStore> {
    let Ok(url) = std::env::var("R3MAP_CASSANDRA_URL") else {
        println!("{SKIP}");
        return None;
    };
    Some(CassandraStore::open_str(&url).unwrap_or_else(|e| panic!("opening {url}: {e}")))
}

/// A key prefix no other call, test or run has used.
fn fresh_prefix(base: &CassandraStore) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}test-{}-{:x}-{}:",
        base.config().prefix,
        std::process::id(),
        fastrand::u64(..),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn stored(base: &CassandraStore, size: u64, options: StoredOptions) -> Stored<CassandraStore> {
    Stored::new(base.with_prefix(fresh_prefix(base)), size, options).unwrap()
}

const SMALL: StoredOptions = StoredOptions { chunk_size: 4096, max_batch: 16 };

#[test]
fn conformance_with_small_chunks_and_batches() {
    let Some(base) = server() else { return };
    conformance::run(&|size| -> SharedBackend { Arc::new(stored(&base, size, SMALL)) });
}

#[test]
fn conformance_with_default_options() {
    let Some(base) = server() else { return };
    conformance::run(&|size| -> SharedBackend { Arc::new(stored(&base, size, StoredOptions::default())) });
}

#[test]
fn missing_chunks_read_as_zeroes_and_only_written_rows_exist() {
    let Some(base) = server() else { return };
    let s = stored(&base, 64 * 4096, SMALL);
    s.write_at(&[7u8; 4096], 2 * 4096).unwrap();
    let mut buf = vec![1u8; 64 * 4096];
    s.read_at(&mut buf, 0).unwrap();
    assert!(buf[..2 * 4096].iter().all(|&b| b == 0));
    assert!(buf[2 * 4096..3 * 4096].iter().all(|&b| b == 7));
    assert!(buf[3 * 4096..].iter().all(|&b| b == 0));
    let rows = s.store().get(&(0..64).collect::<Vec<_>>()).unwrap();
    let present: Vec<usize> = rows.iter().enumerate().filter(|(_, r)| r.is_some()).map(|(i, _)| i).collect();
    assert_eq!(present, [2], "one row, for the one chunk written");
}

#[test]
fn trim_deletes_the_rows() {
    let Some(base) = server() else { return };
    let s = stored(&base, 8 * 4096, SMALL);
    s.write_at(&vec![9u8; 8 * 4096], 0).unwrap();
    s.trim(2 * 4096, 3 * 4096).unwrap();
    let rows = s.store().get(&(0..8).collect::<Vec<_>>()).unwrap();
    let present: Vec<bool> = rows.iter().map(Option::is_some).collect();
    assert_eq!(present, [true, true, false, false, false, true, true, true]);
    let mut buf = vec![1u8; 8 * 4096];
    s.read_at(&mut buf, 0).unwrap();
    assert!(buf[2 * 4096..5 * 4096].iter().all(|&b| b == 0));
    assert!(buf[5 * 4096..].iter().all(|&b| b == 9));
}

#[test]
fn a_row_of_the_wrong_size_is_invalid_data() {
    let Some(base) = server() else { return };
    let s = stored(&base, 8 * 4096, SMALL);
    // Someone else writes 100 bytes under the row of chunk 3 (the store writes what it is given).
    let other = base.with_prefix(s.store().config().prefix.clone());
    other.put(&[(3, &[5u8; 100][..])]).unwrap();
    let err = s.read_at(&mut [0u8; 10], 3 * 4096).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("chunk 3") && err.to_string().contains("100 bytes"), "{err}");
}

#[test]
fn stores_with_other_prefixes_do_not_see_each_other() {
    let Some(base) = server() else { return };
    let a = base.with_prefix(fresh_prefix(&base));
    let b = base.with_prefix(fresh_prefix(&base));
    a.put(&[(0, &[1u8; 8][..]), (1, &[2u8; 8][..])]).unwrap();
    assert_eq!(b.get(&[0, 1]).unwrap(), [None, None]);
    assert_eq!(a.get(&[1, 0, 5]).unwrap(), [Some(vec![2u8; 8]), Some(vec![1u8; 8]), None]);
    a.delete(&[0, 1, 2]).unwrap();
    assert_eq!(a.get(&[0, 1]).unwrap(), [None, None]);
}

fn open_err(url: &str) -> (io::Error, Duration) {
    let started = Instant::now();
    let err = CassandraStore::open_str(url).expect_err("the open must fail");
    let took = started.elapsed();
    println!("open failed after {took:?}: {err}");
    (err, took)
}

#[test]
fn open_fails_within_seconds_when_nothing_listens() {
    let held = r3map_testkit::HeldPort::new();
    let port = held.port();
    let (err, took) = open_err(&format!("cassandra://127.0.0.1:{port}"));
    // Refused at once: a bound with room for a loaded machine, not a performance goal.
    assert!(took < Duration::from_secs(20), "took {took:?}: {err}");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn open_with_a_missing_ca_file_says_which() {
    let (err, _) = open_err("cassandrasecure://127.0.0.1:9?ca=/nonexistent/ca.pem");
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

#[test]
fn open_with_a_ca_file_that_holds_no_certificate_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let (err, _) = open_err(&format!("cassandrasecure://127.0.0.1:9?ca={}", ca.display()));
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("holds no certificate"), "{err}");
}

/// What a fake node does once it has answered OPTIONS.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Never answers anything (not even OPTIONS).
    Silent,
    /// Asks for a password and refuses every one.
    RefusePasswords,
}

/// A fake node on a loopback port, stopped and joined on drop.
struct FakeNode {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeNode {
    fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let flag = Arc::clone(&flag);
                        conns.push(std::thread::spawn(move || serve(stream, behaviour, &flag)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        Self { port, stop, thread: Some(thread) }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// CQL v4 opcodes.
const ERROR: u8 = 0x00;
const STARTUP: u8 = 0x01;
const AUTHENTICATE: u8 = 0x03;
const OPTIONS: u8 = 0x05;
const SUPPORTED: u8 = 0x06;
const AUTH_RESPONSE: u8 = 0x0F;

fn cql_string(s: &str) -> Vec<u8> {
    let mut out = u16::try_from(s.len()).unwrap().to_be_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

fn serve(mut stream: TcpStream, behaviour: Behaviour, stop: &AtomicBool) {
    stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let mut header = [0u8; 9];
    let mut have = 0;
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut header[have..]) {
            Ok(0) => return,
            Ok(n) => have += n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        if have < header.len() {
            continue;
        }
        have = 0;
        let len = u32::from_be_bytes(header[5..9].try_into().unwrap());
        let mut body = vec![0u8; usize::try_from(len).unwrap()];
        stream.set_read_timeout(None).unwrap();
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        stream.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let reply = match (behaviour, header[4]) {
            (Behaviour::Silent, _) => continue,
            (_, OPTIONS) => (SUPPORTED, 0u16.to_be_bytes().to_vec()),
            (_, STARTUP) => (AUTHENTICATE, cql_string("org.apache.cassandra.auth.PasswordAuthenticator")),
            (_, AUTH_RESPONSE) => {
                let mut body = 0x0100u32.to_be_bytes().to_vec();
                body.extend(cql_string("Provided username and/or password are incorrect"));
                (ERROR, body)
            }
            (_, op) => {
                let mut body = 0x000Au32.to_be_bytes().to_vec();
                body.extend(cql_string(&format!("this fake node does not do opcode {op}")));
                (ERROR, body)
            }
        };
        let mut frame = vec![0x84, 0, header[2], header[3], reply.0];
        frame.extend(u32::try_from(reply.1.len()).unwrap().to_be_bytes());
        frame.extend(reply.1);
        if stream.write_all(&frame).is_err() {
            return;
        }
    }
}

#[test]
fn refused_credentials_are_permission_denied() {
    let node = FakeNode::start(Behaviour::RefusePasswords);
    let (err, took) = open_err(&format!("cassandra://cassandra:wrong@127.0.0.1:{}", node.port));
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    assert!(!err.to_string().contains("wrong"), "the password must not show: {err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn missing_credentials_are_permission_denied() {
    let node = FakeNode::start(Behaviour::RefusePasswords);
    let (err, _) = open_err(&format!("cassandra://127.0.0.1:{}", node.port));
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
}

#[test]
fn a_node_that_never_answers_times_out() {
    let node = FakeNode::start(Behaviour::Silent);
    let (err, took) = open_err(&format!("cassandra://127.0.0.1:{}", node.port));
    assert!(took < OPEN_TIMEOUT + Duration::from_secs(20), "took {took:?}: {err}");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{}", node.port)), "{err}");
}
