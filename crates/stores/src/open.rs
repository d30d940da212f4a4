//! Opening a store-backed backend from a URL.

use std::io;

pub use r3map_core::units::parse_size;

use crate::stored::{ChunkStore, Stored, StoredOptions};

/// The URL schemes [`open`] knows, for help texts and dispatch in callers.
pub const SCHEMES: &[&str] = &["redis", "rediss", "redis+unix", "s3", "cassandra", "cassandrasecure"];

/// Whether `url` names a store [`open`] handles (by its scheme).
#[must_use]
pub fn is_store_url(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| SCHEMES.contains(&scheme))
}

/// Opens the store a URL names as a backend. Besides each store's own parameters, every URL takes
/// `size=SIZE` (required: a store has no size of its own; a plain number of bytes or a number with
/// KiB, MiB, GiB, TiB), `chunk-size=SIZE` (bytes per key, object or row; default `chunk_size`) and
/// `max-batch=N` (most chunks per request to the store; default 256).
///
/// # Errors
/// `InvalidInput` for a malformed URL, an unknown scheme or a missing size; what the store's own
/// `open` reports (unreachable, refused credentials).
pub fn open(url: &str, chunk_size: u64) -> io::Result<Stored<Box<dyn ChunkStore>>> {
    let bad =
        |msg: String| io::Error::new(io::ErrorKind::InvalidInput, format!("bad store URL '{url}': {msg}"));
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    // The query by hand: a Cassandra URL lists several hosts, which `url::Url` does not parse.
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let param = |key: &str| {
        url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
    };
    let size = param("size")
        .ok_or_else(|| bad("give the resource's size with ?size=SIZE (for example size=1GiB)".into()))?;
    let size = parse_size(&size).map_err(|e| bad(format!("size: {e}")))?;
    let chunk_size = match param("chunk-size") {
        Some(s) => parse_size(&s).map_err(|e| bad(format!("chunk-size: {e}")))?,
        None => chunk_size,
    };
    let max_batch = match param("max-batch") {
        Some(s) => s.parse().map_err(|_| bad(format!("max-batch: '{s}' is not a number")))?,
        None => StoredOptions::default().max_batch,
    };
    let parsed = || url::Url::parse(url).map_err(|e| bad(e.to_string()));
    let store: Box<dyn ChunkStore> = match scheme {
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redis+unix" => Box::new(crate::redis::RedisStore::open(&parsed()?)?),
        #[cfg(feature = "s3")]
        "s3" => Box::new(crate::s3::S3Store::open(&parsed()?)?),
        #[cfg(feature = "cassandra")]
        "cassandra" | "cassandrasecure" => Box::new(crate::cassandra::CassandraStore::open_str(url)?),
        other => return Err(bad(format!("'{other}' is not a store this build knows"))),
    };
    Stored::new(store, size, StoredOptions { chunk_size, max_batch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn store_urls_are_recognized() {
        assert!(is_store_url("redis://localhost/0?size=1GiB"));
        assert!(is_store_url("redis+unix:///run/redis.sock?size=1GiB"));
        assert!(is_store_url("s3://bucket/prefix?size=1GiB"));
        assert!(!is_store_url("file:///tmp/x"));
        assert!(!is_store_url("memory:1GiB"));
    }

    #[test]
    fn a_url_without_a_size_or_of_an_unknown_scheme_is_refused_before_connecting() {
        let err = open("redis://127.0.0.1:1/0", 4096).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("?size="), "{err}");
        let err = open("gopher://x/?size=1MiB", 4096).unwrap_err();
        assert!(err.to_string().contains("not a store"), "{err}");
        let err = open("s3://b/p?size=1MiB&max-batch=x", 4096).unwrap_err();
        assert!(err.to_string().contains("max-batch"), "{err}");
    }
}
