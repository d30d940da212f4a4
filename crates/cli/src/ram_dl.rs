//! `ram-dl`: "download RAM". Memory served by a `ram-ul` (or any r3map server) becomes swap space
//! on this host: the export is attached as a block device, formatted with `mkswap` and enabled
//! with `swapon`. SIGINT or SIGTERM runs `swapoff` (the kernel reads every swapped page back) and
//! removes the device; a second signal while that runs exits at once.
//!
//! # The device
//! - **Kernel NBD** (`/dev/nbdN`) when `nbd.ko` is loaded or loads with `modprobe nbd`: the
//!   kernel's NBD client talks to this process over socketpairs, several connections at once.
//! - **FUSE and a loop device** otherwise: the export is a single-file FUSE file system in direct
//!   I/O mode (no page cache between the swap and this process), and a loop device over that file
//!   is the swap device.
//!
//! `--frontend` forces one of them. ram-dl says which one it took.
//!
//! # A swap daemon must not wait on its own swap
//! Pages this process needs while it serves swap I/O must never be swapped out to that swap, and
//! its memory allocations must not wait for reclaim, which would write to that swap and wait for
//! this process. So before it serves anything ram-dl:
//! - locks its memory (`mlockall`: what is mapped now at once, what is mapped later as it is
//!   touched), so its pages are never reclaimed;
//! - marks itself an I/O flusher (`PR_SET_IO_FLUSHER`, as the kernel asks of user-space block
//!   device servers), so its allocations never recurse into I/O and are throttled less.
//!
//! The data paths reuse their buffers (the NBD server's and the client's buffer pools), so a
//! steady stream of swap I/O does not grow the heap.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};
use r3map_core::{Aligned, Backend as _, Chunked, SharedBackend};
use r3map_fuse::FuseOptions;
use r3map_mount::{Frontend, Hooks, Mount, MountOptions};
use r3map_nbd::kernel::{self, KernelOptions};
use r3map_net::client::DEFAULT_PORT;
use r3map_net::{ClientOptions, RemoteBackend};

use crate::units::{human, parse_size};

/// Download RAM: use memory served by a ram-ul (on another host) as swap space on this one.
///
/// Connects to the server at --raddr, attaches its memory as a block device (a kernel NBD device,
/// or a FUSE file and a loop device where nbd.ko is missing), runs mkswap and swapon on it, and
/// serves it until SIGINT or SIGTERM; then swapoff reads the swapped pages back and the device is
/// removed. A second signal while that runs exits at once, and whatever is still swapped out is
/// lost. Needs root. The server must be one this host can rely on: swapped pages live only there.
/// ram-dl locks its own memory, so it never waits on the swap it serves.
#[derive(Debug, Parser)]
#[command(name = "ram-dl", version, about)]
pub struct Cli {
    /// The server: HOST:PORT (port 1337 if left out), or an r3map URL (r3map://, r3map+plain://,
    /// r3map+unix://) with parameters of its own.
    #[arg(long, default_value = "localhost:1337", value_name = "ADDR")]
    pub raddr: String,
    /// Size of the swap in bytes (4294967296) or with a unit (4GiB); it must be what the server
    /// serves, which is the default.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    pub size: Option<u64>,
    /// Chunk size: with --chunking, the server only ever gets whole, aligned chunks; also the
    /// device's block size (up to 4096).
    #[arg(long, default_value = "4096", value_parser = parse_size, value_name = "SIZE")]
    pub chunk_size: u64,
    /// Client-side chunking: requests to the server are widened to whole chunks. On by default;
    /// --chunking=false sends the kernel's requests as they are.
    #[arg(
        long,
        value_name = "BOOL",
        default_value = "true",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    pub chunking: bool,
    /// Log every step and more (`RUST_LOG` overrides).
    #[arg(
        long,
        value_name = "BOOL",
        default_value = "false",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        value_parser = BoolishValueParser::new()
    )]
    pub verbose: bool,
    /// The block device: kernel NBD, FUSE plus a loop device, or auto (NBD where nbd.ko is
    /// available).
    #[arg(long, value_enum, default_value_t = FrontendChoice::Auto)]
    pub frontend: FrontendChoice,
    /// Connections between the kernel's NBD client and this process (NBD only).
    #[arg(long, default_value = "4", value_name = "N")]
    pub connections: usize,
    /// Connections to the server.
    #[arg(long, default_value = "4", value_name = "N")]
    pub server_connections: usize,
    /// swapon's priority for this swap (-1 to 32767); the kernel's default otherwise.
    #[arg(long, value_name = "N", allow_negative_numbers = true,
          value_parser = clap::value_parser!(i32).range(-1..=32767))]
    pub priority: Option<i32>,
    /// Where the FUSE file system is mounted (FUSE only); a fresh directory under /run (or the
    /// temporary directory) by default.
    #[arg(long, value_name = "DIR")]
    pub mountpoint: Option<PathBuf>,
    #[command(flatten)]
    pub security: ClientSecurityArgs,
}

/// How ram-dl reaches the server.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Security (TCP needs --ca or --insecure-plaintext)")]
pub struct ClientSecurityArgs {
    /// The CA (PEM) that signed the server's certificate: TLS 1.3.
    #[arg(long, value_name = "PEM", conflicts_with = "insecure_plaintext")]
    pub ca: Option<PathBuf>,
    /// A client certificate (PEM), for a server that requires one.
    #[arg(long, value_name = "PEM", requires = "key", requires = "ca")]
    pub cert: Option<PathBuf>,
    /// The private key (PEM) of --cert.
    #[arg(long, value_name = "PEM", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Read the server's shared secret from a file (R3MAP_TOKEN is used when this is not given).
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Talk to the server without encryption: only on a trusted network.
    #[arg(long)]
    pub insecure_plaintext: bool,
}

/// Which block device ram-dl makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FrontendChoice {
    /// Kernel NBD where nbd.ko is loaded or loads; FUSE and a loop device otherwise.
    Auto,
    /// A kernel NBD device (/dev/nbdN); fails without nbd.ko.
    Nbd,
    /// A FUSE file and a loop device (/dev/loopN).
    Fuse,
}

impl Cli {
    /// The server's URL and the client's options, from --raddr and the security flags.
    ///
    /// # Errors
    /// No security choice for TCP; a bad address; unreadable PEM or token files.
    pub fn client(&self) -> anyhow::Result<(r3map_net::client::Address, ClientOptions)> {
        let url = if self.raddr.contains("://") {
            if self.security.ca.is_some() || self.security.insecure_plaintext {
                bail!(
                    "--raddr is a URL: give the security in it (?ca=PATH, or r3map+plain://), not as flags"
                );
            }
            self.raddr.clone()
        } else {
            let addr = if self.raddr.contains(':') {
                self.raddr.clone()
            } else {
                format!("{}:{DEFAULT_PORT}", self.raddr)
            };
            let addr = addr.strip_prefix(':').map_or(addr.clone(), |port| format!("localhost:{port}"));
            let scheme = match (&self.security.ca, self.security.insecure_plaintext) {
                (Some(_), _) => "r3map",
                (None, true) => "r3map+plain",
                (None, false) => bail!(
                    "choose how to reach the server: --ca PEM (TLS, the CA of the server's certificate) or \
                     --insecure-plaintext (no encryption, trusted networks only)"
                ),
            };
            let mut url = url::Url::parse(&format!("{scheme}://{addr}/default"))
                .with_context(|| format!("'{}' is not HOST:PORT", self.raddr))?;
            {
                let mut q = url.query_pairs_mut();
                for (key, path) in
                    [("ca", &self.security.ca), ("cert", &self.security.cert), ("key", &self.security.key)]
                {
                    if let Some(p) = path {
                        q.append_pair(key, &p.to_string_lossy());
                    }
                }
            }
            let mut s = url.to_string();
            if s.ends_with('?') {
                s.pop();
            }
            s
        };
        let (address, mut options) = ClientOptions::from_url(&url)?;
        if let Some(path) = &self.security.token_file {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?;
            options.token = Some(t.trim_end_matches(['\n', '\r']).to_owned());
        } else if options.token.is_none() {
            options.token = std::env::var("R3MAP_TOKEN").ok().filter(|t| !t.is_empty());
        }
        if options.token.as_deref() == Some("") {
            bail!("the token is empty");
        }
        options.connections = self.server_connections.max(1);
        Ok((address, options))
    }
}

/// Locks this process's memory and marks it an I/O flusher; see the module docs. The flusher mark
/// needs `CAP_SYS_RESOURCE`: without it (some containers drop it) ram-dl warns and goes on, since
/// locked memory is the part that prevents the deadlock.
///
/// # Errors
/// The memory cannot be locked (no `CAP_IPC_LOCK`, or a memlock limit).
pub fn lock_memory() -> anyhow::Result<()> {
    use rustix::mm::{MlockAllFlags, mlockall};
    // What is mapped now is faulted in and locked at once; what is mapped later (heap, thread
    // stacks) is locked page by page as it is touched, so large reservations cost nothing.
    mlockall(MlockAllFlags::CURRENT).context("mlockall: cannot lock this process's memory")?;
    mlockall(MlockAllFlags::FUTURE | MlockAllFlags::ONFAULT)
        .context("mlockall: cannot lock this process's future memory")?;
    if let Err(e) = rustix::process::configure_io_flusher_behavior(true) {
        tracing::warn!(
            error = %e,
            "cannot mark this process an I/O flusher (PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE): under \
             heavy memory pressure its allocations may wait for reclaim"
        );
    }
    Ok(())
}

/// Whether the kernel's NBD driver is there, loading it with `modprobe nbd` if needed.
fn nbd_available() -> bool {
    kernel::driver_loaded()
        || (Command::new("modprobe").args(["-q", "nbd"]).status().is_ok_and(|s| s.success())
            && kernel::driver_loaded())
}

/// Runs a program of util-linux (or busybox) and turns its failure into an error with its output.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (util-linux provides it)"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A device used as swap; `swapoff` when [`SwapOn::off`] is called (never on drop: a failed
/// swapoff must leave the device served).
struct SwapOn {
    device: PathBuf,
}

impl SwapOn {
    fn on(device: &Path, priority: Option<i32>) -> anyhow::Result<Self> {
        let dev = device.to_string_lossy();
        run("mkswap", &[&dev])?;
        let prio = priority.map(|p| p.to_string());
        let mut args = Vec::new();
        if let Some(p) = &prio {
            args.extend(["-p", p.as_str()]);
        }
        args.push(&dev);
        run("swapon", &args)?;
        Ok(Self { device: device.to_owned() })
    }

    fn off(&self) -> anyhow::Result<()> {
        run("swapoff", &[&self.device.to_string_lossy()])
    }
}

/// Swap space in use on a device, in bytes, from `/proc/swaps`; `None` when it is not swap.
fn swap_used(device: &Path) -> Option<u64> {
    swap_used_in(&std::fs::read_to_string("/proc/swaps").ok()?, device)
}

/// [`swap_used`] from the text of `/proc/swaps`.
fn swap_used_in(swaps: &str, device: &Path) -> Option<u64> {
    let name = device.to_string_lossy();
    swaps.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == name).then(|| f.nth(2)?.parse::<u64>().ok().map(|k| k * 1024))?
    })
}

/// Signals, as ram-dl handles them: the first asks for the swap to be removed; one that arrives
/// while it is being removed exits at once.
fn watch_signals(removing: Arc<AtomicBool>) -> anyhow::Result<mpsc::Receiver<()>> {
    let (tx, rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    // A task on the shared runtime, whose threads are up before the swap is.
    drop(r3map_net::Io::shared().handle().spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (mut int, mut term) = match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(i), Ok(t)) => (i, t),
            (Err(e), _) | (_, Err(e)) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let _ = ready_tx.send(Ok(()));
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if removing.load(Ordering::SeqCst) {
                eprintln!(
                    "ram-dl: second signal, exiting without removing the swap: anything still \
                     swapped out to it is lost"
                );
                std::process::exit(130);
            }
            if tx.send(()).is_err() {
                return;
            }
        }
    }));
    ready_rx.recv().context("the signal task")?.context("cannot catch SIGINT and SIGTERM")?;
    Ok(rx)
}

fn say(msg: &str) {
    // Not `println!`: a closed standard output must not take the swap down.
    let _ = writeln!(std::io::stdout().lock(), "{msg}");
}

/// Runs ram-dl until the swap is removed.
///
/// # Errors
/// Not root; the server cannot be reached; no device could be attached; mkswap or swapon failed.
pub fn run_cli(cli: &Cli) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("ram-dl needs root: it attaches a block device and runs swapon");
    }
    if cli.chunk_size == 0 || !cli.chunk_size.is_power_of_two() || cli.chunk_size < 512 {
        bail!("--chunk-size must be a power of two of at least 512 bytes");
    }
    let (address, options) = cli.client()?;
    let removing = Arc::new(AtomicBool::new(false));
    let signals = watch_signals(Arc::clone(&removing))?;
    lock_memory()?;

    let remote = RemoteBackend::connect(address.clone(), options)
        .with_context(|| format!("cannot reach the server at {address}"))?;
    let size = remote.size();
    if let Some(want) = cli.size
        && want != size
    {
        bail!(
            "the server at {address} serves {} ({size} bytes), not --size {want}; leave --size out to use it",
            human(size)
        );
    }
    if size < 40 * 1024 {
        bail!("the server at {address} serves {}: too small for swap", human(size));
    }
    let remote: SharedBackend = Arc::new(remote);
    let backend: SharedBackend = if cli.chunking {
        Arc::new(Aligned::new(Chunked::new(remote, cli.chunk_size)?, cli.chunk_size)?)
    } else {
        remote
    };

    let use_nbd = match cli.frontend {
        FrontendChoice::Nbd => true,
        FrontendChoice::Fuse => false,
        FrontendChoice::Auto => nbd_available(),
    };
    let (mount, how, _dir) = if use_nbd {
        let kernel = KernelOptions {
            connections: cli.connections.max(1),
            block_size: cli.chunk_size.min(4096),
            ..KernelOptions::default()
        };
        let options = MountOptions { frontend: Frontend::Nbd(kernel), loop_device: false };
        let mount = Mount::direct(backend, Path::new("/"), &options, Hooks::default())
            .context("cannot attach a kernel NBD device (try --frontend fuse)")?;
        let how = format!("kernel NBD, {} connections", kernel.connections);
        (mount, how, None)
    } else {
        let (dir, mountpoint) = match &cli.mountpoint {
            Some(p) => (None, p.clone()),
            None => {
                let base =
                    if Path::new("/run").is_dir() { PathBuf::from("/run") } else { std::env::temp_dir() };
                let dir = tempfile::Builder::new()
                    .prefix("ram-dl-")
                    .tempdir_in(&base)
                    .with_context(|| format!("cannot make a mount point in {}", base.display()))?;
                let path = dir.path().to_owned();
                (Some(dir), path)
            }
        };
        let fuse = FuseOptions { direct_io: Some(true), ..FuseOptions::default() };
        let options = MountOptions { frontend: Frontend::Fuse(fuse), loop_device: true };
        let mount = Mount::direct(backend, &mountpoint, &options, Hooks::default())
            .context("cannot make a FUSE file and a loop device")?;
        let reason = if cli.frontend == FrontendChoice::Fuse {
            "as asked"
        } else {
            "nbd.ko is not available (modprobe nbd failed)"
        };
        let how = format!("FUSE file {} and a loop device, {reason}", mount.file_path().display());
        (mount, how, dir)
    };
    let device = mount.device().context("the mount has no block device")?;
    say(&format!("{}: {} from {address} ({how})", device.display(), human(size)));

    let swap = match SwapOn::on(&device, cli.priority) {
        Ok(s) => s,
        Err(e) => {
            let _ = mount.close();
            return Err(e);
        }
    };
    say(&format!("swap on {}: {}; Ctrl-C removes it", device.display(), human(size)));

    loop {
        if signals.recv().is_err() {
            bail!("the signal thread stopped");
        }
        removing.store(true, Ordering::SeqCst);
        let used = swap_used(&device).unwrap_or(0);
        say(&format!(
            "removing the swap: swapoff reads {} back into memory (a second Ctrl-C exits at once)",
            human(used)
        ));
        match swap.off() {
            Ok(()) => break,
            // Someone else (an administrator's swapoff) took it off already.
            Err(_) if swap_used(&device).is_none() => break,
            Err(e) => {
                removing.store(false, Ordering::SeqCst);
                eprintln!(
                    "ram-dl: {e:#}\nram-dl: the swap stays on {} and is still served; free memory and \
                     send SIGINT again",
                    device.display()
                );
            }
        }
    }
    // Give the kernel a moment to drop its last references to the device before it is detached.
    std::thread::sleep(Duration::from_millis(10));
    mount.close().with_context(|| format!("removing {}", device.display()))?;
    say(&format!("removed the swap and {}", device.display()));
    Ok(())
}

/// `ram-dl`'s entry point.
///
/// # Errors
/// See [`run_cli`].
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    crate::init_logging(u8::from(cli.verbose));
    run_cli(&cli)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_defaults_of_the_original() {
        let cli = Cli::try_parse_from(["ram-dl"]).unwrap();
        assert_eq!(cli.raddr, "localhost:1337");
        assert_eq!(cli.size, None);
        assert_eq!(cli.chunk_size, 4096);
        assert!(cli.chunking && !cli.verbose);
        assert_eq!(cli.frontend, FrontendChoice::Auto);
        let cli = Cli::try_parse_from([
            "ram-dl",
            "--raddr",
            "10.0.0.2:1337",
            "--size",
            "4294967296",
            "--chunk-size",
            "4096",
            "--chunking=false",
            "--verbose",
        ])
        .unwrap();
        assert_eq!(cli.size, Some(4 << 30));
        assert!(!cli.chunking && cli.verbose);
        assert!(Cli::try_parse_from(["ram-dl", "--priority", "-2"]).is_err());
        assert_eq!(Cli::try_parse_from(["ram-dl", "--priority", "-1"]).unwrap().priority, Some(-1));
    }

    #[test]
    fn addresses_and_security_make_the_url() {
        let parse = |args: &[&str]| {
            let mut all = vec!["ram-dl"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().client()
        };
        let e = parse(&[]).unwrap_err().to_string();
        assert!(e.contains("--ca") && e.contains("--insecure-plaintext"), "{e}");
        let (addr, opts) = parse(&["--insecure-plaintext"]).unwrap();
        assert_eq!(addr.to_string(), "localhost:1337");
        assert_eq!(opts.export, "default");
        assert_eq!(opts.connections, 4);
        let (addr, _) = parse(&["--insecure-plaintext", "--raddr", "example.org"]).unwrap();
        assert_eq!(addr.to_string(), "example.org:1337");
        let (addr, _) = parse(&["--insecure-plaintext", "--raddr", ":2000"]).unwrap();
        assert_eq!(addr.to_string(), "localhost:2000");
        let (addr, opts) = parse(&["--raddr", "r3map+plain://h:9/other?token=t"]).unwrap();
        assert_eq!((addr.to_string().as_str(), opts.export.as_str()), ("h:9", "other"));
        assert_eq!(opts.token.as_deref(), Some("t"));
        let e = parse(&["--insecure-plaintext", "--raddr", "r3map+plain://h:9"]).unwrap_err().to_string();
        assert!(e.contains("is a URL"), "{e}");
        let e = parse(&["--ca", "/nonexistent/ca.pem"]).unwrap_err();
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let (_, opts) = parse(&["--insecure-plaintext", "--token-file", token.to_str().unwrap()]).unwrap();
        assert_eq!(opts.token.as_deref(), Some("s3cret"));
        assert!(Cli::try_parse_from(["ram-dl", "--ca", "a", "--insecure-plaintext"]).is_err());
        assert!(Cli::try_parse_from(["ram-dl", "--cert", "a", "--key", "b"]).is_err());
    }

    #[test]
    fn swap_use_is_read_from_proc_swaps_format() {
        let swaps = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n\
                     /dev/loop0                              partition\t393212\t\t1024\t\t-2\n\
                     /dev/nbd3                               partition\t262140\t\t0\t\t-3\n";
        assert_eq!(swap_used_in(swaps, Path::new("/dev/loop0")), Some(1024 * 1024));
        assert_eq!(swap_used_in(swaps, Path::new("/dev/nbd3")), Some(0));
        assert_eq!(swap_used_in(swaps, Path::new("/dev/nbd0")), None);
        assert_eq!(swap_used_in(swaps, Path::new("Filename")), None, "the header is no device");
    }
}
