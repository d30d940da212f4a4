//! Serves a memory backend as a file until Ctrl-C (run as root):
//!
//! ```sh
//! mkdir -p /tmp/r3map-mnt
//! cargo run --release -p r3map-fuse --example fuse_file -- /tmp/r3map-mnt 1024 [--direct-io]
//! dd if=/tmp/r3map-mnt/r3map of=/dev/null bs=1M
//! ```
//!
//! The second argument is the size in MiB (default 1024); `--write-through` turns the writeback
//! cache off.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use r3map_core::Memory;
use r3map_fuse::{FuseMount, FuseOptions};

fn main() -> io::Result<()> {
    let mut options = FuseOptions::default();
    let mut positional = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--direct-io" => options.direct_io = Some(true),
            "--write-through" => options.writeback_cache = false,
            _ => positional.push(arg),
        }
    }
    let usage = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "usage: fuse_file MOUNTPOINT [SIZE_MIB] [--direct-io] [--write-through]",
        )
    };
    let mountpoint = PathBuf::from(positional.first().ok_or_else(usage)?);
    let size_mib: u64 = match positional.get(1) {
        Some(s) => s.parse().map_err(|_| usage())?,
        None => 1024,
    };

    r3map_fuse::cleanup_stale(&mountpoint)?;
    let backend = Arc::new(Memory::new(size_mib << 20));
    let mount = FuseMount::mount(backend, &mountpoint, options)?;
    println!(
        "serving {} ({size_mib} MiB, {:?}); Ctrl-C to unmount",
        mount.file_path().display(),
        mount.settings()
    );

    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(tokio::signal::ctrl_c())?;
    println!("unmounting");
    mount.unmount()
}
