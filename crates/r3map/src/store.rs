//! Stores as backends: Redis, S3 and Cassandra, one key, object or row per chunk. The parameters
//! every store takes (`size`, `chunk-size`, `max-batch`, [`r3map_stores::COMMON_PARAMETERS`])
//! are read here; the store's constructor reads the rest of its URL.

use std::io;
use std::sync::Arc;

use r3map_stores::{ChunkStore, Stored, StoredOptions};

use crate::params::Params;
use crate::{Io, OpenOptions, Opened};

/// A [`Stored`] backend of the size and chunking the URL gives, over the store `connect` opens.
fn open_store(
    mut params: Params,
    options: &OpenOptions,
    connect: impl FnOnce(Io) -> io::Result<Box<dyn ChunkStore>>,
) -> io::Result<Opened> {
    let size = params.size("size")?.ok_or_else(|| {
        params.error("size", "give the resource's size with ?size=SIZE (for example size=1GiB)")
    })?;
    let chunk_size = params.size("chunk-size")?.unwrap_or(options.chunk_size);
    let max_batch =
        params.number("max-batch", "a number of chunks")?.unwrap_or(StoredOptions::default().max_batch);
    // What is left is the store's own, which its constructor checks.
    let stored = Stored::new(connect(options.io())?, size, StoredOptions { chunk_size, max_batch })?;
    let description = stored.store().describe();
    Ok(Opened::new(Arc::new(stored), description))
}

fn parsed(url: &str) -> io::Result<url::Url> {
    url::Url::parse(url)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("it is not a valid URL: {e}")))
}

/// `redis://`, `rediss://`, `redis+unix://` ([`r3map_stores::redis::RedisStore`]).
#[cfg(feature = "redis")]
pub(crate) fn open_redis(url: &str, params: Params, options: &OpenOptions) -> io::Result<Opened> {
    use r3map_stores::redis::{RedisOptions, RedisStore};
    open_store(params, options, |io| {
        Ok(Box::new(RedisStore::open_on(&parsed(url)?, RedisOptions::default(), io)?))
    })
}

/// `s3://` ([`r3map_stores::s3::S3Store`]).
#[cfg(feature = "s3")]
pub(crate) fn open_s3(url: &str, params: Params, options: &OpenOptions) -> io::Result<Opened> {
    open_store(params, options, |io| Ok(Box::new(r3map_stores::s3::S3Store::open_on(&parsed(url)?, io)?)))
}

/// `cassandra://`, `cassandrasecure://` ([`r3map_stores::cassandra::CassandraConfig::parse`],
/// which takes a port on every host).
#[cfg(feature = "cassandra")]
pub(crate) fn open_cassandra(url: &str, params: Params, options: &OpenOptions) -> io::Result<Opened> {
    use r3map_stores::cassandra::{CassandraConfig, CassandraStore};
    open_store(params, options, |io| {
        Ok(Box::new(CassandraStore::connect_on(CassandraConfig::parse(url)?, io)?))
    })
}

#[cfg(test)]
mod tests {
    use r3map_core::Backend as _;

    use super::*;
    use crate::open;

    fn err(url: &str) -> io::Error {
        open(url, &OpenOptions { chunk_size: 4096, ..OpenOptions::default() }).unwrap_err()
    }

    #[test]
    fn the_common_parameters_are_the_stores_own_list() {
        // The store parsers skip exactly the parameters read here.
        let mut params = Params::parse("x://h?size=1MiB&chunk-size=4KiB&max-batch=8").unwrap();
        for key in r3map_stores::COMMON_PARAMETERS {
            assert!(params.take(key).is_some(), "{key}");
        }
        params.finish().unwrap();
    }

    #[test]
    fn a_store_url_without_a_size_or_with_a_bad_batch_is_refused_before_connecting() {
        for url in ["redis://127.0.0.1:1/0", "s3://bucket/prefix", "cassandra://a:9042,b:9043?keyspace=k"] {
            let e = err(url);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{url}: {e}");
            assert!(e.to_string().contains("?size=SIZE"), "{url}: {e}");
            assert!(e.to_string().starts_with(&format!("cannot open the backend '{url}': ")), "{e}");
        }
        let e = err("s3://b/p?size=1MiB&max-batch=x").to_string();
        assert!(e.contains("max-batch=x is not a number of chunks"), "{e}");
        let e = err("redis://127.0.0.1:1/0?size=0").to_string();
        assert!(e.contains("size must not be zero"), "{e}");
        let e = err("redis://127.0.0.1:1/0?size=1MiB&size=2MiB").to_string();
        assert!(e.contains("the parameter 'size' is given twice"), "{e}");
    }

    #[cfg(feature = "redis")]
    #[test]
    fn the_store_reads_its_own_parameters() {
        let e = err("redis://127.0.0.1:1/0?size=1MiB&colour=blue").to_string();
        assert!(e.contains("unknown parameter 'colour'"), "{e}");
        let nobody = r3map_testkit::HeldPort::new();
        let e = err(&format!("redis://{}/0?size=1MiB", nobody.addr()));
        assert!(e.to_string().contains(&nobody.addr().to_string()), "{e}");
    }

    #[cfg(feature = "cassandra")]
    #[test]
    fn cassandra_urls_with_a_port_on_every_host_reach_the_store() {
        // Parsed past the common parameters: the store's own parser names its problem.
        let e = err("cassandra://a:9042,b:9043?size=1MiB&keyspace=no-dashes").to_string();
        assert!(e.contains("keyspace 'no-dashes' is not a valid name"), "{e}");
        let e = err("cassandrasecure://a:9042,b:9043?size=1MiB").to_string();
        assert!(e.contains("cassandrasecure:// needs ?ca=PATH"), "{e}");
    }

    #[cfg(feature = "redis")]
    #[test]
    fn redis_round_trip() {
        let held = r3map_testkit::HeldPort::new();
        let port = held.port().to_string();
        let mut command = std::process::Command::new("redis-server");
        command.args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        let Ok(_server) = r3map_testkit::Daemon::start(command, "eady to accept connections") else {
            return println!("skipped: redis-server not installed (scripts/test.sh installs it)");
        };
        let url = format!("redis://127.0.0.1:{port}/0?size=1MiB&chunk-size=4KiB&prefix=facade:");
        let opened = open(&url, &OpenOptions::default()).unwrap();
        assert_eq!(opened.backend.size(), 1 << 20);
        assert!(
            opened.description.contains(&format!("redis://127.0.0.1:{port}/0")),
            "{}",
            opened.description
        );
        opened.backend.write_at(b"stored", 4096 * 3 - 2).unwrap();
        opened.backend.flush().unwrap();
        let again = open(&url, &OpenOptions::default()).unwrap();
        let mut back = [0u8; 6];
        again.backend.read_at(&mut back, 4096 * 3 - 2).unwrap();
        assert_eq!(&back, b"stored");
    }
}
