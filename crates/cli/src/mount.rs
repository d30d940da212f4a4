//! `r3map mount`: a remote (or any backend) as a local file, or a block device with `--loop`,
//! until Ctrl-C; and `r3map cleanup` for a mount left behind by a crash.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use r3map::OpenOptions;
use r3map_core::Backend as _;
use r3map_mount::{Frontend, FuseOptions, Hooks, ManagedOptions, Mount, MountOptions};
use r3map_nbd::kernel::KernelOptions;
use tokio::signal::unix::{SignalKind, signal};

use crate::backend_url;
use crate::units::{human, parse_duration, parse_size};

/// The flags of `r3map mount`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to mount: a server, a store or a local backend, as a backend URL.
    #[arg(
        value_name = "REMOTE-URL",
        long_help = backend_url::help("What to mount: a server, a store or a local backend:", "")
    )]
    pub remote: String,
    /// An existing directory; the resource appears in it as one file (see --file-name). Not
    /// used with --nbd.
    #[arg(required_unless_present = "nbd")]
    pub mountpoint: Option<PathBuf>,
    /// Serve the resource as a kernel NBD device (/dev/nbdN) instead of a FUSE file: a block
    /// device without FUSE and a loop device in between. Needs root and the nbd module.
    #[arg(long, conflicts_with_all = ["loop_device", "direct_io", "page_cache"])]
    pub nbd: bool,
    /// Connections between the kernel and this process with --nbd.
    #[arg(long, default_value_t = 4, value_name = "N", requires = "nbd")]
    pub nbd_connections: usize,
    /// Managed mount: a local cache, chunks pulled on first access and in the background, writes
    /// pushed in the background. Without it, every access goes to the remote.
    #[arg(long)]
    pub managed: bool,
    /// The local cache of a managed mount, a backend URL (`file:///var/cache/x?size=...`).
    /// Default: memory of the remote's size.
    #[arg(long, value_name = "BACKEND-URL", requires = "managed")]
    pub local: Option<String>,
    /// Attach a loop device to the file and print it: a block device (`mkfs`, `mount`, swap).
    #[arg(long = "loop")]
    pub loop_device: bool,
    /// Bypass the page cache: every read and write goes to the backend (`mmap` still works on
    /// Linux 6.6 and later). The default for managed mounts.
    #[arg(long, conflicts_with = "page_cache")]
    pub direct_io: bool,
    /// Serve the file through the page cache (the kernel caches reads and writes back later).
    /// The default for direct mounts.
    #[arg(long)]
    pub page_cache: bool,
    /// Name of the file inside the mount point.
    #[arg(long, default_value = "r3map", value_name = "NAME")]
    pub file_name: String,
    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Chunk size of a managed mount: the unit of pulling, pushing and state.
    #[arg(long, default_value = "64KiB", value_parser = parse_size, value_name = "SIZE")]
    pub chunk_size: u64,
    /// Background pull requests in flight.
    #[arg(long, default_value_t = 16)]
    pub pull_depth: usize,
    /// Largest background pull request (adjacent missing chunks are merged).
    #[arg(long, default_value = "16MiB", value_parser = parse_size, value_name = "SIZE")]
    pub pull_request: u64,
    /// Pull everything before the mount appears.
    #[arg(long)]
    pub pull_first: bool,
    /// No background pull: chunks come only when accessed.
    #[arg(long)]
    pub no_pull: bool,
    /// No push: writes stay in the local cache (the remote is never changed).
    #[arg(long)]
    pub no_push: bool,
    /// Time between background pushes.
    #[arg(long, default_value = "20s", value_parser = parse_duration, value_name = "DURATION")]
    pub push_interval: Duration,
    /// Push requests in flight.
    #[arg(long, default_value_t = 4)]
    pub push_depth: usize,
}

/// `r3map mount`: mounts, shows progress, and on SIGINT or SIGTERM syncs, unmounts and pushes
/// what is left; a second signal exits at once.
///
/// # Errors
/// The remote or the cache cannot be opened, the mount cannot be set up, or the final push failed.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let open = OpenOptions { read_only: false, chunk_size: args.chunk_size, ..OpenOptions::default() };
    let remote = r3map::open(&args.remote, &open)?;
    let size = remote.backend.size();
    let fuse = FuseOptions {
        file_name: args.file_name.clone(),
        threads: args.threads,
        direct_io: match (args.direct_io, args.page_cache) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        },
        ..FuseOptions::default()
    };
    let frontend = if args.nbd {
        Frontend::Nbd(KernelOptions { connections: args.nbd_connections, ..KernelOptions::default() })
    } else {
        Frontend::Fuse(fuse)
    };
    let options = MountOptions { frontend, loop_device: args.loop_device };
    let mountpoint = args.mountpoint.clone().unwrap_or_default();
    let mount = if args.managed {
        let local_url = args.local.clone().unwrap_or_else(|| format!("memory:{size}"));
        let local = r3map::open(&local_url, &open)?;
        let managed = ManagedOptions {
            chunk_size: args.chunk_size,
            pull: !args.no_pull,
            pull_depth: args.pull_depth,
            pull_request: args.pull_request,
            pull_first: args.pull_first,
            push: !args.no_push,
            push_depth: args.push_depth,
            push_interval: args.push_interval,
            ..ManagedOptions::default()
        };
        Mount::managed(remote.backend, local.backend, &mountpoint, &options, managed, Hooks::default())
    } else {
        Mount::direct(remote.backend, &mountpoint, &options, Hooks::default())
    }
    .with_context(|| format!("cannot mount {} at {}", remote.description, mountpoint.display()))?;
    println!(
        "mounted {} ({}, {}) at {} in {:.1?}",
        remote.description,
        human(size),
        if args.managed { "managed" } else { "direct" },
        mount.path().display(),
        mount.opened_in()
    );

    let mount = Arc::new(mount);
    r3map_net::Io::shared().block_on(wait_for_signal(&mount))?;
    let mount = Arc::try_unwrap(mount).map_err(|_| anyhow::anyhow!("the mount is still in use"))?;
    let stats = mount.synced().map(|s| s.stats());
    mount.close().context("closing the mount (sync, unmount, final push) failed")?;
    if let Some(s) = stats {
        println!(
            "closed: pulled {} in {} requests, pushed {} in {} requests",
            human(s.pulled_bytes),
            s.pull_requests,
            human(s.pushed_bytes),
            s.push_requests
        );
    } else {
        println!("closed");
    }
    Ok(())
}

async fn wait_for_signal(mount: &Arc<Mount>) -> anyhow::Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let bar = mount.synced().map(|s| {
        let bar = ProgressBar::new(s.geometry().chunks());
        bar.set_style(
            ProgressStyle::with_template("{spinner} pulled {pos}/{len} chunks [{bar:30}] {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    });
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                if let (Some(bar), Some(s)) = (&bar, mount.synced()) {
                    let st = s.stats();
                    bar.set_position(st.local_chunks);
                    bar.set_message(format!("pushed {} chunks, {} dirty", st.pushed_chunks, st.dirty_chunks));
                }
            }
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    eprintln!(
        "stopping: syncing, unmounting and pushing what is left (send the signal again to exit at once)"
    );
    // A second signal while closing exits at once.
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => std::process::exit(130),
            _ = sigterm.recv() => std::process::exit(143),
        }
    });
    Ok(())
}

/// The flags of `r3map cleanup`.
#[derive(Debug, clap::Args)]
pub struct CleanupArgs {
    /// The mount point a crashed `r3map mount` left behind.
    pub mountpoint: PathBuf,
}

/// `r3map cleanup`: detaches loop devices over files in the mount point and lazily unmounts a
/// stale FUSE mount.
///
/// # Errors
/// The unmount failed.
pub fn cleanup(args: &CleanupArgs) -> anyhow::Result<()> {
    let mut detached = 0;
    let list = std::process::Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output();
    if let Ok(out) = list {
        let prefix = args.mountpoint.to_string_lossy().trim_end_matches('/').to_owned() + "/";
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let mut parts = line.split_whitespace();
            if let (Some(dev), Some(file)) = (parts.next(), parts.next())
                && file.starts_with(&prefix)
            {
                let ok = std::process::Command::new("losetup")
                    .args(["--detach", dev])
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    println!("detached {dev} ({file})");
                    detached += 1;
                }
            }
        }
    }
    let unmounted = r3map_fuse::cleanup_stale(&args.mountpoint)
        .with_context(|| format!("cannot clean up {}", args.mountpoint.display()))?;
    match (unmounted, detached) {
        (true, _) => println!("unmounted the stale mount at {}", args.mountpoint.display()),
        (false, 0) => println!("nothing to clean up at {}", args.mountpoint.display()),
        (false, _) => {}
    }
    if !unmounted && detached == 0 && !args.mountpoint.is_dir() {
        bail!("{} is not a directory", args.mountpoint.display());
    }
    Ok(())
}
