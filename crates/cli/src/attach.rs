//! `r3map attach` and `r3map detach`: a backend as a kernel NBD device (`/dev/nbdN`) served by
//! this process, through the kernel's generic-netlink NBD interface.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use r3map_nbd::kernel::{self, Interface, KernelDevice, KernelOptions};
use r3map_nbd::{NbdExport, NbdServer};
use tokio::signal::unix::{SignalKind, signal};

use crate::units::{human, parse_size};

/// The flags of `r3map attach`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What the device holds: any backend URL (`memory:SIZE`, `file:///PATH`, an r3map or NBD
    /// server, a store...).
    #[arg(value_name = "BACKEND-URL", long_help = crate::backend_url::help("What the device holds:", ""))]
    pub backend: String,
    /// Sockets between the kernel and this process (the device's connections).
    #[arg(long, default_value = "4", value_name = "N")]
    pub connections: usize,
    /// Use /dev/nbdN; by default the kernel picks a free device.
    #[arg(long, value_name = "N")]
    pub index: Option<u32>,
    /// The device's logical block size (512 to 4096).
    #[arg(long, default_value = "4096", value_parser = parse_size, value_name = "SIZE")]
    pub block_size: u64,
    /// Seconds the device waits for this process to come back (a dead-connection timeout) before
    /// it fails I/O; 0 fails at once.
    #[arg(long, default_value = "0", value_name = "SECONDS")]
    pub dead_conn_timeout: u64,
    /// Chunk size for backends that have one (a directory, a store).
    #[arg(long, default_value = "64KiB", value_parser = parse_size, value_name = "SIZE")]
    pub chunk_size: u64,
    /// Refuse writes (the device is read-only).
    #[arg(long)]
    pub read_only: bool,
    /// How the kernel is told about the device: netlink (Linux 4.12 and later), the driver's
    /// older ioctls, or auto (netlink where the driver offers it).
    #[arg(long, value_enum, default_value_t = KernelInterface::Auto)]
    pub interface: KernelInterface,
}

/// The kernel interface `--interface` chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelInterface {
    /// Netlink, or the ioctls where the driver has no netlink interface.
    Auto,
    /// The generic-netlink `nbd` family: several connections, a dead-connection timeout, the
    /// device picked by the kernel.
    Netlink,
    /// The ioctls on /dev/nbdN: the first unused device is claimed.
    Ioctl,
}

impl From<KernelInterface> for Interface {
    fn from(i: KernelInterface) -> Self {
        match i {
            KernelInterface::Auto => Self::Auto,
            KernelInterface::Netlink => Self::Netlink,
            KernelInterface::Ioctl => Self::Ioctl,
        }
    }
}

/// The flags of `r3map detach`.
#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The device: /dev/nbdN, nbdN or N.
    #[arg(value_name = "DEVICE")]
    pub device: String,
}

/// Attaches, prints the device, serves it until SIGINT or SIGTERM, then detaches and flushes.
///
/// # Errors
/// The backend cannot be opened; the device cannot be attached (no `nbd.ko`, not root).
pub fn run(args: &Args) -> anyhow::Result<()> {
    let options = r3map::OpenOptions {
        read_only: args.read_only,
        chunk_size: args.chunk_size,
        ..r3map::OpenOptions::default()
    };
    let opened = r3map::open(&args.backend, &options)?;
    let size = opened.backend.size();
    let mut export = NbdExport::new("default", Arc::clone(&opened.backend));
    export.read_only = args.read_only;
    let server = NbdServer::new(vec![export]).context("the NBD server")?;
    let options = KernelOptions {
        connections: args.connections,
        block_size: args.block_size,
        dead_conn_timeout: Duration::from_secs(args.dead_conn_timeout),
        index: args.index,
        interface: args.interface.into(),
        ..KernelOptions::default()
    };
    let device = KernelDevice::attach(&server, "default", options).context("cannot attach an NBD device")?;
    // Not `println!`: a closed standard output must not take the device down.
    let _ = writeln!(
        std::io::stdout().lock(),
        "attached {} ({}, {}, {} connections)",
        device.path().display(),
        opened.description,
        human(size),
        args.connections
    );
    r3map_net::Io::shared().block_on(async {
        let mut sigint = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
        let mut sigterm = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        anyhow::Ok(())
    })?;
    let path = device.path();
    device.detach().with_context(|| format!("detaching {}", path.display()))?;
    let _ = writeln!(std::io::stdout().lock(), "detached {}", path.display());
    Ok(())
}

/// Disconnects a device, for one left behind by a process that died.
///
/// # Errors
/// A name that is no NBD device; the kernel's refusal.
pub fn detach(args: &DetachArgs) -> anyhow::Result<()> {
    let name = Path::new(&args.device).file_name().and_then(|n| n.to_str()).unwrap_or(&args.device);
    let Ok(index) = name.trim_start_matches("nbd").parse::<u32>() else {
        bail!("'{}' is not an NBD device: give /dev/nbdN, nbdN or N", args.device);
    };
    kernel::disconnect(index).with_context(|| format!("cannot disconnect /dev/nbd{index}"))?;
    println!("disconnected /dev/nbd{index}");
    Ok(())
}
