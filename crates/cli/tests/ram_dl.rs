//! `ram-ul` and `ram-dl` as processes on this host: memory served by ram-ul becomes swap through
//! ram-dl's FUSE file and loop device (this kernel has no nbd.ko; the test VM covers the NBD
//! device), a process whose memory cgroup holds less than it fills swaps through it and gets its
//! data back, and SIGINT removes the swap, the loop device and the mount.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::{Proc, STARTUP, scrape};

const RAM_UL: &str = env!("CARGO_BIN_EXE_ram-ul");
const RAM_DL: &str = env!("CARGO_BIN_EXE_ram-dl");
const MIB: u64 = 1024 * 1024;

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Why this host cannot run the swap tests, if it cannot.
fn missing() -> Option<&'static str> {
    if !r3map_fuse::can_mount() {
        return Some("needs root and /dev/fuse");
    }
    if !["losetup", "mkswap", "swapon", "swapoff"].iter().all(|p| have(p)) {
        return Some("needs util-linux (losetup, mkswap, swapon)");
    }
    if MemCgroup::root().is_none() {
        return Some("needs a memory cgroup controller");
    }
    None
}

/// The `swap-check` example, built with the tests (`target/debug/examples`).
fn swap_check() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join("examples/swap-check");
    assert!(path.exists(), "{} is missing: build it with `cargo build --examples`", path.display());
    path
}

/// `SwapTotal` of /proc/meminfo, in bytes.
fn swap_total() -> u64 {
    let info = fs::read_to_string("/proc/meminfo").unwrap();
    let line = info.lines().find(|l| l.starts_with("SwapTotal:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn is_swap(device: &Path) -> bool {
    let swaps = fs::read_to_string("/proc/swaps").unwrap();
    swaps.lines().any(|l| l.split_whitespace().next() == Some(device.to_str().unwrap()))
}

fn is_mounted(dir: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(dir.to_str().unwrap()))
}

/// The file a loop device is attached to, if it is attached.
fn loop_backing(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok().map(|s| s.trim().to_owned())
}

/// A memory cgroup limited to a number of bytes (cgroup v2 where the memory controller is
/// there, v1 otherwise); removed on drop.
struct MemCgroup {
    dir: PathBuf,
}

impl MemCgroup {
    /// The hierarchy to create cgroups in, and whether it is v2.
    fn root() -> Option<(PathBuf, bool)> {
        let v2 = Path::new("/sys/fs/cgroup");
        if fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"))
        {
            return Some((v2.to_owned(), true));
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        v1.join("memory.limit_in_bytes").exists().then(|| (v1.to_owned(), false))
    }

    fn new(limit: u64) -> Self {
        let (root, v2) = Self::root().unwrap();
        let dir = root.join(format!("r3map-ram-dl-{}", std::process::id()));
        if v2 {
            let _ = fs::write(root.join("cgroup.subtree_control"), "+memory");
        }
        fs::create_dir(&dir).unwrap();
        let group = Self { dir };
        let limit_file = if v2 { "memory.max" } else { "memory.limit_in_bytes" };
        fs::write(group.dir.join(limit_file), limit.to_string()).unwrap();
        group
    }

    /// Runs `program args` inside the cgroup and waits for it.
    fn run(&self, program: &Path, args: &[&str]) -> std::process::Output {
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {}/cgroup.procs && exec \"$@\"", self.dir.display()))
            .arg("sh")
            .arg(program)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // The processes in it have exited; the kernel may take a moment to let the group go.
        for _ in 0..50 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove the cgroup {}", self.dir.display());
    }
}

/// A running ram-dl. Dropped after a failure, it takes its swap off first (while it still serves
/// the swap), then stops, and whatever it left (loop device, mount) is removed.
struct RamDl {
    proc: Proc,
    device: PathBuf,
    mountpoint: PathBuf,
}

impl RamDl {
    fn start(server: &str, mountpoint: &Path, dir: &Path) -> Self {
        let proc = Proc::start(
            RAM_DL,
            &["--raddr", server, "--insecure-plaintext", "--mountpoint", mountpoint.to_str().unwrap()],
            dir,
            &[],
        );
        // "swap on /dev/loopN: SIZE; ..."
        let device = proc.ready.strip_prefix("swap on ").unwrap().split(':').next().unwrap().into();
        Self { proc, device, mountpoint: mountpoint.to_owned() }
    }
}

impl Drop for RamDl {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if is_swap(&self.device) {
            let _ = Command::new("swapoff").arg(&self.device).status();
        }
        if self.proc.child.try_wait().ok().flatten().is_none() {
            self.proc.interrupt();
            let deadline = Instant::now() + STARTUP;
            while self.proc.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if loop_backing(&self.device).is_some() {
            let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).status();
        }
    }
}

#[test]
fn remote_memory_is_swap_for_a_memory_limited_process_and_ctrl_c_removes_it() {
    if let Some(why) = missing() {
        return eprintln!("skipped: {why}");
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Proc::start(
        RAM_UL,
        &[
            "--backend",
            "memory",
            "--size",
            "384MiB",
            "--addr",
            "127.0.0.1:0",
            "--insecure-plaintext",
            "--mlock",
            "--metrics",
            "127.0.0.1:0",
        ],
        dir.path(),
        &[],
    );
    let metrics = server.metrics();
    let before = swap_total();
    let mountpoint = dir.path().join("mnt");
    fs::create_dir(&mountpoint).unwrap();
    let mut dl = RamDl::start(&server.tcp(), &mountpoint, dir.path());
    let device = dl.device.clone();

    // The swap is there, as big as the server's memory (less the swap header's page).
    assert!(is_swap(&device), "{} is not in /proc/swaps", device.display());
    assert!(device.to_str().unwrap().starts_with("/dev/loop"), "{}", device.display());
    let added = swap_total() - before;
    assert!((384 * MIB - 8192..=384 * MIB).contains(&added), "swap grew by {added} bytes");
    assert!(is_mounted(&mountpoint));

    // A process limited to 48 MiB fills 160 MiB and checks it back: most of it went out to the
    // remote memory and came back intact.
    let group = MemCgroup::new(48 * MIB);
    let out = group.run(&swap_check(), &["160"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "swap-check failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("swap-check: OK"), "{stdout}");
    let peak: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("swap-check: peak swapped out: "))
        .and_then(|v| v.trim_end_matches(" KiB").parse().ok())
        .unwrap();
    assert!(peak > 64 * 1024, "only {peak} KiB were swapped out:\n{stdout}");
    drop(group);
    // The pages went to the server and came back from it.
    let scraped = scrape(&metrics);
    let counter = |name: &str| -> f64 {
        scraped.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    };
    let writes = counter("r3map_server_requests_total{op=\"write\"}");
    let read = counter("r3map_server_bytes_total{direction=\"read\"}");
    assert!(
        writes >= 100.0 && read >= (64 * MIB) as f64,
        "the server saw {writes} writes, {read} bytes read:\n{scraped}"
    );

    // Ctrl-C: swapoff, then the loop device and the mount go, and ram-dl exits cleanly.
    dl.proc.interrupt();
    let status = dl.proc.wait(STARTUP);
    assert!(status.success(), "ram-dl exited with {status}:\n{}", dl.proc.stderr());
    assert!(!is_swap(&device));
    assert_eq!(swap_total(), before);
    assert_eq!(loop_backing(&device), None, "{} is still attached", device.display());
    assert!(!is_mounted(&mountpoint));
}

/// A ram-ul serving 64 MiB of memory on a free port.
fn small_server(dir: &Path) -> Proc {
    Proc::start(
        RAM_UL,
        &["--backend", "memory", "--size", "64MiB", "--addr", "127.0.0.1:0", "--insecure-plaintext"],
        dir,
        &[],
    )
}

/// Runs ram-dl with `args` (plaintext) where it must fail before any swap exists; its standard
/// error.
fn ram_dl_fails(raddr: &str, args: &[&str]) -> String {
    let out = Command::new(RAM_DL)
        .args(["--raddr", raddr, "--insecure-plaintext"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("swap on"));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_unreachable_server_is_a_clear_error_and_leaves_no_swap() {
    if let Some(why) = missing() {
        return eprintln!("skipped: {why}");
    }
    let nobody = r3map_testkit::HeldPort::new();
    let stderr = ram_dl_fails(&nobody.addr().to_string(), &[]);
    assert!(stderr.contains(&format!("cannot reach the server at {}", nobody.addr())), "{stderr}");
}

#[test]
fn a_size_other_than_the_servers_is_refused() {
    if let Some(why) = missing() {
        return eprintln!("skipped: {why}");
    }
    let dir = tempfile::tempdir().unwrap();
    let server = small_server(dir.path());
    let stderr = ram_dl_fails(&server.tcp(), &["--size", "128MiB"]);
    assert!(stderr.contains("serves 64.0 MiB") && stderr.contains("not --size"), "{stderr}");
}

#[test]
fn nbd_asked_for_without_nbd_ko_says_how_to_load_it() {
    if let Some(why) = missing() {
        return eprintln!("skipped: {why}");
    }
    if Path::new("/sys/module/nbd").exists() {
        return eprintln!("skipped: nbd.ko is loaded here (the VM tests cover the NBD path)");
    }
    let dir = tempfile::tempdir().unwrap();
    let server = small_server(dir.path());
    let stderr = ram_dl_fails(&server.tcp(), &["--frontend", "nbd"]);
    assert!(stderr.contains("modprobe nbd") && stderr.contains("--frontend fuse"), "{stderr}");
}
