//! The `Seeder` service: track, write through the `Backend` service, sync, close.

use std::io;
use std::sync::{Arc, Mutex};

use r3map_core::{Backend, Chunk, Memory, Seeder, SharedBackend, Tracked};
use r3map_grpc::proto::migration::seeder_client::SeederClient;
use r3map_grpc::proto::migration::{ReadAtArgs, SyncArgs, TrackArgs};
use r3map_grpc::{GrpcBackend, GrpcClientOptions, GrpcExport, GrpcSeeder, GrpcServer};
use tonic::Code;

use crate::{any_port, http, runtime};

const CHUNK: u64 = 4096;
const SIZE: u64 = 64 * CHUNK + 100;

fn tracked_server() -> (Arc<Tracked<Memory>>, GrpcServer) {
    let tracked = Arc::new(Tracked::new(Memory::new(SIZE), CHUNK).unwrap());
    let backend: SharedBackend = tracked.clone();
    let export = GrpcExport { seeder: Some(tracked.clone()), ..GrpcExport::new(backend) };
    (tracked, GrpcServer::start(any_port(), export).unwrap())
}

#[test]
fn track_write_sync_close() {
    let (_tracked, server) = tracked_server();
    let endpoint = http(&server);
    let seeder = GrpcSeeder::connect(&endpoint, CHUNK, GrpcClientOptions::default()).unwrap();
    let backend = GrpcBackend::connect(&endpoint, SIZE, GrpcClientOptions::default()).unwrap();
    assert_eq!(seeder.chunk_size(), CHUNK);

    backend.write_at(&[1u8; 10], 0).unwrap(); // before track: not recorded
    seeder.track().unwrap();
    backend.write_at(&[2u8; 10], 5 * CHUNK + 7).unwrap();
    backend.write_at(&[3u8; 2], 2 * CHUNK - 1).unwrap(); // crosses into chunk 2
    backend.write_at(&[4u8; 50], 64 * CHUNK).unwrap(); // the short tail chunk
    assert_eq!(seeder.sync().unwrap(), vec![Chunk(1), Chunk(2), Chunk(5), Chunk(64)]);
    assert_eq!(seeder.sync().unwrap(), vec![], "sync stops tracking and clears");

    // The source's data, read through the Seeder service.
    let source = seeder.source(SIZE);
    assert!(source.capabilities().read_only);
    let mut buf = [0u8; 10];
    source.read_at(&mut buf, 5 * CHUNK + 7).unwrap();
    assert_eq!(buf, [2u8; 10]);
    assert_eq!(source.read_at(&mut buf, SIZE - 5).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    assert_eq!(source.write_at(&buf, 0).unwrap_err().kind(), io::ErrorKind::PermissionDenied);
    seeder.close().unwrap();
}

#[test]
fn sync_answers_byte_offsets_on_the_wire() {
    let (tracked, server) = tracked_server();
    tracked.track();
    tracked.write_at(&[1], 3 * CHUNK).unwrap();
    tracked.write_at(&[1], 10 * CHUNK + 5).unwrap();
    runtime().block_on(async {
        let mut raw = SeederClient::connect(http(&server)).await.unwrap();
        let reply = raw.sync(SyncArgs {}).await.unwrap().into_inner();
        assert_eq!(reply.dirty_offsets, vec![3 * 4096, 10 * 4096]);
        raw.track(TrackArgs {}).await.unwrap();
        let read = raw.read_at(ReadAtArgs { length: 1, off: 3 * 4096 }).await.unwrap().into_inner();
        assert_eq!((read.n, &read.p[..]), (1, &[1u8][..]));
    });
}

#[test]
fn offsets_that_are_not_chunk_multiples_are_refused() {
    let (tracked, server) = tracked_server();
    tracked.track();
    tracked.write_at(&[1], 3 * CHUNK).unwrap();
    // The client believes in chunks twice as large: offset 3 × 4096 is not one of its chunks.
    let seeder = GrpcSeeder::connect(&http(&server), 2 * CHUNK, GrpcClientOptions::default()).unwrap();
    let err = seeder.sync().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    assert!(err.to_string().contains("not a multiple of the chunk size 8192"), "{err}");
    let err = GrpcSeeder::connect(&http(&server), 0, GrpcClientOptions::default()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

/// A seeder whose calls fail, and which records what was called.
#[derive(Default)]
struct Refusing {
    calls: Mutex<Vec<&'static str>>,
}

impl Seeder for Refusing {
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn track(&self) -> io::Result<()> {
        self.calls.lock().unwrap().push("track");
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "the application may not be tracked"))
    }
    fn sync(&self) -> io::Result<Vec<Chunk>> {
        self.calls.lock().unwrap().push("sync");
        Err(io::Error::new(io::ErrorKind::TimedOut, "the application did not suspend in time"))
    }
    fn close(&self) -> io::Result<()> {
        self.calls.lock().unwrap().push("close");
        Err(io::Error::new(io::ErrorKind::Unsupported, "closing is not supported"))
    }
}

#[test]
fn seeder_errors_reach_the_client() {
    let refusing = Arc::new(Refusing::default());
    let export =
        GrpcExport { seeder: Some(refusing.clone()), ..GrpcExport::new(Arc::new(Memory::new(SIZE))) };
    let server = GrpcServer::start(any_port(), export).unwrap();
    let seeder = GrpcSeeder::connect(&http(&server), CHUNK, GrpcClientOptions::default()).unwrap();
    let err = seeder.track().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    assert!(err.to_string().contains("the application may not be tracked"), "{err}");
    assert_eq!(seeder.sync().unwrap_err().kind(), io::ErrorKind::TimedOut);
    assert_eq!(seeder.close().unwrap_err().kind(), io::ErrorKind::Unsupported);
    assert_eq!(*refusing.calls.lock().unwrap(), ["track", "sync", "close"]);
}

#[test]
fn without_a_seeder_the_service_is_not_mounted() {
    let server = GrpcServer::start(any_port(), GrpcExport::new(Arc::new(Memory::new(SIZE)))).unwrap();
    let seeder = GrpcSeeder::connect(&http(&server), CHUNK, GrpcClientOptions::default()).unwrap();
    let err = seeder.track().unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
    runtime().block_on(async {
        let mut raw = SeederClient::connect(http(&server)).await.unwrap();
        assert_eq!(raw.track(TrackArgs {}).await.unwrap_err().code(), Code::Unimplemented);
    });
}
