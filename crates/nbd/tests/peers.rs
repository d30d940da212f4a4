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

/// `nbdinfo --map` output as (offset, length, flags) rows.
fn map_rows(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect()
}

/// A `Synced` export over a memory remote with 1 MiB chunks: chunk 0 pulled, chunk 2 written
/// locally (dirty), the rest still remote.
fn synced_export(name: &str) -> (NbdExport, Arc<r3map_core::Synced>) {
    use r3map_core::Synced;
    use r3map_core::pipeline::synced::SyncedOptions;
    let remote = memory(4 * MIB);
    remote.write_at(&[1u8; 4096], 0).unwrap();
    let options = SyncedOptions { chunk_size: MIB, ..SyncedOptions::default() };
    let synced = Arc::new(Synced::new(remote, memory(4 * MIB), options).expect("synced"));
    synced.fetch(0..1).expect("pull chunk 0");
    synced.write_at(&vec![2u8; usize::try_from(MIB).unwrap()], 2 * MIB).expect("write chunk 2");
    let export = export(name, synced.clone()).with_chunk_states(synced.clone());
    (export, synced)
}

#[test]
fn nbdinfo_maps_allocation_and_chunk_states() {
    if !have("nbdinfo") {
        return;
    }
    let backend = memory(4 * MIB);
    backend.write_at(&[9u8; 100], MIB).unwrap();
    let (lazy, synced) = synced_export("lazy");
    let server = Running::unix(vec![export("plain", backend), lazy]);

    let (ok, out) = run("nbdinfo", &["--map", &server.uri("plain")]);
    assert!(ok, "{out}");
    // 64 KiB pages: a hole, the written page, a hole.
    assert_eq!(map_rows(&out), [(0, MIB, 3), (MIB, 65536, 0), (MIB + 65536, 3 * MIB - 65536, 3)], "{out}");

    let (ok, out) = run("nbdinfo", &["--map=r3map:chunks", &server.uri("lazy")]);
    assert!(ok, "{out}");
    assert_eq!(map_rows(&out), [(0, MIB, 0), (MIB, MIB, 1), (2 * MIB, MIB, 2), (3 * MIB, MIB, 1)], "{out}");

    // Both contexts are listed for the lazy export, only the spec's for the plain one.
    let (ok, out) = run("nbdinfo", &["--list", "--json", &server.uri("")]);
    assert!(ok, "{out}");
    assert_eq!(out.matches("\"base:allocation\"").count(), 2, "{out}");
    assert_eq!(out.matches("\"r3map:chunks\"").count(), 1, "{out}");
    drop(server);
    assert!(synced.is_dirty(r3map_core::Chunk(2)));
}

#[test]
fn qemu_img_converts_images_in_and_out_and_compares() {
    if !have("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let mut data = vec![0u8; usize::try_from(size).unwrap()];
    fastrand::Rng::with_seed(11).fill(&mut data[..3 << 20]);
    fastrand::Rng::with_seed(12).fill(&mut data[6 << 20..]);
    let raw = dir.path().join("in.raw");
    std::fs::write(&raw, &data).unwrap();
    let qcow = dir.path().join("in.qcow2");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let (ok, out) = run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &path(&raw), &path(&qcow)]);
    assert!(ok, "{out}");
    let backend = memory(size);
    let server = Running::tcp(vec![export("disk", backend.clone())]);
    let uri = server.uri("disk");
    // A qcow2 image into the export (`-n`: the target exists), compared against the raw one.
    let (ok, out) = run("qemu-img", &["convert", "-n", "-f", "qcow2", "-O", "raw", &path(&qcow), &uri]);
    assert!(ok, "{out}");
    assert!(contents(&*backend) == data, "the export differs from the image");
    let (ok, out) = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &path(&raw), &uri]);
    assert!(ok && out.contains("Images are identical"), "{out}");
    // And out again, to qcow2, compared by qemu-img across formats.
    let back = dir.path().join("out.qcow2");
    let (ok, out) = run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", &uri, &path(&back)]);
    assert!(ok, "{out}");
    let (ok, out) = run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", &path(&back), &uri]);
    assert!(ok && out.contains("Images are identical"), "{out}");
    // A change on the export is seen by compare.
    backend.write_at(&[0xee], 5 * MIB).unwrap();
    let (ok, out) = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &path(&raw), &uri]);
    assert!(!ok && out.contains("mismatch at offset 5242880"), "{out}");
    server.stop().expect("final flush");
}

#[test]
fn fio_random_writes_verify_over_tcp_and_unix() {
    if !have("fio") {
        return;
    }
    for unix in [false, true] {
        let exports = vec![export("disk", memory(32 * MIB))];
        let server = if unix { Running::unix(exports) } else { Running::tcp(exports) };
        let uri = format!("--uri={}", server.uri("disk"));
        let (ok, out) = run(
            "fio",
            &[
                "--name=verify",
                "--ioengine=nbd",
                &uri,
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--size=32M",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
            ],
        );
        assert!(ok && !out.contains("verify: bad"), "unix={unix}: {out}");
        assert!(out.contains("err= 0"), "unix={unix}: {out}");
        server.stop().expect("final flush");
    }
}

/// A TLS server requiring client certificates, and a libnbd certificate directory holding the
/// CA and (when `with_client_cert`) a client certificate.
fn tls_server(dir: &std::path::Path, with_client_cert: bool, backend: Arc<r3map_core::Memory>) -> Running {
    use r3map_nbd::{NbdServer, NbdTls, TlsMode};
    use r3map_net::certs::Authority;
    let ca = Authority::new("r3map test CA").unwrap();
    let server_pem = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    std::fs::write(dir.join("ca-cert.pem"), &ca.pem().cert).unwrap();
    if with_client_cert {
        let client = ca.client("tester").unwrap();
        std::fs::write(dir.join("client-cert.pem"), &client.cert).unwrap();
        std::fs::write(dir.join("client-key.pem"), &client.key).unwrap();
    }
    let config = r3map_net::server_tls(
        server_pem.cert.as_bytes(),
        server_pem.key.as_bytes(),
        Some(ca.pem().cert.as_bytes()),
    )
    .unwrap();
    let server = NbdServer::new(vec![export("disk", backend)])
        .unwrap()
        .with_tls(NbdTls { config, mode: TlsMode::Require });
    Running::tcp_server(server)
}

#[test]
fn libnbd_clients_speak_tls_with_client_certificates() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backend = memory(4 * MIB);
    let server = tls_server(dir.path(), true, backend.clone());
    let tls_uri = format!("nbds://localhost:{}/disk?tls-certificates={}", server.port, dir.path().display());
    let (ok, out) = run("nbdinfo", &[&tls_uri]);
    assert!(ok, "{out}");
    assert!(out.contains("with TLS"), "{out}");
    // Data through TLS, in and out.
    let mut data = vec![0u8; usize::try_from(4 * MIB).unwrap()];
    fastrand::Rng::with_seed(5).fill(&mut data);
    let src = dir.path().join("in.bin");
    let dst = dir.path().join("out.bin");
    std::fs::write(&src, &data).unwrap();
    let (ok, out) = run("nbdcopy", &[src.to_str().unwrap(), &tls_uri]);
    assert!(ok, "{out}");
    assert!(contents(&*backend) == data);
    let (ok, out) = run("nbdcopy", &[&tls_uri, dst.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(std::fs::read(&dst).unwrap() == data);
    // Plaintext is refused by a server that requires TLS.
    let (ok, out) = run("nbdinfo", &[&server.uri("disk")]);
    assert!(!ok, "{out}");
    assert!(out.to_lowercase().contains("tls"), "{out}");
    server.stop().expect("final flush");
}

#[test]
fn tls_clients_without_a_certificate_are_refused() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = tls_server(dir.path(), false, memory(MIB));
    let tls_uri = format!("nbds://localhost:{}/disk?tls-certificates={}", server.port, dir.path().display());
    let (ok, out) = run("nbdinfo", &[&tls_uri]);
    assert!(!ok, "{out}");
}
