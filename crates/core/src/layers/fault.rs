//! Injected I/O errors, for testing how callers cope with a backend that fails.
//!
//! [`FaultInject`] counts the calls of the kinds selected by [`FaultConfig::ops`] and fails a call
//! when any of these holds:
//! - failing is forced on with [`FaultInject::set_failing`] (a server that went away);
//! - [`FaultConfig::fail_after`] is `Some(n)` and `n` matching calls have already been made;
//! - a draw from a seeded random generator falls below [`FaultConfig::probability`] (every
//!   matching call draws once, so a given seed fails the same calls on every run of a
//!   single-threaded test).
//!
//! A failed call returns an error of [`FaultConfig::kind`] saying "injected fault on write at
//! offset 4096" (or on read, flush, trim, write_zeroes, extents) **without calling the inner
//! backend**: a failed write changes nothing and a failed read leaves the buffer as it was.
//!
//! It does not fail `size` or `capabilities`, corrupt data, return short reads, or delay calls
//! (see [`Delay`](super::Delay) for that).

use std::io;
use std::ops::BitOr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::backend::{Backend, Extent};

/// A set of operation kinds that faults apply to. Combine with `|`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ops(u8);

impl Ops {
    /// No operation: nothing ever fails.
    pub const NONE: Self = Self(0);
    /// `read_at`.
    pub const READ: Self = Self(1);
    /// `write_at`.
    pub const WRITE: Self = Self(1 << 1);
    /// `flush`.
    pub const FLUSH: Self = Self(1 << 2);
    /// `trim` and `write_zeroes`.
    pub const ZEROES: Self = Self(1 << 3);
    /// `extents`.
    pub const EXTENTS: Self = Self(1 << 4);
    /// Every operation that can fail.
    pub const ALL: Self = Self(0b1_1111);

    /// The operations in either set.
    #[must_use]
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether every operation of `other` is in this set.
    #[must_use]
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl Default for Ops {
    fn default() -> Self {
        Self::ALL
    }
}

impl BitOr for Ops {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

/// When and how [`FaultInject`] fails calls. The default fails nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    /// Matching calls after the first `n` fail (`Some(0)`: every matching call fails).
    pub fail_after: Option<u64>,
    /// Probability in `0.0..=1.0` that a matching call fails (clamped; NaN counts as 0).
    pub probability: f64,
    /// Which operations are affected (default: all).
    pub ops: Ops,
    /// Kind of the injected errors (default: `Other`).
    pub kind: io::ErrorKind,
    /// Seed of the generator `probability` draws from.
    pub seed: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        Self { fail_after: None, probability: 0.0, ops: Ops::ALL, kind: io::ErrorKind::Other, seed: 0x5eed }
    }
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Extents,
}

impl Op {
    fn set(self) -> Ops {
        match self {
            Op::Read => Ops::READ,
            Op::Write => Ops::WRITE,
            Op::Flush => Ops::FLUSH,
            Op::Trim | Op::WriteZeroes => Ops::ZEROES,
            Op::Extents => Ops::EXTENTS,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Extents => "extents",
        }
    }
}

/// Fails selected calls on purpose; see the [module documentation](self).
pub struct FaultInject<B> {
    inner: B,
    config: FaultConfig,
    rng: Mutex<fastrand::Rng>,
    calls: AtomicU64,
    failures: AtomicU64,
    failing: AtomicBool,
}

impl<B: Backend> FaultInject<B> {
    /// Wraps `inner`, failing calls as `config` says.
    #[must_use]
    pub fn new(inner: B, mut config: FaultConfig) -> Self {
        config.probability =
            if config.probability.is_nan() { 0.0 } else { config.probability.clamp(0.0, 1.0) };
        Self {
            inner,
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            config,
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        }
    }

    /// Counts the call and decides whether it fails.
    fn check(&self, op: Op, off: Option<u64>) -> io::Result<()> {
        if !self.config.ops.contains(op.set()) {
            return Ok(());
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let mut fail = self.failing.load(Ordering::SeqCst);
        if let Some(after) = self.config.fail_after {
            fail |= n > after;
        }
        if self.config.probability > 0.0 {
            let draw = self.rng.lock().expect("fault rng lock").f64();
            fail |= draw < self.config.probability;
        }
        if !fail {
            return Ok(());
        }
        self.failures.fetch_add(1, Ordering::SeqCst);
        let msg = match off {
            Some(off) => format!("injected fault on {} at offset {off}", op.name()),
            None => format!("injected fault on {}", op.name()),
        };
        Err(io::Error::new(self.config.kind, msg))
    }
}

impl<B> FaultInject<B> {
    /// Forces every matching call to fail (`true`) or goes back to the configured rules (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// Whether failing is forced on.
    #[must_use]
    pub fn is_failing(&self) -> bool {
        self.failing.load(Ordering::SeqCst)
    }

    /// Number of matching calls so far (calls of operations not in [`FaultConfig::ops`] are not
    /// counted); `fail_after` compares against it.
    #[must_use]
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Number of calls failed on purpose so far.
    #[must_use]
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// Starts over: zeroes the counters, turns forced failing off and reseeds the generator.
    pub fn reset(&self) {
        *self.rng.lock().expect("fault rng lock") = fastrand::Rng::with_seed(self.config.seed);
        self.calls.store(0, Ordering::SeqCst);
        self.failures.store(0, Ordering::SeqCst);
        self.failing.store(false, Ordering::SeqCst);
    }

    /// The configuration (with `probability` clamped).
    #[must_use]
    pub fn config(&self) -> &FaultConfig {
        &self.config
    }
}

crate::impl_layer!(FaultInject { config, calls = calls(), failures = failures(), failing = is_failing() });

impl<B: Backend> Backend for FaultInject<B> {
    crate::forward_backend!(inner, except read_at, write_at, flush, trim, write_zeroes, extents);

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.check(Op::Read, Some(off))?;
        self.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.check(Op::Write, Some(off))?;
        self.inner.write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.check(Op::Flush, None)?;
        self.inner.flush()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.check(Op::Trim, Some(off))?;
        self.inner.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.check(Op::WriteZeroes, Some(off))?;
        self.inner.write_zeroes(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.check(Op::Extents, Some(off))?;
        self.inner.extents(off, len)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::SharedBackend;
    use crate::backends::Memory;
    use crate::conformance;

    fn faulty(config: FaultConfig) -> FaultInject<Memory> {
        FaultInject::new(Memory::new(8192), config)
    }

    #[test]
    fn conformance_without_faults() {
        conformance::run(&|size| -> SharedBackend {
            Arc::new(FaultInject::new(Memory::new(size), FaultConfig::default()))
        });
    }

    #[test]
    fn fail_after_fails_calls_past_the_limit() {
        let f = faulty(FaultConfig { fail_after: Some(3), ..FaultConfig::default() });
        for _ in 0..3 {
            f.read_at(&mut [0u8; 4], 0).unwrap();
        }
        let err = f.write_at(&[1u8; 4], 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::Other);
        assert_eq!(err.to_string(), "injected fault on write at offset 4096");
        let err = f.flush().unwrap_err();
        assert_eq!(err.to_string(), "injected fault on flush");
        assert_eq!((f.calls(), f.failures()), (5, 2));
        f.reset();
        assert_eq!((f.calls(), f.failures()), (0, 0));
        f.read_at(&mut [0u8; 4], 0).unwrap();
    }

    #[test]
    fn probability_zero_never_fails_and_one_always_fails() {
        let never = faulty(FaultConfig { probability: 0.0, ..FaultConfig::default() });
        for i in 0..1000 {
            never.write_at(&[1], i).unwrap();
        }
        assert_eq!((never.calls(), never.failures()), (1000, 0));

        let always = faulty(FaultConfig {
            probability: 1.0,
            kind: io::ErrorKind::ConnectionReset,
            ..FaultConfig::default()
        });
        for i in 0..1000 {
            let err = always.read_at(&mut [0], i).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        }
        assert_eq!(always.failures(), 1000);
    }

    #[test]
    fn probability_is_seeded_and_roughly_right() {
        let config = FaultConfig { probability: 0.3, seed: 42, ..FaultConfig::default() };
        let pattern = |f: &FaultInject<Memory>| -> Vec<bool> {
            (0..1000).map(|i| f.read_at(&mut [0], i).is_err()).collect()
        };
        let a = faulty(config.clone());
        let first = pattern(&a);
        let failed = first.iter().filter(|&&x| x).count();
        assert!((200..400).contains(&failed), "{failed} of 1000 failed at p = 0.3");
        assert_eq!(pattern(&faulty(config)), first, "same seed, same faults");
        a.reset();
        assert_eq!(pattern(&a), first, "reset reseeds");
        // Out-of-range probabilities are clamped.
        let clamped = faulty(FaultConfig { probability: 7.0, ..FaultConfig::default() });
        assert!((clamped.config().probability - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn set_failing_toggles() {
        let f = faulty(FaultConfig::default());
        f.write_at(&[1], 0).unwrap();
        f.set_failing(true);
        assert!(f.is_failing());
        assert!(f.read_at(&mut [0], 0).is_err());
        assert!(f.trim(0, 1).is_err());
        assert_eq!(f.extents(0, 1).unwrap_err().to_string(), "injected fault on extents at offset 0");
        f.set_failing(false);
        f.read_at(&mut [0], 0).unwrap();
        assert_eq!(f.failures(), 3);
        f.set_failing(true);
        f.reset();
        assert!(!f.is_failing(), "reset turns forced failing off");
    }

    #[test]
    fn only_selected_ops_fail() {
        let f = faulty(FaultConfig { ops: Ops::WRITE | Ops::ZEROES, ..FaultConfig::default() });
        f.set_failing(true);
        f.read_at(&mut [0], 0).unwrap();
        f.flush().unwrap();
        f.extents(0, 10).unwrap();
        assert!(f.write_at(&[1], 0).is_err());
        assert!(f.trim(0, 1).is_err());
        assert_eq!(
            f.write_zeroes(5, 1).unwrap_err().to_string(),
            "injected fault on write_zeroes at offset 5"
        );
        assert_eq!(f.calls(), 3, "only matching calls are counted");
        assert!(Ops::ALL.contains(Ops::READ | Ops::EXTENTS));
        assert!(!Ops::NONE.contains(Ops::READ));
        assert_eq!(Ops::default(), Ops::ALL);
    }

    #[test]
    fn failed_writes_do_not_reach_the_inner_backend() {
        let f = faulty(FaultConfig { ops: Ops::WRITE | Ops::ZEROES, ..FaultConfig::default() });
        f.write_at(&[7u8; 100], 0).unwrap();
        f.set_failing(true);
        assert!(f.write_at(&[9u8; 100], 0).is_err());
        assert!(f.trim(0, 100).is_err());
        assert!(f.write_zeroes(0, 100).is_err());
        let mut back = [0u8; 100];
        f.inner().read_at(&mut back, 0).unwrap();
        assert_eq!(back, [7u8; 100]);
        // A failed read leaves the buffer alone.
        let f = faulty(FaultConfig { fail_after: Some(0), ..FaultConfig::default() });
        let mut buf = [3u8; 4];
        assert!(f.read_at(&mut buf, 0).is_err());
        assert_eq!(buf, [3u8; 4]);
        let text = format!("{f:?}");
        assert!(text.contains("failures: 1"), "{text}");
    }
}
