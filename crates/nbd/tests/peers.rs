//! The server driven by real NBD clients: `nbdinfo`, `qemu-io` and `nbdcopy` (libnbd and QEMU).
//! A test whose client is missing prints `skipped: <tool> not installed` and passes.

mod common;

use std::sync::Arc;

use common::{Running, contents, export, have, memory, run};
use r3map_core::{Backend, File};
use r3map_nbd::NbdExport;

const MIB: u64 = 1024 * 1024;

#[test]
fn nbdinfo_reads_size_and_flags_over_tcp() {
    if !have("nbdinfo") {
        return;
    }
    let server = Running::tcp(vec![export("disk", memory(8 * MIB))]);
    let (ok, out) = run("nbdinfo", &[&server.uri("disk")]);
    assert!(ok, "{out}");
    assert!(out.contains("export-size: 8388608"), "{out}");
    assert!(out.contains("using structured packets"), "{out}");
    for line in ["can_flush: true", "can_fua: true", "can_trim: true", "can_zero: true", "can_cache: true"] {
        assert!(out.contains(line), "{line} missing in {out}");
    }
    assert!(out.contains("can_multi_conn: true"), "{out}");
    assert!(out.contains("is_read_only: false"), "{out}");
    assert!(out.contains("block_size_maximum: 33554432"), "{out}");
    // The default export is the first one.
    let (ok, out) = run("nbdinfo", &["--size", &server.uri("")]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "8388608");
    // An unknown export is refused.
    let (ok, out) = run("nbdinfo", &[&server.uri("nope")]);
    assert!(!ok, "{out}");
    server.stop().expect("final flush");
}

#[test]
fn nbdinfo_lists_every_export_over_unix() {
    if !have("nbdinfo") {
        return;
    }
    let ro = NbdExport {
        read_only: true,
        description: Some("a read-only one".into()),
        ..export("second", memory(MIB))
    };
    let server = Running::unix(vec![export("first", memory(2 * MIB)), ro]);
    let (ok, out) = run("nbdinfo", &["--list", &server.uri("")]);
    assert!(ok, "{out}");
    assert!(out.contains("export=\"first\""), "{out}");
    assert!(out.contains("export=\"second\""), "{out}");
    assert!(out.contains("a read-only one"), "{out}");
    let (ok, out) = run("nbdinfo", &[&server.uri("second")]);
    assert!(ok, "{out}");
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(out.contains("export-size: 1048576"), "{out}");
}

fn qemu_io(uri: &str, commands: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    run("qemu-io", &args)
}

#[test]
fn qemu_io_writes_and_reads_back_over_tcp_and_unix() {
    if !have("qemu-io") {
        return;
    }
    for unix in [false, true] {
        let backend = memory(16 * MIB);
        let exports = vec![export("disk", backend.clone())];
        let server = if unix { Running::unix(exports) } else { Running::tcp(exports) };
        let (ok, out) = qemu_io(
            &server.uri("disk"),
            &[
                "write -P 0xab 0 1M",
                "read -P 0xab 0 1M",
                "write -f -P 0xcd 3M 512k",
                "read -P 0xcd 3M 512k",
                "aio_write -P 0x11 8M 64k",
                "aio_write -P 0x22 9M 64k",
                "aio_flush",
                "read -P 0x11 8M 64k",
                "read -P 0x22 9M 64k",
                "flush",
            ],
        );
        assert!(ok && !out.contains("failed"), "unix={unix}: {out}");
        let data = contents(&*backend);
        let mib = usize::try_from(MIB).unwrap();
        assert!(data[..mib].iter().all(|&b| b == 0xab));
        assert!(data[3 * mib..3 * mib + mib / 2].iter().all(|&b| b == 0xcd));
        assert!(data[mib..3 * mib].iter().all(|&b| b == 0));
        server.stop().expect("final flush");
    }
}

#[test]
fn qemu_io_zeroes_and_discards() {
    if !have("qemu-io") {
        return;
    }
    let backend = memory(4 * MIB);
    let server = Running::tcp(vec![export("", backend.clone())]);
    let (ok, out) = qemu_io(
        &server.uri(""),
        &[
            "write -P 0x5a 0 2M",
            "write -z 256k 128k",
            "read -P 0 256k 128k",
            "read -P 0x5a 0 256k",
            "discard 1M 512k",
            "read -P 0 1M 512k",
            "read -P 0x5a 1536k 512k",
        ],
    );
    assert!(ok && !out.contains("failed"), "{out}");
}

#[test]
fn qemu_io_is_refused_writes_on_a_read_only_export() {
    if !have("qemu-io") {
        return;
    }
    let backend = memory(MIB);
    backend.write_at(&[7u8; 4096], 0).unwrap();
    let ro = NbdExport { read_only: true, ..export("ro", backend.clone()) };
    let server = Running::tcp(vec![ro]);
    let (ok, out) = run("qemu-io", &["-r", "-f", "raw", &server.uri("ro"), "-c", "read -P 7 0 4k"]);
    assert!(ok && !out.contains("failed"), "{out}");
    // QEMU reads the READ_ONLY flag and refuses to open the export for writing (the server's
    // own EPERM for writes is checked in tests/raw.rs).
    let (ok, out) = qemu_io(&server.uri("ro"), &["write -P 9 0 4k"]);
    assert!(!ok, "{out}");
    assert!(out.contains("Permission denied") || out.to_lowercase().contains("read-only"), "{out}");
    assert!(contents(&*backend)[..4096].iter().all(|&b| b == 7));
}

#[test]
fn nbdcopy_copies_a_file_in_and_out_of_a_file_backend() {
    if !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 12 * MIB + 4096;
    let mut input = vec![0u8; usize::try_from(size).unwrap()];
    fastrand::Rng::with_seed(7).fill(&mut input);
    // A hole in the middle, so the copy has zeroes to skip or send.
    input[4 << 20..5 << 20].fill(0);
    let src = dir.path().join("in.bin");
    let dst = dir.path().join("out.bin");
    std::fs::write(&src, &input).unwrap();
    let backend = Arc::new(File::create(dir.path().join("disk.img"), size).expect("file backend"));
    let server = Running::tcp(vec![export("disk", backend.clone())]);
    let uri = server.uri("disk");
    let (ok, out) = run("nbdcopy", &[src.to_str().unwrap(), &uri]);
    assert!(ok, "{out}");
    assert!(contents(&*backend) == input, "the backend differs from the copied file");
    let (ok, out) = run("nbdcopy", &[&uri, dst.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(std::fs::read(&dst).unwrap() == input, "the copy out differs from the input");
    // Several connections at once (nbdcopy uses them when the server allows multi-conn).
    let (ok, out) = run("nbdcopy", &["--connections=4", "--requests=16", src.to_str().unwrap(), &uri]);
    assert!(ok, "{out}");
    server.stop().expect("final flush");
}
