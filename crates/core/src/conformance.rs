//! The conformance suite: the [`Backend`] contract as executable checks.
//!
//! Every backend and every layer stack runs it: `conformance::run(&|size| make(size))`, where the
//! factory returns a fresh backend of `size` bytes that reads as zeroes. Failures panic with the
//! check's name, so this is meant for tests (and for crates adding backends of their own).

// Test support: sizes here are a few MiB, so `u64 as usize` cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::io;
use std::sync::Arc;

use crate::backend::{Backend, SharedBackend};

/// Size the suite asks for: not a multiple of any power of two above 1, so tails get exercised.
pub const SIZE: u64 = 3 * 1024 * 1024 + 4099;

/// Runs every check against fresh backends from `make`.
///
/// # Panics
/// On the first check that fails, naming it.
pub fn run(make: &dyn Fn(u64) -> SharedBackend) {
    size_is_reported(make(SIZE).as_ref());
    fresh_reads_zero(make(SIZE).as_ref());
    writes_read_back(make(SIZE).as_ref());
    out_of_range_is_rejected(make(SIZE).as_ref());
    read_many_reads_each_range(make(SIZE).as_ref());
    empty_io(make(SIZE).as_ref());
    optional_verbs(make(SIZE).as_ref());
    concurrent_disjoint_writes(&make(SIZE));
    random_ops_match_model(make(SIZE).as_ref(), 0x5eed);
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(1..=255)).collect()
}

fn read(b: &dyn Backend, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; len];
    b.read_at(&mut buf, off).unwrap_or_else(|e| panic!("read {len} bytes at {off} failed: {e}"));
    buf
}

fn assert_model(b: &dyn Backend, model: &[u8], check: &str) {
    let got = read(b, 0, model.len());
    if let Some(i) = got.iter().zip(model).position(|(a, m)| a != m) {
        panic!("{check}: byte {i} reads {} but {} was written", got[i], model[i]);
    }
}

fn read_many_reads_each_range(b: &dyn Backend) {
    let size = b.size();
    let data = pattern(77, size as usize);
    b.write_at(&data, 0).expect("read_many_reads_each_range: write");
    let ranges: [(u64, usize); 5] =
        [(size - 10, 10), (0, 4096), (70_000, 1024 * 1024 + 3), (5, 0), (2 * 1024 * 1024, 65_536)];
    let mut bufs: Vec<Vec<u8>> = ranges.iter().map(|&(_, len)| vec![0xAA; len]).collect();
    let mut reads: Vec<(u64, &mut [u8])> =
        ranges.iter().zip(bufs.iter_mut()).map(|(&(off, _), buf)| (off, buf.as_mut_slice())).collect();
    b.read_many(&mut reads).unwrap_or_else(|e| panic!("read_many_reads_each_range: {e}"));
    for (&(off, len), buf) in ranges.iter().zip(&bufs) {
        assert!(
            buf[..] == data[off as usize..off as usize + len],
            "read_many_reads_each_range: the read of {len} at {off} differs"
        );
    }
    let mut ok = [0u8; 16];
    let mut past = [0u8; 16];
    let err = b
        .read_many(&mut [(0, &mut ok[..]), (size - 8, &mut past[..])])
        .expect_err("read_many_reads_each_range: a range past the end must fail");
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "read_many_reads_each_range: {err}");
}

fn size_is_reported(b: &dyn Backend) {
    assert_eq!(b.size(), SIZE, "size_is_reported");
}

fn fresh_reads_zero(b: &dyn Backend) {
    assert_model(b, &vec![0; b.size() as usize], "fresh_reads_zero");
}

fn writes_read_back(b: &dyn Backend) {
    let size = b.size();
    let mut model = vec![0u8; size as usize];
    let cases: [(u64, usize); 9] = [
        (0, 1),
        (1, 4095),
        (4095, 2),
        (65_530, 70_000),
        (1024 * 1024, 1024 * 1024),
        (size - 1, 1),
        (size - 4099, 4099),
        (size - 200_000, 150_000),
        (7, 2 * 1024 * 1024 + 13),
    ];
    for (i, (off, len)) in cases.into_iter().enumerate() {
        let data = pattern(i as u64, len);
        b.write_at(&data, off).unwrap_or_else(|e| panic!("write {len} at {off} failed: {e}"));
        model[off as usize..off as usize + len].copy_from_slice(&data);
        assert_eq!(read(b, off, len), data, "writes_read_back: case {i} read back differs");
    }
    b.flush().expect("flush after writes");
    assert_model(b, &model, "writes_read_back");
}

fn out_of_range_is_rejected(b: &dyn Backend) {
    let size = b.size();
    let before = read(b, 0, size as usize);
    let cases = [(size, 1usize), (size - 1, 2), (u64::MAX, 1), (u64::MAX - 1, 4096), (size + 4096, 0)];
    for (off, len) in cases {
        let mut buf = vec![0u8; len];
        let err = b.read_at(&mut buf, off).expect_err("a read past the end must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "read at {off}+{len}: {err}");
        let err = b.write_at(&vec![9u8; len], off).expect_err("a write past the end must fail");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "write at {off}+{len}: {err}");
    }
    assert_model(b, &before, "out_of_range_is_rejected (nothing may change)");
}

fn empty_io(b: &dyn Backend) {
    let size = b.size();
    for off in [0, 1, size] {
        b.read_at(&mut [], off).expect("an empty read inside the size succeeds");
        b.write_at(&[], off).expect("an empty write inside the size succeeds");
    }
}

fn optional_verbs(b: &dyn Backend) {
    let caps = b.capabilities();
    let size = b.size();
    let mut model = pattern(99, size as usize);
    b.write_at(&model, 0).expect("fill");
    if caps.trim {
        for (off, len) in [(4096u64, 8192u64), (100, 70_000), (size - 5000, 5000)] {
            b.trim(off, len).unwrap_or_else(|e| panic!("trim {off}+{len}: {e}"));
            model[off as usize..(off + len) as usize].fill(0);
        }
        assert_model(b, &model, "trim zeroes the range");
        assert_eq!(b.trim(size, 1).expect_err("trim past end").kind(), io::ErrorKind::InvalidInput);
    } else {
        assert_eq!(b.trim(0, 1).expect_err("trim without capability").kind(), io::ErrorKind::Unsupported);
    }
    if caps.write_zeroes {
        for (off, len) in [(300_000u64, 1u64), (1_000_000, 300_000)] {
            b.write_zeroes(off, len).unwrap_or_else(|e| panic!("write_zeroes {off}+{len}: {e}"));
            model[off as usize..(off + len) as usize].fill(0);
        }
        assert_model(b, &model, "write_zeroes zeroes the range");
        assert_eq!(b.write_zeroes(size, 1).expect_err("past end").kind(), io::ErrorKind::InvalidInput);
    }
    if caps.extents {
        for (off, len) in [(0u64, size), (5000, 1_000_000), (size - 1, 1)] {
            let extents = b.extents(off, len).unwrap_or_else(|e| panic!("extents {off}+{len}: {e}"));
            assert_eq!(extents.iter().map(|e| e.len).sum::<u64>(), len, "extents cover the range exactly");
            let mut pos = off;
            for e in extents {
                if e.hole {
                    let start = pos as usize;
                    let end = (pos + e.len) as usize;
                    assert!(
                        model[start..end].iter().all(|&x| x == 0),
                        "a hole at {pos}+{} holds data",
                        e.len
                    );
                }
                pos += e.len;
            }
        }
    }
    b.flush().expect("flush");
}

fn concurrent_disjoint_writes(b: &SharedBackend) {
    let size = b.size();
    let threads = 4u64;
    let span = size / threads;
    std::thread::scope(|s| {
        for t in 0..threads {
            let b = Arc::clone(b);
            s.spawn(move || {
                let mut off = t * span;
                let end = off + span;
                let mut i = 0;
                while off < end {
                    let len = (((i * 7919) % 20_000) + 1).min(end - off);
                    let data = pattern(t * 1000 + i, len as usize);
                    b.write_at(&data, off).expect("concurrent write");
                    assert_eq!(read(b.as_ref(), off, len as usize), data, "concurrent read back");
                    off += len;
                    i += 1;
                }
            });
        }
    });
}

fn random_ops_match_model(b: &dyn Backend, seed: u64) {
    let size = b.size();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut model = read(b, 0, size as usize);
    for i in 0..300 {
        let off = rng.u64(0..size);
        let len = rng.u64(0..=(size - off).min(200_000));
        match rng.u8(0..10) {
            0..=4 => {
                let data = pattern(seed ^ i, len as usize);
                b.write_at(&data, off).expect("random write");
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5..=8 => {
                assert_eq!(
                    read(b, off, len as usize),
                    model[off as usize..(off + len) as usize],
                    "random_ops_match_model: read {len} at {off} (op {i})"
                );
            }
            _ => b.flush().expect("random flush"),
        }
    }
    assert_model(b, &model, "random_ops_match_model");
}
