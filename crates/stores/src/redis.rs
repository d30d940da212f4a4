//! [`RedisStore`]: a [`ChunkStore`] with one Redis key per chunk, named `{prefix}{chunk index}`.
//!
//! A batch is one command: `MGET` for a read (a missing key is a chunk never written), `MSET` for
//! a write and `DEL` for a trim, each one round trip whatever the batch size.
//!
//! URLs:
//! - `redis://[USER:PASSWORD@]HOST[:PORT][/DB]?prefix=P`: plain TCP;
//! - `rediss://[USER:PASSWORD@]HOST[:PORT][/DB]?prefix=P[&ca=PATH]`: TLS, trusting the CA
//!   certificates of the PEM file `ca` if given (and only them), else the system's roots;
//! - `redis+unix:///PATH/TO/SOCKET?db=N&prefix=P`: a Unix socket.
//!
//! The port defaults to 6379, the database to 0 and the prefix to `r3map:`; the user and password
//! are percent-decoded. `timeout=SECONDS` (the wait for one answer) and `connect-timeout=SECONDS`
//! (one connection attempt) override [`RedisOptions`]. The parameters `size`, `chunk-size` and
//! `max-batch` belong to the caller and are ignored here; any other is an error.
//!
//! The API is blocking, like every [`ChunkStore`]; inside, the commands run on the runtime of
//! the [`Io`] the store is opened on ([`Io::shared`] unless the caller gives its own), so it may
//! be called from any thread, a tokio worker included. The connection is a [`ConnectionManager`], which reconnects by itself when the server goes away:
//! a call in flight then fails (or is tried once more on the new connection, as every command
//! here is safe to repeat), and the calls after the server is back work again. No call waits
//! longer than the connection and response timeouts together.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use r3map_net::Io;
use r3map_net::params::Params;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo, RedisError,
    TlsCertificates, Value,
};
use url::Url;

use crate::ChunkStore;

/// The port Redis listens on unless the URL says otherwise.
pub const DEFAULT_PORT: u16 = 6379;
/// The prefix of the keys unless the URL says otherwise.
pub const DEFAULT_PREFIX: &str = "r3map:";

/// How long a [`RedisStore`] waits before it gives up on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisOptions {
    /// Longest wait for one connection attempt (TCP, TLS, authentication).
    pub connect_timeout: Duration,
    /// Longest wait for the answer to one command, so that a server that stopped answering gives
    /// `TimedOut` instead of a hang. A batch of large chunks needs time to cross a slow link.
    pub response_timeout: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self { connect_timeout: Duration::from_secs(5), response_timeout: Duration::from_secs(10) }
    }
}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Tcp { host: String, port: u16, tls: bool },
    Unix(PathBuf),
}

/// Everything a URL says.
#[derive(Clone)]
struct Target {
    address: Address,
    db: i64,
    username: Option<String>,
    password: Option<String>,
    /// PEM file of the CA certificates to trust for TLS (instead of the system's).
    ca: Option<PathBuf>,
    prefix: String,
    options: RedisOptions,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("address", &self.address)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("prefix", &self.prefix)
            .field("options", &self.options)
            .finish()
    }
}

impl Target {
    fn parse(url: &Url, mut options: RedisOptions) -> io::Result<Self> {
        let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, format!("bad Redis URL: {msg}"));
        let tls = match url.scheme() {
            "redis" | "redis+unix" => false,
            "rediss" => true,
            other => return Err(bad(format!("unknown scheme '{other}' (use redis, rediss or redis+unix)"))),
        };
        let unix = url.scheme() == "redis+unix";
        let mut params = Params::parse(url.as_str())?;
        for key in crate::COMMON_PARAMETERS {
            params.take(key);
        }
        let prefix = params.take("prefix").unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        let ca = params.path("ca")?;
        if ca.is_some() && !tls {
            return Err(params.error("ca", "ca= is for TLS only (rediss://)"));
        }
        let query_db = params.number::<i64>("db", "a number")?;
        if query_db.is_some() && !unix {
            return Err(params.error("db", "the database goes in the path (redis://HOST:PORT/DB)"));
        }
        for (key, timeout) in
            [("timeout", &mut options.response_timeout), ("connect-timeout", &mut options.connect_timeout)]
        {
            if let Some(value) = params.take(key) {
                *timeout = seconds(key, &value).map_err(|e| params.error(key, e))?;
            }
        }
        params.finish()?;
        let username = match url.username() {
            "" => None,
            u => Some(percent_decode(u).map_err(|e| bad(format!("the user name: {e}")))?),
        };
        let password =
            url.password().map(percent_decode).transpose().map_err(|e| bad(format!("the password: {e}")))?;
        let (address, db) = if unix {
            if url.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(bad("a Unix socket URL has no host: redis+unix:///PATH/TO/SOCKET".to_owned()));
            }
            let path = percent_decode(url.path()).map_err(|e| bad(format!("the socket path: {e}")))?;
            if path.is_empty() || path == "/" {
                return Err(bad("no socket path: redis+unix:///PATH/TO/SOCKET".to_owned()));
            }
            (Address::Unix(PathBuf::from(path)), query_db.unwrap_or(0))
        } else {
            let host = match url.host() {
                Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
                Some(url::Host::Ipv4(a)) => a.to_string(),
                Some(url::Host::Ipv6(a)) => a.to_string(),
                _ => return Err(bad("no host".to_owned())),
            };
            let db = match url.path().trim_start_matches('/') {
                "" => 0,
                p => p.parse::<i64>().map_err(|_| bad(format!("the database '{p}' is no number")))?,
            };
            (Address::Tcp { host, port: url.port().unwrap_or(DEFAULT_PORT), tls }, db)
        };
        if db < 0 {
            return Err(bad(format!("the database {db} is negative")));
        }
        Ok(Self { address, db, username, password, ca, prefix, options })
    }

    /// The server and database, without credentials: `redis://127.0.0.1:6379/0`.
    fn place(&self) -> String {
        match &self.address {
            Address::Tcp { host, port, tls } => {
                let scheme = if *tls { "rediss" } else { "redis" };
                if host.contains(':') {
                    format!("{scheme}://[{host}]:{port}/{}", self.db)
                } else {
                    format!("{scheme}://{host}:{port}/{}", self.db)
                }
            }
            Address::Unix(path) => format!("redis+unix://{}?db={}", path.display(), self.db),
        }
    }

    /// A client for the target (it connects later).
    fn client(&self) -> io::Result<Client> {
        let place = self.place();
        let addr = match &self.address {
            Address::Tcp { host, port, tls: false } => ConnectionAddr::Tcp(host.clone(), *port),
            Address::Tcp { host, port, tls: true } => {
                ConnectionAddr::TcpTls { host: host.clone(), port: *port, insecure: false, tls_params: None }
            }
            Address::Unix(path) => ConnectionAddr::Unix(path.clone()),
        };
        let mut redis_info = RedisConnectionInfo::default().set_db(self.db);
        if let Some(u) = &self.username {
            redis_info = redis_info.set_username(u);
        }
        if let Some(p) = &self.password {
            redis_info = redis_info.set_password(p);
        }
        let info = addr
            .into_connection_info()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{place}: {e}")))?
            .set_redis_settings(redis_info);
        let client = match &self.ca {
            Some(ca) => {
                let pem = std::fs::read(ca).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("reading the CA certificates {} for {place}: {e}", ca.display()),
                    )
                })?;
                Client::build_with_tls(info, TlsCertificates { client_tls: None, root_cert: Some(pem) })
            }
            None => Client::open(info),
        };
        client.map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("setting up the client for {place}: {e}"))
        })
    }
}

/// A duration in seconds (fractions allowed) from a URL parameter.
fn seconds(key: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| *s > 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("{key}={value} is no positive number of seconds"))
}

/// Decodes the `%XX` escapes of a URL part.
fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "its percent escapes are not UTF-8".to_owned())
}

/// The key of `chunk` under `prefix`.
fn key(prefix: &str, chunk: u64) -> Vec<u8> {
    format!("{prefix}{chunk}").into_bytes()
}

/// Names a batch of keys for messages: `key "r3map:5"` or `16 keys from "r3map:0"`.
fn keys_named(prefix: &str, chunks: &[u64]) -> String {
    match chunks {
        [one] => format!("key \"{prefix}{one}\""),
        [first, ..] => format!("{} keys from \"{prefix}{first}\"", chunks.len()),
        [] => "no keys".to_owned(),
    }
}

/// The `io::ErrorKind` of a Redis error: `PermissionDenied` for refused credentials, `TimedOut`,
/// and the kind of the I/O error underneath for the others.
fn kind_of(e: &RedisError) -> io::ErrorKind {
    if is_auth_error(e) {
        return io::ErrorKind::PermissionDenied;
    }
    if e.is_timeout() {
        return io::ErrorKind::TimedOut;
    }
    // The I/O error sits in an `Arc` inside the Redis error.
    let source = std::error::Error::source(e);
    let io = source.and_then(|s| s.downcast_ref::<io::Error>()).or_else(|| {
        source
            .and_then(|s| s.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>())
            .and_then(|inner| inner.downcast_ref::<io::Error>())
    });
    match io {
        Some(io) => io.kind(),
        None if e.is_connection_refusal() => io::ErrorKind::ConnectionRefused,
        None if e.is_connection_dropped() => io::ErrorKind::ConnectionAborted,
        None => io::ErrorKind::Other,
    }
}

/// The server refused the credentials, or wants some (`WRONGPASS`, `NOAUTH`, `NOPERM`).
fn is_auth_error(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
}

/// The connection broke (rather than the command failing): worth one more try on a new one.
fn is_connection_error(e: &RedisError) -> bool {
    !e.is_timeout() && (e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error())
}

/// A [`ChunkStore`] on a Redis server, one key per chunk; see the [module docs](self).
pub struct RedisStore {
    manager: ConnectionManager,
    place: String,
    prefix: String,
    options: RedisOptions,
    io: Io,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("place", &self.place)
            .field("prefix", &self.prefix)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the server of `url` (see the [module docs](self)) with the default
    /// [`RedisOptions`], and checks it answers.
    ///
    /// # Errors
    /// As [`open_with`](Self::open_with).
    pub fn open(url: &Url) -> io::Result<Self> {
        Self::open_with(url, RedisOptions::default())
    }

    /// Connects to the server of `url` with `options` (which the URL's `timeout` and
    /// `connect-timeout` override) and sends it a `PING`, so that a bad address or credentials
    /// fail here rather than at the first read.
    ///
    /// # Errors
    /// `InvalidInput` for a bad URL; `PermissionDenied` when the server refuses the credentials
    /// (or wants some); `TimedOut` or the connection error when the server cannot be reached
    /// within the timeouts.
    pub fn open_with(url: &Url, options: RedisOptions) -> io::Result<Self> {
        Self::open_on(url, options, Io::shared())
    }

    /// As [`open_with`](Self::open_with), running the store's I/O on `io`.
    ///
    /// # Errors
    /// As [`open_with`](Self::open_with).
    pub fn open_on(url: &Url, options: RedisOptions, io: Io) -> io::Result<Self> {
        let target = Target::parse(url, options)?;
        let client = target.client()?;
        let place = target.place();
        let options = target.options;
        let fail = |what: &str, e: &RedisError| {
            let kind = kind_of(e);
            let hint = if kind == io::ErrorKind::PermissionDenied {
                ": the server refused the credentials (or needs some): check the user and password of the URL"
            } else {
                ""
            };
            io::Error::new(kind, format!("{what} {place} failed{hint}: {e}"))
        };
        let manager = io.block_on(async {
            let deadline = options.connect_timeout + options.response_timeout;
            let probe = async {
                // A plain connection first: the manager would retry refused credentials in a loop.
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(options.connect_timeout))
                    .set_response_timeout(Some(options.response_timeout));
                let mut conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map_err(|e| fail("connecting to", &e))?;
                redis::cmd("PING").exec_async(&mut conn).await.map_err(|e| fail("PING to", &e))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(options.connect_timeout))
                    .set_response_timeout(Some(options.response_timeout))
                    .set_number_of_retries(5)
                    .set_max_delay(Duration::from_secs(1));
                ConnectionManager::new_with_config(client, config)
                    .await
                    .map_err(|e| fail("connecting to", &e))
            };
            tokio::time::timeout(deadline, probe).await.map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{place} did not answer within {}s", deadline.as_secs_f64()),
                )
            })?
        })?;
        Ok(Self { manager, place, prefix: target.prefix, options, io })
    }

    /// The prefix of every key of this store.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The Redis key that holds `chunk`: the prefix followed by the index in decimal.
    #[must_use]
    pub fn key(&self, chunk: u64) -> Vec<u8> {
        key(&self.prefix, chunk)
    }

    #[must_use]
    pub fn options(&self) -> RedisOptions {
        self.options
    }

    /// Runs `cmd` on the server, once more if the connection broke (the manager has started a
    /// new one by then), all within the connection and response timeouts. `what` names the
    /// command and its keys for messages.
    fn run(&self, cmd: &redis::Cmd, what: &(dyn Fn() -> String + Sync)) -> io::Result<Value> {
        let deadline = self.options.connect_timeout + self.options.response_timeout;
        let mut manager = self.manager.clone();
        self.io.block_on(async {
            let attempts = async {
                match cmd.query_async::<Value>(&mut manager).await {
                    Err(e) if is_connection_error(&e) => {
                        tracing::debug!("{} on {}: {e}; trying again", what(), self.place);
                        cmd.query_async::<Value>(&mut manager).await
                    }
                    other => other,
                }
            };
            match tokio::time::timeout(deadline, attempts).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => {
                    Err(io::Error::new(kind_of(&e), format!("{} on {} failed: {e}", what(), self.place)))
                }
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} on {}: no answer within {}s", what(), self.place, deadline.as_secs_f64()),
                )),
            }
        })
    }
}

impl ChunkStore for RedisStore {
    fn describe(&self) -> String {
        format!("{}, prefix \"{}\"", self.place, self.prefix)
    }

    /// One `MGET` of every key; a nil (a key never written, or deleted) is `None`.
    fn get(&self, chunks: &[u64]) -> io::Result<Vec<Option<Vec<u8>>>> {
        if chunks.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for &c in chunks {
            cmd.arg(self.key(c));
        }
        let what = || format!("MGET of {}", keys_named(&self.prefix, chunks));
        let Value::Array(values) = self.run(&cmd, &what)? else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} on {}: the answer is no array", what(), self.place),
            ));
        };
        if values.len() != chunks.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} on {}: {} values came back", what(), self.place, values.len()),
            ));
        }
        chunks
            .iter()
            .zip(values)
            .map(|(&c, v)| match v {
                Value::Nil => Ok(None),
                Value::BulkString(data) => Ok(Some(data)),
                other => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("key \"{}{c}\" on {} holds no string but {other:?}", self.prefix, self.place),
                )),
            })
            .collect()
    }

    /// One `MSET` of every key.
    fn put(&self, chunks: &[(u64, &[u8])]) -> io::Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("MSET");
        for &(c, data) in chunks {
            cmd.arg(self.key(c)).arg(data);
        }
        let first: Vec<u64> = chunks.iter().map(|(c, _)| *c).collect();
        self.run(&cmd, &|| format!("MSET of {}", keys_named(&self.prefix, &first))).map(drop)
    }

    /// One `DEL` of every key; a key that does not exist is no error.
    fn delete(&self, chunks: &[u64]) -> io::Result<()> {
        if chunks.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("DEL");
        for &c in chunks {
            cmd.arg(self.key(c));
        }
        self.run(&cmd, &|| format!("DEL of {}", keys_named(&self.prefix, chunks))).map(drop)
    }

    /// Nothing to do: Redis has applied a command once it answers, and whether it survives a
    /// restart of the server is the server's persistence setting (`appendonly`, `save`), which a
    /// client cannot change per write. (`WAIT` would only count replicas, not make it durable.)
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> io::Result<Target> {
        Target::parse(&Url::parse(url).unwrap(), RedisOptions::default())
    }

    #[test]
    fn defaults_fill_what_the_url_leaves_out() {
        let t = parse("redis://cache.example").unwrap();
        assert_eq!(t.address, Address::Tcp { host: "cache.example".into(), port: 6379, tls: false });
        assert_eq!((t.db, t.prefix.as_str(), &t.username, &t.password), (0, "r3map:", &None, &None));
        assert_eq!(t.options, RedisOptions::default());
        assert_eq!(t.place(), "redis://cache.example:6379/0");
    }

    #[test]
    fn a_full_tcp_url_is_parsed_and_its_credentials_decoded() {
        let common = "size=1G&chunk-size=4096&max-batch=8";
        let t = parse(&format!("redis://us%40er:p%3Ass%2Fw%25rd@10.0.0.1:7000/3?prefix=disk%3A&{common}"))
            .unwrap();
        assert_eq!(t.address, Address::Tcp { host: "10.0.0.1".into(), port: 7000, tls: false });
        assert_eq!(t.db, 3);
        assert_eq!(t.username.as_deref(), Some("us@er"));
        assert_eq!(t.password.as_deref(), Some("p:ss/w%rd"));
        assert_eq!(t.prefix, "disk:");
        assert_eq!(t.place(), "redis://10.0.0.1:7000/3", "no credentials in messages");
        assert!(!format!("{t:?}").contains("p:ss"), "no password in debug output");
    }

    #[test]
    fn a_password_alone_and_ipv6_hosts_work() {
        let t = parse("redis://:secret@[::1]:6380/").unwrap();
        assert_eq!((t.username.as_deref(), t.password.as_deref()), (None, Some("secret")));
        assert_eq!(t.address, Address::Tcp { host: "::1".into(), port: 6380, tls: false });
        assert_eq!(t.place(), "redis://[::1]:6380/0");
    }

    #[test]
    fn tls_urls_take_a_ca() {
        let t = parse("rediss://h:6390?ca=/etc/ca.pem&prefix=x").unwrap();
        assert_eq!(t.address, Address::Tcp { host: "h".into(), port: 6390, tls: true });
        assert_eq!(t.ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(t.place(), "rediss://h:6390/0");
        assert_eq!(parse("rediss://h").unwrap().ca, None);
        let err = parse("redis://h?ca=/etc/ca.pem").unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
    }

    #[test]
    fn unix_urls_take_the_socket_path_and_db() {
        let t = parse("redis+unix:///run/redis/redis%20server.sock?db=2&prefix=p").unwrap();
        assert_eq!(t.address, Address::Unix(PathBuf::from("/run/redis/redis server.sock")));
        assert_eq!((t.db, t.prefix.as_str()), (2, "p"));
        assert_eq!(t.place(), "redis+unix:///run/redis/redis server.sock?db=2");
        assert_eq!(parse("redis+unix:///tmp/s").unwrap().db, 0);
        assert!(parse("redis+unix:///").is_err());
        assert!(parse("redis+unix:///tmp/s?db=x").is_err());
    }

    #[test]
    fn timeouts_come_from_the_url() {
        let t = parse("redis://h?timeout=0.5&connect-timeout=2").unwrap();
        assert_eq!(t.options.response_timeout, Duration::from_millis(500));
        assert_eq!(t.options.connect_timeout, Duration::from_secs(2));
        assert!(parse("redis://h?timeout=0").is_err());
        assert!(parse("redis://h?timeout=soon").is_err());
    }

    #[test]
    fn bad_urls_are_invalid_input_naming_the_problem() {
        for (url, needle) in [
            ("redis://h?prefx=a", "prefx"),
            ("http://h", "scheme"),
            ("redis://h/abc", "abc"),
            ("redis://h/-1", "negative"),
            ("redis://h?db=1", "path"),
        ] {
            let err = parse(url).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn keys_are_the_prefix_and_the_decimal_index() {
        assert_eq!(key("r3map:", 0), b"r3map:0");
        assert_eq!(key("disk/", 1234), b"disk/1234");
        assert_eq!(key("", u64::MAX), u64::MAX.to_string().into_bytes());
        assert_eq!(keys_named("p", &[7]), "key \"p7\"");
        assert_eq!(keys_named("p", &[7, 9, 3]), "3 keys from \"p7\"");
    }

    #[test]
    fn percent_decoding_leaves_stray_percents_alone() {
        assert_eq!(percent_decode("a%20b%2f").unwrap(), "a b/");
        assert_eq!(percent_decode("100%").unwrap(), "100%");
        assert_eq!(percent_decode("%zz%4").unwrap(), "%zz%4");
        assert_eq!(percent_decode("%C3%A9").unwrap(), "é");
        assert!(percent_decode("%FF").is_err());
    }
}
