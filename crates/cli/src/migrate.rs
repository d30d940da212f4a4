//! `r3map migrate seed` and `r3map migrate leech`: live migration of a backend between hosts.
//!
//! `seed` serves a backend as a migration source (the native protocol with the seeder
//! operations) and exits once a destination has finished with it. `leech` is the destination: it
//! pulls the source into a local backend while the source keeps running, runs rounds of
//! iterative pre-copy, finalizes (the source suspends; the chunks it wrote last are queued first)
//! and prints the downtime, then waits until everything is local and releases the source; with
//! `--then-seed` it then serves the resource as the source of the next hop.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use r3map::{OpenOptions, Opened};
use r3map_core::Backend as _;
use r3map_core::pipeline::puller::PullerOptions;
use r3map_migrate::{Leecher, LeecherHooks, LeecherOptions};
use r3map_net::RemoteBackend;

use crate::serve;
use crate::units::{human, parse_size};

/// The two sides of a migration.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Serve a backend as a migration source; exit once a destination has taken it over.
    ///
    /// The same flags as `r3map serve` (--seeder is implied). The destination connects with
    /// `r3map migrate leech`. --invalidate runs a demo application that writes random data over
    /// a share of the resource while the destination copies it.
    Seed(Box<SeedArgs>),
    /// Pull a migration source into a local backend, finalize, and take the resource over.
    ///
    /// Pre-copy: everything is pulled while the source keeps running, then rounds pull again what
    /// the source wrote meanwhile until that shrinks by less than a tenth. Finalize: the source
    /// suspends and sends the chunks it wrote last; the local copy is usable from then on (the
    /// downtime is printed) while those chunks arrive. When everything is local the source is
    /// released (and, with --then-seed, the copy is served to the next hop).
    ///
    /// If the source fails before finalize, the source's application is unaffected and this exits
    /// with an error; a dropped link is reconnected in any phase.
    Leech(Box<LeechArgs>),
}

/// The flags of `r3map migrate seed`.
#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub serve: serve::Args,
    /// Demo: once the destination starts tracking, keep rewriting PERCENT of the resource (a
    /// random set of whole chunks) with random data until the destination finalizes.
    #[arg(long, value_name = "PERCENT", value_parser = percent)]
    pub invalidate: Option<f64>,
}

/// The flags of `r3map migrate leech`.
#[derive(Debug, clap::Args)]
pub struct LeechArgs {
    /// The source: `r3map://HOST:PORT/EXPORT?ca=PATH[&token=T]`, `r3map+plain://HOST:PORT/EXPORT`
    /// or `r3map+unix:///EXPORT?socket=PATH` of an `r3map migrate seed`.
    #[arg(value_name = "SOURCE-URL")]
    pub source: String,
    /// Where the resource goes, of the source's size: `file:///PATH?size=SIZE`, `memory:SIZE`
    /// (kept only while this runs), `dir:///PATH?size=SIZE`.
    #[arg(
        value_name = "LOCAL-URL",
        long_help = crate::backend_url::help_for(
            "Where the resource goes, of the source's size (memory is kept only while this runs):",
            crate::backend_url::is_local,
            "",
        )
    )]
    pub local: String,
    /// Finalize once this share of the resource has been pulled, without pre-copy rounds; at
    /// 100 (the default) the rounds run first.
    #[arg(long, value_name = "PERCENT", value_parser = percent, default_value = "100")]
    pub finalize_at: f64,
    /// Most rounds of iterative pre-copy.
    #[arg(long, default_value = "8", value_name = "N")]
    pub rounds: usize,
    /// Pull requests in flight.
    #[arg(long, default_value = "16", value_name = "N")]
    pub pull_depth: usize,
    /// Largest pull request.
    #[arg(long, default_value = "4MiB", value_parser = parse_size, value_name = "SIZE")]
    pub pull_request: u64,
    /// Once the resource is here, serve it as the source of the next hop (A → B → C) on ADDR
    /// (HOST:PORT or :PORT), as `r3map migrate seed LOCAL-URL --listen ADDR` would, without
    /// reopening it; exit once the next destination has taken over. The server flags below
    /// (TLS, token, metrics, gRPC) apply to it; they are checked before the migration starts.
    #[arg(long, value_name = "ADDR")]
    pub then_seed: Option<String>,
    /// The export name of --then-seed.
    #[arg(long, default_value = "default", value_name = "NAME", requires = "then_seed")]
    pub export: String,
    #[command(flatten)]
    pub next_hop: serve::CommonArgs,
}

fn percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim_end_matches('%').parse().map_err(|_| format!("'{s}' is not a number"))?;
    if (0.0..=100.0).contains(&v) { Ok(v) } else { Err(format!("{v} is not between 0 and 100")) }
}

/// Runs a migration command.
///
/// # Errors
/// What made it fail, with context.
pub fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Seed(args) => seed(args),
        Command::Leech(args) => leech(args),
    }
}

fn seed(args: &SeedArgs) -> anyhow::Result<()> {
    let mut config = args.serve.config();
    config.seeder = true;
    config.migration =
        serve::MigrationOptions { exit_when_closed: true, invalidate_percent: args.invalidate };
    let options = OpenOptions {
        read_only: args.serve.read_only,
        chunk_size: args.serve.chunk_size,
        ..OpenOptions::default()
    };
    let url = args.serve.backend.clone();
    serve::run(&config, move || Ok(r3map::open(&url, &options)?))
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} {{pos}}/{{len}} chunks [{{bar:30}}] {{msg}}"
        ))
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

/// The server of `--then-seed`, its flags checked (so that a bad flag fails before the migration,
/// not after it).
fn next_hop(args: &LeechArgs, chunk_size: u64) -> anyhow::Result<Option<serve::Config>> {
    let Some(listen) = &args.then_seed else {
        let hop = &args.next_hop;
        let sec = &hop.security;
        if hop.metrics.is_some()
            || hop.grpc.is_some()
            || sec.tls_cert.is_some()
            || sec.token.is_some()
            || sec.token_file.is_some()
            || sec.insecure_plaintext
        {
            bail!("the server flags (TLS, token, metrics, gRPC) are for the next hop: add --then-seed ADDR");
        }
        return Ok(None);
    };
    args.next_hop.security.resolve(true).context("--then-seed")?;
    Ok(Some(serve::Config {
        listen: Some(listen.clone()),
        unix: None,
        export: args.export.clone(),
        read_only: false,
        chunk_size,
        chunking: false,
        seeder: true,
        migration: serve::MigrationOptions { exit_when_closed: true, invalidate_percent: None },
        nbd: serve::NbdArgs::default(),
        common: args.next_hop.clone(),
    }))
}

fn leech(args: &LeechArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let remote = Arc::new(
        RemoteBackend::open(&args.source)
            .with_context(|| format!("cannot reach the source {}", args.source))?,
    );
    let size = remote.size();
    let chunk_size = r3map_core::Seeder::chunk_size(&*remote);
    let then_seed = next_hop(args, chunk_size)?;
    let options = OpenOptions { read_only: false, chunk_size, ..OpenOptions::default() };
    let local = r3map::open(&args.local, &options)?;
    if local.backend.size() != size {
        bail!(
            "the local backend has {} bytes and the source {size}: give the source's size ({})",
            local.backend.size(),
            human(size)
        );
    }
    let leecher_options = LeecherOptions {
        puller: PullerOptions {
            depth: args.pull_depth,
            request_size: args.pull_request,
            ..PullerOptions::default()
        },
        max_rounds: args.rounds,
        ..LeecherOptions::default()
    };
    let leecher = Leecher::open(remote, Arc::clone(&local.backend), leecher_options, LeecherHooks::default())
        .context("cannot start the migration")?;
    let chunks = leecher.progress().chunks;
    let pre = bar(chunks, "pre-copy: pulled");
    let show = |bar: &ProgressBar| bar.set_position(leecher.progress().local_chunks);

    let rounds = if args.finalize_at < 100.0 {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
        let goal = ((chunks as f64) * args.finalize_at / 100.0).ceil() as u64;
        while leecher.progress().local_chunks < goal {
            if let Some(failed) = leecher.progress().failed {
                bail!("the pull from the source failed: {failed}");
            }
            show(&pre);
            std::thread::sleep(Duration::from_millis(20));
        }
        Vec::new()
    } else {
        std::thread::scope(|s| {
            let rounds = s.spawn(|| leecher.precopy());
            while !rounds.is_finished() {
                show(&pre);
                pre.set_message(format!("remaining {}", chunks - leecher.progress().local_chunks));
                std::thread::sleep(Duration::from_millis(50));
            }
            rounds.join().expect("the pre-copy thread does not panic")
        })
        .context("the pre-copy failed; the source is unaffected")?
    };
    show(&pre);
    pre.finish_and_clear();
    let rounds_text: Vec<String> = rounds.iter().map(|r| r.dirty.to_string()).collect();
    let finalized = leecher.finalize().context("the final sync failed; the migration did not happen")?;
    let _ = writeln!(
        std::io::stdout().lock(),
        "finalized: {} chunks written at the source since the last round (pre-copy rounds: [{}]); downtime {:.1} ms",
        finalized.dirty.len(),
        rounds_text.join(", "),
        finalized.downtime.as_secs_f64() * 1e3
    );

    let post = bar(chunks, "post-copy: local");
    std::thread::scope(|s| {
        let done = s.spawn(|| leecher.wait());
        while !done.is_finished() {
            show(&post);
            std::thread::sleep(Duration::from_millis(50));
        }
        done.join().expect("the wait does not panic")
    })
    .context("the post-copy failed")?;
    post.finish_and_clear();
    let pulled = leecher.progress().pulled_bytes;
    let local_backend = leecher.close().context("cannot release the source")?;
    local_backend.flush().context("cannot flush the local backend")?;
    #[allow(clippy::cast_precision_loss)]
    let ratio = pulled as f64 / size.max(1) as f64;
    let _ = writeln!(
        std::io::stdout().lock(),
        "migrated {} from {} to {} in {:.2} s: {} pulled ({ratio:.2} × the size)",
        human(size),
        args.source.split('?').next().unwrap_or(&args.source),
        local.description,
        started.elapsed().as_secs_f64(),
        human(pulled),
    );
    match then_seed {
        // The next hop: the same open backend, served as a migration source.
        Some(config) => serve::run(&config, move || Ok(Opened { backend: local_backend, ..local })),
        None => Ok(()),
    }
}
