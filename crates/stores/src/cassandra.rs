//! [`CassandraStore`]: a [`ChunkStore`] of one Cassandra or ScyllaDB row per chunk.
//!
//! A URL names the cluster, the table and the prefix of the row keys:
//!
//! ```text
//! cassandra://[USER:PASSWORD@]HOST[:PORT][,HOST[:PORT]...][/]?keyspace=K&table=T&prefix=P&replication=N
//! cassandrasecure://...&ca=PATH
//! ```
//!
//! Ports default to 9042, the keyspace to `r3map`, the table to `chunks`, the prefix to nothing
//! and the replication factor to 1. `cassandrasecure` speaks TLS (rustls) and needs `ca`, the CA
//! in PEM that signed the nodes' certificates: the driver checks a node's certificate against the
//! node's IP address (not a host name), so the certificates must name the IP addresses, and it has
//! no system trust store to fall back on. User names and passwords are percent-decoded.
//!
//! At open the store creates what is missing:
//! `CREATE KEYSPACE IF NOT EXISTS K WITH replication = {'class': 'SimpleStrategy', ...}` and
//! `CREATE TABLE IF NOT EXISTS K.T (key text PRIMARY KEY, data blob)`, then prepares its select,
//! insert and delete statements once. The row of chunk `i` has the key `{prefix}{i}`. A batch runs
//! its statements concurrently, up to [`IN_FLIGHT`] at a time, on the sessions' connections.
//!
//! The API is blocking, like every [`ChunkStore`]: the statements run on the runtime of the
//! [`Io`] the store is opened on ([`Io::shared`] unless the caller gives its own), so it may be
//! called from any thread, a tokio worker included. The driver reconnects to
//! a node that went away in the background; a call made while no node answers fails at once
//! or after [`REQUEST_TIMEOUT`], and the next call after a node is back works.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt, stream};
use r3map_net::Io;
use r3map_net::params::{BackendUrl, Params};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{
    ConnectionError, ConnectionPoolError, ConnectionSetupRequestErrorKind, DbError, ExecutionError,
    MetadataError, MetadataFetchErrorKind, NewSessionError, PrepareError, RequestAttemptError,
};
use scylla::statement::prepared::PreparedStatement;

use crate::ChunkStore;

/// The port of a node whose address gives none.
pub const DEFAULT_PORT: u16 = 9042;
/// The keyspace of a URL without `keyspace=`.
pub const DEFAULT_KEYSPACE: &str = "r3map";
/// The table of a URL without `table=`.
pub const DEFAULT_TABLE: &str = "chunks";
/// Longest keyspace or table name (Cassandra's own limit).
pub const MAX_NAME_LEN: usize = 48;
/// How long one connection to a node may take to open.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening the session (name resolution, first connection, cluster metadata) may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one statement may wait for its answer, retries included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Statements of one batch in flight at once.
pub const IN_FLIGHT: usize = 64;

/// A node to contact first (the driver discovers the rest of the cluster from it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// A host name or an IP address (IPv6 without brackets).
    pub host: String,
    pub port: u16,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// What a Cassandra URL says; see the [module documentation](self).
#[derive(Clone, PartialEq, Eq)]
pub struct CassandraConfig {
    pub nodes: Vec<Node>,
    /// User name and password, for the server's password authenticator.
    pub credentials: Option<(String, String)>,
    /// TLS, with the CA in PEM at this path (`cassandrasecure://`); plaintext when `None`.
    pub ca: Option<PathBuf>,
    /// A valid CQL identifier, in lower case (unquoted names are case-insensitive in CQL).
    pub keyspace: String,
    /// A valid CQL identifier, in lower case.
    pub table: String,
    pub prefix: String,
    /// The keyspace's replication factor, used only when the store creates it.
    pub replication: u32,
}

impl fmt::Debug for CassandraConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CassandraConfig")
            .field("nodes", &self.nodes)
            .field("user", &self.credentials.as_ref().map(|(user, _)| user))
            .field("ca", &self.ca)
            .field("keyspace", &self.keyspace)
            .field("table", &self.table)
            .field("prefix", &self.prefix)
            .field("replication", &self.replication)
            .finish()
    }
}

fn bad_url(msg: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("bad Cassandra URL: {msg}"))
}

impl CassandraConfig {
    /// Parses a parsed URL. [`url::Url`] cannot hold a port on any node but the last one
    /// (`cassandra://a,b:9043` can be parsed, `cassandra://a:9043,b` cannot); [`Self::parse`]
    /// takes the string and every form.
    ///
    /// # Errors
    /// As [`Self::parse`].
    pub fn from_url(url: &url::Url) -> io::Result<Self> {
        Self::parse(url.as_str())
    }

    /// Parses `cassandra://` and `cassandrasecure://` URLs (see the
    /// [module documentation](self)). Reads no file: the CA is read at connect.
    ///
    /// # Errors
    /// `InvalidInput` saying what is wrong: another scheme, no node, a bad port, a keyspace or
    /// table that is not a CQL identifier, an unknown parameter (named), a path, `ca` missing for
    /// TLS or given without it.
    pub fn parse(url: &str) -> io::Result<Self> {
        if !url.contains("://") {
            return Err(bad_url("no scheme (cassandra://...)"));
        }
        let parsed = BackendUrl::parse(url)?;
        let tls = match parsed.scheme() {
            "cassandra" => false,
            "cassandrasecure" => true,
            other => {
                return Err(bad_url(format!("unknown scheme '{other}' (use cassandra or cassandrasecure)")));
            }
        };
        if url.contains('#') {
            return Err(bad_url("a fragment (#...) means nothing here"));
        }
        let path = parsed.path();
        if !path.is_empty() && path != "/" {
            return Err(bad_url(format!(
                "unexpected path '{path}' (name the keyspace and table with ?keyspace=K&table=T)"
            )));
        }
        if parsed.hosts().is_empty() {
            return Err(bad_url("no node (cassandra://HOST[:PORT])"));
        }
        let nodes = parsed
            .hosts()
            .iter()
            .map(|h| Node { host: h.host.clone(), port: h.port.unwrap_or(DEFAULT_PORT) })
            .collect();
        let credentials =
            parsed.user().map(|user| (user.to_owned(), parsed.password().unwrap_or_default().to_owned()));

        let mut params = parsed.into_params();
        for key in crate::COMMON_PARAMETERS {
            params.take(key);
        }
        let name = |params: &mut Params, key: &str, default: &str| {
            params.take(key).map_or_else(|| Ok(default.to_owned()), |v| identifier(key, &v))
        };
        let keyspace = name(&mut params, "keyspace", DEFAULT_KEYSPACE)?;
        let table = name(&mut params, "table", DEFAULT_TABLE)?;
        let prefix = params.take("prefix").unwrap_or_default();
        let replication = match params.take("replication") {
            None => 1,
            Some(value) => value.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                params.error(
                    "replication",
                    format!("replication={value} (a replication factor is a number from 1)"),
                )
            })?,
        };
        let ca = params.path("ca")?;
        if ca.is_some() && !tls {
            return Err(params.error("ca", "ca is for TLS: use cassandrasecure:// with it"));
        }
        params.finish()?;
        if tls && ca.is_none() {
            return Err(bad_url(
                "cassandrasecure:// needs ?ca=PATH, the CA in PEM that signed the nodes' certificates",
            ));
        }
        Ok(Self { nodes, credentials, ca, keyspace, table, prefix, replication })
    }

    /// The nodes, comma-separated (`127.0.0.1:9042,[::1]:9042`).
    #[must_use]
    pub fn nodes_list(&self) -> String {
        self.nodes.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
    }

    /// The URL without credentials, and the prefix:
    /// `cassandra://127.0.0.1:9042?keyspace=r3map&table=chunks, prefix "disk:"`.
    #[must_use]
    pub fn describe(&self) -> String {
        let scheme = if self.ca.is_some() { "cassandrasecure" } else { "cassandra" };
        format!(
            "{scheme}://{}?keyspace={}&table={}, prefix {:?}",
            self.nodes_list(),
            self.keyspace,
            self.table,
            self.prefix
        )
    }
}

/// `name` in lower case if it is a CQL identifier that can name a keyspace or table: letters,
/// digits and underscores, starting with a letter, at most [`MAX_NAME_LEN`] characters.
///
/// # Errors
/// `InvalidInput` naming `what` and the rule broken.
pub fn identifier(what: &str, name: &str) -> io::Result<String> {
    let valid = name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(bad_url(format!(
            "{what} '{name}' is not a valid name: letters, digits and underscores, starting with a \
             letter, at most {MAX_NAME_LEN} characters"
        )))
    }
}

/// The CQL the store sends, built from validated names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statements {
    pub create_keyspace: String,
    pub create_table: String,
    /// Binds the key; answers the row's `data`, or no row.
    pub select: String,
    /// Binds the key and the data.
    pub insert: String,
    /// Binds the key.
    pub delete: String,
}

/// The statements for `keyspace.table`. The names must have passed [`identifier`]; they are
/// quoted all the same, so that names CQL reserves (`table`, `select`) work too.
#[must_use]
pub fn statements(keyspace: &str, table: &str, replication: u32) -> Statements {
    let ks = format!("\"{keyspace}\"");
    let full = format!("{ks}.\"{table}\"");
    Statements {
        create_keyspace: format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = \
             {{'class': 'SimpleStrategy', 'replication_factor': {replication}}}"
        ),
        create_table: format!("CREATE TABLE IF NOT EXISTS {full} (key text PRIMARY KEY, data blob)"),
        select: format!("SELECT data FROM {full} WHERE key = ?"),
        insert: format!("INSERT INTO {full} (key, data) VALUES (?, ?)"),
        delete: format!("DELETE FROM {full} WHERE key = ?"),
    }
}

/// The row key of `chunk`.
#[must_use]
pub fn row_key(prefix: &str, chunk: u64) -> String {
    format!("{prefix}{chunk}")
}

/// The `io::ErrorKind` for a driver error: `PermissionDenied` for refused credentials or rights,
/// `TimedOut` for timeouts, the socket's own kind for connection failures.
fn execution_kind(e: &ExecutionError) -> io::ErrorKind {
    match e {
        ExecutionError::RequestTimeout(_) => io::ErrorKind::TimedOut,
        ExecutionError::ConnectionPoolError(p) => pool_kind(p),
        ExecutionError::LastAttemptError(a) => attempt_kind(a),
        ExecutionError::PrepareError(p) => prepare_kind(p),
        ExecutionError::BadQuery(_) => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    }
}

fn prepare_kind(e: &PrepareError) -> io::ErrorKind {
    match e {
        PrepareError::ConnectionPoolError(p) => pool_kind(p),
        PrepareError::AllAttemptsFailed { first_attempt } => attempt_kind(first_attempt),
        _ => io::ErrorKind::Other,
    }
}

fn new_session_kind(e: &NewSessionError) -> io::ErrorKind {
    match e {
        NewSessionError::FailedToResolveAnyHostname(_) => io::ErrorKind::NotFound,
        NewSessionError::EmptyKnownNodesList | NewSessionError::IllegalConfig(_) => {
            io::ErrorKind::InvalidInput
        }
        NewSessionError::MetadataError(MetadataError::ConnectionPoolError(p)) => pool_kind(p),
        NewSessionError::MetadataError(MetadataError::FetchError(f)) => match &f.error {
            MetadataFetchErrorKind::PrepareError(a) => attempt_kind(a),
            _ => io::ErrorKind::Other,
        },
        _ => io::ErrorKind::Other,
    }
}

fn pool_kind(e: &ConnectionPoolError) -> io::ErrorKind {
    match e {
        ConnectionPoolError::Broken { last_connection_error } => connection_kind(last_connection_error),
        _ => io::ErrorKind::NotConnected,
    }
}

fn connection_kind(e: &ConnectionError) -> io::ErrorKind {
    match e {
        ConnectionError::ConnectTimeout => io::ErrorKind::TimedOut,
        ConnectionError::IoError(io) => io.kind(),
        ConnectionError::BrokenConnection(_) => io::ErrorKind::ConnectionAborted,
        ConnectionError::ConnectionSetupRequestError(s) => match s.get_error() {
            ConnectionSetupRequestErrorKind::MissingAuthentication
            | ConnectionSetupRequestErrorKind::DbError(
                DbError::AuthenticationError | DbError::Unauthorized,
                _,
            ) => io::ErrorKind::PermissionDenied,
            ConnectionSetupRequestErrorKind::BrokenConnection(_) => io::ErrorKind::ConnectionAborted,
            _ => io::ErrorKind::Other,
        },
        _ => io::ErrorKind::Other,
    }
}

fn attempt_kind(e: &RequestAttemptError) -> io::ErrorKind {
    match e {
        RequestAttemptError::DbError(db, _) => match db {
            DbError::AuthenticationError | DbError::Unauthorized => io::ErrorKind::PermissionDenied,
            DbError::ReadTimeout { .. } | DbError::WriteTimeout { .. } => io::ErrorKind::TimedOut,
            DbError::SyntaxError | DbError::Invalid | DbError::ConfigError => io::ErrorKind::InvalidInput,
            _ => io::ErrorKind::Other,
        },
        RequestAttemptError::BrokenConnectionError(_) => io::ErrorKind::ConnectionAborted,
        _ => io::ErrorKind::Other,
    }
}

/// What the store shares with the stores made from it by [`CassandraStore::with_prefix`].
struct Shared {
    session: Session,
    select: PreparedStatement,
    insert: PreparedStatement,
    delete: PreparedStatement,
    io: Io,
}

impl Shared {
    fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.io.block_on(f)
    }
}

/// A [`ChunkStore`] of one row per chunk in a Cassandra or ScyllaDB table; see the
/// [module documentation](self).
pub struct CassandraStore {
    config: CassandraConfig,
    shared: Arc<Shared>,
}

impl fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CassandraStore").field("config", &self.config).finish_non_exhaustive()
    }
}

impl CassandraStore {
    /// Parses `url` ([`CassandraConfig::from_url`]) and connects ([`Self::connect`]).
    ///
    /// # Errors
    /// As [`CassandraConfig::parse`] and [`Self::connect`].
    pub fn open(url: &url::Url) -> io::Result<Self> {
        Self::connect(CassandraConfig::from_url(url)?)
    }

    /// Parses `url` ([`CassandraConfig::parse`], which takes a port on every node) and connects.
    ///
    /// # Errors
    /// As [`CassandraConfig::parse`] and [`Self::connect`].
    pub fn open_str(url: &str) -> io::Result<Self> {
        Self::connect(CassandraConfig::parse(url)?)
    }

    /// Connects, creates the keyspace and table if they are missing and prepares the statements.
    ///
    /// # Errors
    /// The CA cannot be read or used; no node answers (the socket's error, `TimedOut` after
    /// [`CONNECT_TIMEOUT`] for one connection or [`OPEN_TIMEOUT`] for the whole); the server
    /// refuses the credentials (`PermissionDenied`); the schema cannot be created or the
    /// statements prepared (an existing table of other columns, say).
    pub fn connect(config: CassandraConfig) -> io::Result<Self> {
        Self::connect_on(config, Io::shared())
    }

    /// As [`connect`](Self::connect), running the store's statements on `io`.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub fn connect_on(config: CassandraConfig, io: Io) -> io::Result<Self> {
        let at = config.describe();
        let profile = ExecutionProfile::builder().request_timeout(Some(REQUEST_TIMEOUT)).build();
        let mut builder = SessionBuilder::new()
            .known_nodes(config.nodes.iter().map(ToString::to_string))
            .connection_timeout(CONNECT_TIMEOUT)
            .hostname_resolution_timeout(Some(CONNECT_TIMEOUT))
            .schema_agreement_timeout(REQUEST_TIMEOUT)
            .keyspaces_to_fetch([config.keyspace.clone()])
            .default_execution_profile_handle(profile.into_handle());
        if let Some((user, password)) = &config.credentials {
            builder = builder.user(user.clone(), password.clone());
        }
        if let Some(ca) = &config.ca {
            builder = builder.tls_context(Some(tls_config(ca)?));
        }
        let session = io
            .block_on(async { tokio::time::timeout(OPEN_TIMEOUT, builder.build()).await })
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connecting to Cassandra at {at} took longer than {OPEN_TIMEOUT:?}"),
                )
            })?
            .map_err(|e| {
                let kind = new_session_kind(&e);
                let hint = match (kind, &config.credentials) {
                    (io::ErrorKind::PermissionDenied, None) => {
                        " (the server wants a user name and password: cassandra://USER:PASSWORD@HOST)"
                    }
                    (io::ErrorKind::PermissionDenied, Some(_)) => " (check the user name and password)",
                    _ => "",
                };
                io::Error::new(kind, format!("connecting to Cassandra at {at}: {e}{hint}"))
            })?;

        let text = statements(&config.keyspace, &config.table, config.replication);
        let (select, insert, delete) = io.block_on(async {
            for (what, statement) in
                [("the keyspace", &text.create_keyspace), ("the table", &text.create_table)]
            {
                if let Err(e) = session.query_unpaged(statement.as_str(), ()).await {
                    // A user without CREATE rights may still use a schema that exists: go on, and
                    // let the prepare below say whether it does.
                    if matches!(
                        &e,
                        ExecutionError::LastAttemptError(RequestAttemptError::DbError(
                            DbError::Unauthorized,
                            _
                        ))
                    ) {
                        tracing::warn!("{at}: not allowed to create {what}, assuming it exists: {e}");
                    } else {
                        return Err(io::Error::new(
                            execution_kind(&e),
                            format!("creating {what} on {at}: {e}"),
                        ));
                    }
                }
            }
            let prepare = async |statement: &str| {
                let mut prepared = session.prepare(statement).await.map_err(|e| {
                    io::Error::new(prepare_kind(&e), format!("preparing '{statement}' on {at}: {e}"))
                })?;
                // Each statement may run twice with the same effect, so the driver may retry it
                // after a timeout or a broken connection.
                prepared.set_is_idempotent(true);
                io::Result::Ok(prepared)
            };
            Ok((prepare(&text.select).await?, prepare(&text.insert).await?, prepare(&text.delete).await?))
        })?;
        Ok(Self { config, shared: Arc::new(Shared { session, select, insert, delete, io }) })
    }

    /// A store on the same session and table whose rows have another key prefix (another
    /// resource on the same cluster, without another connection).
    #[must_use]
    pub fn with_prefix(&self, prefix: impl Into<String>) -> Self {
        let mut config = self.config.clone();
        config.prefix = prefix.into();
        Self { config, shared: Arc::clone(&self.shared) }
    }

    #[must_use]
    pub fn config(&self) -> &CassandraConfig {
        &self.config
    }

    fn key(&self, chunk: u64) -> String {
        row_key(&self.config.prefix, chunk)
    }

    fn failed(&self, doing: &str, chunk: u64, e: &ExecutionError) -> io::Error {
        io::Error::new(
            execution_kind(e),
            format!("{doing} chunk {chunk} (row {:?}) on {}: {e}", self.key(chunk), self.describe()),
        )
    }

    async fn get_one(&self, chunk: u64) -> io::Result<Option<Vec<u8>>> {
        let s = &self.shared;
        let result = s
            .session
            .execute_unpaged(&s.select, (self.key(chunk),))
            .await
            .map_err(|e| self.failed("reading", chunk, &e))?;
        let bad = |e: &dyn fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reading chunk {chunk} (row {:?}) on {}: {e}", self.key(chunk), self.describe()),
            )
        };
        let rows = result.into_rows_result().map_err(|e| bad(&e))?;
        // A row whose data is null (written by someone else) reads as empty data: the caller
        // sees a chunk of the wrong size, not zeroes.
        let row = rows.maybe_first_row::<(Option<Vec<u8>>,)>().map_err(|e| bad(&e))?;
        Ok(row.map(|(data,)| data.unwrap_or_default()))
    }
}

fn tls_config(ca: &Path) -> io::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let pem = std::fs::read(ca)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read the CA file {}: {e}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| invalid(format!("the CA file {} is not PEM: {e}", ca.display())))?;
        roots.add(cert).map_err(|e| {
            invalid(format!("the CA in {} cannot be used as a trust anchor: {e}", ca.display()))
        })?;
    }
    if roots.is_empty() {
        return Err(invalid(format!("the CA file {} holds no certificate", ca.display())));
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("no TLS version is available: {e}")))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

impl ChunkStore for CassandraStore {
    fn describe(&self) -> String {
        self.config.describe()
    }

    fn get(&self, chunks: &[u64]) -> io::Result<Vec<Option<Vec<u8>>>> {
        self.shared
            .block_on(stream::iter(chunks.iter().map(|&c| self.get_one(c))).buffered(IN_FLIGHT).try_collect())
    }

    fn put(&self, chunks: &[(u64, &[u8])]) -> io::Result<()> {
        let s = &self.shared;
        s.block_on(stream::iter(chunks.iter().map(Ok)).try_for_each_concurrent(
            IN_FLIGHT,
            |&(c, data)| async move {
                s.session
                    .execute_unpaged(&s.insert, (self.key(c), data))
                    .await
                    .map_err(|e| self.failed("writing", c, &e))?;
                Ok(())
            },
        ))
    }

    fn delete(&self, chunks: &[u64]) -> io::Result<()> {
        let s = &self.shared;
        s.block_on(stream::iter(chunks.iter().map(Ok)).try_for_each_concurrent(IN_FLIGHT, |&c| async move {
            s.session
                .execute_unpaged(&s.delete, (self.key(c),))
                .await
                .map_err(|e| self.failed("deleting", c, &e))?;
            Ok(())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> CassandraConfig {
        CassandraConfig::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn rejected(url: &str) -> String {
        let err = CassandraConfig::parse(url).expect_err(url);
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{url}: {err}");
        err.to_string()
    }

    fn node(host: &str, port: u16) -> Node {
        Node { host: host.to_owned(), port }
    }

    #[test]
    fn a_bare_url_takes_the_defaults() {
        let c = parse("cassandra://localhost");
        assert_eq!(c.nodes, [node("localhost", 9042)]);
        assert_eq!(c.credentials, None);
        assert_eq!(c.ca, None);
        assert_eq!((c.keyspace.as_str(), c.table.as_str(), c.prefix.as_str()), ("r3map", "chunks", ""));
        assert_eq!(c.replication, 1);
        assert_eq!(parse("cassandra://localhost/"), c);
    }

    #[test]
    fn every_node_may_have_its_port() {
        let c = parse("cassandra://a:1,b,[::1]:3,[fe80::2],10.0.0.1:9043");
        assert_eq!(
            c.nodes,
            [node("a", 1), node("b", 9042), node("::1", 3), node("fe80::2", 9042), node("10.0.0.1", 9043)]
        );
        assert_eq!(c.nodes_list(), "a:1,b:9042,[::1]:3,[fe80::2]:9042,10.0.0.1:9043");
    }

    #[test]
    fn a_parsed_url_gives_the_same_config() {
        for s in [
            "cassandra://a,b:2?keyspace=k",
            "cassandra://u%40x:p%3Aw@[::1]:9000/?prefix=d%3A",
            "cassandra://h",
        ] {
            let url = url::Url::parse(s).unwrap();
            assert_eq!(CassandraConfig::from_url(&url).unwrap(), parse(s), "{s}");
        }
        let c = CassandraConfig::from_url(&url::Url::parse("cassandra://a,b:2").unwrap()).unwrap();
        assert_eq!(c.nodes, [node("a", 9042), node("b", 2)]);
    }

    #[test]
    fn credentials_are_percent_decoded() {
        let c = parse("cassandra://us%40er:p%3Aa%2Fss%25w%C3%B6rd@h");
        assert_eq!(c.credentials, Some(("us@er".to_owned(), "p:a/ss%wörd".to_owned())));
        assert_eq!(parse("cassandra://user@h").credentials, Some(("user".to_owned(), String::new())));
        assert_eq!(parse("cassandra://@h").credentials, None);
        // An '@' in the password, left unencoded, still splits at the last '@'.
        assert_eq!(parse("cassandra://u:p@ss@h").credentials, Some(("u".to_owned(), "p@ss".to_owned())));
        rejected("cassandra://u:p%4@h");
        rejected("cassandra://u:p%+1@h");
        rejected("cassandra://u:%ff@h");
    }

    #[test]
    fn parameters_are_read_and_common_ones_ignored() {
        let c = parse(
            "cassandra://h?keyspace=Disks&table=t_1&prefix=vm%2F1%3A&replication=3&size=1G&chunk-size=4096&max-batch=8",
        );
        assert_eq!((c.keyspace.as_str(), c.table.as_str(), c.prefix.as_str()), ("disks", "t_1", "vm/1:"));
        assert_eq!(c.replication, 3);
    }

    #[test]
    fn unknown_and_repeated_parameters_are_rejected_by_name() {
        assert!(rejected("cassandra://h?keyspace=k&colour=red").contains("'colour'"));
        assert!(rejected("cassandra://h?table=a&table=b").contains("'table' is given twice"));
    }

    #[test]
    fn names_must_be_cql_identifiers() {
        let longest = "a".repeat(MAX_NAME_LEN);
        assert_eq!(parse(&format!("cassandra://h?keyspace={longest}")).keyspace, longest);
        for bad in
            ["", "1abc", "_a", "a-b", "a.b", "a%20b", "a%22b", "%C3%A9t%C3%A9", &"a".repeat(MAX_NAME_LEN + 1)]
        {
            assert!(rejected(&format!("cassandra://h?keyspace={bad}")).contains("keyspace"), "{bad}");
            assert!(rejected(&format!("cassandra://h?table={bad}")).contains("table"), "{bad}");
        }
    }

    #[test]
    fn replication_is_a_positive_number() {
        for bad in ["0", "-1", "x", ""] {
            assert!(rejected(&format!("cassandra://h?replication={bad}")).contains("replication"));
        }
    }

    #[test]
    fn tls_needs_a_ca_and_plaintext_takes_none() {
        let c = parse("cassandrasecure://h?ca=/etc/ca.pem");
        assert_eq!(c.ca, Some(PathBuf::from("/etc/ca.pem")));
        assert!(rejected("cassandrasecure://h").contains("ca=PATH"));
        assert!(rejected("cassandra://h?ca=/etc/ca.pem").contains("cassandrasecure"));
    }

    #[test]
    fn malformed_urls_are_rejected() {
        for bad in [
            "redis://h",
            "h:9042",
            "cassandra://",
            "cassandra://a,,b",
            "cassandra://h:0",
            "cassandra://h:65536",
            "cassandra://h:x",
            "cassandra://::1",
            "cassandra://[::1",
            "cassandra://[::1]9042",
            "cassandra://h/r3map",
            "cassandra://h#x",
        ] {
            rejected(bad);
        }
    }

    #[test]
    fn the_description_has_no_credentials() {
        let c = parse("cassandra://user:secret@h1,h2:9043?prefix=disk:&table=t");
        assert_eq!(c.describe(), "cassandra://h1:9042,h2:9043?keyspace=r3map&table=t, prefix \"disk:\"");
        assert!(!format!("{c:?}").contains("secret"));
        assert!(parse("cassandrasecure://h?ca=x").describe().starts_with("cassandrasecure://h:9042?"));
    }

    #[test]
    fn statements_name_the_table_and_replication() {
        let s = statements("r3map", "chunks", 3);
        assert_eq!(
            s.create_keyspace,
            "CREATE KEYSPACE IF NOT EXISTS \"r3map\" WITH replication = {'class': 'SimpleStrategy', \
             'replication_factor': 3}"
        );
        assert_eq!(
            s.create_table,
            "CREATE TABLE IF NOT EXISTS \"r3map\".\"chunks\" (key text PRIMARY KEY, data blob)"
        );
        assert_eq!(s.select, "SELECT data FROM \"r3map\".\"chunks\" WHERE key = ?");
        assert_eq!(s.insert, "INSERT INTO \"r3map\".\"chunks\" (key, data) VALUES (?, ?)");
        assert_eq!(s.delete, "DELETE FROM \"r3map\".\"chunks\" WHERE key = ?");
    }

    #[test]
    fn row_keys_are_the_prefix_and_the_index() {
        assert_eq!(row_key("", 0), "0");
        assert_eq!(row_key("disk:", 42), "disk:42");
        assert_eq!(row_key("p", u64::MAX), format!("p{}", u64::MAX));
    }

    #[test]
    fn driver_errors_map_to_io_kinds() {
        let db = |e: DbError| ExecutionError::LastAttemptError(RequestAttemptError::DbError(e, "no".into()));
        assert_eq!(execution_kind(&db(DbError::Unauthorized)), io::ErrorKind::PermissionDenied);
        assert_eq!(execution_kind(&db(DbError::SyntaxError)), io::ErrorKind::InvalidInput);
        assert_eq!(execution_kind(&ExecutionError::RequestTimeout(REQUEST_TIMEOUT)), io::ErrorKind::TimedOut);

        let broken = |e: ConnectionError| {
            NewSessionError::MetadataError(MetadataError::ConnectionPoolError(ConnectionPoolError::Broken {
                last_connection_error: e,
            }))
        };
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(new_session_kind(&broken(refused.into())), io::ErrorKind::ConnectionRefused);
        assert_eq!(new_session_kind(&broken(ConnectionError::ConnectTimeout)), io::ErrorKind::TimedOut);
        assert_eq!(
            new_session_kind(&NewSessionError::FailedToResolveAnyHostname(vec!["x".into()])),
            io::ErrorKind::NotFound
        );
    }
}
