//! Layers: each wraps an inner backend and changes one thing about it.
//!
//! # Writing a layer
//! As with nbdkit filters, a layer writes only the verbs it changes; every other verb goes on to
//! the backend underneath without a line of code. A layer is a struct generic over its inner
//! backend, which it keeps in a field named `inner`, plus:
//! - [`impl_layer!`](crate::impl_layer), which writes `inner()`, `into_inner()` and `Debug`
//!   (the fields and `name = method()` values in braces, then the inner type's name);
//! - an `impl Backend` that opens with [`forward_backend!`](crate::forward_backend), which writes
//!   a forwarding method for every verb not listed after `except`;
//! - the listed verbs, written by hand: that is the layer's effect.
//!
//! ```
//! use std::io;
//! use r3map_core::{Backend, Capabilities, Memory};
//!
//! /// Hides trim from the frontends above (a store whose trim is slow, say).
//! pub struct NoTrim<B> {
//!     inner: B,
//! }
//! r3map_core::impl_layer!(NoTrim {});
//!
//! impl<B: Backend> Backend for NoTrim<B> {
//!     // `trim` is listed but not written, so it gets the trait's default: `Unsupported`.
//!     r3map_core::forward_backend!(inner, except capabilities, trim);
//!
//!     fn capabilities(&self) -> Capabilities {
//!         Capabilities { trim: false, ..self.inner.capabilities() }
//!     }
//! }
//!
//! let layer = NoTrim { inner: Memory::new(4096) };
//! layer.write_at(b"abc", 0)?; // forwarded
//! assert!(!layer.capabilities().trim && layer.inner().capabilities().trim);
//! assert_eq!(layer.trim(0, 4096).unwrap_err().kind(), io::ErrorKind::Unsupported);
//! # Ok::<(), io::Error>(())
//! ```
//!
//! What to list: a layer that changes what writes do lists every verb that changes bytes,
//! `write_at`, `trim` and `write_zeroes` ([`Tracked`]); one that hides or adds a verb lists
//! `capabilities` with it. `read_many` follows `read_at`: a layer that lists `read_at` gets the
//! default `read_many`, which goes through its `read_at` for each range; it lists `read_many` as
//! well to pass batches on whole ([`Delay`], [`Locked`]). The forwarding is static: `#[inline]`
//! calls on the inner type, with no trait object unless the inner backend is one.

pub mod aligned;
pub mod chunked;
pub mod delay;
pub mod fault;
pub mod locked;
pub mod tracked;

pub use aligned::Aligned;
pub use chunked::Chunked;
pub use delay::{Clock, Delay, ManualClock, SystemClock};
pub use fault::{FaultConfig, FaultInject, Ops};
pub use locked::Locked;
pub use tracked::Tracked;

/// Writes what every layer has and nothing of its effect: `inner()`, `into_inner()` and `Debug`,
/// for a struct `Name<B>` that keeps its inner backend in the field `inner`.
///
/// `impl_layer!(Name { field, name = method() })`: `Debug` shows each `field`, each `name` with
/// the value of `self.method()`, then the inner backend's type name (not its value: a shared
/// backend is a trait object without `Debug`). See [`layers`](crate::layers) for a whole layer.
#[macro_export]
macro_rules! impl_layer {
    ($layer:ident { $($name:ident $(= $method:ident())?),* $(,)? }) => {
        // The accessors are as public as the layer, and a private layer (a test double) need not
        // use them.
        #[allow(unreachable_pub, dead_code)]
        impl<B> $layer<B> {
            /// The wrapped backend. Calls made on it directly go around this layer.
            #[must_use]
            #[inline]
            pub fn inner(&self) -> &B {
                &self.inner
            }

            /// Unwraps the layer, returning the wrapped backend; the layer's own state is dropped.
            #[must_use]
            #[inline]
            pub fn into_inner(self) -> B {
                self.inner
            }
        }

        impl<B> ::std::fmt::Debug for $layer<B> {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.debug_struct(::std::stringify!($layer))
                    $(.field(::std::stringify!($name), $crate::impl_layer!(@value self $name $($method)?)))*
                    .field("inner", &::std::any::type_name::<B>())
                    .finish_non_exhaustive()
            }
        }
    };

    // `self` comes from `fmt`, so that it names that method's receiver.
    (@value $self:tt $field:ident) => { &$self.$field };
    (@value $self:tt $name:ident $method:ident) => { &$self.$method() };
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::Mutex;

    use crate::backend::{Backend, Capabilities, Extent};
    use crate::backends::Memory;

    /// Every verb of the trait, as the counting backend records them.
    const VERBS: [&str; 9] = [
        "size",
        "read_at",
        "read_many",
        "write_at",
        "flush",
        "capabilities",
        "trim",
        "write_zeroes",
        "extents",
    ];

    /// Records the name of every verb called on it, then serves it from memory.
    #[derive(Debug)]
    struct Counting {
        memory: Memory,
        calls: Mutex<Vec<&'static str>>,
    }

    impl Counting {
        fn new() -> Self {
            Self { memory: Memory::new(8192), calls: Mutex::new(Vec::new()) }
        }

        fn record(&self, verb: &'static str) {
            self.calls.lock().unwrap().push(verb);
        }

        fn take(&self) -> Vec<&'static str> {
            std::mem::take(&mut *self.calls.lock().unwrap())
        }
    }

    impl Backend for Counting {
        fn size(&self) -> u64 {
            self.record("size");
            self.memory.size()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.record("read_at");
            self.memory.read_at(buf, off)
        }
        fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> io::Result<()> {
            self.record("read_many");
            self.memory.read_many(reads)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            self.record("write_at");
            self.memory.write_at(buf, off)
        }
        fn flush(&self) -> io::Result<()> {
            self.record("flush");
            self.memory.flush()
        }
        fn capabilities(&self) -> Capabilities {
            self.record("capabilities");
            self.memory.capabilities()
        }
        fn trim(&self, off: u64, len: u64) -> io::Result<()> {
            self.record("trim");
            self.memory.trim(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
            self.record("write_zeroes");
            self.memory.write_zeroes(off, len)
        }
        fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
            self.record("extents");
            self.memory.extents(off, len)
        }
    }

    /// Calls every verb once, in the order of [`VERBS`].
    fn call_every_verb(b: &impl Backend) {
        let mut buf = [0u8; 16];
        let mut other = [0u8; 16];
        b.size();
        b.read_at(&mut buf, 0).unwrap();
        b.read_many(&mut [(0, &mut buf[..]), (4096, &mut other[..])]).unwrap();
        b.write_at(&[1u8; 16], 0).unwrap();
        b.flush().unwrap();
        b.capabilities();
        b.trim(0, 4096).unwrap();
        b.write_zeroes(0, 16).unwrap();
        b.extents(0, 8192).unwrap();
    }

    /// A layer that changes one verb: its flushes never reach the inner backend.
    struct NoFlush<B> {
        inner: B,
        flushes: Mutex<u64>,
    }

    crate::impl_layer!(NoFlush { flushes });

    impl<B: Backend> Backend for NoFlush<B> {
        crate::forward_backend!(inner, except flush);

        fn flush(&self) -> io::Result<()> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
    }

    #[test]
    fn a_layer_that_changes_one_verb_forwards_every_other() {
        let layer = NoFlush { inner: Counting::new(), flushes: Mutex::new(0) };
        call_every_verb(&layer);
        let expected: Vec<_> = VERBS.into_iter().filter(|&v| v != "flush").collect();
        assert_eq!(layer.inner().take(), expected, "each other verb reached the inner backend once");
        assert_eq!(*layer.flushes.lock().unwrap(), 1, "the layer's own flush ran");
    }

    /// A layer that changes reads: it counts them.
    struct CountReads<B> {
        inner: B,
        count: Mutex<u64>,
    }

    crate::impl_layer!(CountReads { reads = reads() });

    impl<B> CountReads<B> {
        fn reads(&self) -> u64 {
            *self.count.lock().unwrap()
        }
    }

    impl<B: Backend> Backend for CountReads<B> {
        crate::forward_backend!(inner, except read_at);

        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            *self.count.lock().unwrap() += 1;
            self.inner.read_at(buf, off)
        }
    }

    #[test]
    fn a_batch_goes_through_the_layers_own_read_at() {
        let layer = CountReads { inner: Counting::new(), count: Mutex::new(0) };
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        layer.read_many(&mut [(0, &mut a[..]), (100, &mut b[..])]).unwrap();
        assert_eq!(layer.reads(), 2, "each range of the batch went through the layer");
        assert_eq!(layer.inner().take(), ["read_at", "read_at"], "the batch was not forwarded around it");
    }

    #[test]
    fn pointers_forward_every_verb() {
        let counting = Counting::new();
        call_every_verb(&&counting);
        assert_eq!(counting.take(), VERBS);
        let boxed = Box::new(Counting::new());
        call_every_verb(&boxed);
        assert_eq!(boxed.take(), VERBS);
        let shared = std::sync::Arc::new(Counting::new());
        call_every_verb(&shared);
        assert_eq!(shared.take(), VERBS);
    }

    #[test]
    fn impl_layer_writes_accessors_and_debug() {
        let layer = CountReads { inner: Memory::new(10), count: Mutex::new(3) };
        let text = format!("{layer:?}");
        assert!(text.starts_with("CountReads { reads: 3, inner: "), "{text}");
        assert!(text.contains("Memory"), "{text}");
        assert_eq!(layer.into_inner().size(), 10);
    }
}
