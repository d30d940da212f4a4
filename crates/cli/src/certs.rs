//! `r3map certs`: a private CA and the certificates it signs, written as PEM files for
//! `r3map serve --tls-cert ... --tls-key ... [--tls-client-ca ...]` and `r3map://` client URLs.
//!
//! Files written in `--out`: `ca.pem`, `ca-key.pem`, `server.pem`, `server-key.pem`, and for each
//! `--client NAME` `client-NAME.pem` and `client-NAME-key.pem`. Private keys are created with mode
//! 0600. Nothing is overwritten without `--force`, and nothing is written when any file exists.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use r3map_net::certs::Authority;

/// The flags of `r3map certs`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to write the PEM files to (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A host name or IP address the server certificate is valid for; repeat for several. Clients
    /// must connect with one of them (or name one with `server-name=` in their URL). Defaults to
    /// localhost, 127.0.0.1 and ::1.
    #[arg(long = "server-name", value_name = "NAME")]
    pub server_names: Vec<String>,
    /// Also make a client certificate for mutual TLS (`client-NAME.pem`, `client-NAME-key.pem`);
    /// repeat for several clients. NAME may hold letters, digits, `.`, `_` and `-`.
    #[arg(long = "client", value_name = "NAME")]
    pub clients: Vec<String>,
    /// Replace files that already exist.
    #[arg(long)]
    pub force: bool,
    /// The common name of the CA certificate.
    #[arg(long, default_value = "r3map CA", value_name = "NAME")]
    pub ca_name: String,
}

/// One file to write.
struct Output {
    path: PathBuf,
    contents: String,
    private: bool,
}

/// `r3map certs`.
///
/// # Errors
/// A bad client name, existing files without `--force`, a name the certificate cannot hold, or a
/// failed write.
pub fn run(args: &Args) -> anyhow::Result<()> {
    for name in &args.clients {
        let valid = !name.is_empty()
            && !name.starts_with('.')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            bail!(
                "the client name '{name}' is not usable in a file name; use letters, digits, '.', '_' and '-'"
            );
        }
    }
    let server_names: Vec<&str> = if args.server_names.is_empty() {
        vec!["localhost", "127.0.0.1", "::1"]
    } else {
        args.server_names.iter().map(String::as_str).collect()
    };
    let out = &args.out;
    let planned: Vec<PathBuf> = ["ca.pem", "ca-key.pem", "server.pem", "server-key.pem"]
        .into_iter()
        .map(str::to_owned)
        .chain(args.clients.iter().flat_map(|n| [format!("client-{n}.pem"), format!("client-{n}-key.pem")]))
        .map(|f| out.join(f))
        .collect();
    if !args.force {
        let existing: Vec<String> = planned
            .iter()
            .filter(|p| p.symlink_metadata().is_ok())
            .map(|p| p.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!("refusing to overwrite {} (add --force to replace them)", existing.join(", "));
        }
    }

    let ca = Authority::new(&args.ca_name).context("cannot make the CA")?;
    let server = ca
        .server(&server_names)
        .with_context(|| format!("cannot make a server certificate for {}", server_names.join(", ")))?;
    let mut outputs = vec![
        Output { path: out.join("ca.pem"), contents: ca.pem().cert.clone(), private: false },
        Output { path: out.join("ca-key.pem"), contents: ca.pem().key.clone(), private: true },
        Output { path: out.join("server.pem"), contents: server.cert, private: false },
        Output { path: out.join("server-key.pem"), contents: server.key, private: true },
    ];
    for name in &args.clients {
        let client =
            ca.client(name).with_context(|| format!("cannot make a client certificate for '{name}'"))?;
        outputs.push(Output {
            path: out.join(format!("client-{name}.pem")),
            contents: client.cert,
            private: false,
        });
        outputs.push(Output {
            path: out.join(format!("client-{name}-key.pem")),
            contents: client.key,
            private: true,
        });
    }

    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for o in &outputs {
        write(o, args.force)?;
    }
    let dir = fs::canonicalize(out).with_context(|| format!("cannot resolve {}", out.display()))?;

    println!("wrote {} files to {}", outputs.len(), dir.display());
    let p = |f: &str| dir.join(f).display().to_string();
    let mut serve =
        format!("r3map serve BACKEND-URL --tls-cert {} --tls-key {}", p("server.pem"), p("server-key.pem"));
    if !args.clients.is_empty() {
        serve.push_str(&format!(" --tls-client-ca {}", p("ca.pem")));
    }
    println!("serve with:   {serve}");
    let host = match server_names[0] {
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_owned(),
    };
    let base = format!("r3map://{host}:1337/default?ca={}", encode(&dir.join("ca.pem")));
    if args.clients.is_empty() {
        println!("connect with: {base}");
    } else {
        for name in &args.clients {
            let cert = encode(&dir.join(format!("client-{name}.pem")));
            let key = encode(&dir.join(format!("client-{name}-key.pem")));
            println!("connect with: {base}&cert={cert}&key={key}   (client '{name}')");
        }
    }
    println!("(add --token-file on the server and &token=... on clients for a shared secret too)");
    Ok(())
}

fn write(o: &Output, force: bool) -> anyhow::Result<()> {
    let shown = o.path.display();
    if force {
        match fs::remove_file(&o.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot replace {shown}")),
        }
    }
    let mode = if o.private { 0o600 } else { 0o644 };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&o.path)
        .with_context(|| format!("cannot create {shown}"))?;
    // The mode given at creation is reduced by the umask; a key must be 0600 exactly, not less
    // readable by its owner.
    if o.private {
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot set the mode of {shown}"))?;
    }
    file.write_all(o.contents.as_bytes()).with_context(|| format!("cannot write {shown}"))?;
    file.sync_all().with_context(|| format!("cannot write {shown}"))?;
    Ok(())
}

/// A path as a URL query value: everything but unreserved characters and `/` percent-encoded.
fn encode(path: &Path) -> String {
    let mut s = String::new();
    for b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(b) {
            s.push(char::from(*b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_encoded_for_urls() {
        assert_eq!(encode(Path::new("/tmp/a b/ca&.pem")), "/tmp/a%20b/ca%26.pem");
        assert_eq!(encode(Path::new("/plain/ca-1_x.pem")), "/plain/ca-1_x.pem");
    }

    fn args(out: &Path) -> Args {
        Args {
            out: out.to_owned(),
            server_names: vec![],
            clients: vec!["alice".into()],
            force: false,
            ca_name: "test CA".into(),
        }
    }

    #[test]
    fn writes_keys_privately_and_never_overwrites_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("pki");
        run(&args(&out)).unwrap();
        for f in [
            "ca.pem",
            "ca-key.pem",
            "server.pem",
            "server-key.pem",
            "client-alice.pem",
            "client-alice-key.pem",
        ] {
            let meta = fs::metadata(out.join(f)).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if f.ends_with("-key.pem") {
                assert_eq!(mode, 0o600, "{f}");
            } else {
                assert_eq!(mode & 0o600, 0o600, "{f}");
            }
            assert!(fs::read_to_string(out.join(f)).unwrap().starts_with("-----BEGIN"), "{f}");
        }
        let before = fs::read_to_string(out.join("ca.pem")).unwrap();
        let e = run(&args(&out)).unwrap_err().to_string();
        assert!(e.contains("refusing to overwrite") && e.contains("--force"), "{e}");
        assert_eq!(fs::read_to_string(out.join("ca.pem")).unwrap(), before);
        run(&Args { force: true, ..args(&out) }).unwrap();
        assert_ne!(fs::read_to_string(out.join("ca.pem")).unwrap(), before);
    }

    #[test]
    fn bad_client_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", "../x", ".hidden", "a b"] {
            let a = Args { clients: vec![name.into()], ..args(dir.path()) };
            assert!(run(&a).unwrap_err().to_string().contains("not usable in a file name"), "{name}");
        }
    }
}
