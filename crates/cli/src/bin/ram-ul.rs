//! `ram-ul`: "upload RAM". Serves memory, a file or a directory of chunk files to r3map clients,
//! with the flags and defaults of the original `ram-ul`, plus a security choice the original did
//! not ask for (TLS, a token, or an explicit `--insecure-plaintext`) and Prometheus metrics.
//!
//! The server itself is `r3map serve`'s ([`r3map_cli::serve::run`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, bail};
use clap::builder::BoolishValueParser;
use clap::{ArgAction, Parser, ValueEnum};
use r3map::Opened;
use r3map::local::{self, DEFAULT_MAX_OPEN, DIR_GEOMETRY_FILE};
use r3map_cli::serve::{self, CommonArgs, Config};
use r3map_cli::units::parse_size;
use r3map_core::Memory;

/// Upload RAM: serve memory, a file or a directory to r3map clients (remote swap, remote memory).
///
/// Clients connect with r3map://HOST:1337/default?ca=CA.pem (TLS) or r3map+plain://HOST:1337/default.
/// The storage at --location is deleted and created afresh on every start. SIGINT or SIGTERM stops
/// the server cleanly; a second one exits at once.
#[derive(Debug, Parser)]
#[command(name = "ram-ul", version, about)]
struct Cli {
    /// Address to listen on: :PORT for every interface, HOST:PORT or `[IPV6]:PORT`.
    #[arg(long, default_value = serve::DEFAULT_LISTEN, value_name = "ADDR")]
    addr: String,
    /// Size of the memory to serve, in bytes (4294967296) or with a unit (4GiB).
    #[arg(long, default_value = "4GiB", value_parser = parse_size, value_name = "SIZE")]
    size: u64,
    /// Chunk size: announced to clients, the unit of --chunking and of the directory backend's files.
    #[arg(long, default_value = "4096", value_parser = parse_size, value_name = "SIZE")]
    chunk_size: u64,
    /// Where the data lives: memory (lost on exit), a file at --location, or a directory of chunk
    /// files at --location (at most 512 open at once).
    #[arg(long, value_enum, default_value_t = Kind::File)]
    backend: Kind,
    /// The file (or directory, for --backend directory) to keep the data in. It is deleted and
    /// created afresh on start; a directory is only deleted when it holds nothing but chunk files.
    #[arg(long, default_value_os_t = default_location(), value_name = "PATH")]
    location: PathBuf,
    /// Server-side chunking: the backend only sees whole, aligned chunks. On by default; turn it
    /// off with --chunking=false.
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
    chunking: bool,
    /// Log every connection and more (`RUST_LOG` overrides).
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
    verbose: bool,
    /// Lock this server's memory (mlockall) so it is never swapped out: needed when the swap it
    /// serves is on this same host, and it keeps latency steady elsewhere. Memory is locked as it
    /// is touched, so a sparse memory backend does not take its whole size at once.
    #[arg(long)]
    mlock: bool,
    #[command(flatten)]
    common: CommonArgs,
}

/// The storage behind the served memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Kind {
    /// Sparse memory in this process.
    Memory,
    /// A sparse file at --location.
    File,
    /// One file per chunk in the directory --location.
    Directory,
}

fn default_location() -> PathBuf {
    std::env::temp_dir().join("ram-ul")
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    r3map_cli::init_logging(u8::from(cli.verbose));
    if cli.mlock {
        r3map_cli::ram_dl::lock_memory()?;
    }
    let config = Config {
        listen: Some(cli.addr.clone()),
        unix: None,
        export: r3map_net::client::DEFAULT_EXPORT.to_owned(),
        read_only: false,
        chunk_size: cli.chunk_size,
        chunking: cli.chunking,
        seeder: false,
        migration: r3map_cli::serve::MigrationOptions::default(),
        nbd: r3map_cli::serve::NbdArgs::default(),
        common: cli.common.clone(),
    };
    serve::run(&config, || open(&cli))
}

/// Deletes whatever was at the location and creates the backend afresh.
fn open(cli: &Cli) -> anyhow::Result<Opened> {
    if cli.size == 0 {
        bail!("--size must not be zero");
    }
    match cli.backend {
        Kind::Memory => Ok(Opened::volatile(Arc::new(Memory::new(cli.size)), "memory".to_owned())),
        // Whatever the backend, ram-ul starts afresh: its clients must not take a restarted
        // ram-ul's empty storage for their data.
        Kind::File => {
            clear(&cli.location)?;
            let opened = local::open_file(&cli.location, Some(cli.size), true, false)?;
            Ok(Opened { volatile: true, ..opened })
        }
        Kind::Directory => {
            clear(&cli.location)?;
            let opened = local::open_dir(&cli.location, cli.size, cli.chunk_size, DEFAULT_MAX_OPEN)?;
            Ok(Opened { volatile: true, ..opened })
        }
    }
}

/// Removes a file, or a directory that holds only what a directory backend writes, at `path`.
fn clear(path: &Path) -> anyhow::Result<()> {
    let shown = path.display();
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {shown}")),
    };
    let kind = meta.file_type();
    if kind.is_file() || kind.is_symlink() {
        return fs::remove_file(path).with_context(|| format!("cannot delete {shown}"));
    }
    if !kind.is_dir() {
        bail!("{shown} is neither a file nor a directory; refusing to delete it (choose another --location)");
    }
    for entry in fs::read_dir(path).with_context(|| format!("cannot list {shown}"))? {
        let name = entry.with_context(|| format!("cannot list {shown}"))?.file_name();
        let name = name.to_string_lossy();
        let chunk_file = name.bytes().all(|b| b.is_ascii_digit())
            || (name.starts_with('.') && name.ends_with(".tmp"))
            || name == DIR_GEOMETRY_FILE;
        if !chunk_file {
            bail!(
                "{shown} holds '{name}', which is not a chunk file; ram-ul deletes its --location on start and \
                 will not delete that (choose another --location)"
            );
        }
    }
    fs::remove_dir_all(path).with_context(|| format!("cannot delete {shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_defaults_of_the_original() {
        let cli = Cli::try_parse_from(["ram-ul"]).unwrap();
        assert_eq!(cli.addr, ":1337");
        assert_eq!(cli.size, 4 << 30);
        assert_eq!(cli.chunk_size, 4096);
        assert_eq!(cli.backend, Kind::File);
        assert_eq!(cli.location, std::env::temp_dir().join("ram-ul"));
        assert!(cli.chunking && !cli.verbose);
        let cli = Cli::try_parse_from([
            "ram-ul",
            "--size",
            "4294967296",
            "--chunking=false",
            "--verbose",
            "--backend",
            "directory",
        ])
        .unwrap();
        assert_eq!(cli.size, 4294967296);
        assert!(!cli.chunking && cli.verbose);
        assert_eq!(cli.backend, Kind::Directory);
        assert!(Cli::try_parse_from(["ram-ul", "--chunking"]).unwrap().chunking);
    }

    #[test]
    fn only_chunk_directories_and_files_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, "x").unwrap();
        clear(&file).unwrap();
        assert!(!file.exists());
        clear(&file).unwrap();

        let chunks = dir.path().join("chunks");
        fs::create_dir(&chunks).unwrap();
        for f in ["0", "17", ".3.00ff.tmp", DIR_GEOMETRY_FILE] {
            fs::write(chunks.join(f), "x").unwrap();
        }
        clear(&chunks).unwrap();
        assert!(!chunks.exists());

        let home = dir.path().join("home");
        fs::create_dir(&home).unwrap();
        fs::write(home.join("thesis.tex"), "precious").unwrap();
        let e = clear(&home).unwrap_err().to_string();
        assert!(e.contains("thesis.tex") && e.contains("not a chunk file"), "{e}");
        assert!(home.join("thesis.tex").exists());
    }
}
