//! Maps a file as a userfaultfd region: pages are read from the file on first access, written
//! pages go back to it on `sync`.
//!
//! `cargo run -p r3map-region --example map_file -- <file>` (a temporary 64 MiB file without an
//! argument). Needs userfaultfd (root, or access to /dev/userfaultfd).

use std::sync::Arc;
use std::time::Instant;

use r3map_core::backends::File;
use r3map_region::{Region, RegionOptions};

fn main() -> anyhow::Result<()> {
    let (path, _tmp) = match std::env::args().nth(1) {
        Some(p) => (std::path::PathBuf::from(p), None),
        None => {
            let dir = tempfile::tempdir()?;
            let p = dir.path().join("region.bin");
            std::fs::write(&p, vec![7u8; 64 << 20])?;
            (p, Some(dir))
        }
    };
    let file = Arc::new(File::open(&path)?);
    let region = Region::open(file, RegionOptions { pull: None, ..RegionOptions::default() })?;
    println!(
        "mapped {} ({} bytes) at {:p}, tracking {:?}",
        path.display(),
        region.len(),
        region.as_ptr(),
        region.tracking()
    );

    let t = Instant::now();
    let mut sum = 0u64;
    for off in (0..region.len() as u64).step_by(4096) {
        sum += u64::from(region.read_u8(off)?);
    }
    println!("touched every page in {:?} (byte sum {sum})", t.elapsed());

    region.write(0, b"written through the region")?;
    let cycle = region.sync()?;
    println!("sync pushed {} chunk(s); stats: {:?}", cycle.chunks, region.stats());
    region.close()?;
    Ok(())
}
