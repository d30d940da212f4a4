//! Property tests of the managed stack (Synced + Puller + Pusher) against a `Vec<u8>` model,
//! with the background pull and push running while the application reads and writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use r3map_core::backend::Backend;
use r3map_core::layers::fault::{FaultConfig, Ops};
use r3map_core::pipeline::puller::{Puller, PullerOptions};
use r3map_core::pipeline::pusher::{Pusher, PusherOptions};
use r3map_core::pipeline::synced::{Synced, SyncedOptions};
use r3map_core::{Delay, FaultInject, Memory};

#[derive(Debug, Clone)]
enum Op {
    Read { at: f64, len: usize },
    Write { at: f64, len: usize, seed: u64 },
    Trim { at: f64, len: usize },
    Flush,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0.0..1.0f64, 0usize..40_000).prop_map(|(at, len)| Op::Read { at, len }),
        4 => (0.0..1.0f64, 0usize..40_000, any::<u64>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        1 => (0.0..1.0f64, 0usize..20_000).prop_map(|(at, len)| Op::Trim { at, len }),
        1 => Just(Op::Flush),
    ]
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

/// Offset and clipped length of an op in a resource of `size` bytes.
fn place(size: usize, at: f64, len: usize) -> (usize, usize) {
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
    let off = ((size as f64) * at) as usize;
    let off = off.min(size);
    (off, len.min(size - off))
}

struct Stack {
    remote: Arc<Memory>,
    synced: Arc<Synced>,
    puller: Puller,
    pusher: Pusher,
}

fn stack(
    data: &[u8],
    chunk_size: u64,
    request_chunks: u64,
    depth: usize,
    latency_us: u64,
    fault: Option<FaultConfig>,
) -> Stack {
    let remote = Arc::new(Memory::from_bytes(data));
    let delayed = Delay::new(remote.clone(), Duration::from_micros(latency_us));
    let faulty = FaultInject::new(delayed, fault.unwrap_or_default());
    let local = Arc::new(Memory::with_page_size(remote.size(), 4096).unwrap());
    let opts = SyncedOptions { chunk_size, max_request: chunk_size * request_chunks, on_chunk_local: None };
    let synced = Arc::new(Synced::new(Arc::new(faulty), local, opts).unwrap());
    let puller = Puller::start(
        Arc::clone(&synced),
        PullerOptions {
            depth,
            request_size: chunk_size * request_chunks,
            max_attempts: 1000,
            retry_backoff: Duration::from_micros(100),
            ..PullerOptions::default()
        },
    )
    .unwrap();
    let pusher = Pusher::start(
        Arc::clone(&synced),
        PusherOptions {
            interval: Duration::from_millis(1),
            depth,
            request_size: chunk_size * request_chunks,
            retry_backoff: Duration::from_micros(100),
        },
    )
    .unwrap();
    Stack { remote, synced, puller, pusher }
}

fn contents(b: &dyn Backend) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(b.size()).unwrap()];
    b.read_at(&mut v, 0).unwrap();
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every read returns what the model holds; after flush and drain the remote equals the model.
    #[test]
    fn managed_stack_matches_the_model(
        size in 1usize..300_000,
        chunk_size in prop::sample::select(vec![512u64, 4096, 16_384, 65_536]),
        request_chunks in 1u64..6,
        depth in 1usize..5,
        latency_us in 0u64..300,
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut model = pattern(seed, size);
        let s = stack(&model, chunk_size, request_chunks, depth, latency_us, None);
        for op in ops {
            match op {
                Op::Read { at, len } => {
                    let (off, len) = place(size, at, len);
                    let mut buf = vec![0u8; len];
                    s.pusher.read_at(&mut buf, off as u64).unwrap();
                    prop_assert_eq!(&buf[..], &model[off..off + len], "read {} at {}", len, off);
                }
                Op::Write { at, len, seed } => {
                    let (off, len) = place(size, at, len);
                    let data = pattern(seed, len);
                    s.pusher.write_at(&data, off as u64).unwrap();
                    model[off..off + len].copy_from_slice(&data);
                }
                Op::Trim { at, len } => {
                    let (off, len) = place(size, at, len);
                    s.pusher.trim(off as u64, len as u64).unwrap();
                    model[off..off + len].fill(0);
                }
                Op::Flush => {
                    s.pusher.flush().unwrap();
                }
            }
        }
        s.pusher.flush().unwrap();
        s.puller.wait().unwrap();
        prop_assert!(s.synced.is_complete());
        prop_assert_eq!(contents(&*s.synced), model.clone());
        prop_assert!(contents(&*s.remote) == model, "the remote differs from the model after flush");
    }

    /// With a remote that fails some calls, failed operations leave no trace, successful reads are
    /// right, and retried flushes eventually push everything.
    #[test]
    fn a_flaky_remote_loses_nothing(
        size in 1usize..200_000,
        chunk_size in prop::sample::select(vec![4096u64, 16_384]),
        failure_seed in any::<u64>(),
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let mut model = pattern(seed, size);
        let fault = FaultConfig { probability: 0.2, ops: Ops::READ | Ops::WRITE, seed: failure_seed, ..FaultConfig::default() };
        let s = stack(&model, chunk_size, 3, 2, 0, Some(fault));
        for op in ops {
            match op {
                Op::Read { at, len } => {
                    let (off, len) = place(size, at, len);
                    let mut buf = vec![0u8; len];
                    if s.pusher.read_at(&mut buf, off as u64).is_ok() {
                        prop_assert_eq!(&buf[..], &model[off..off + len]);
                    }
                }
                Op::Write { at, len, seed } => {
                    let (off, len) = place(size, at, len);
                    let data = pattern(seed, len);
                    if s.pusher.write_at(&data, off as u64).is_ok() {
                        model[off..off + len].copy_from_slice(&data);
                    }
                }
                Op::Trim { at, len } => {
                    let (off, len) = place(size, at, len);
                    if s.pusher.trim(off as u64, len as u64).is_ok() {
                        model[off..off + len].fill(0);
                    }
                }
                // A failed flush keeps everything dirty; it is retried below.
                Op::Flush => drop(s.pusher.flush()),
            }
        }
        let mut attempts = 0;
        while s.pusher.flush().is_err() {
            attempts += 1;
            prop_assert!(attempts < 1000, "flush never succeeded");
        }
        s.puller.wait().unwrap();
        prop_assert!(contents(&*s.remote) == model, "the remote differs from the model after flush");
    }
}

/// Polls `cond` until it holds; a minute without is a hang.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "still waiting for {what} after a minute");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Writers keep rewriting the same chunks while the pusher pushes continuously: after the final
/// flush the remote holds the last version of every chunk.
#[test]
fn writes_racing_pushes_are_never_lost() {
    let size = 64 * 4096;
    // Remote calls take 1 ms, so pushes are in flight most of the time the writers run.
    let s = stack(&vec![0u8; size], 4096, 4, 4, 1000, None);
    let mut last = vec![0u8; size];
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let pusher = &s.pusher;
                scope.spawn(move || {
                    let mut mine = Vec::new();
                    for round in 0..300u64 {
                        // Each thread owns chunks t, t+4, ...; it rewrites a few of them each round.
                        let chunk = usize::try_from(t + 4 * (round % 16)).unwrap();
                        let data = pattern(t << 32 | round, 4096);
                        pusher.write_at(&data, (chunk * 4096) as u64).unwrap();
                        mine.push((chunk, data));
                        if round % 100 == 50 {
                            // However the threads are scheduled, background cycles end while
                            // the writers are still at it.
                            let seen = pusher.progress().cycles;
                            wait_until("a background push cycle", || pusher.progress().cycles > seen);
                        }
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    mine
                })
            })
            .collect();
        for w in workers {
            for (chunk, data) in w.join().unwrap() {
                last[chunk * 4096..(chunk + 1) * 4096].copy_from_slice(&data);
            }
        }
    });
    s.pusher.flush().unwrap();
    assert!(s.pusher.progress().cycles > 1, "the pusher should have run during the writes");
    assert!(contents(&*s.remote) == last, "a write racing a push was lost");
}
