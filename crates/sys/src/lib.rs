//! The one place of r3map's unsafe code: wrappers over kernel interfaces whose safety depends on
//! conditions the compiler cannot see. Every `unsafe` block here carries a `// SAFETY:` comment,
//! every unsafe function a `# Safety` section; the rest of the workspace denies `unsafe_code`.
//!
//! # Layout
//! - [`mapping`]: shared memory mappings of files whose size never changes (r3map's FUSE files
//!   and block devices).
//! - [`loop_ioctl`]: binding a loop device to a file without `losetup`.
//! - [`nbd_ioctl`]: the kernel NBD driver's ioctls, for kernels without its netlink interface.
//! - [`netlink`]: generic netlink messages and a socket for them, the NBD driver's newer interface
//!   (no unsafe code; a kernel interface all the same).
//! - [`region_map`]: [`AnonMapping`], a private anonymous mapping filled by a userfaultfd
//!   handler, accessed through volatile copies (no `&[u8]` view: its bytes change under any
//!   reference).
//! - [`uffd`]: userfaultfd ([`Uffd`]: handshake, registration, `COPY`, `ZEROPAGE`, `WAKE`,
//!   `WRITEPROTECT`, `POISON`, events) and `PAGEMAP_SCAN` of written pages ([`PageMap`]).

// The workspace denies unsafe code; this crate exists to hold it.
#![allow(unsafe_code)]

pub mod loop_ioctl;
pub mod mapping;
pub mod nbd_ioctl;
pub mod netlink;
pub mod region_map;
pub mod uffd;

pub use mapping::SharedMapping;
pub use region_map::AnonMapping;
pub use uffd::{PageMap, Uffd};
