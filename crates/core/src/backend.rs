//! The [`Backend`] trait: positional byte storage every part of r3map reads and writes through.

use std::fmt;
use std::io;
use std::sync::Arc;

/// What a backend can do beyond the four required verbs.
///
/// Layers report the capabilities of the backend they wrap, minus what they hide (a read-only layer
/// would clear `trim`). Frontends advertise only what the probe says (NBD `SEND_TRIM`, FUSE
/// `fallocate`), so a `false` here never reaches a caller as a failed request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(clippy::struct_excessive_bools)]
pub struct Capabilities {
    /// [`Backend::trim`] works: the range may be deallocated and then reads as zeroes.
    pub trim: bool,
    /// [`Backend::write_zeroes`] works more cheaply than writing a buffer of zeroes.
    pub write_zeroes: bool,
    /// [`Backend::extents`] reports holes (ranges known to read as zeroes).
    pub extents: bool,
    /// Writes are rejected.
    pub read_only: bool,
}

/// One run of bytes as reported by [`Backend::extents`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length of the run in bytes.
    pub len: u64,
    /// The run is a hole: it is not allocated and reads as zeroes.
    pub hole: bool,
}

/// Positional, thread-safe byte storage of a fixed size.
///
/// The contract every implementation keeps (the [`conformance`](crate::conformance) suite checks it):
/// - `size` is fixed for the life of the backend.
/// - `read_at` fills the whole buffer or fails; it never returns a short read and never presents
///   zeroes for data it could not fetch.
/// - `write_at` writes the whole buffer or fails.
/// - A range that ends past `size` fails with [`io::ErrorKind::InvalidInput`] and changes nothing.
/// - A zero-length read or write at any offset up to `size` succeeds and does nothing.
/// - `flush` returns once every write that completed before it was called is durable in the
///   backend's own terms (on disk, at the remote, ...).
/// - Concurrent calls on disjoint ranges do not interfere. Concurrent overlapping writes leave each
///   byte with the value of one of them, as for a block device.
pub trait Backend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `off..off + buf.len()`.
    ///
    /// # Errors
    /// `InvalidInput` for a range past the end; any error of the storage underneath.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;

    /// Fills each buffer of `reads` with the bytes at its offset, as `read_at` on each in turn.
    ///
    /// Backends that keep requests in flight (network clients) send every read before waiting
    /// for the first, so scattered ranges cost one round trip together instead of one each: the
    /// background pull fetches a batch of scattered chunks this way. The default reads one range
    /// after another.
    ///
    /// # Errors
    /// As `read_at`, for the first range that fails; the other buffers are then unspecified.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
        for (off, buf) in reads.iter_mut() {
            self.read_at(buf, *off)?;
        }
        Ok(())
    }

    /// Writes `buf` at `off`.
    ///
    /// # Errors
    /// `InvalidInput` for a range past the end, `PermissionDenied` on a read-only backend; any error
    /// of the storage underneath.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;

    /// Makes completed writes durable.
    ///
    /// # Errors
    /// Any error of the storage underneath; the writes stay pending and a later flush retries them.
    fn flush(&self) -> io::Result<()>;

    /// What the optional verbs below can do.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }

    /// Deallocates `off..off + len`; afterwards the range reads as zeroes.
    ///
    /// # Errors
    /// `Unsupported` unless [`Capabilities::trim`] is set.
    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Err(unsupported("trim"))
    }

    /// Sets `off..off + len` to zeroes without sending a buffer of them.
    ///
    /// # Errors
    /// `Unsupported` unless [`Capabilities::write_zeroes`] is set.
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Err(unsupported("write_zeroes"))
    }

    /// Describes `off..off + len` as a list of data and hole runs covering the range exactly.
    ///
    /// # Errors
    /// `Unsupported` unless [`Capabilities::extents`] is set.
    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        let _ = (off, len);
        Err(unsupported("extents"))
    }
}

fn unsupported(verb: &str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("this backend does not support {verb}"))
}

/// A shared, type-erased backend: what layers wrap and stacks are built from at run time.
pub type SharedBackend = Arc<dyn Backend>;

/// Writes the [`Backend`] verbs a wrapper does not change, each passing its call on unchanged to
/// the backend it wraps, so that the wrapper's `impl Backend` holds only the verbs it changes
/// (as an nbdkit filter writes only the callbacks it changes).
///
/// Invoked inside `impl Backend for ...`:
/// - `forward_backend!(inner);` forwards every verb to the field `self.inner`;
/// - `forward_backend!(inner, except read_at, trim);` forwards every verb but those listed, which
///   the impl writes itself.
///
/// `read_many` follows `read_at`: a wrapper that lists `read_at` keeps the default `read_many`,
/// which calls the wrapper's own `read_at` for each range, so a batch never goes around what the
/// wrapper does to a read. List `read_many` too to send batches on whole (as
/// [`Delay`](crate::Delay) and [`Locked`](crate::Locked) do).
///
/// A name in the list that is not a verb of the trait fails to compile, and so does a verb that
/// is written by hand but not listed (it is defined twice). A verb that is listed but not
/// written gets the trait's default (`Unsupported` for the optional verbs). The forwarding
/// methods are `#[inline]` calls through the inner type, so a stack of concrete layers pays no
/// dynamic dispatch. [`layers`](crate::layers) shows a whole layer.
#[macro_export]
macro_rules! forward_backend {
    ($field:ident $(, except $($verb:ident),+ $(,)?)?) => {
        $crate::forward_backend!(@check $($($verb)+)?);
        $crate::forward_backend!(@all [field $field] [$($($verb)+)?]);
    };

    // Every name in the list is a verb of the trait.
    (@check) => {};
    (@check size $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check read_at $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check read_many $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check write_at $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check flush $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check capabilities $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check trim $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check write_zeroes $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check extents $($rest:ident)*) => { $crate::forward_backend!(@check $($rest)*); };
    (@check $other:ident $($rest:ident)*) => {
        ::std::compile_error!(::std::concat!(
            "forward_backend!: `", ::std::stringify!($other), "` is not a verb of Backend"
        ));
    };

    // One forwarding method for each verb of the trait that is not excepted.
    (@all $to:tt $except:tt) => {
        $crate::forward_backend!(@one $to size $except);
        $crate::forward_backend!(@one $to read_at $except);
        $crate::forward_backend!(@one $to read_many $except);
        $crate::forward_backend!(@one $to write_at $except);
        $crate::forward_backend!(@one $to flush $except);
        $crate::forward_backend!(@one $to capabilities $except);
        $crate::forward_backend!(@one $to trim $except);
        $crate::forward_backend!(@one $to write_zeroes $except);
        $crate::forward_backend!(@one $to extents $except);
    };

    // Looks `verb` up in the except list; forwards it when it is not there.
    (@one $to:tt $verb:ident []) => { $crate::forward_backend!(@emit $to $verb); };
    (@one $to:tt size [size $($rest:ident)*]) => {};
    (@one $to:tt read_at [read_at $($rest:ident)*]) => {};
    (@one $to:tt read_many [read_many $($rest:ident)*]) => {};
    (@one $to:tt read_many [read_at $($rest:ident)*]) => {};
    (@one $to:tt write_at [write_at $($rest:ident)*]) => {};
    (@one $to:tt flush [flush $($rest:ident)*]) => {};
    (@one $to:tt capabilities [capabilities $($rest:ident)*]) => {};
    (@one $to:tt trim [trim $($rest:ident)*]) => {};
    (@one $to:tt write_zeroes [write_zeroes $($rest:ident)*]) => {};
    (@one $to:tt extents [extents $($rest:ident)*]) => {};
    (@one $to:tt $verb:ident [$head:ident $($rest:ident)*]) => {
        $crate::forward_backend!(@one $to $verb [$($rest)*]);
    };

    // The wrapped backend, as a reference: a field, or what a smart pointer points to. `self`
    // comes from the method being written, so that it names that method's receiver.
    (@to $self:tt [field $field:ident]) => { &$self.$field };
    (@to $self:tt [deref]) => { &**$self };

    (@emit $to:tt size) => {
        #[inline]
        fn size(&self) -> u64 {
            $crate::backend::Backend::size($crate::forward_backend!(@to self $to))
        }
    };
    (@emit $to:tt read_at) => {
        #[inline]
        fn read_at(&self, buf: &mut [u8], off: u64) -> ::std::io::Result<()> {
            $crate::backend::Backend::read_at($crate::forward_backend!(@to self $to), buf, off)
        }
    };
    (@emit $to:tt read_many) => {
        #[inline]
        fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> ::std::io::Result<()> {
            $crate::backend::Backend::read_many($crate::forward_backend!(@to self $to), reads)
        }
    };
    (@emit $to:tt write_at) => {
        #[inline]
        fn write_at(&self, buf: &[u8], off: u64) -> ::std::io::Result<()> {
            $crate::backend::Backend::write_at($crate::forward_backend!(@to self $to), buf, off)
        }
    };
    (@emit $to:tt flush) => {
        #[inline]
        fn flush(&self) -> ::std::io::Result<()> {
            $crate::backend::Backend::flush($crate::forward_backend!(@to self $to))
        }
    };
    (@emit $to:tt capabilities) => {
        #[inline]
        fn capabilities(&self) -> $crate::backend::Capabilities {
            $crate::backend::Backend::capabilities($crate::forward_backend!(@to self $to))
        }
    };
    (@emit $to:tt trim) => {
        #[inline]
        fn trim(&self, off: u64, len: u64) -> ::std::io::Result<()> {
            $crate::backend::Backend::trim($crate::forward_backend!(@to self $to), off, len)
        }
    };
    (@emit $to:tt write_zeroes) => {
        #[inline]
        fn write_zeroes(&self, off: u64, len: u64) -> ::std::io::Result<()> {
            $crate::backend::Backend::write_zeroes($crate::forward_backend!(@to self $to), off, len)
        }
    };
    (@emit $to:tt extents) => {
        #[inline]
        fn extents(
            &self,
            off: u64,
            len: u64,
        ) -> ::std::io::Result<::std::vec::Vec<$crate::backend::Extent>> {
            $crate::backend::Backend::extents($crate::forward_backend!(@to self $to), off, len)
        }
    };

    // Smart pointers and references are backends that change nothing.
    (@deref) => { $crate::forward_backend!(@all [deref] []); };
}

impl<B: Backend + ?Sized> Backend for Arc<B> {
    crate::forward_backend!(@deref);
}

impl<B: Backend + ?Sized> Backend for Box<B> {
    crate::forward_backend!(@deref);
}

impl<B: Backend + ?Sized> Backend for &B {
    crate::forward_backend!(@deref);
}

/// Checks that `off..off + len` lies within a backend of `size` bytes.
///
/// # Errors
/// `InvalidInput`, with a message naming the range and the size, when it does not.
pub fn check_range(off: u64, len: u64, size: u64) -> io::Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, OutOfRange { off, len, size }.to_string())),
    }
}

/// Flushes every named backend in turn (a server's exports at shutdown), logging each failure
/// with its name, so that one failing backend does not keep the others from being flushed.
///
/// # Errors
/// The first failed flush.
pub fn flush_each<'a>(backends: impl IntoIterator<Item = (&'a str, &'a dyn Backend)>) -> io::Result<()> {
    let mut first = Ok(());
    for (name, backend) in backends {
        if let Err(err) = backend.flush() {
            tracing::error!(export = %name, error = %err, "flushing the export failed");
            if first.is_ok() {
                first = Err(err);
            }
        }
    }
    first
}

/// Length of a buffer as a byte count.
#[must_use]
pub fn len64(buf: &[u8]) -> u64 {
    buf.len() as u64
}

#[derive(Debug)]
struct OutOfRange {
    off: u64,
    len: u64,
    size: u64,
}

impl fmt::Display for OutOfRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "range {}..{} (offset {}, length {}) is beyond the end of the backend ({} bytes)",
            self.off,
            u128::from(self.off) + u128::from(self.len),
            self.off,
            self.len,
            self.size
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Counts flushes; fails them when `fails`.
    struct Flushes {
        fails: bool,
        count: AtomicUsize,
    }

    impl Backend for Flushes {
        fn size(&self) -> u64 {
            0
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            check_range(off, len64(buf), 0)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            check_range(off, len64(buf), 0)
        }
        fn flush(&self) -> io::Result<()> {
            self.count.fetch_add(1, Ordering::SeqCst);
            if self.fails {
                Err(io::Error::other(format!("flush {}", self.count.load(Ordering::SeqCst))))
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn flush_each_flushes_every_backend_and_returns_the_first_error() {
        let b = |fails| Flushes { fails, count: AtomicUsize::new(0) };
        let all = [b(false), b(true), b(false), b(true)];
        let err = flush_each(all.iter().map(|x| ("x", x as &dyn Backend))).unwrap_err();
        assert_eq!(err.to_string(), "flush 1", "the first error is returned");
        assert!(all.iter().all(|x| x.count.load(Ordering::SeqCst) == 1), "every backend was flushed once");
        assert!(flush_each([("ok", &all[0] as &dyn Backend)]).is_ok());
    }

    #[test]
    fn check_range_accepts_ranges_that_end_at_size() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
    }

    #[test]
    fn check_range_rejects_overflow_and_past_end() {
        let err = check_range(5, 6, 10).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("beyond the end"), "{err}");
        assert!(check_range(u64::MAX, 2, 10).is_err());
        assert!(check_range(11, 0, 10).is_err());
    }
}
