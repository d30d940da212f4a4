//! Kernel NBD devices (`/dev/nbdN`) served by this process.
//!
//! [`KernelDevice::attach`] hands the kernel's NBD driver one end of each of several socketpairs
//! through the generic-netlink `nbd` family, with the export's size, block size and transmission
//! flags, and serves the other ends in-process with [`NbdServer::serve_transmission`]. The kernel
//! picks a free device (or takes the index asked for) in the same call, so there is no race over
//! sysfs with other processes; several sockets give the device several connections
//! (multi-connection); a dead-connection timeout lets the device wait for a server instead of
//! failing I/O at once. [`KernelDevice::detach`] (or dropping the device) disconnects it and
//! finishes the requests in flight; [`disconnect`] removes a device left behind by a process
//! that died.
//!
//! Kernels without the netlink interface (before 4.12, or built without it) are configured with
//! the driver's older ioctls instead ([`Interface`]): the device is then the first one sysfs shows
//! unused, claimed by its first `NBD_SET_SOCK` (a device another process claimed first answers
//! `EBUSY`, and the next one is tried), and a thread of this process sits in `NBD_DO_IT` while it
//! runs. The dead-connection timeout is a netlink feature and is not set that way.
//!
//! It needs root (`CAP_SYS_ADMIN`) and the `nbd` module (`modprobe nbd`); the errors say so.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use r3map_net::Io;
use r3map_sys::nbd_ioctl;

use tokio::sync::watch;

use crate::server::{ConnectionError, NbdServer};
use r3map_sys::netlink::{Attr, GenlSocket, RawAttr};

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_GENL_VERSION: u8 = 1;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// How a device is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelOptions {
    /// Sockets (connections) between the kernel and the server.
    pub connections: usize,
    /// The device's logical block size: 512 to 4096, a power of two.
    pub block_size: u64,
    /// A request without an answer for this long fails (zero: the kernel's default of 30 s).
    pub timeout: Duration,
    /// How long the device waits for a connection to come back before failing I/O (zero: it fails
    /// at once).
    pub dead_conn_timeout: Duration,
    /// The device to use (`/dev/nbdN`); `None` lets the kernel pick a free one.
    pub index: Option<u32>,
    /// How the kernel is told: netlink, or the ioctls where netlink is missing.
    pub interface: Interface,
}

/// The kernel interface a device is configured through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interface {
    /// Netlink, or the ioctls when the kernel's driver has no netlink interface.
    #[default]
    Auto,
    /// The generic-netlink `nbd` family (Linux 4.12 and later).
    Netlink,
    /// The driver's ioctls on `/dev/nbdN`.
    Ioctl,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            connections: 4,
            block_size: 4096,
            timeout: Duration::ZERO,
            dead_conn_timeout: Duration::ZERO,
            index: None,
            interface: Interface::Auto,
        }
    }
}

/// A kernel NBD device served by this process; disconnected when detached or dropped.
#[derive(Debug)]
pub struct KernelDevice {
    index: u32,
    server: NbdServer,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), ConnectionError>>>,
    /// The runtime the connections run on; `None` once detached.
    io: Option<Io>,
    /// The kernel's ends, kept open while attached.
    _kernel_ends: Vec<UnixStream>,
    /// Attached by ioctls: the device's descriptor and the thread in `NBD_DO_IT`.
    ioctl: Option<IoctlRun>,
}

#[derive(Debug)]
struct IoctlRun {
    device: Arc<File>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

fn nbd_family(sock: &mut GenlSocket) -> io::Result<u16> {
    sock.family("nbd").map_err(|e| if e.kind() == io::ErrorKind::NotFound { driver_not_loaded() } else { e })
}

/// Whether the kernel's NBD driver (`nbd.ko`) is loaded.
#[must_use]
pub fn driver_loaded() -> bool {
    Path::new("/sys/module/nbd").exists()
}

fn driver_not_loaded() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        "the kernel's NBD driver is not loaded: run `modprobe nbd` as root (the module is nbd.ko, in the \
         kernel's own package)",
    )
}

fn as_root(e: &io::Error, what: &str) -> io::Error {
    if e.raw_os_error() == Some(rustix::io::Errno::PERM.raw_os_error()) {
        io::Error::new(io::ErrorKind::PermissionDenied, format!("{what} needs root (CAP_SYS_ADMIN)"))
    } else {
        io::Error::new(e.kind(), format!("{what} failed: {e}"))
    }
}

fn secs(d: Duration) -> u64 {
    d.as_secs().max(u64::from(!d.is_zero()))
}

impl KernelDevice {
    /// Attaches a device serving `export` of `server`; returns once the device has its size.
    ///
    /// # Errors
    /// `InvalidInput` for bad options or an unknown export; `NotFound` when `nbd.ko` is not
    /// loaded; `PermissionDenied` without root; `ResourceBusy`-like kernel errors (the index
    /// asked for is in use) as they come.
    pub fn attach(server: &NbdServer, export: &str, options: KernelOptions) -> io::Result<Self> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if options.connections == 0 || options.connections > 64 {
            return Err(invalid(format!("{} connections: give 1 to 64", options.connections)));
        }
        if !(512..=4096).contains(&options.block_size) || !options.block_size.is_power_of_two() {
            return Err(invalid(format!("block size {}: give 512, 1024, 2048 or 4096", options.block_size)));
        }
        let found = server
            .exports()
            .iter()
            .find(|e| e.name == export)
            .ok_or_else(|| invalid(format!("no export '{export}' to attach")))?;
        let size = found.backend.size();
        let flags = found.transmission_flags();
        let netlink = if options.interface == Interface::Ioctl {
            None
        } else {
            let mut sock = GenlSocket::open()?;
            match nbd_family(&mut sock) {
                Ok(family) => Some((sock, family)),
                // The driver is there, its netlink interface is not: an older kernel.
                Err(e)
                    if options.interface == Interface::Auto
                        && e.kind() == io::ErrorKind::NotFound
                        && driver_loaded() =>
                {
                    tracing::info!("the kernel's NBD driver has no netlink interface; using its ioctls");
                    None
                }
                Err(e) => return Err(e),
            }
        };
        if netlink.is_none() && !driver_loaded() {
            return Err(driver_not_loaded());
        }

        let io = Io::shared();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut kernel_ends = Vec::new();
        for _ in 0..options.connections {
            let (ours, theirs) = UnixStream::pair()?;
            let (server, export, mut rx) = (server.clone(), export.to_owned(), stop_rx.clone());
            tasks.push(io.handle().spawn(async move {
                let shutdown = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                server.serve_transmission(ours, &export, shutdown).await
            }));
            kernel_ends.push(theirs);
        }
        let attached = match netlink {
            None => attach_ioctl(&kernel_ends, size, flags, &options).map(|(i, run)| (i, Some(run))),
            Some((mut sock, family)) => {
                connect_netlink(&mut sock, family, &kernel_ends, size, flags, &options).map(|i| (i, None))
            }
        };
        let (index, ioctl) = match attached {
            Ok(a) => a,
            Err(e) => {
                let _ = stop.send(true);
                return Err(e);
            }
        };
        let interface = if ioctl.is_some() { "ioctl" } else { "netlink" };
        let mut device = Self {
            index,
            server: server.clone(),
            stop,
            tasks,
            io: Some(io),
            _kernel_ends: kernel_ends,
            ioctl,
        };
        device.wait_ready(size)?;
        tracing::info!(device = %device.path().display(), size, connections = options.connections, interface, "NBD device attached");
        Ok(device)
    }

    /// Waits until the device shows its size in sysfs (the kernel sets it up asynchronously).
    fn wait_ready(&mut self, size: u64) -> io::Result<()> {
        let file = PathBuf::from(format!("/sys/block/nbd{}/size", self.index));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // An ioctl-attached device whose NBD_DO_IT returned at once never comes up.
            if let Some(run) = &mut self.ioctl
                && run.thread.as_ref().is_some_and(JoinHandle::is_finished)
            {
                let ended = run.thread.take().map(JoinHandle::join);
                let e = match ended {
                    Some(Ok(Err(e))) => e,
                    _ => io::Error::other("NBD_DO_IT ended at once"),
                };
                return Err(as_root(&e, &format!("starting {}", self.path().display())));
            }
            let sectors: u64 =
                std::fs::read_to_string(&file).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
            if sectors * 512 >= size.min(512) && sectors > 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not come up within 10 s", self.path().display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The device's index: it is `/dev/nbd{index}`.
    #[must_use]
    pub fn index(&self) -> u32 {
        self.index
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{}", self.index))
    }

    /// Disconnects the device, lets the requests in flight finish and flushes the exports.
    ///
    /// # Errors
    /// The disconnect or the final flush failed.
    pub fn detach(mut self) -> io::Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> io::Result<()> {
        let Some(io) = self.io.take() else {
            return Ok(());
        };
        let disconnected = match &mut self.ioctl {
            None => disconnect(self.index),
            Some(run) => {
                let asked = nbd_ioctl::disconnect(run.device.as_fd());
                // NBD_DO_IT returns once the kernel has let go of the sockets.
                let ended = match run.thread.take().map(JoinHandle::join) {
                    Some(Ok(r)) => r,
                    Some(Err(_)) => Err(io::Error::other("the NBD_DO_IT thread panicked")),
                    None => Ok(()),
                };
                if let Err(e) = &ended {
                    tracing::debug!(error = %e, "NBD_DO_IT ended with an error");
                }
                let _ = nbd_ioctl::clear_sock(run.device.as_fd());
                asked
            }
        };
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        let server = self.server.clone();
        let flushed = io.block_on(async move {
            for t in tasks {
                match tokio::time::timeout(Duration::from_secs(30), t).await {
                    Ok(Ok(Err(e))) => {
                        tracing::warn!(error = %e, "an NBD device connection ended with an error");
                    }
                    Ok(_) => {}
                    Err(_) => tracing::warn!("an NBD device connection did not end within 30 s"),
                }
            }
            server.flush_all().await
        });
        tracing::info!(device = %format!("/dev/nbd{}", self.index), "NBD device detached");
        disconnected.and(flushed)
    }
}

/// Attaches a device with one netlink `NBD_CMD_CONNECT`; returns the index the kernel chose.
fn connect_netlink(
    sock: &mut GenlSocket,
    family: u16,
    kernel_ends: &[UnixStream],
    size: u64,
    flags: u16,
    options: &KernelOptions,
) -> io::Result<u32> {
    let sockets = kernel_ends
        .iter()
        .map(|s| {
            let fd = u32::try_from(s.as_raw_fd()).expect("descriptors are not negative");
            Attr::Nested(NBD_SOCK_ITEM, vec![Attr::U32(NBD_SOCK_FD, fd)])
        })
        .collect();
    let mut attrs = vec![
        Attr::U64(NBD_ATTR_SIZE_BYTES, size),
        Attr::U64(NBD_ATTR_BLOCK_SIZE_BYTES, options.block_size),
        Attr::U64(NBD_ATTR_SERVER_FLAGS, u64::from(flags)),
        Attr::Nested(NBD_ATTR_SOCKETS, sockets),
    ];
    if !options.timeout.is_zero() {
        attrs.push(Attr::U64(NBD_ATTR_TIMEOUT, secs(options.timeout)));
    }
    if !options.dead_conn_timeout.is_zero() {
        attrs.push(Attr::U64(NBD_ATTR_DEAD_CONN_TIMEOUT, secs(options.dead_conn_timeout)));
    }
    if let Some(i) = options.index {
        attrs.push(Attr::U32(NBD_ATTR_INDEX, i));
    }
    let reply = sock
        .request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &attrs)
        .map_err(|e| as_root(&e, "attaching an NBD device"))?;
    reply.iter().find(|a| a.kind == NBD_ATTR_INDEX).and_then(RawAttr::u32).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "the kernel did not say which device it attached")
    })
}

/// The devices sysfs shows, in index order, that no server is attached to.
fn unused_devices() -> io::Result<Vec<u32>> {
    let mut found: Vec<u32> = std::fs::read_dir("/sys/block")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("nbd")?.parse().ok())
        .filter(|i| !Path::new(&format!("/sys/block/nbd{i}/pid")).exists())
        .filter(|i| std::fs::read_to_string(format!("/sys/block/nbd{i}/size")).is_ok_and(|s| s.trim() == "0"))
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Configures a device with ioctls and starts `NBD_DO_IT` on a thread of its own.
fn attach_ioctl(
    sockets: &[UnixStream],
    size: u64,
    flags: u16,
    options: &KernelOptions,
) -> io::Result<(u32, IoctlRun)> {
    let candidates = match options.index {
        Some(i) => vec![i],
        None => unused_devices()?,
    };
    let mut last = None;
    for index in candidates {
        let path = format!("/dev/nbd{index}");
        let device = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) => {
                last = Some(io::Error::new(e.kind(), format!("cannot open {path}: {e}")));
                continue;
            }
        };
        // The first socket claims the device; another process's device answers EBUSY.
        match nbd_ioctl::set_sock(device.as_fd(), sockets[0].as_fd()) {
            Ok(()) => {}
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error())
                    && options.index.is_none() =>
            {
                last = Some(e);
                continue;
            }
            Err(e) => return Err(as_root(&e, &format!("attaching {path}"))),
        }
        let configure = || -> io::Result<()> {
            for s in &sockets[1..] {
                nbd_ioctl::set_sock(device.as_fd(), s.as_fd())?;
            }
            nbd_ioctl::set_block_size(device.as_fd(), options.block_size)?;
            nbd_ioctl::set_size_blocks(device.as_fd(), size / options.block_size)?;
            nbd_ioctl::set_flags(device.as_fd(), u64::from(flags))?;
            if !options.timeout.is_zero() {
                nbd_ioctl::set_timeout(device.as_fd(), secs(options.timeout))?;
            }
            Ok(())
        };
        if let Err(e) = configure() {
            let _ = nbd_ioctl::clear_sock(device.as_fd());
            return Err(as_root(&e, &format!("configuring {path}")));
        }
        if !options.dead_conn_timeout.is_zero() {
            tracing::debug!("the dead-connection timeout needs the netlink interface; not set");
        }
        let device = Arc::new(device);
        let for_thread = Arc::clone(&device);
        let thread = std::thread::Builder::new()
            .name(format!("nbd{index}-do-it"))
            .spawn(move || nbd_ioctl::do_it(for_thread.as_fd()))?;
        return Ok((index, IoctlRun { device, thread: Some(thread) }));
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no unused NBD device (load nbd with more: nbds_max=N)")
    }))
}

impl Drop for KernelDevice {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            tracing::warn!(error = %e, device = self.index, "detaching the NBD device failed");
        }
    }
}

/// Disconnects `/dev/nbd{index}`, whoever attached it (a device left behind by a process that
/// died keeps failing I/O until then).
///
/// # Errors
/// As [`KernelDevice::attach`] for the module and privileges; the kernel's error otherwise.
pub fn disconnect(index: u32) -> io::Result<()> {
    let mut sock = GenlSocket::open()?;
    let family = nbd_family(&mut sock)?;
    sock.request(family, NBD_CMD_DISCONNECT, NBD_GENL_VERSION, &[Attr::U32(NBD_ATTR_INDEX, index)])
        .map(drop)
        .map_err(|e| as_root(&e, &format!("disconnecting /dev/nbd{index}")))
}
