//! Every command's `--help` names and explains its flags.

use std::process::Command;

fn help(bin: &str, args: &[&str]) -> String {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{bin} {args:?} --help failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn assert_mentions(text: &str, words: &[&str]) {
    for w in words {
        assert!(text.contains(w), "the help does not mention {w:?}:\n{text}");
    }
}

#[test]
fn r3map_lists_its_commands() {
    let h = help(env!("CARGO_BIN_EXE_r3map"), &[]);
    assert_mentions(
        &h,
        &["demo", "serve", "certs", "mount", "map", "Serve a backend", "private CA", "userfaultfd"],
    );
}

#[test]
fn serve_explains_its_flags() {
    let h = help(env!("CARGO_BIN_EXE_r3map"), &["serve"]);
    assert_mentions(
        &h,
        &[
            // The backend URL forms.
            "memory:SIZE",
            "file:///PATH",
            "?size=SIZE",
            "truncate=true",
            "dir:///PATH",
            "max-open",
            // Listening.
            "--listen",
            "[::]:1337",
            ":PORT for every interface",
            "--unix",
            "--export",
            "[default: default]",
            // The export.
            "--read-only",
            "--chunk-size",
            "[default: 64KiB]",
            "--chunking",
            "Server-side chunking",
            "--seeder",
            "migration",
            "--max-request",
            "[default: 32MiB]",
            // Security.
            "--tls-cert",
            "--tls-key",
            "TLS 1.3",
            "--tls-client-ca",
            "mutual TLS",
            "--token ",
            "--token-file",
            "R3MAP_TOKEN",
            "--insecure-plaintext",
            "trusted networks",
            // Metrics and shutdown.
            "--metrics",
            "Prometheus",
            "/metrics",
            "SIGINT",
            "flushed",
        ],
    );
}

#[test]
fn certs_explains_its_flags() {
    let h = help(env!("CARGO_BIN_EXE_r3map"), &["certs"]);
    assert_mentions(
        &h,
        &[
            "--out",
            "--server-name",
            "--client",
            "--force",
            "ca.pem",
            "server-key.pem",
            "client-NAME.pem",
            "0600",
        ],
    );
}

#[test]
fn ram_dl_explains_its_flags() {
    let h = help(env!("CARGO_BIN_EXE_ram-dl"), &[]);
    assert_mentions(
        &h,
        &[
            "--raddr",
            "[default: localhost:1337]",
            "--size",
            "4294967296",
            "--chunk-size",
            "[default: 4096]",
            "--chunking",
            "--chunking=false",
            "--verbose",
            "--frontend",
            "nbd.ko",
            "loop device",
            "--connections",
            "--priority",
            "--ca",
            "--insecure-plaintext",
            "--token-file",
            "swapoff",
            "Needs root",
        ],
    );
}

#[test]
fn ram_ul_explains_its_flags() {
    let h = help(env!("CARGO_BIN_EXE_ram-ul"), &[]);
    assert_mentions(
        &h,
        &[
            "--addr",
            "[default: :1337]",
            "--size",
            "[default: 4GiB]",
            "4294967296",
            "--chunk-size",
            "[default: 4096]",
            "--backend",
            "memory",
            "directory",
            "[default: file]",
            "--location",
            "deleted and created afresh",
            "--chunking",
            "--chunking=false",
            "--verbose",
            "--tls-cert",
            "--insecure-plaintext",
            "--token-file",
            "--metrics",
        ],
    );
}
