//! What the mount crate's benchmarks share: the data they serve and check, warming memory up,
//! percentiles and how durations are printed.

// Each benchmark uses its own part of this module.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use r3map_core::{Backend as _, Memory};

const MIB: u64 = 1024 * 1024;

/// The tag in the first 8 bytes of MiB `mib` of generation `generation` of the data, so that a
/// read checks it got the MiB it asked for, as last written.
pub(crate) fn tag(generation: u64, mib: u64) -> u64 {
    generation << 48 | mib
}

/// The tag `buf` (a MiB, or its start) carries.
pub(crate) fn tag_of(buf: &[u8]) -> u64 {
    u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"))
}

/// The contents: one random MiB, repeated, each copy tagged (see [`tag`]).
pub(crate) struct Data {
    template: Vec<u8>,
}

impl Data {
    pub(crate) fn new() -> Self {
        let mut rng = fastrand::Rng::with_seed(42);
        Self { template: (0..MIB).map(|_| rng.u8(..)).collect() }
    }

    /// MiB `mib` of generation `generation` into `buf` (1 MiB).
    pub(crate) fn fill(&self, buf: &mut [u8], generation: u64, mib: u64) {
        buf.copy_from_slice(&self.template);
        buf[..8].copy_from_slice(&tag(generation, mib).to_le_bytes());
    }

    /// The `len` bytes at `off` (not in a tag).
    pub(crate) fn bytes_at(&self, off: u64, len: usize) -> &[u8] {
        let start = (off % MIB) as usize;
        assert!(start >= 8, "a tag would differ");
        &self.template[start..start + len]
    }
}

/// Touches and frees `size` bytes, so that later allocations get memory the hypervisor has already
/// backed: on a virtual machine the first touch of guest memory costs far more than the kernel's
/// page fault, and would land on whichever measurement runs first.
pub(crate) fn warm_up(size: u64) {
    let m = Memory::new(size);
    let ones = vec![1u8; MIB as usize];
    let mut off = 0;
    while off < size {
        m.write_at(&ones, off).expect("touch memory");
        off += MIB;
    }
}

/// A `Memory` remote of `size` bytes holding generation `generation` of the data.
pub(crate) fn memory_remote(data: &Data, size: u64, generation: u64) -> Arc<Memory> {
    let m = Arc::new(Memory::new(size));
    let mut buf = vec![0u8; MIB as usize];
    for mib in 0..size / MIB {
        data.fill(&mut buf, generation, mib);
        m.write_at(&buf, mib * MIB).expect("fill the remote");
    }
    m
}

/// The `p` quantile (nearest rank) of `samples`.
pub(crate) fn quantile(samples: &[Duration], p: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort_unstable();
    let rank = ((p * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// `420 µs`, `71.46 ms`, `3.17 s`.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.0} µs", d.as_secs_f64() * 1e6)
    } else if d < Duration::from_secs(1) {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}
