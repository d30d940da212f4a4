//! `r3map`: mount, serve and migrate remote memory.

use clap::{Parser, Subcommand};
use r3map_cli::{certs, demo, init_logging, serve};

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
    /// Run the managed chunk pipeline against a simulated remote and check the result.
    ///
    /// A "remote" memory backend behind a per-call delay is used through a managed stack
    /// (lazy copy-on-read, background pull, background push) with random reads and writes;
    /// then everything is pushed and the remote is compared with what was written.
    Demo(demo::Args),
    /// Serve a backend (memory, a file, a block device, a directory) to r3map clients.
    ///
    /// Clients connect with r3map://HOST:PORT/EXPORT?ca=CA.pem (TLS), r3map+plain://HOST:PORT/EXPORT
    /// (plaintext) or r3map+unix:///EXPORT?socket=PATH, adding &token=... when the server needs one.
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Serve(args) => serve::run_args(&args),
        Command::Certs(args) => certs::run(&args),
    }
}
