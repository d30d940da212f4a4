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
//! It needs root (`CAP_SYS_ADMIN`) and the `nbd` module (`modprobe nbd`); the errors say so.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::netlink::{Attr, GenlSocket};
use crate::server::{ConnectionError, NbdServer};

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
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            connections: 4,
            block_size: 4096,
            timeout: Duration::ZERO,
            dead_conn_timeout: Duration::ZERO,
            index: None,
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
    runtime: Option<tokio::runtime::Runtime>,
    /// The kernel's ends, kept open while attached.
    _kernel_ends: Vec<UnixStream>,
}

fn nbd_family(sock: &mut GenlSocket) -> io::Result<u16> {
    sock.family("nbd").map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            io::Error::new(
                io::ErrorKind::NotFound,
                "the kernel's NBD driver is not loaded: run `modprobe nbd` as root (the module is nbd.ko, \
                 in the kernel's own package)",
            )
        } else {
            e
        }
    })
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
        let mut sock = GenlSocket::open()?;
        let family = nbd_family(&mut sock)?;

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("r3map-nbd-dev")
            .enable_all()
            .build()?;
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut kernel_ends = Vec::new();
        for _ in 0..options.connections {
            let (ours, theirs) = UnixStream::pair()?;
            let (server, export, mut rx) = (server.clone(), export.to_owned(), stop_rx.clone());
            tasks.push(runtime.spawn(async move {
                let shutdown = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                server.serve_transmission(ours, &export, shutdown).await
            }));
            kernel_ends.push(theirs);
        }
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
        let stop_serving = |stop: &watch::Sender<bool>| {
            let _ = stop.send(true);
        };
        let reply = match sock.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &attrs) {
            Ok(r) => r,
            Err(e) => {
                stop_serving(&stop);
                return Err(as_root(&e, "attaching an NBD device"));
            }
        };
        let Some(index) =
            reply.iter().find(|a| a.kind == NBD_ATTR_INDEX).and_then(crate::netlink::RawAttr::u32)
        else {
            stop_serving(&stop);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the kernel did not say which device it attached",
            ));
        };
        let device = Self {
            index,
            server: server.clone(),
            stop,
            tasks,
            runtime: Some(runtime),
            _kernel_ends: kernel_ends,
        };
        device.wait_ready(size)?;
        tracing::info!(device = %device.path().display(), size, connections = options.connections, "NBD device attached");
        Ok(device)
    }

    /// Waits until the device shows its size in sysfs (the kernel sets it up asynchronously).
    fn wait_ready(&self, size: u64) -> io::Result<()> {
        let file = PathBuf::from(format!("/sys/block/nbd{}/size", self.index));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
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
        let Some(runtime) = self.runtime.take() else {
            return Ok(());
        };
        let disconnected = disconnect(self.index);
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut self.tasks);
        let server = self.server.clone();
        let flushed = runtime.block_on(async move {
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
        runtime.shutdown_timeout(Duration::from_secs(1));
        tracing::info!(device = %format!("/dev/nbd{}", self.index), "NBD device detached");
        disconnected.and(flushed)
    }
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
