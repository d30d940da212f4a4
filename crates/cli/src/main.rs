//! `r3map`: mount, serve and migrate remote memory.

use clap::{Parser, Subcommand};
use r3map_cli::{attach, certs, demo, init_logging, map, migrate, mount, serve};

/// Remote memory: mount any resource as local memory that is pulled lazily and in the background,
/// pushed back in the background, and live-migrated between hosts.
#[derive(Debug, Parser)]
#[command(name = "r3map", version, about, long_about = None)]
struct Cli {
    /// Log more (repeat for more detail); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Mount an embedded server's memory (with a simulated latency) and check it end to end.
    ///
    /// An embedded r3map server serves memory behind a per-call delay; a managed FUSE mount of it
    /// (lazy copy-on-read, background pull, background push) is used through its file and a
    /// mapping with random reads and writes; then it is closed and the server's memory is compared
    /// with everything written. Without root and /dev/fuse, or with --pipeline, the same managed
    /// stack runs in-process.
    Demo(demo::Args),
    /// Serve a backend (memory, a file, a block device, a directory) to r3map and NBD clients.
    ///
    /// Clients connect with r3map://HOST:PORT/EXPORT?ca=CA.pem (TLS), r3map+plain://HOST:PORT/EXPORT
    /// (plaintext) or r3map+unix:///EXPORT?socket=PATH, adding &token=... when the server needs one.
    /// With --nbd or --nbd-unix, NBD clients (the kernel, QEMU, libnbd, nbdkit's tools) connect with
    /// nbd://HOST:PORT/EXPORT, nbds:// (TLS) or nbd+unix:///EXPORT?socket=PATH.
    /// TCP needs a security choice: --tls-cert/--tls-key (TLS 1.3) or --insecure-plaintext.
    /// SIGINT or SIGTERM stops it cleanly (requests in flight finish, the backend is flushed);
    /// a second one exits at once.
    Serve(Box<serve::Args>),
    /// Make a private CA, a server certificate and client certificates for TLS and mutual TLS.
    ///
    /// Writes ca.pem, ca-key.pem, server.pem, server-key.pem and client-NAME.pem,
    /// client-NAME-key.pem per --client (keys with mode 0600), then prints the serve command and the
    /// client URL to use them with.
    Certs(certs::Args),
    /// Mount a remote (or any backend) as a local file, or a block device with --loop.
    ///
    /// Direct: every access goes to the remote. Managed (--managed): a local cache, chunks pulled on
    /// first access and in the background, writes pushed in the background. Runs until SIGINT or
    /// SIGTERM, then syncs, unmounts and pushes what is left; a second signal exits at once.
    Mount(Box<mount::Args>),
    /// Map a backend into this process's memory as a userfaultfd region and use it.
    ///
    /// Pages are fetched on first access (a fault fetches its whole chunk) and by a background pull;
    /// writes are tracked with userfaultfd write-protect and pushed back. By default the region is
    /// read once from start to end (timed); --write-percent writes random pages, pushes them and
    /// checks the backend; --hold keeps it mapped until SIGINT or SIGTERM. Needs root or access to
    /// /dev/userfaultfd.
    Map(Box<map::Args>),
    /// Live-migrate a backend between hosts: `seed` at the source, `leech` at the destination.
    #[command(subcommand)]
    Migrate(migrate::Command),
    /// Attach a backend as a kernel block device (/dev/nbdN) served by this process.
    ///
    /// Uses the kernel's NBD driver through its netlink interface: the kernel picks a free device
    /// (or takes --index), with --connections sockets to this process. Runs until SIGINT or
    /// SIGTERM, then disconnects the device and flushes the backend. Needs root and the nbd
    /// module (`modprobe nbd`).
    Attach(Box<attach::Args>),
    /// Disconnect a kernel NBD device (one left behind by a process that died).
    Detach(attach::DetachArgs),
    /// Clean up after a crashed `r3map mount`: detach its loop devices and unmount the stale FUSE
    /// mount ("Transport endpoint is not connected").
    Cleanup(mount::CleanupArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Serve(args) => serve::run_args(&args),
        Command::Certs(args) => certs::run(&args),
        Command::Mount(args) => mount::run(&args),
        Command::Map(args) => map::run(&args),
        Command::Migrate(command) => migrate::run(&command),
        Command::Cleanup(args) => mount::cleanup(&args),
        Command::Attach(args) => attach::run(&args),
        Command::Detach(args) => attach::detach(&args),
    }
}
