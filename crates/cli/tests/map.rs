//! `r3map map`: a backend mapped as a userfaultfd region, read, written, pushed and checked.

use std::process::Command;

const R3MAP: &str = env!("CARGO_BIN_EXE_r3map");

fn userfaultfd_available() -> bool {
    match r3map_sys::Uffd::probe() {
        Ok(_) => true,
        Err(e) => {
            println!("skipped: userfaultfd is not available here ({e})");
            false
        }
    }
}

#[test]
fn map_reads_writes_and_pushes_into_a_file() {
    if !userfaultfd_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let size = 8 * 1024 * 1024;
    let original: Vec<u8> = (0..size).map(|i| u8::try_from(i % 251).unwrap()).collect();
    std::fs::write(&path, &original).unwrap();
    let url = format!("file://{}", path.display());
    let out =
        Command::new(R3MAP).args(["map", &url, "--write-percent", "20", "--seed", "7"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "r3map map failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("read every page"), "{stdout}");
    assert!(stdout.contains("the backend holds every written page"), "{stdout}");
    // The written pages reached the file, the rest is unchanged.
    let now = std::fs::read(&path).unwrap();
    assert_eq!(now.len(), original.len());
    let changed = now.chunks(4096).zip(original.chunks(4096)).filter(|(a, b)| a != b).count();
    assert!((200..=410).contains(&changed), "about 20 % of 2048 pages changed: {changed}");
}

#[test]
fn map_rejects_a_bad_share_and_a_bad_url() {
    let out = Command::new(R3MAP).args(["map", "memory:1MiB", "--write-percent", "150"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("between 0 and 100"), "{stderr}");
    let out = Command::new(R3MAP).args(["map", "nosuch://x"]).output().unwrap();
    assert!(!out.status.success());
}
