//! The S3 store against a real S3-compatible server (moto), which each test starts on a loopback
//! port it holds and kills when it ends.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use r3map_core::conformance;
use r3map_core::{Backend, SharedBackend};
use r3map_stores::s3::S3Store;
use r3map_stores::{ChunkStore, Stored, StoredOptions};
use r3map_testkit::HeldPort;

mod servers;

const BUCKET: &str = "r3map-test";

/// A moto server on a port the test holds, killed on drop; it logs every request it serves.
struct Moto {
    server: servers::Server,
}

impl Moto {
    /// Starts moto, or says why the test is skipped and returns `None`.
    fn start(check_credentials: bool) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let Some(server) = servers::moto_on(HeldPort::new(), dir, check_credentials) else {
            println!("skipped: moto_server not installed (scripts/test.sh installs it)");
            return None;
        };
        Some(Self { server })
    }

    /// Kills this server and starts another on the same port (with an empty state).
    fn restart(&mut self) {
        self.server.restart();
    }

    fn stop(&mut self) {
        self.server.kill();
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    fn url(&self, prefix: &str, extra: &str) -> url::Url {
        url::Url::parse(&format!(
            "s3://{BUCKET}/{prefix}?endpoint={}&region=us-east-1&access-key-id=AKTEST\
             &secret-access-key=s3cr3t{extra}",
            self.endpoint()
        ))
        .unwrap()
    }

    /// Opens a store under `prefix`, creating the bucket if need be.
    fn open(&self, prefix: &str) -> S3Store {
        S3Store::open(&self.url(prefix, "&create-bucket=true")).unwrap()
    }

    /// Requests the server logged whose request line starts with `start` (`GET /bucket/p/`),
    /// once it has logged at least `at_least`. moto logs a request before it answers it, so what
    /// a test has had answered is in the log by the time it asks.
    fn requests(&self, start: &str, at_least: usize) -> usize {
        if at_least > 0 {
            self.server.wait_for_lines(start, at_least);
        }
        self.server.count_lines(start)
    }

    /// A plain `object_store` client on the bucket, to look at or plant objects behind the store.
    fn raw(&self) -> Raw {
        let s3 = AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id("AKTEST")
            .with_secret_access_key("s3cr3t")
            .build()
            .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Raw { s3, runtime }
    }
}

struct Raw {
    s3: AmazonS3,
    runtime: tokio::runtime::Runtime,
}

impl Raw {
    fn keys(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .runtime
            .block_on(self.s3.list(Some(&Path::from(prefix))).try_collect::<Vec<_>>())
            .unwrap()
            .into_iter()
            .map(|meta| meta.location.to_string())
            .collect();
        keys.sort();
        keys
    }

    fn put(&self, key: &str, data: Vec<u8>) {
        self.runtime.block_on(self.s3.put(&Path::from(key), PutPayload::from(data))).unwrap();
    }
}

/// A unique prefix per store on one server.
fn prefix(name: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{name}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn conformance_with(chunk_size: u64, max_batch: usize) {
    let Some(moto) = Moto::start(false) else { return };
    conformance::run(&|size| -> SharedBackend {
        let store = moto.open(&prefix("conformance"));
        Arc::new(Stored::new(store, size, StoredOptions { chunk_size, max_batch }).unwrap())
    });
}

#[test]
fn conformance_with_small_chunks_and_batches() {
    // 16 KiB rather than the 4 KiB of the other stores: moto takes some 10 ms per object, and the
    // suite moves about 10 MiB.
    conformance_with(16 * 1024, 16);
}

#[test]
fn conformance_with_default_options() {
    let defaults = StoredOptions::default();
    conformance_with(defaults.chunk_size, defaults.max_batch);
}

#[test]
fn keys_are_prefix_slash_index_and_missing_chunks_read_as_zeroes() {
    let Some(moto) = Moto::start(false) else { return };
    let raw = moto.raw();
    let p = prefix("layout");
    let backend = Stored::new(
        moto.open(&format!("{p}/disk")),
        64 * 4096,
        StoredOptions { chunk_size: 4096, max_batch: 16 },
    )
    .unwrap();
    backend.write_at(&[7u8; 4096], 2 * 4096).unwrap();
    backend.write_at(&[8u8; 10], 11 * 4096 + 5).unwrap();
    assert_eq!(raw.keys(&p), [format!("{p}/disk/11"), format!("{p}/disk/2")]);
    let mut buf = vec![1u8; 64 * 4096];
    backend.read_at(&mut buf, 0).unwrap();
    assert!(buf[..2 * 4096].iter().all(|&b| b == 0));
    assert!(buf[2 * 4096..3 * 4096].iter().all(|&b| b == 7));
    assert!(buf[3 * 4096..11 * 4096 + 5].iter().all(|&b| b == 0));
    assert!(buf[11 * 4096 + 5..11 * 4096 + 15].iter().all(|&b| b == 8));
    assert!(buf[11 * 4096 + 15..].iter().all(|&b| b == 0));

    // Without a prefix, the key is the index alone.
    let bare = moto.open("");
    bare.put(&[(3, &[1u8; 5][..])]).unwrap();
    assert_eq!(bare.key(3), "3");
    assert_eq!(bare.get(&[3, 4]).unwrap(), [Some(vec![1u8; 5]), None]);
    assert!(raw.keys("").contains(&"3".to_owned()));
}

#[test]
fn a_read_is_one_get_per_chunk_and_a_trim_one_bulk_delete() {
    let Some(moto) = Moto::start(false) else { return };
    let p = prefix("requests");
    let backend =
        Stored::new(moto.open(&p), 256 * 4096, StoredOptions { chunk_size: 4096, max_batch: 256 }).unwrap();
    backend.write_at(&vec![3u8; 100 * 4096], 0).unwrap();
    let gets = format!("GET /{BUCKET}/{p}/");
    let before = moto.requests(&gets, 0);
    let mut buf = vec![0u8; 200 * 4096];
    backend.read_at(&mut buf, 0).unwrap();
    assert_eq!(moto.requests(&gets, before + 200) - before, 200, "one GET per chunk, none repeated");

    let posts = format!("POST /{BUCKET}");
    let before = moto.requests(&posts, 0);
    backend.trim(0, 100 * 4096).unwrap();
    assert_eq!(
        moto.requests(&posts, before + 1) - before,
        1,
        "100 chunks deleted in one DeleteObjects request"
    );
    assert!(moto.raw().keys(&p).is_empty(), "trim deletes the objects");
}

#[test]
fn trim_deletes_the_objects_and_a_partial_trim_rewrites_its_chunk() {
    let Some(moto) = Moto::start(false) else { return };
    let raw = moto.raw();
    let p = prefix("trim");
    let backend =
        Stored::new(moto.open(&p), 10 * 4096, StoredOptions { chunk_size: 4096, max_batch: 4 }).unwrap();
    backend.write_at(&vec![9u8; 10 * 4096], 0).unwrap();
    assert_eq!(raw.keys(&p).len(), 10);
    backend.trim(4096, 6 * 4096 + 100).unwrap();
    // Chunks 1 to 6 are whole and deleted; 7 is rewritten with its first 100 bytes zeroed.
    let mut left: Vec<String> = [0, 7, 8, 9].iter().map(|c| format!("{p}/{c}")).collect();
    left.sort();
    assert_eq!(raw.keys(&p), left);
    let mut buf = vec![1u8; 10 * 4096];
    backend.read_at(&mut buf, 0).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 9));
    assert!(buf[4096..7 * 4096 + 100].iter().all(|&b| b == 0));
    assert!(buf[7 * 4096 + 100..].iter().all(|&b| b == 9));
    // Deleting what is not there is fine.
    backend.trim(4096, 4096).unwrap();
}

#[test]
fn a_chunk_of_the_wrong_size_planted_by_someone_else_is_invalid_data() {
    let Some(moto) = Moto::start(false) else { return };
    let p = prefix("planted");
    let backend =
        Stored::new(moto.open(&p), 8 * 4096, StoredOptions { chunk_size: 4096, max_batch: 16 }).unwrap();
    moto.raw().put(&format!("{p}/2"), vec![5u8; 100]);
    let err = backend.read_at(&mut [0u8; 10], 2 * 4096).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("chunk 2") && err.to_string().contains(BUCKET), "{err}");
}

#[test]
fn an_unreachable_server_fails_at_open_within_seconds() {
    // A port nothing listens on.
    let held = HeldPort::new();
    let port = held.port();
    let url = url::Url::parse(&format!(
        "s3://{BUCKET}/p?endpoint=http://127.0.0.1:{port}&access-key-id=a&secret-access-key=b"
    ))
    .unwrap();
    let started = Instant::now();
    let err = S3Store::open(&url).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused, "{err}");
}

#[test]
fn a_missing_bucket_is_not_found_at_open() {
    let Some(moto) = Moto::start(false) else { return };
    let url = moto.url("p", "").to_string().replace(BUCKET, "no-such-bucket");
    let err = S3Store::open(&url::Url::parse(&url).unwrap()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("no-such-bucket") && err.to_string().contains("create-bucket"), "{err}");
    // Creating a bucket that exists already is fine.
    drop(moto.open("p"));
    drop(moto.open("p"));
}

#[test]
fn a_bucket_is_created_in_the_region_the_url_names() {
    let Some(moto) = Moto::start(false) else { return };
    let url = moto.url("p", "&create-bucket=true").to_string().replace(BUCKET, "elsewhere");
    let url = url.replace("region=us-east-1", "region=eu-west-1");
    let store = S3Store::open(&url::Url::parse(&url).unwrap()).unwrap();
    store.put(&[(1, &[1u8; 3][..])]).unwrap();
    assert_eq!(store.get(&[1, 2]).unwrap(), [Some(vec![1u8; 3]), None]);
}

/// A server on a free loopback port that gives every connection to `serve`.
fn fake_server(serve: fn(TcpStream)) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve(stream));
        }
    });
    port
}

fn open_at(port: u16) -> io::Result<S3Store> {
    S3Store::open(
        &url::Url::parse(&format!(
            "s3://{BUCKET}/p?endpoint=http://127.0.0.1:{port}&access-key-id=a&secret-access-key=b"
        ))
        .unwrap(),
    )
}

#[test]
fn a_server_that_is_not_s3_is_refused_at_open() {
    // Answers 404 to everything, as some proxies do.
    let port = fake_server(|mut stream| {
        let mut buf = [0u8; 4096];
        while std::io::Read::read(&mut stream, &mut buf).is_ok_and(|n| n > 0) {
            let reply = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
            if std::io::Write::write_all(&mut stream, reply).is_err() {
                return;
            }
        }
    });
    let err = open_at(port).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("is it an S3 server"), "{err}");
}

#[test]
fn a_server_that_never_answers_fails_at_open_within_seconds() {
    // Accepts connections and reads requests, but never answers.
    let port = fake_server(|mut stream| {
        let mut buf = [0u8; 4096];
        while std::io::Read::read(&mut stream, &mut buf).is_ok_and(|n| n > 0) {}
    });
    let started = Instant::now();
    let err = open_at(port).unwrap_err();
    // OPEN_TIMEOUT, with room for a loaded machine: the point is that it does not wait forever.
    assert!(
        started.elapsed() < r3map_stores::s3::OPEN_TIMEOUT + Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
}

#[test]
fn wrong_credentials_are_permission_denied_at_open() {
    let Some(moto) = Moto::start(true) else { return };
    let err = S3Store::open(&moto.url("p", "")).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    let err = S3Store::open(&moto.url("p", "&create-bucket=true")).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    assert!(
        err.to_string().contains("creating bucket") && err.to_string().contains(&moto.endpoint()),
        "{err}"
    );
}

#[test]
fn the_store_works_again_after_the_server_restarts() {
    let Some(mut moto) = Moto::start(false) else { return };
    let p = prefix("restart");
    let store = moto.open(&p);
    store.put(&[(1, &[1u8; 8][..])]).unwrap();
    assert_eq!(store.get(&[1]).unwrap(), [Some(vec![1u8; 8])]);

    moto.restart();
    // Moto keeps nothing: the bucket is gone, which the store reports rather than reading zeroes.
    let started = Instant::now();
    let err = store.get(&[1]).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");

    // Once the bucket is back, the same store works again.
    drop(moto.open(&p));
    store.put(&[(1, &[2u8; 8][..]), (2, &[3u8; 8][..])]).unwrap();
    assert_eq!(store.get(&[1, 2, 3]).unwrap(), [Some(vec![2u8; 8]), Some(vec![3u8; 8]), None]);
    store.delete(&[1, 2]).unwrap();
    assert_eq!(store.get(&[1, 2]).unwrap(), [None, None]);
}

#[test]
fn a_call_in_flight_when_the_server_dies_fails_and_does_not_hang() {
    let Some(mut moto) = Moto::start(false) else { return };
    let p = prefix("inflight");
    let store = Arc::new(moto.open(&p));
    let data = vec![4u8; 4096];
    let batch: Vec<(u64, &[u8])> = (0..2000).map(|c| (c, data.as_slice())).collect();
    let writer = {
        let store = Arc::clone(&store);
        let batch: Vec<(u64, Vec<u8>)> = batch.iter().map(|(c, d)| (*c, d.to_vec())).collect();
        std::thread::spawn(move || {
            let started = Instant::now();
            let refs: Vec<(u64, &[u8])> = batch.iter().map(|(c, d)| (*c, d.as_slice())).collect();
            let result = store.put(&refs);
            (result, started.elapsed())
        })
    };
    // Killed once the batch has begun: 2000 objects take moto seconds.
    moto.server.wait_for_lines(&format!("PUT /{BUCKET}/{p}/"), 1);
    moto.stop();
    let (result, took) = writer.join().unwrap();
    assert!(result.is_err(), "a batch cut by the server's death cannot have succeeded");
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let started = Instant::now();
    assert!(store.get(&[0]).is_err());
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
}

#[test]
fn describe_names_the_bucket_server_and_prefix_but_no_secret() {
    let Some(moto) = Moto::start(false) else { return };
    let store = moto.open("some/prefix");
    let d = store.describe();
    assert!(d.contains(BUCKET) && d.contains(&moto.endpoint()) && d.contains("\"some/prefix\""), "{d}");
    assert!(!d.contains("s3cr3t") && !d.contains("AKTEST"), "{d}");
}
