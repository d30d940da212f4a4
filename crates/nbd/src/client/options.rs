//! Where the server is and how to talk to it: [`NbdAddress`], [`NbdClientOptions`] and the NBD URI
//! form (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md>).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// The port NBD servers listen on unless told otherwise (assigned by IANA).
pub const DEFAULT_PORT: u16 = 10809;

/// Where an NBD server listens: the same addresses as the native protocol's.
pub use r3map_net::Address as NbdAddress;

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
    /// How long one connection attempt (connect and handshake) may take.
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub max_backoff: Duration,
}

impl Default for NbdClientOptions {
    fn default() -> Self {
        Self {
            export: String::new(),
            connections: 1,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Query parameters of the URI standard about TLS, which this client does not do yet.
const TLS_PARAMETERS: [&str; 5] =
    ["tls-type", "tls-hostname", "tls-verify-peer", "tls-certificates", "tls-psk-file"];

impl NbdClientOptions {
    /// Options for `export` with the defaults for everything else.
    #[must_use]
    pub fn for_export(export: impl Into<String>) -> Self {
        Self { export: export.into(), ..Self::default() }
    }

    /// Parses an NBD URI:
    /// - `nbd://HOST[:PORT]/[EXPORT]`: TCP, port 10809 unless given, IPv6 addresses in brackets;
    /// - `nbd+unix:///[EXPORT]?socket=PATH`: a Unix socket.
    ///
    /// The export name is the path without its leading `/`, percent-decoded; an empty one names
    /// the server's default export. Parameters: `socket=PATH` (Unix sockets only),
    /// `connections=N` and `timeout=SECONDS`.
    ///
    /// # Errors
    /// `InvalidInput` naming what is wrong: a malformed URI, an unknown scheme or parameter, a
    /// missing socket, a bad number; `Unsupported` for `nbds://` and `nbds+unix://` and TLS
    /// parameters, since this client does not do TLS yet.
    pub fn from_url(url: &str) -> io::Result<(NbdAddress, Self)> {
        let bad =
            |msg: String| io::Error::new(io::ErrorKind::InvalidInput, format!("bad NBD URI '{url}': {msg}"));
        let no_tls = || {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "cannot open '{url}': this NBD client does not support TLS yet; use nbd:// or nbd+unix://"
                ),
            )
        };
        let u = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let unix = match u.scheme() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" => return Err(no_tls()),
            other => return Err(bad(format!("unknown scheme '{other}' (use nbd:// or nbd+unix://)"))),
        };
        let mut options = Self::default();
        let mut socket = None;
        for (key, value) in u.query_pairs() {
            match key.as_ref() {
                "socket" if unix => socket = Some(PathBuf::from(value.as_ref())),
                "connections" => {
                    options.connections =
                        value.parse().ok().filter(|&n| (1..=64).contains(&n)).ok_or_else(|| {
                            bad(format!("connections={value} is not a number from 1 to 64"))
                        })?;
                }
                "timeout" => {
                    let seconds: u64 =
                        value.parse().ok().filter(|&s| s > 0).ok_or_else(|| {
                            bad(format!("timeout={value} is not a positive number of seconds"))
                        })?;
                    options.timeout = Duration::from_secs(seconds);
                }
                k if TLS_PARAMETERS.contains(&k) => return Err(no_tls()),
                k => return Err(bad(format!("unknown parameter '{k}'"))),
            }
        }
        options.export = export_name(u.path()).map_err(bad)?;
        let address = if unix {
            if u.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(
                    bad("a Unix socket URI has no host: write nbd+unix:///EXPORT?socket=PATH".into()),
                );
            }
            NbdAddress::Unix(socket.ok_or_else(|| bad("a Unix socket URI needs ?socket=PATH".into()))?)
        } else {
            let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no host".into()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            NbdAddress::Tcp { host, port: u.port().unwrap_or(DEFAULT_PORT) }
        };
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

    #[test]
    fn tls_is_refused_clearly() {
        for url in ["nbds://h/e", "nbds+unix:///e?socket=s", "nbd://h/e?tls-type=x509"] {
            let e = err(url);
            assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{url}");
            assert!(e.to_string().contains("does not support TLS yet"), "{e}");
        }
    }

    #[test]
    fn malformed_uris() {
        assert!(err("http://h/e").to_string().contains("unknown scheme 'http'"));
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
