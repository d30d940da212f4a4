//! [`S3Store`]: chunks as objects in an S3 bucket (AWS or any S3-compatible server), one object
//! per chunk, through `object_store`.
//!
//! URL: `s3://BUCKET[/PREFIX]?endpoint=URL&region=R&access-key-id=K&secret-access-key=S&create-bucket=true`,
//! every parameter optional. The object of chunk `i` is `PREFIX/i` (just `i` without a prefix).
//! Credentials, region and endpoint not given in the URL come from the environment
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT`...), as the AWS tools read them. With an `endpoint`, requests are path-style
//! (`ENDPOINT/BUCKET/KEY`), as S3-compatible servers expect, and an `http://` endpoint allows
//! plain HTTP.
//!
//! S3 has no request for several objects, so a batch is many requests at once: the GETs and PUTs
//! of a batch run concurrently (at most [`S3Store::DEFAULT_CONCURRENCY`] in flight), and a delete
//! is one `DeleteObjects` request per thousand chunks.
//!
//! The API is blocking, like every [`ChunkStore`]: the requests run on the runtime of the [`Io`]
//! the store is opened on ([`Io::shared`] unless the caller gives its own), so it may be called
//! from any thread, a tokio worker included.
//!
//! Failures are bounded in time: a connection attempt gives up after [`CONNECT_TIMEOUT`], a
//! request after [`REQUEST_TIMEOUT`], and failed requests are retried only within
//! [`RETRY_TIMEOUT`]; opening gives up after [`OPEN_TIMEOUT`]. Connections are pooled and re-established as needed, so a server that
//! restarts is used again by the next call once it is back.

use std::fmt;
use std::io;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt, stream};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, AwsAuthorizer};
use object_store::client::{HttpError, HttpErrorKind, HttpRequest, HttpRequestBody};
use object_store::path::Path;
use object_store::signer::{Method, Signer};
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use r3map_net::Io;
use r3map_net::params::{self, Params};

use crate::ChunkStore;

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take, body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after its first attempt a failed request may still be retried.
pub const RETRY_TIMEOUT: Duration = Duration::from_secs(4);
/// How long [`S3Store::open`] may take to create and check the bucket.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(8);

/// An object that is never a chunk (chunk keys are decimal), read at open to check the bucket.
const PROBE_KEY: &str = "r3map-probe";

/// What an `s3://` URL says.
#[derive(Clone, PartialEq, Eq)]
struct S3Url {
    bucket: String,
    prefix: Path,
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    create_bucket: bool,
}

impl fmt::Debug for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Url")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix.as_ref())
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "******"))
            .field("create_bucket", &self.create_bucket)
            .finish()
    }
}

impl S3Url {
    fn parse(url: &url::Url) -> io::Result<Self> {
        let bad = |msg: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad S3 URL '{}': {msg}", params::shown(url.as_str())),
            )
        };
        if url.scheme() != "s3" {
            return Err(bad(format!("the scheme is '{}', not 's3'", url.scheme())));
        }
        let bucket = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad("no bucket".into()))?;
        if !url.username().is_empty() || url.password().is_some() || url.port().is_some() {
            return Err(bad("the host part is the bucket alone: give the server as ?endpoint=URL and the \
                 credentials as ?access-key-id=K&secret-access-key=S"
                .into()));
        }
        let prefix = Path::from_url_path(url.path().trim_matches('/'))
            .map_err(|e| bad(format!("the prefix '{}' is not a valid object path: {e}", url.path())))?;
        let mut params = Params::parse(url.as_str())?;
        for key in crate::COMMON_PARAMETERS {
            params.take(key);
        }
        let endpoint = params.take("endpoint");
        if let Some(e) = &endpoint {
            let parsed = url::Url::parse(e).map_err(|err| bad(format!("endpoint={e}: {err}")))?;
            if !["http", "https"].contains(&parsed.scheme()) {
                return Err(bad(format!("endpoint={e}: not an http:// or https:// URL")));
            }
        }
        let access_key_id = params.take("access-key-id");
        let secret_access_key = params.take("secret-access-key");
        if access_key_id.is_some() != secret_access_key.is_some() {
            return Err(bad("access-key-id and secret-access-key go together".into()));
        }
        let create_bucket = params.flag("create-bucket")?.unwrap_or(false);
        let region = params.take("region");
        params.finish()?;
        Ok(Self {
            bucket: bucket.to_owned(),
            prefix,
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            create_bucket,
        })
    }
}

/// A [`ChunkStore`] of one object per chunk in an S3 bucket; see the [module docs](self).
pub struct S3Store {
    s3: AmazonS3,
    bucket: String,
    prefix: Path,
    /// The server, for messages: the endpoint, or AWS and the region.
    server: String,
    /// Most requests of one batch in flight at once.
    concurrency: usize,
    io: Io,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix.as_ref())
            .field("server", &self.server)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Requests of one batch in flight at once unless [`with_concurrency`](Self::with_concurrency)
    /// says otherwise.
    pub const DEFAULT_CONCURRENCY: usize = 64;

    /// Opens the bucket an `s3://` URL names (see the [module docs](self)), creating it first
    /// with `create-bucket=true`, and checks that it can be read with one small request.
    ///
    /// # Errors
    /// `InvalidInput` for a bad URL or an unknown parameter (the common `size`, `chunk-size` and
    /// `max-batch` are ignored); `PermissionDenied` when the server refuses the credentials;
    /// `NotFound` when the bucket does not exist; `TimedOut` or a connection error when the server
    /// cannot be reached (within a few seconds).
    pub fn open(url: &url::Url) -> io::Result<Self> {
        Self::open_on(url, Io::shared())
    }

    /// As [`open`](Self::open), running the store's requests on `io`.
    ///
    /// # Errors
    /// As [`open`](Self::open).
    pub fn open_on(url: &url::Url, io: Io) -> io::Result<Self> {
        let config = S3Url::parse(url)?;
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&config.bucket)
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), seconds(CONNECT_TIMEOUT))
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), seconds(REQUEST_TIMEOUT))
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: RETRY_TIMEOUT,
            });
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        if let Some(region) = &config.region {
            builder = builder.with_region(region);
        }
        if let (Some(key), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            builder = builder.with_access_key_id(key).with_secret_access_key(secret);
        }
        let has_credentials = builder.get_config_value(&AmazonS3ConfigKey::AccessKeyId).is_some()
            || builder.get_config_value(&AmazonS3ConfigKey::WebIdentityTokenFile).is_some();
        let region =
            builder.get_config_value(&AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".to_owned());
        let server = match builder.get_config_value(&AmazonS3ConfigKey::Endpoint) {
            Some(endpoint) => endpoint,
            None => format!("AWS S3 ({region})"),
        };
        let s3 = builder.build().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot configure S3 for '{}': {e}", params::shown(url.as_str())),
            )
        })?;
        let store = Self {
            s3,
            bucket: config.bucket,
            prefix: config.prefix,
            server,
            concurrency: Self::DEFAULT_CONCURRENCY,
            io,
        };
        let checked = store.block_on(async {
            let check = async {
                if config.create_bucket {
                    store.create_bucket(&region).await?;
                }
                store.probe().await
            };
            tokio::time::timeout(OPEN_TIMEOUT, check).await.unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "opening s3://{} at {}: no answer within {} s",
                        store.bucket,
                        store.server,
                        OPEN_TIMEOUT.as_secs()
                    ),
                ))
            })
        });
        match checked {
            Ok(()) => Ok(store),
            Err(e) if !has_credentials => Err(io::Error::new(
                e.kind(),
                format!(
                    "{e} (neither the URL nor the environment gave credentials, so they were asked \
                     of the instance metadata service: add access-key-id and secret-access-key to \
                     the URL or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
                ),
            )),
            Err(e) => Err(e),
        }
    }

    /// Sets how many requests of one batch may be in flight at once (at least 1).
    #[must_use]
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The object key of `chunk`: `PREFIX/chunk`, or just the decimal index without a prefix.
    #[must_use]
    pub fn key(&self, chunk: u64) -> String {
        chunk_key(&self.prefix, chunk).to_string()
    }

    fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.io.block_on(future)
    }

    /// Where an object is, for messages.
    fn location(&self, key: &Path) -> String {
        format!("s3://{}/{key} at {}", self.bucket, self.server)
    }

    /// Creates the bucket with one `PUT /BUCKET`, which `object_store` does not offer: the
    /// bucket's URL comes from `object_store` (a presigned URL without its query, so it follows
    /// the store's addressing style), the request is signed with SigV4 headers by its
    /// [`AwsAuthorizer`] and the store's credentials, and sent with reqwest. A bucket that exists
    /// already is no error (if it belongs to someone else, the probe that follows says so).
    async fn create_bucket(&self, region: &str) -> io::Result<()> {
        let what = format!("creating bucket '{}' at {}", self.bucket, self.server);
        let mut url = self
            .s3
            .signed_url(Method::PUT, &Path::default(), Duration::from_secs(60))
            .await
            .map_err(|e| s3_error(&what, &e))?;
        url.set_query(None);
        // Outside us-east-1, S3 wants the region in the body.
        let body = if region == "us-east-1" {
            String::new()
        } else {
            format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
            )
        };
        let credential = self.s3.credentials().get_credential().await.map_err(|e| s3_error(&what, &e))?;
        let mut request = HttpRequest::new(HttpRequestBody::from(body.clone()));
        *request.method_mut() = Method::PUT;
        *request.uri_mut() = url
            .as_str()
            .parse()
            .map_err(|e| io::Error::other(format!("{what}: bad bucket URL {url}: {e}")))?;
        AwsAuthorizer::new(&credential, "s3", region)
            .try_authorize(&mut request, None)
            .map_err(|e| s3_error(&what, &e))?;
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| io::Error::other(format!("{what}: cannot build an HTTP client: {e}")))?;
        let response = client
            .put(url.as_str())
            .headers(request.headers().clone())
            // Sent even for an empty body, which some servers insist on.
            .header(reqwest::header::CONTENT_LENGTH, body.len())
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let kind = if e.is_timeout() {
                    io::ErrorKind::TimedOut
                } else if e.is_connect() {
                    io::ErrorKind::ConnectionRefused
                } else {
                    io::ErrorKind::Other
                };
                io::Error::new(kind, format!("{what}: {e}"))
            })?;
        let status = response.status();
        if status.is_success() || status == reqwest::StatusCode::CONFLICT {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let kind = match status {
            reqwest::StatusCode::FORBIDDEN | reqwest::StatusCode::UNAUTHORIZED => {
                io::ErrorKind::PermissionDenied
            }
            _ => io::ErrorKind::Other,
        };
        Err(io::Error::new(kind, format!("{what}: the server answered {status}: {text}")))
    }

    /// Reads an object that is not a chunk, to learn early whether the server answers, accepts
    /// the credentials and has the bucket.
    async fn probe(&self) -> io::Result<()> {
        let key = self.prefix.clone().join(PROBE_KEY);
        match self.s3.get(&key).await {
            Ok(_) => Ok(()),
            Err(e) if is_missing_bucket(&e) => Err(self.missing_bucket(&e)),
            // S3 says which is missing; anything else answering 404 is not S3.
            Err(e @ object_store::Error::NotFound { .. }) if !e.to_string().contains("NoSuchKey") => {
                Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "checking {}: the server answered 404 without saying whether the bucket or \
                         the object is missing: is it an S3 server? {e}",
                        self.location(&key)
                    ),
                ))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_error(&format!("checking {}", self.location(&key)), &e)),
        }
    }

    fn missing_bucket(&self, e: &object_store::Error) -> io::Error {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "bucket '{}' does not exist at {} (add create-bucket=true to the URL to create it): {e}",
                self.bucket, self.server
            ),
        )
    }

    async fn get_one(&self, chunk: u64) -> io::Result<Option<Vec<u8>>> {
        let key = chunk_key(&self.prefix, chunk);
        let what = || format!("reading chunk {chunk} from {}", self.location(&key));
        let result = match self.s3.get(&key).await {
            Ok(result) => result,
            Err(e) if is_missing_bucket(&e) => return Err(self.missing_bucket(&e)),
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(s3_error(&what(), &e)),
        };
        let bytes = result.bytes().await.map_err(|e| s3_error(&what(), &e))?;
        Ok(Some(Vec::from(bytes)))
    }

    async fn put_one(&self, chunk: u64, data: &[u8]) -> io::Result<()> {
        let key = chunk_key(&self.prefix, chunk);
        let payload = PutPayload::from(bytes::Bytes::copy_from_slice(data));
        match self.s3.put(&key, payload).await {
            Ok(_) => Ok(()),
            Err(e) if is_missing_bucket(&e) => Err(self.missing_bucket(&e)),
            Err(e) => Err(s3_error(&format!("writing chunk {chunk} to {}", self.location(&key)), &e)),
        }
    }
}

impl ChunkStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{} at {}, prefix \"{}\"", self.bucket, self.server, self.prefix)
    }

    fn get(&self, chunks: &[u64]) -> io::Result<Vec<Option<Vec<u8>>>> {
        self.block_on(stream::iter(chunks).map(|&c| self.get_one(c)).buffered(self.concurrency).try_collect())
    }

    fn put(&self, chunks: &[(u64, &[u8])]) -> io::Result<()> {
        self.block_on(
            stream::iter(chunks)
                .map(|&(c, data)| self.put_one(c, data))
                .buffer_unordered(self.concurrency)
                .try_collect(),
        )
    }

    /// One `DeleteObjects` request per thousand chunks; deleting a missing object is no error.
    fn delete(&self, chunks: &[u64]) -> io::Result<()> {
        let keys: Vec<object_store::Result<Path>> =
            chunks.iter().map(|&c| Ok(chunk_key(&self.prefix, c))).collect();
        self.block_on(async {
            let mut deleted = self.s3.delete_stream(stream::iter(keys).boxed());
            while let Some(result) = deleted.next().await {
                match result {
                    Ok(_) => {}
                    Err(e) if is_missing_bucket(&e) => return Err(self.missing_bucket(&e)),
                    Err(e) => {
                        return Err(s3_error(
                            &format!(
                                "deleting {} chunks from s3://{}/{} at {}",
                                chunks.len(),
                                self.bucket,
                                self.prefix,
                                self.server
                            ),
                            &e,
                        ));
                    }
                }
            }
            Ok(())
        })
    }
}

/// A duration as `object_store` configuration takes it (`30s`).
fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

fn chunk_key(prefix: &Path, chunk: u64) -> Path {
    prefix.clone().join(chunk.to_string().as_str())
}

/// Whether `e` is S3 saying that the bucket itself is missing (not just the object).
fn is_missing_bucket(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. }) && e.to_string().contains("NoSuchBucket")
}

/// `e` as an `io::Error` saying `what` failed, of the kind that fits: `NotFound`,
/// `PermissionDenied` for refused credentials, `TimedOut`, `ConnectionRefused` when the server
/// could not be reached.
fn s3_error(what: &str, e: &object_store::Error) -> io::Error {
    let kind = match e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            io::ErrorKind::PermissionDenied
        }
        _ => match http_error_kind(e) {
            Some(HttpErrorKind::Timeout) => io::ErrorKind::TimedOut,
            Some(HttpErrorKind::Connect) => io::ErrorKind::ConnectionRefused,
            Some(HttpErrorKind::Interrupted) => io::ErrorKind::ConnectionReset,
            _ => io::ErrorKind::Other,
        },
    };
    io::Error::new(kind, format!("{what}: {e}"))
}

/// The kind of the HTTP failure behind `e`, if there is one.
fn http_error_kind(e: &object_store::Error) -> Option<HttpErrorKind> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(http) = err.downcast_ref::<HttpError>() {
            return Some(http.kind());
        }
        source = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> io::Result<S3Url> {
        S3Url::parse(&url::Url::parse(url).unwrap())
    }

    #[test]
    fn a_full_url_is_parsed() {
        let u = parse(
            "s3://bkt/disks/one?endpoint=http://127.0.0.1:9000&region=eu-west-1&access-key-id=AK\
             &secret-access-key=SK&create-bucket=true&size=1G&chunk-size=65536&max-batch=16",
        )
        .unwrap();
        assert_eq!(u.bucket, "bkt");
        assert_eq!(u.prefix.as_ref(), "disks/one");
        assert_eq!(u.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(u.region.as_deref(), Some("eu-west-1"));
        assert_eq!(u.access_key_id.as_deref(), Some("AK"));
        assert_eq!(u.secret_access_key.as_deref(), Some("SK"));
        assert!(u.create_bucket);
    }

    #[test]
    fn a_bare_url_leaves_everything_to_the_environment() {
        let u = parse("s3://bkt").unwrap();
        assert_eq!(u.bucket, "bkt");
        assert!(u.prefix.as_ref().is_empty());
        assert_eq!((u.endpoint, u.region, u.access_key_id), (None, None, None));
        assert!(!u.create_bucket);
        assert!(parse("s3://bkt/").unwrap().prefix.as_ref().is_empty());
    }

    #[test]
    fn bad_urls_are_invalid_input_naming_the_problem() {
        for (url, needle) in [
            ("s3://bkt?colour=blue", "unknown parameter 'colour'"),
            ("redis://bkt", "scheme"),
            ("s3:///prefix", "no bucket"),
            ("s3://bkt:9000", "bucket alone"),
            ("s3://user:pw@bkt", "bucket alone"),
            ("s3://bkt?access-key-id=AK", "go together"),
            ("s3://bkt?create-bucket=maybe", "create-bucket=maybe"),
            ("s3://bkt?endpoint=ftp://host", "not an http"),
            ("s3://bkt/a//b", "prefix"),
        ] {
            let err = parse(url).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{url}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn messages_do_not_show_the_secret() {
        let err = parse("s3://bkt?secret-access-key=hunter2&access-key-id=AK&oops=1").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(
            format!("{:?}", parse("s3://b?secret-access-key=hunter2&access-key-id=AK").unwrap())
                .contains("******")
        );
    }

    #[test]
    fn keys_are_the_decimal_index_under_the_prefix() {
        assert_eq!(chunk_key(&Path::from("disks/one"), 42).as_ref(), "disks/one/42");
        assert_eq!(chunk_key(&Path::default(), 7).as_ref(), "7");
        assert_eq!(chunk_key(&Path::default(), u64::MAX).as_ref(), "18446744073709551615");
    }
}
