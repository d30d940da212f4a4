//! The commands behind the `r3map`, `ram-ul` and `ram-dl` binaries, kept in a library so both binaries (and
//! the tests) share one implementation.
//!
//! # Layout
//! - [`backend_url`]: the help texts of backend URL arguments, listed from the table of schemes
//!   of the `r3map` crate, which opens the URLs ([`r3map::open`]).
//! - [`serve`]: `r3map serve` and the server behind `ram-ul`: listeners, security, metrics,
//!   shutdown on signals.
//! - [`certs`]: `r3map certs`, a private CA and the certificates for mutual TLS.
//! - [`mount`]: `r3map mount` and `r3map cleanup`.
//! - [`map`]: `r3map map`, a backend mapped into the process as a userfaultfd region.
//! - [`migrate`]: `r3map migrate seed` and `r3map migrate leech`, live migration.
//! - [`ram_dl`]: `ram-dl`, memory of a remote `ram-ul` as swap space.
//! - [`demo`]: `r3map demo`, a managed mount of an embedded server, checked end to end.
//! - [`units`]: sizes and durations on the command line.

pub mod attach;
pub mod backend_url;
pub mod certs;
pub mod demo;
pub mod map;
pub mod migrate;
pub mod mount;
mod prometheus;
pub mod ram_dl;
pub mod serve;
pub mod units;

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// Logs to standard error at `info`, `debug` (`verbose` 1) or `trace` (2 and more); `RUST_LOG`
/// overrides.
pub fn init_logging(verbose: u8) {
    let default = match verbose {
        // fuser warns when its session ends after the mount was already taken down (ours unmounts
        // first, on purpose).
        0 => "info,fuser::session=error",
        1 => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
