//! Where the server is and how to talk to it: [`NbdAddress`], [`NbdClientOptions`],
//! [`NbdClientTls`] and the NBD URI form
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md>).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use r3map_net::params::Params;
use r3map_net::security::{client_tls, read_pem};
use rustls::pki_types::ServerName;

/// The port NBD servers listen on unless told otherwise (assigned by IANA).
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens: the same addresses as the native protocol's.
pub use r3map_net::Address as NbdAddress;

/// The files libnbd (and GnuTLS) look for in a `tls-certificates` directory.
const CA_FILE: &str = "ca-cert.pem";
const CA_CRL_FILE: &str = "ca-crl.pem";
const CLIENT_CERT_FILE: &str = "client-cert.pem";
const CLIENT_KEY_FILE: &str = "client-key.pem";

/// The name a certificate is checked against on a Unix socket, which has no host.
const UNIX_SOCKET_SERVER_NAME: &str = "localhost";

/// TLS for connections to an NBD server (`NBD_OPT_STARTTLS`): a rustls client configuration and
/// the name the server's certificate must be valid for. The server's certificate is always
/// verified.
#[derive(Clone)]
pub struct NbdClientTls {
    /// TLS 1.3 trusting a CA, with or without a client certificate (from
    /// [`r3map_net::client_tls`], or [`NbdClientTls::from_pem`]).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate is checked against.
    pub server_name: ServerName<'static>,
}

impl NbdClientTls {
    /// TLS with `config`, checking the server's certificate against `server_name` (a DNS name or
    /// an IP address).
    ///
    /// # Errors
    /// `InvalidInput` when `server_name` is neither.
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: &str) -> io::Result<Self> {
        let server_name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("'{server_name}' cannot be checked against a TLS certificate: {e}"),
            )
        })?;
        Ok(Self { config, server_name })
    }

    /// TLS 1.3 trusting the CA certificates in `ca_pem`, presenting `identity` (certificate chain
    /// and private key, PEM) to servers that ask for a client certificate.
    ///
    /// # Errors
    /// `InvalidInput` for unusable PEM, a certificate that does not fit its key, or a bad
    /// `server_name`.
    pub fn from_pem(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>, server_name: &str) -> io::Result<Self> {
        Self::new(client_tls(ca_pem, identity)?, server_name)
    }

    /// Whether this client presents a certificate to servers that ask for one.
    #[must_use]
    pub fn has_client_certificate(&self) -> bool {
        self.config.client_auth_cert_resolver.has_certs()
    }
}

impl fmt::Debug for NbdClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdClientTls")
            .field("server_name", &self.server_name)
            .field("client_certificate", &self.has_client_certificate())
            .finish_non_exhaustive()
    }
}

/// Equal when they share one configuration and check the same name.
impl PartialEq for NbdClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

impl Eq for NbdClientTls {}

/// How a client connects and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdClientOptions {
    /// The export to open; the empty name is the server's default export.
    pub export: String,
    /// Connections to open. More than one is used only when the server announces
    /// `NBD_FLAG_CAN_MULTI_CONN`, since otherwise a flush on one connection need not cover writes
    /// made on another.
    pub connections: usize,
    /// How long a request may wait for its answer, through reconnections, before it fails.
    pub timeout: Duration,
    /// How long one connection attempt (connect, TLS and handshake) may take.
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
    /// TLS, which every connection then requires: a server that does not start it is an error,
    /// never a reason to go on in plaintext. `None` is plaintext.
    pub tls: Option<NbdClientTls>,
}

impl Default for NbdClientOptions {
    fn default() -> Self {
        Self {
            export: String::new(),
            connections: 1,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// What a URI says about TLS.
#[derive(Debug, Default)]
struct TlsParameters {
    /// The first TLS parameter seen, for the error on a plaintext URI.
    first: Option<String>,
    certificates: Option<PathBuf>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    hostname: Option<String>,
    /// `tls-verify-peer=false`, which is refused.
    no_verify: bool,
    /// A TLS kind other than X.509 certificates (`tls-type=psk` or `anon`, `tls-psk-file`).
    unsupported: Option<String>,
}

impl TlsParameters {
    /// Takes `key=value` when it is a TLS parameter; `Ok(false)` when it is not one.
    fn take(&mut self, key: &str, value: &str) -> Result<bool, String> {
        let path = || Some(PathBuf::from(value));
        match key {
            "tls-certificates" => self.certificates = path(),
            "ca" => self.ca = path(),
            "cert" => self.cert = path(),
            "key" => self.key = path(),
            "tls-hostname" => {
                if value.is_empty() {
                    return Err("tls-hostname is empty".into());
                }
                self.hostname = Some(value.to_owned());
            }
            "tls-verify-peer" => match parse_bool(value) {
                Some(verify) => self.no_verify = !verify,
                None => return Err(format!("tls-verify-peer={value} is not a boolean (true or false)")),
            },
            "tls-type" => match value {
                "x509" => {}
                "psk" | "anon" => self.unsupported = Some(format!("tls-type={value}")),
                other => return Err(format!("tls-type={other} is not x509, psk or anon")),
            },
            "tls-psk-file" | "tls-username" => self.unsupported = Some(key.to_owned()),
            _ => return Ok(false),
        }
        self.first.get_or_insert_with(|| key.to_owned());
        Ok(true)
    }

    /// The TLS configuration of an `nbds://` or `nbds+unix://` URI; `default_name` is the name
    /// the certificate is checked against without `tls-hostname`.
    fn build(self, default_name: &str) -> io::Result<NbdClientTls> {
        let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
        let unsupported = |msg: String| io::Error::new(io::ErrorKind::Unsupported, msg);
        if let Some(what) = self.unsupported {
            return Err(unsupported(format!(
                "{what}: this NBD client does TLS with X.509 certificates only (no pre-shared keys, no \
                 anonymous TLS)"
            )));
        }
        if self.no_verify {
            return Err(unsupported(
                "tls-verify-peer=false: this NBD client always verifies the server's certificate; give \
                 the CA that signed it with tls-certificates=DIR or ca=PATH"
                    .into(),
            ));
        }
        let mixed = self.ca.is_some() || self.cert.is_some() || self.key.is_some();
        if self.certificates.is_some() && mixed {
            return Err(invalid(
                "give the certificates either as tls-certificates=DIR or as ca=, cert= and key=, not both"
                    .into(),
            ));
        }
        let (ca, identity) = match (self.certificates, self.ca) {
            (Some(dir), _) => certificate_directory(&dir)?,
            (None, Some(ca)) => {
                let identity = match (self.cert, self.key) {
                    (Some(cert), Some(key)) => Some((read_pem(&cert)?, read_pem(&key)?)),
                    (None, None) => None,
                    _ => return Err(invalid("cert= and key= go together".into())),
                };
                (read_pem(&ca)?, identity)
            }
            (None, None) => {
                return Err(invalid(
                    "TLS needs the CA that signed the server's certificate: add tls-certificates=DIR (a \
                     directory holding ca-cert.pem, and client-cert.pem with client-key.pem for a client \
                     certificate) or ca=PATH (with cert=PATH and key=PATH for a client certificate); the \
                     system's trusted roots are not used"
                        .into(),
                ));
            }
        };
        let name = self.hostname.as_deref().unwrap_or(default_name);
        NbdClientTls::from_pem(&ca, identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())), name)
    }
}

/// A client certificate chain and its private key, PEM.
type Identity = (Vec<u8>, Vec<u8>);

/// The CA and the optional client certificate and key of a libnbd-style certificate directory.
fn certificate_directory(dir: &Path) -> io::Result<(Vec<u8>, Option<Identity>)> {
    let read = |name: &str| -> io::Result<Option<Vec<u8>>> {
        match std::fs::read(dir.join(name)) {
            Ok(pem) => Ok(Some(pem)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io::Error::new(e.kind(), format!("cannot read {}: {e}", dir.join(name).display()))),
        }
    };
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("the tls-certificates directory {} does not exist", dir.display()),
        ));
    }
    let ca = read(CA_FILE)?.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "the tls-certificates directory {} has no {CA_FILE} (the CA that signed the server's \
                 certificate)",
                dir.display()
            ),
        )
    })?;
    if dir.join(CA_CRL_FILE).exists() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "the tls-certificates directory {} has a revocation list ({CA_CRL_FILE}), which this NBD \
                 client cannot check; remove it to connect without revocation checks",
                dir.display()
            ),
        ));
    }
    let identity = match (read(CLIENT_CERT_FILE)?, read(CLIENT_KEY_FILE)?) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the tls-certificates directory {} must hold both {CLIENT_CERT_FILE} and \
                     {CLIENT_KEY_FILE}, or neither",
                    dir.display()
                ),
            ));
        }
    };
    Ok((ca, identity))
}

/// A URI boolean as libnbd reads it.
fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

impl NbdClientOptions {
    /// Options for `export` with the defaults for everything else.
    #[must_use]
    pub fn for_export(export: impl Into<String>) -> Self {
        Self { export: export.into(), ..Self::default() }
    }

    /// Parses an NBD URI:
    /// - `nbd://HOST[:PORT]/[EXPORT]`: TCP, port 10809 unless given, IPv6 addresses in brackets;
    /// - `nbd+unix:///[EXPORT]?socket=PATH`: a Unix socket;
    /// - `nbds://HOST[:PORT]/[EXPORT]` and `nbds+unix:///[EXPORT]?socket=PATH`: the same with TLS,
    ///   which is then required (`NBD_OPT_STARTTLS`; never plaintext).
    ///
    /// The export name is the path without its leading `/`, percent-decoded; an empty one names
    /// the server's default export. Parameters: `socket=PATH` (Unix sockets only),
    /// `connections=N` and `timeout=SECONDS`, and for `nbds` URIs only:
    /// - `tls-certificates=DIR`: a directory as libnbd reads it, holding `ca-cert.pem` (the CA
    ///   that signed the server's certificate) and, for a client certificate, `client-cert.pem`
    ///   and `client-key.pem`;
    /// - or `ca=PATH`, with `cert=PATH` and `key=PATH` for a client certificate (PEM files, as
    ///   `r3map://` URLs take them);
    /// - `tls-hostname=NAME`: the name the server's certificate is checked against (by default
    ///   the URI's host, or `localhost` on a Unix socket);
    /// - `tls-type=x509` and `tls-verify-peer=true`, which are what this client does anyway.
    ///
    /// The PEM files are read here.
    ///
    /// # Errors
    /// `InvalidInput` naming what is wrong: a malformed URI, an unknown scheme or parameter, a
    /// missing socket, a bad number, an `nbds` URI without a CA, TLS parameters on a plaintext
    /// URI, unusable PEM. `Unsupported` for what this client refuses to do:
    /// `tls-verify-peer=false` (the server's certificate is always verified), pre-shared keys
    /// (`tls-type=psk`, `tls-psk-file`), anonymous TLS (`tls-type=anon`), and revocation lists
    /// (`ca-crl.pem`). Errors reading the PEM files, naming them.
    pub fn from_url(url: &str) -> io::Result<(NbdAddress, Self)> {
        // Messages never show a secret of the URI.
        let shown = r3map_net::params::shown(url);
        let bad = |msg: String| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("bad NBD URI '{shown}': {msg}"))
        };
        let u = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let (unix, tls) = match u.scheme() {
            "nbd" => (false, false),
            "nbd+unix" => (true, false),
            "nbds" => (false, true),
            "nbds+unix" => (true, true),
            other => {
                return Err(bad(format!(
                    "unknown scheme '{other}' (use nbd://, nbds://, nbd+unix:// or nbds+unix://)"
                )));
            }
        };
        let mut options = Self::default();
        let mut params = Params::parse(url)?;
        let socket = if unix { params.path("socket")? } else { None };
        if let Some(value) = params.take("connections") {
            options.connections = value
                .parse()
                .ok()
                .filter(|&n| (1..=64).contains(&n))
                .ok_or_else(|| bad(format!("connections={value} is not a number from 1 to 64")))?;
        }
        if let Some(value) = params.take("timeout") {
            let seconds: u64 = value
                .parse()
                .ok()
                .filter(|&s| s > 0)
                .ok_or_else(|| bad(format!("timeout={value} is not a positive number of seconds")))?;
            options.timeout = Duration::from_secs(seconds);
        }
        // The rest are TLS parameters, or unknown.
        let mut tls_parameters = TlsParameters::default();
        let rest: Vec<String> = params.keys().map(str::to_owned).collect();
        for key in rest {
            let value = params.take(&key).unwrap_or_default();
            if !tls_parameters.take(&key, &value).map_err(bad)? {
                return Err(bad(format!("unknown parameter '{key}'")));
            }
        }
        if !tls && let Some(k) = &tls_parameters.first {
            return Err(bad(format!(
                "'{k}' is a TLS parameter, but {}:// is plaintext: use {}:// for TLS",
                u.scheme(),
                if unix { "nbds+unix" } else { "nbds" }
            )));
        }
        options.export = export_name(u.path()).map_err(bad)?;
        let address = if unix {
            if u.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(bad(format!(
                    "a Unix socket URI has no host: write {}:///EXPORT?socket=PATH",
                    u.scheme()
                )));
            }
            NbdAddress::Unix(socket.ok_or_else(|| bad("a Unix socket URI needs ?socket=PATH".into()))?)
        } else {
            let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host".into()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            NbdAddress::Tcp { host, port: u.port().unwrap_or(DEFAULT_PORT) }
        };
        if tls {
            let default_name = match &address {
                NbdAddress::Tcp { host, .. } => host.as_str(),
                NbdAddress::Unix(_) => UNIX_SOCKET_SERVER_NAME,
            };
            let built = tls_parameters.build(default_name).map_err(|e| {
                let kind = e.kind();
                let message = e.to_string();
                io::Error::new(kind, format!("bad NBD URI '{shown}': {message}"))
            })?;
            options.tls = Some(built);
        }
        Ok((address, options))
    }
}

/// The export a URI path names: the path without its leading `/`, percent-decoded.
fn export_name(path: &str) -> Result<String, String> {
    let raw = path.strip_prefix('/').unwrap_or(path);
    let bytes = percent_decode(raw).ok_or_else(|| format!("the export name '{raw}' has a bad %-escape"))?;
    let name = String::from_utf8(bytes).map_err(|_| format!("the export name '{raw}' is not UTF-8"))?;
    if name.contains('\0') {
        return Err("an export name cannot contain NUL".into());
    }
    if name.len() > crate::proto::MAX_NAME {
        return Err(format!("the export name is longer than {} bytes", crate::proto::MAX_NAME));
    }
    Ok(name)
}

/// Decodes `%XX` escapes; `None` for a `%` not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> (NbdAddress, NbdClientOptions) {
        NbdClientOptions::from_url(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn err(url: &str) -> io::Error {
        NbdClientOptions::from_url(url).expect_err(url)
    }

    fn tcp(host: &str, port: u16) -> NbdAddress {
        NbdAddress::Tcp { host: host.into(), port }
    }

    #[test]
    fn export_names_follow_the_uri_standard() {
        let cases = [
            ("nbd://example.com/disk", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
            ("nbd://example.com/caf%C3%A9", "café"),
        ];
        for (url, export) in cases {
            let (address, options) = parse(url);
            assert_eq!(address, tcp("example.com", DEFAULT_PORT), "{url}");
            assert_eq!(options.export, export, "{url}");
        }
    }

    #[test]
    fn ports_and_ipv6_hosts() {
        assert_eq!(parse("nbd://127.0.0.1:1234/x").0, tcp("127.0.0.1", 1234));
        let (address, _) = parse("nbd://[::1]:10900/x");
        assert_eq!(address, tcp("::1", 10900));
        assert_eq!(address.to_string(), "[::1]:10900");
        assert_eq!(parse("nbd://[fe80::1]/").0, tcp("fe80::1", DEFAULT_PORT));
    }

    #[test]
    fn unix_sockets() {
        let (address, options) = parse("nbd+unix:///disk?socket=/run/nbd%20x.sock");
        assert_eq!(address, NbdAddress::Unix("/run/nbd x.sock".into()));
        assert_eq!(address.to_string(), "unix:/run/nbd x.sock");
        assert_eq!(options.export, "disk");
        assert_eq!(parse("nbd+unix:///?socket=s").1.export, "");
        assert!(err("nbd+unix:///disk").to_string().contains("?socket=PATH"));
        assert!(err("nbd+unix://host/disk?socket=s").to_string().contains("has no host"));
        assert!(err("nbd://host/disk?socket=s").to_string().contains("unknown parameter 'socket'"));
    }

    #[test]
    fn parameters() {
        let (_, o) = parse("nbd://h/e?connections=4&timeout=5");
        assert_eq!((o.connections, o.timeout), (4, Duration::from_secs(5)));
        assert_eq!(parse("nbd://h/e").1, NbdClientOptions::for_export("e"));
        for bad in ["connections=0", "connections=x", "connections=65", "timeout=0", "timeout=soon"] {
            let e = err(&format!("nbd://h/e?{bad}"));
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains(bad), "{e}");
        }
        let e = err("nbd://h/e?colour=blue");
        assert!(e.to_string().contains("unknown parameter 'colour'"), "{e}");
    }

    /// Certificate files as clients read them: a libnbd-style directory (`full`, with a client
    /// certificate), one with only the CA (`ca-only`), and the CA, client certificate and key.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let ca = r3map_net::certs::Authority::new("options test CA").unwrap();
            let client = ca.client("tester").unwrap();
            let dir = tempfile::tempdir().unwrap();
            for sub in ["full", "ca-only"] {
                std::fs::create_dir(dir.path().join(sub)).unwrap();
                std::fs::write(dir.path().join(sub).join("ca-cert.pem"), &ca.pem().cert).unwrap();
            }
            std::fs::write(dir.path().join("full/client-cert.pem"), &client.cert).unwrap();
            std::fs::write(dir.path().join("full/client-key.pem"), &client.key).unwrap();
            Self { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        fn full(&self) -> String {
            format!("tls-certificates={}", self.path("full"))
        }

        fn ca_only(&self) -> String {
            format!("tls-certificates={}", self.path("ca-only"))
        }

        fn files(&self) -> String {
            let (ca, cert, key) = (
                self.path("full/ca-cert.pem"),
                self.path("full/client-cert.pem"),
                self.path("full/client-key.pem"),
            );
            format!("ca={ca}&cert={cert}&key={key}")
        }
    }

    fn tls_of(url: &str) -> NbdClientTls {
        parse(url).1.tls.unwrap_or_else(|| panic!("{url}: no TLS"))
    }

    fn name(tls: &NbdClientTls) -> String {
        tls.server_name.to_str().into_owned()
    }

    #[test]
    fn tls_uris_with_a_certificate_directory() {
        let f = Files::new();
        let (address, options) = parse(&format!("nbds://example.com:1234/disk?{}&connections=2", f.full()));
        assert_eq!(address, tcp("example.com", 1234));
        assert_eq!((options.export.as_str(), options.connections), ("disk", 2));
        let tls = options.tls.unwrap();
        assert_eq!(name(&tls), "example.com");
        assert!(tls.has_client_certificate());
        let tls = tls_of(&format!("nbds://example.com/?{}", f.ca_only()));
        assert!(!tls.has_client_certificate());
        let debug = format!("{tls:?}");
        assert!(debug.contains("example.com") && debug.contains("client_certificate: false"), "{debug}");
        // Plaintext URIs have no TLS.
        assert_eq!(parse("nbd://example.com/disk").1.tls, None);
    }

    #[test]
    fn tls_uris_with_certificate_files() {
        let f = Files::new();
        assert!(tls_of(&format!("nbds://h/e?{}", f.files())).has_client_certificate());
        let ca = format!("ca={}", f.path("full/ca-cert.pem"));
        assert!(!tls_of(&format!("nbds://h/e?{ca}")).has_client_certificate());
        for half in [format!("{ca}&cert={}", f.path("full/client-cert.pem")), format!("{ca}&key=x")] {
            let e = err(&format!("nbds://h/e?{half}"));
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
            assert!(e.to_string().contains("cert= and key= go together"), "{e}");
        }
        let e = err(&format!("nbds://h/e?{}&{ca}", f.full()));
        assert!(e.to_string().contains("not both"), "{e}");
        let e = err(&format!("nbds://h/e?ca={}", f.path("missing.pem")));
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let e = err(&format!("nbds://h/e?ca={}", f.path("full/client-key.pem")));
        assert!(e.to_string().contains("holds no certificate"), "{e}");
    }

    #[test]
    fn tls_server_names() {
        let f = Files::new();
        let q = f.ca_only();
        assert_eq!(name(&tls_of(&format!("nbds://10.0.0.1/e?{q}"))), "10.0.0.1");
        assert_eq!(name(&tls_of(&format!("nbds://[::1]:10900/e?{q}"))), "::1");
        let (address, options) = parse(&format!("nbds+unix:///disk?socket=/run/nbd.sock&{q}"));
        assert_eq!(address, NbdAddress::Unix("/run/nbd.sock".into()));
        assert_eq!(name(options.tls.as_ref().unwrap()), "localhost", "Unix sockets check localhost");
        let tls = tls_of(&format!("nbds+unix:///disk?socket=s&{q}&tls-hostname=nbd.example.com"));
        assert_eq!(name(&tls), "nbd.example.com");
        assert_eq!(name(&tls_of(&format!("nbds://10.0.0.1/e?{q}&tls-hostname=server"))), "server");
        assert!(err(&format!("nbds://h/e?{q}&tls-hostname=")).to_string().contains("tls-hostname is empty"));
        let e = err(&format!("nbds://h/e?{q}&tls-hostname=not%20a%20name"));
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("'not a name' cannot be checked against a TLS certificate"), "{e}");
    }

    #[test]
    fn tls_needs_a_ca() {
        let f = Files::new();
        let cert_only =
            format!("cert={}&key={}", f.path("full/client-cert.pem"), f.path("full/client-key.pem"));
        for url in ["nbds://example.com/disk".to_owned(), format!("nbds://h/e?{cert_only}")] {
            let e = err(&url);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{url}");
            let text = e.to_string();
            assert!(text.contains("TLS needs the CA") && text.contains("tls-certificates=DIR"), "{text}");
            assert!(text.contains("ca=PATH"), "{text}");
        }
        let e = err("nbds+unix:///e?socket=s");
        assert!(e.to_string().contains("TLS needs the CA"), "{e}");
    }

    #[test]
    fn certificate_directories_are_checked() {
        let f = Files::new();
        let e = err(&format!("nbds://h/e?tls-certificates={}", f.path("nowhere")));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("does not exist"), "{e}");
        let empty = f.path("empty");
        std::fs::create_dir(&empty).unwrap();
        let e = err(&format!("nbds://h/e?tls-certificates={empty}"));
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("has no ca-cert.pem"), "{e}");
        std::fs::copy(f.path("full/ca-cert.pem"), f.path("empty/ca-cert.pem")).unwrap();
        std::fs::copy(f.path("full/client-key.pem"), f.path("empty/client-key.pem")).unwrap();
        let e = err(&format!("nbds://h/e?tls-certificates={empty}"));
        assert!(e.to_string().contains("both client-cert.pem and client-key.pem, or neither"), "{e}");
        std::fs::remove_file(f.path("empty/client-key.pem")).unwrap();
        std::fs::write(f.path("empty/ca-crl.pem"), "").unwrap();
        let e = err(&format!("nbds://h/e?tls-certificates={empty}"));
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("revocation list"), "{e}");
    }

    #[test]
    fn tls_parameters_need_a_tls_uri() {
        let f = Files::new();
        for (url, k, use_) in [
            (format!("nbd://h/e?{}", f.full()), "tls-certificates", "nbds://"),
            (format!("nbd://h/e?{}", f.files()), "ca", "nbds://"),
            ("nbd+unix:///e?socket=s&tls-hostname=x".to_owned(), "tls-hostname", "nbds+unix://"),
            ("nbd://h/e?tls-type=x509".to_owned(), "tls-type", "nbds://"),
            ("nbd://h/e?tls-verify-peer=false".to_owned(), "tls-verify-peer", "nbds://"),
        ] {
            let e = err(&url);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{url}");
            let text = e.to_string();
            assert!(text.contains(&format!("'{k}' is a TLS parameter")), "{text}");
            assert!(text.contains(&format!("use {use_} for TLS")), "{text}");
        }
    }

    #[test]
    fn tls_this_client_does_not_do_is_refused() {
        let f = Files::new();
        let q = f.ca_only();
        for verify in ["true", "1", "yes"] {
            assert!(parse(&format!("nbds://h/e?{q}&tls-verify-peer={verify}")).1.tls.is_some());
        }
        assert!(parse(&format!("nbds://h/e?{q}&tls-type=x509")).1.tls.is_some());
        for (param, text) in [
            ("tls-verify-peer=false", "always verifies the server's certificate"),
            ("tls-verify-peer=0", "always verifies the server's certificate"),
            ("tls-type=psk", "X.509 certificates only"),
            ("tls-type=anon", "X.509 certificates only"),
            ("tls-psk-file=/keys.psk", "X.509 certificates only"),
        ] {
            let e = err(&format!("nbds://h/e?{q}&{param}"));
            assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{param}");
            assert!(e.to_string().contains(text), "{param}: {e}");
        }
        for param in ["tls-verify-peer=maybe", "tls-type=kerberos"] {
            let e = err(&format!("nbds://h/e?{q}&{param}"));
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{param}");
            assert!(e.to_string().contains(param), "{e}");
        }
        let e = err(&format!("nbds://h/e?{q}&tls-priority=NORMAL"));
        assert!(e.to_string().contains("unknown parameter 'tls-priority'"), "{e}");
    }

    #[test]
    fn tls_options_compare_by_configuration() {
        let f = Files::new();
        let url = format!("nbds://h/e?{}", f.ca_only());
        let a = tls_of(&url);
        assert_eq!(a, a.clone());
        assert_ne!(a, tls_of(&url), "another configuration, though from the same files");
        let renamed = NbdClientTls::new(Arc::clone(&a.config), "other").unwrap();
        assert_ne!(a, renamed);
    }

    #[test]
    fn malformed_uris() {
        assert!(err("http://h/e").to_string().contains("unknown scheme 'http'"));
        assert!(err("nbds+unix://host/e?socket=s").to_string().contains("write nbds+unix:///EXPORT"));
        assert!(err("nbd:///e").to_string().contains("no host"));
        assert!(err("nbd://h/%zz").to_string().contains("bad %-escape"));
        assert!(err("nbd://h/%ff").to_string().contains("not UTF-8"));
        assert!(err("nbd://h/a%00b").to_string().contains("NUL"));
        assert!(err("not a url").to_string().contains("bad NBD URI 'not a url'"));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Fb%41"), Some(b"a/bA".to_vec()));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%é"), None);
    }
}
