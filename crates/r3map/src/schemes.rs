//! The table of schemes: every backend URL [`open`](crate::open) knows, once, with the form and
//! the line help texts show, and the constructor its feature builds in.

use std::fmt;
use std::io;

use crate::params::Params;
use crate::{OpenOptions, Opened, local};

/// Opens the backend of a URL of this scheme; the query is parsed already (and has no parameter
/// twice).
type Constructor = fn(url: &str, params: Params, options: &OpenOptions) -> io::Result<Opened>;

/// A URL scheme and how it opens; see [`schemes`].
#[derive(Clone, Copy)]
pub struct Scheme {
    name: &'static str,
    aliases: &'static [&'static str],
    feature: Option<&'static str>,
    form: &'static str,
    description: &'static str,
    open: Option<Constructor>,
}

impl Scheme {
    /// The scheme as URLs write it (`nbd+unix`).
    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Other names for it (`mem` for `memory`).
    #[must_use]
    pub fn aliases(&self) -> &'static [&'static str] {
        self.aliases
    }

    /// The cargo feature of this crate it needs, if any (`nbd`).
    #[must_use]
    pub fn feature(&self) -> Option<&'static str> {
        self.feature
    }

    /// The URL's form, parameters in brackets where optional (`memory:SIZE`).
    #[must_use]
    pub fn form(&self) -> &'static str {
        self.form
    }

    /// One line for help texts: what a URL of this form opens.
    #[must_use]
    pub fn description(&self) -> &'static str {
        self.description
    }

    /// Whether this build opens it (its feature is on).
    #[must_use]
    pub fn available(&self) -> bool {
        self.open.is_some()
    }

    /// Whether `scheme` (in any case) names this one.
    #[must_use]
    pub fn is(&self, scheme: &str) -> bool {
        scheme.eq_ignore_ascii_case(self.name) || self.aliases.iter().any(|a| scheme.eq_ignore_ascii_case(a))
    }

    pub(crate) fn open(&self, url: &str, params: Params, options: &OpenOptions) -> io::Result<Opened> {
        match self.open {
            Some(open) => open(url, params, options),
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "{}:// URLs are not supported by this build of r3map (built without its '{}' feature)",
                    self.name,
                    self.feature.unwrap_or_default()
                ),
            )),
        }
    }
}

impl fmt::Debug for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scheme")
            .field("name", &self.name)
            .field("aliases", &self.aliases)
            .field("feature", &self.feature)
            .field("form", &self.form)
            .field("available", &self.available())
            .finish()
    }
}

/// `Some(constructor)` when the feature is on, `None` when it is off (so that the constructor,
/// which uses the feature's crate, is not even named).
macro_rules! gated {
    ($feature:literal, $open:path) => {{
        #[cfg(feature = $feature)]
        let open: Option<Constructor> = Some($open);
        #[cfg(not(feature = $feature))]
        let open: Option<Constructor> = None;
        open
    }};
}

const fn always(
    name: &'static str,
    aliases: &'static [&'static str],
    form: &'static str,
    description: &'static str,
    open: Constructor,
) -> Scheme {
    Scheme { name, aliases, feature: None, form, description, open: Some(open) }
}

const fn with_feature(
    name: &'static str,
    feature: &'static str,
    form: &'static str,
    description: &'static str,
    open: Option<Constructor>,
) -> Scheme {
    Scheme { name, aliases: &[], feature: Some(feature), form, description, open }
}

static SCHEMES: &[Scheme] = &[
    always(
        "memory",
        &["mem"],
        "memory:SIZE",
        "sparse memory of SIZE bytes, gone when the process ends",
        local::open_memory,
    ),
    always(
        "file",
        &[],
        "file:///PATH[?size=SIZE[&truncate=true]]",
        "a regular file or block device: without size as it is, with size created (sparse) if missing, \
         with truncate=true emptied",
        local::open_file_url,
    ),
    always(
        "dir",
        &["directory"],
        "dir:///PATH?size=SIZE[&chunk-size=SIZE][&max-open=N]",
        "one file per chunk in a directory (created if missing; chunk size from the caller, 512 open files)",
        local::open_dir_url,
    ),
    with_feature(
        "r3map",
        "net",
        "r3map://HOST[:PORT]/EXPORT?ca=PATH[&token=T][&cert=PATH&key=PATH]",
        "an r3map server over TLS 1.3",
        gated!("net", crate::remote::open_r3map),
    ),
    with_feature(
        "r3map+plain",
        "net",
        "r3map+plain://HOST[:PORT]/EXPORT[?token=T]",
        "an r3map server over plaintext TCP",
        gated!("net", crate::remote::open_r3map),
    ),
    with_feature(
        "r3map+unix",
        "net",
        "r3map+unix:///EXPORT?socket=PATH[&token=T]",
        "an r3map server on a Unix socket",
        gated!("net", crate::remote::open_r3map),
    ),
    with_feature(
        "grpc",
        "grpc",
        "grpc://HOST:PORT?size=SIZE",
        "a gRPC Backend service (the Go r3map's, or ours), plaintext; the size is given since the service has no size call",
        gated!("grpc", crate::remote::open_grpc),
    ),
    with_feature(
        "nbd",
        "nbd",
        "nbd://HOST[:PORT]/[EXPORT]",
        "an export of any NBD server (nbdkit, qemu-nbd, r3map serve --nbd); port 10809, the empty export the default one",
        gated!("nbd", crate::remote::open_nbd),
    ),
    with_feature(
        "nbd+unix",
        "nbd",
        "nbd+unix:///[EXPORT]?socket=PATH",
        "an export of an NBD server on a Unix socket",
        gated!("nbd", crate::remote::open_nbd),
    ),
    with_feature(
        "nbds",
        "nbd",
        "nbds://HOST[:PORT]/[EXPORT]?tls-certificates=DIR",
        "an NBD export over TLS, which is then required (or ?ca=PATH[&cert=PATH&key=PATH] instead of the directory)",
        gated!("nbd", crate::remote::open_nbd),
    ),
    with_feature(
        "nbds+unix",
        "nbd",
        "nbds+unix:///[EXPORT]?socket=PATH&tls-certificates=DIR",
        "an NBD export over TLS on a Unix socket (the certificate is checked for localhost)",
        gated!("nbd", crate::remote::open_nbd),
    ),
    with_feature(
        "redis",
        "redis",
        "redis://[USER:PASS@]HOST[:PORT][/DB]?size=SIZE[&prefix=P]",
        "Redis, one key {prefix}{chunk} per chunk (prefix r3map: by default)",
        gated!("redis", crate::store::open_redis),
    ),
    with_feature(
        "rediss",
        "redis",
        "rediss://[USER:PASS@]HOST[:PORT][/DB]?size=SIZE[&ca=PATH][&prefix=P]",
        "Redis over TLS",
        gated!("redis", crate::store::open_redis),
    ),
    with_feature(
        "redis+unix",
        "redis",
        "redis+unix:///PATH?size=SIZE[&db=N][&prefix=P]",
        "Redis on a Unix socket",
        gated!("redis", crate::store::open_redis),
    ),
    with_feature(
        "s3",
        "s3",
        "s3://BUCKET[/PREFIX]?size=SIZE[&endpoint=URL&region=R&access-key-id=K&secret-access-key=S&create-bucket=true]",
        "S3 objects PREFIX/{chunk}, one per chunk; credentials and region from the environment unless given",
        gated!("s3", crate::store::open_s3),
    ),
    with_feature(
        "cassandra",
        "cassandra",
        "cassandra://[USER:PASS@]HOST[:PORT][,HOST...]?size=SIZE[&keyspace=K&table=T&prefix=P]",
        "Cassandra or ScyllaDB, one row per chunk",
        gated!("cassandra", crate::store::open_cassandra),
    ),
    with_feature(
        "cassandrasecure",
        "cassandra",
        "cassandrasecure://[USER:PASS@]HOST[:PORT][,HOST...]?size=SIZE&ca=PATH[&keyspace=K&table=T&prefix=P]",
        "Cassandra or ScyllaDB over TLS",
        gated!("cassandra", crate::store::open_cassandra),
    ),
];

/// Every scheme, in the order help texts list them: local backends, servers, stores. Schemes
/// whose feature is off are listed too ([`Scheme::available`] says so), and opening them says
/// which feature they need.
#[must_use]
pub fn schemes() -> &'static [Scheme] {
    SCHEMES
}

/// The scheme `name` (in any case, or an alias) names.
#[must_use]
pub fn find(name: &str) -> Option<&'static Scheme> {
    SCHEMES.iter().find(|s| s.is(name))
}

/// `use memory:SIZE, file:///PATH..., ...`: every form this build opens, for errors.
pub(crate) fn forms() -> String {
    let forms: Vec<&str> = SCHEMES.iter().filter(|s| s.available()).map(Scheme::form).collect();
    format!("use {}", forms.join(", "))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use r3map_core::Backend as _;
    use r3map_testkit::HeldPort;

    use super::*;
    use crate::open;

    fn opens(url: &str) -> Opened {
        open(url, &OpenOptions { chunk_size: 4096, ..OpenOptions::default() })
            .unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    fn fails(url: &str) -> io::Error {
        match open(url, &OpenOptions { chunk_size: 4096, ..OpenOptions::default() }) {
            Ok(opened) => panic!("{url} opened {}", opened.description),
            Err(e) => e,
        }
    }

    /// Writes and reads back through the backend.
    fn round_trip(opened: &Opened) {
        opened.backend.write_at(b"r3map", 4093).unwrap();
        opened.backend.flush().unwrap();
        let mut back = [0u8; 5];
        opened.backend.read_at(&mut back, 4093).unwrap();
        assert_eq!(&back, b"r3map", "{}", opened.description);
    }

    #[test]
    fn every_scheme_of_the_table_reaches_its_constructor() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let nobody = HeldPort::new();
        let refused = nobody.addr();
        // Local schemes open; the others fail without a server, with an error their own
        // constructor makes, under a message that names the URL (so its scheme).
        let local: Vec<(&str, String)> = vec![
            ("memory", "memory:64KiB".to_owned()),
            ("mem", "MEM:64KiB".to_owned()),
            ("file", format!("file://{d}/file?size=64KiB")),
            ("dir", format!("dir://{d}/dir?size=64KiB")),
            ("directory", format!("directory://{d}/directory?size=64KiB&chunk-size=1KiB")),
        ];
        let remote: Vec<(&str, String, String)> = vec![
            ("r3map", "r3map://127.0.0.1:1/default".into(), "add ?ca=PATH".into()),
            ("r3map+plain", format!("r3map+plain://{refused}/default"), refused.to_string()),
            ("r3map+unix", "r3map+unix:///default".into(), "needs ?socket=PATH".into()),
            ("grpc", "grpc://127.0.0.1:1".into(), "no size call".into()),
            ("nbd", format!("nbd://{refused}/disk"), format!("NBD server at {refused}")),
            ("nbd+unix", "nbd+unix:///disk".into(), "needs ?socket=PATH".into()),
            ("nbds", "nbds://example.com/disk".into(), "TLS needs the CA".into()),
            ("nbds+unix", format!("nbds+unix:///disk?socket={d}/nbd.sock"), "TLS needs the CA".into()),
            ("redis", format!("redis://{refused}/0?size=1MiB"), refused.to_string()),
            (
                "rediss",
                format!("rediss://127.0.0.1:1/0?size=1MiB&ca={d}/missing.pem"),
                format!("{d}/missing.pem"),
            ),
            ("redis+unix", format!("redis+unix://{d}/redis.sock?size=1MiB"), format!("{d}/redis.sock")),
            (
                "s3",
                "s3://bucket/prefix?size=1MiB&endpoint=ftp://x".into(),
                "not an http:// or https:// URL".into(),
            ),
            (
                "cassandra",
                "cassandra://a:9042,b:9043?size=1MiB&keyspace=no-dashes".into(),
                "not a valid name".into(),
            ),
            ("cassandrasecure", "cassandrasecure://a:9042,b?size=1MiB".into(), "needs ?ca=PATH".into()),
        ];
        let mut covered = HashSet::new();
        for (scheme, url) in &local {
            round_trip(&opens(url));
            covered.insert(find(scheme).unwrap().name());
        }
        for (scheme, url, wanted) in &remote {
            let e = fails(url).to_string();
            assert!(e.starts_with(&format!("cannot open the backend '{scheme}:")), "{e}");
            assert!(e.contains(wanted.as_str()), "{scheme}: wanted {wanted:?} in: {e}");
            assert_eq!(find(scheme).unwrap().name(), *scheme);
            covered.insert(*scheme);
        }
        let all: HashSet<_> = schemes().iter().map(Scheme::name).collect();
        assert_eq!(covered, all, "every scheme of the table has a case here");
    }

    #[test]
    fn unknown_and_malformed_urls_list_the_forms() {
        let e = fails("ftp://example.com/x").to_string();
        assert!(e.contains("unknown backend type 'ftp'") && e.contains("memory:SIZE"), "{e}");
        for scheme in schemes() {
            assert!(e.contains(scheme.form()), "{} is not listed: {e}", scheme.name());
        }
        let e = fails("nonsense");
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("not a backend URL"), "{e}");
        let e = fails("/srv/disk.img").to_string();
        assert!(e.contains("write file:///srv/disk.img"), "{e}");
    }

    #[test]
    fn a_parameter_given_twice_is_refused_whatever_the_scheme() {
        for url in [
            "memory:1MiB?size=1&size=2",
            "nbd://127.0.0.1:1/x?timeout=1&timeout=2",
            "r3map+plain://127.0.0.1:1/x?token=a&token=b",
            "s3://b/p?size=1MiB&region=a&region=b",
        ] {
            let e = fails(url);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{url}");
            assert!(e.to_string().contains("is given twice"), "{url}: {e}");
            assert_eq!(e.to_string().matches(&crate::params::shown(url)).count(), 1, "the URL once: {e}");
        }
    }

    #[test]
    fn a_scheme_left_out_of_the_build_names_its_feature() {
        let left_out = Scheme { open: None, ..*find("nbd").unwrap() };
        assert!(!left_out.available());
        let e = left_out
            .open("nbd://h/x", Params::parse("nbd://h/x").unwrap(), &OpenOptions::default())
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        assert!(e.to_string().contains("without its 'nbd' feature"), "{e}");
    }

    #[test]
    fn names_are_unique_and_documented() {
        let doc = include_str!("lib.rs");
        let mut seen = HashSet::new();
        for scheme in schemes() {
            for name in std::iter::once(&scheme.name()).chain(scheme.aliases()) {
                assert!(seen.insert(*name), "{name} twice");
                assert_eq!(name.to_ascii_lowercase(), *name);
            }
            assert!(scheme.form().starts_with(&format!("{}:", scheme.name())), "{scheme:?}");
            assert!(
                doc.contains(&format!("`{}:", scheme.name())),
                "{} is not in the crate documentation",
                scheme.name()
            );
            assert!(!scheme.description().is_empty() && !scheme.description().contains('\n'));
            assert!(scheme.available(), "every feature is on in the tests");
        }
        assert!(find("NBDS+UNIX").is_some_and(|s| s.name() == "nbds+unix"));
        assert!(find("gopher").is_none());
    }
}
