//! The one place of r3map's unsafe code: wrappers over kernel interfaces whose safety depends on
//! conditions the compiler cannot see. Every `unsafe` block here carries a `// SAFETY:` comment,
//! every unsafe function a `# Safety` section; the rest of the workspace denies `unsafe_code`.
//!
//! # Layout
//! - [`mapping`]: shared memory mappings of files whose size never changes (r3map's FUSE files
//!   and block devices).

// The workspace denies unsafe code; this crate exists to hold it.
#![allow(unsafe_code)]

pub mod mapping;

pub use mapping::SharedMapping;
