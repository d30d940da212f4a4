//! `r3map`: mount, serve and migrate remote memory.

mod demo;
mod units;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default = match cli.verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Demo(args) => demo::run(&args),
    }
}
