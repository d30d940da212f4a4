//! Backend URLs taken apart: [`Params`], the query with typed getters, and [`BackendUrl`], the
//! whole URL with an authority of several hosts (`cassandra://h1:9042,h2:9042`), which
//! [`url::Url`] cannot parse.
//!
//! Parameters are taken one by one, so that what is left at the end can be reported as unknown;
//! a parameter given twice is an error as soon as the query is parsed, since no backend could
//! say which of the two was meant. Every error is an [`io::ErrorKind::InvalidInput`] carrying a
//! [`UrlError`] that names the URL and, where there is one, the parameter.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;

use r3map_core::units::parse_size;

/// What is wrong with a backend URL. It travels inside an [`io::Error`] of kind
/// `InvalidInput` (`error.get_ref()` downcasts to it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad backend URL '{url}': {problem}")]
pub struct UrlError {
    url: String,
    key: Option<String>,
    problem: String,
}

impl UrlError {
    /// The URL, as it was given.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The parameter the problem is with, if it is with one.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The problem, a sentence without the URL.
    #[must_use]
    pub fn problem(&self) -> &str {
        &self.problem
    }
}

fn url_error(url: &str, key: Option<&str>, problem: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        UrlError { url: url.to_owned(), key: key.map(str::to_owned), problem },
    )
}

/// Query parameters whose values are secrets: [`shown`] replaces them with `******`.
pub const SECRET_PARAMETERS: [&str; 3] = ["token", "secret-access-key", "password"];

/// `url` as messages may show it: the values of [`SECRET_PARAMETERS`] and the password of the
/// authority (`USER:PASSWORD@`) replaced with `******`. Everything else is left as written.
#[must_use]
pub fn shown(url: &str) -> String {
    let (before_fragment, fragment) = url.split_once('#').map_or((url, None), |(b, f)| (b, Some(f)));
    let (rest, query) =
        before_fragment.split_once('?').map_or((before_fragment, None), |(r, q)| (r, Some(q)));
    let mut out = String::with_capacity(url.len());
    // The password: between "//USER:" and the last '@' of the authority.
    match rest.split_once("//") {
        Some((scheme, after)) => {
            let (authority, path) = after.find('/').map_or((after, ""), |at| after.split_at(at));
            out.push_str(scheme);
            out.push_str("//");
            match authority.rsplit_once('@') {
                Some((userinfo, hosts)) => {
                    match userinfo.split_once(':') {
                        Some((user, _)) => {
                            out.push_str(user);
                            out.push_str(":******");
                        }
                        None => out.push_str(userinfo),
                    }
                    out.push('@');
                    out.push_str(hosts);
                }
                None => out.push_str(authority),
            }
            out.push_str(path);
        }
        None => out.push_str(rest),
    }
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| {
                let key = pair.split_once('=').map_or(pair, |(k, _)| k);
                let decoded: String = url::form_urlencoded::parse(key.as_bytes()).map(|(k, _)| k).collect();
                if SECRET_PARAMETERS.contains(&decoded.as_str()) {
                    format!("{key}=******")
                } else {
                    pair.to_owned()
                }
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
}

/// The part of `url` between the scheme and the query (without a fragment), and the query.
fn split(url: &str) -> (&str, &str) {
    let url = url.split_once('#').map_or(url, |(before, _)| before);
    let (rest, query) = url.split_once('?').unwrap_or((url, ""));
    (rest.split_once(':').map_or(rest, |(_, after)| after), query)
}

/// The query parameters of a URL, percent-decoded, each taken at most once. Its errors show the
/// URL without its secrets ([`shown`]).
#[derive(Clone)]
pub struct Params {
    /// The URL as errors show it.
    url: String,
    left: BTreeMap<String, String>,
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Params").field("url", &self.url).field("keys", &self.left.keys()).finish()
    }
}

impl Params {
    /// The parameters of `url`'s query (between `?` and `#`; none without `?`).
    ///
    /// # Errors
    /// A parameter given twice.
    pub fn parse(url: &str) -> io::Result<Self> {
        let (_, query) = split(url);
        let shown = shown(url);
        let mut left = BTreeMap::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if left.insert(key.clone().into_owned(), value.into_owned()).is_some() {
                return Err(url_error(&shown, Some(&key), format!("the parameter '{key}' is given twice")));
            }
        }
        Ok(Self { url: shown, left })
    }

    /// The URL these parameters are from, as messages show it (without secrets).
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The parameters not taken yet, in order of their names.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.left.keys().map(String::as_str)
    }

    /// Whether `key` is given (and not taken yet).
    #[must_use]
    pub fn contains(&self, key: &str) -> bool {
        self.left.contains_key(key)
    }

    /// Takes `key`'s value as it was given (decoded).
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.left.remove(key)
    }

    /// Takes a size (`4096`, `64KiB`, `4GiB`: [`parse_size`]), which must not be zero.
    ///
    /// # Errors
    /// A value that is not a size, or zero.
    pub fn size(&mut self, key: &str) -> io::Result<Option<u64>> {
        let Some(value) = self.take(key) else { return Ok(None) };
        let size = parse_size(&value).map_err(|e| self.error(key, format!("{key}={value}: {e}")))?;
        if size == 0 {
            return Err(self.error(key, format!("{key} must not be zero")));
        }
        Ok(Some(size))
    }

    /// Takes a number (or anything else [`FromStr`]); `what` says what it counts, for the error
    /// (`"a number of files"`).
    ///
    /// # Errors
    /// A value that does not parse.
    pub fn number<T: FromStr>(&mut self, key: &str, what: &str) -> io::Result<Option<T>> {
        let Some(value) = self.take(key) else { return Ok(None) };
        match value.parse() {
            Ok(n) => Ok(Some(n)),
            Err(_) => Err(self.error(key, format!("{key}={value} is not {what}"))),
        }
    }

    /// Takes a yes-or-no: `true`, `1`, `yes` or nothing at all (`?truncate`) for yes; `false`,
    /// `0`, `no` for no.
    ///
    /// # Errors
    /// Any other value.
    pub fn flag(&mut self, key: &str) -> io::Result<Option<bool>> {
        match self.take(key).as_deref() {
            None => Ok(None),
            Some("false" | "0" | "no") => Ok(Some(false)),
            Some("" | "true" | "1" | "yes") => Ok(Some(true)),
            Some(other) => Err(self.error(key, format!("{key}={other} is neither true nor false"))),
        }
    }

    /// Takes a path (taken as it is: a relative one is relative to the working directory).
    ///
    /// # Errors
    /// An empty value.
    pub fn path(&mut self, key: &str) -> io::Result<Option<PathBuf>> {
        match self.take(key) {
            None => Ok(None),
            Some(p) if p.is_empty() => Err(self.error(key, format!("{key}= needs a path"))),
            Some(p) => Ok(Some(PathBuf::from(p))),
        }
    }

    /// An error about `key` in this URL: `problem` is a sentence naming it.
    #[must_use]
    pub fn error(&self, key: &str, problem: impl Into<String>) -> io::Error {
        url_error(&self.url, Some(key), problem.into())
    }

    /// An error about this URL as a whole.
    #[must_use]
    pub fn url_error(&self, problem: impl Into<String>) -> io::Error {
        url_error(&self.url, None, problem.into())
    }

    /// Done taking: every parameter left over is unknown.
    ///
    /// # Errors
    /// The first unknown parameter (by name), or all of them.
    pub fn finish(self) -> io::Result<()> {
        let mut keys = self.left.keys();
        match (keys.next(), keys.len()) {
            (None, _) => Ok(()),
            (Some(k), 0) => Err(self.error(k, format!("unknown parameter '{k}'"))),
            (Some(k), _) => {
                let all: Vec<String> = self.left.keys().map(|k| format!("'{k}'")).collect();
                Err(self.error(k, format!("unknown parameters {}", all.join(", "))))
            }
        }
    }
}

/// One host of an authority, with its port if it has one. An IPv6 address is kept without its
/// brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: Option<u16>,
}

impl HostPort {
    /// `host:port`, the port `default` if the URL gave none, IPv6 addresses in brackets.
    #[must_use]
    pub fn with_port(&self, default: u16) -> String {
        let port = self.port.unwrap_or(default);
        if self.host.contains(':') {
            format!("[{}]:{port}", self.host)
        } else {
            format!("{}:{port}", self.host)
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.host.contains(':'), self.port) {
            (true, Some(p)) => write!(f, "[{}]:{p}", self.host),
            (true, None) => write!(f, "[{}]", self.host),
            (false, Some(p)) => write!(f, "{}:{p}", self.host),
            (false, None) => f.write_str(&self.host),
        }
    }
}

/// A backend URL taken apart: `SCHEME:[//[USER[:PASSWORD]@]HOST[:PORT][,HOST[:PORT]...]]PATH[?QUERY]`.
#[derive(Clone)]
pub struct BackendUrl {
    scheme: String,
    user: Option<String>,
    password: Option<String>,
    hosts: Vec<HostPort>,
    path: String,
    params: Params,
}

impl fmt::Debug for BackendUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendUrl")
            .field("scheme", &self.scheme)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("hosts", &self.hosts)
            .field("path", &self.path)
            .field("params", &self.params.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl BackendUrl {
    /// Parses `url`. The scheme is compared in lower case; user and password are
    /// percent-decoded, the path is kept as written.
    ///
    /// # Errors
    /// No scheme, an authority that is not hosts with ports (an empty host between commas, a
    /// port that is not a number from 1 to 65535, an IPv6 address without brackets), or a
    /// parameter given twice.
    pub fn parse(url: &str) -> io::Result<Self> {
        let shown = shown(url);
        let bad = |problem: String| url_error(&shown, None, problem);
        let scheme = match url.split_once(':') {
            Some((s, _))
                if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                s.to_ascii_lowercase()
            }
            _ => return Err(bad("no scheme (SCHEME:...)".to_owned())),
        };
        let params = Params::parse(url)?;
        let (rest, _) = split(url);
        let (authority, path) = match rest.strip_prefix("//") {
            Some(after) => after.find('/').map_or((Some(after), ""), |at| {
                let (a, p) = after.split_at(at);
                (Some(a), p)
            }),
            None => (None, rest),
        };
        let (mut user, mut password, mut hosts) = (None, None, Vec::new());
        if let Some(authority) = authority {
            let (userinfo, host_list) =
                authority.rsplit_once('@').map_or((None, authority), |(u, h)| (Some(u), h));
            if let Some(userinfo) = userinfo.filter(|u| !u.is_empty()) {
                let (u, p) = userinfo.split_once(':').map_or((userinfo, None), |(u, p)| (u, Some(p)));
                user = Some(decode(u).map_err(|e| bad(format!("the user name {e}")))?);
                password = p.map(decode).transpose().map_err(|e| bad(format!("the password {e}")))?;
            }
            if !host_list.is_empty() {
                hosts =
                    host_list.split(',').map(|h| host_port(h).map_err(&bad)).collect::<io::Result<_>>()?;
            }
        }
        Ok(Self { scheme, user, password, hosts, path: path.to_owned(), params })
    }

    /// The scheme, in lower case.
    #[must_use]
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The user name, decoded.
    #[must_use]
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The password, decoded.
    #[must_use]
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Every host of the authority, in order; none for `file:///...` or `memory:SIZE`.
    #[must_use]
    pub fn hosts(&self) -> &[HostPort] {
        &self.hosts
    }

    /// The one host of the authority.
    ///
    /// # Errors
    /// No host, or several.
    pub fn host(&self) -> io::Result<&HostPort> {
        match self.hosts.as_slice() {
            [one] => Ok(one),
            [] => Err(self.params.url_error(format!("no host: {}://HOST[:PORT]", self.scheme))),
            _ => Err(self.params.url_error(format!("{}:// takes one host, not a list", self.scheme))),
        }
    }

    /// The path as written (percent-encoded), from its `/`; or, for a URL without `//`
    /// (`memory:4GiB`), everything between the scheme and the query.
    #[must_use]
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The query parameters.
    pub fn params(&mut self) -> &mut Params {
        &mut self.params
    }

    /// The query parameters, for taking them after the rest has been read.
    #[must_use]
    pub fn into_params(self) -> Params {
        self.params
    }
}

fn decode(s: &str) -> Result<String, String> {
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(s).collect();
    if s.split('%')
        .skip(1)
        .any(|after| after.len() < 2 || !after.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit))
    {
        return Err("has a '%' without two hex digits after it".to_owned());
    }
    String::from_utf8(bytes).map_err(|_| "is not UTF-8 once decoded".to_owned())
}

fn host_port(s: &str) -> Result<HostPort, String> {
    let (host, port) = if let Some(inner) = s.strip_prefix('[') {
        let (host, after) =
            inner.split_once(']').ok_or_else(|| format!("'{s}': an IPv6 address without its ']'"))?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or_else(|| format!("'{s}': ':' must follow ']'"))?)),
        }
    } else {
        match s.split_once(':') {
            Some((_, port)) if port.contains(':') => {
                return Err(format!("'{s}': write an IPv6 address in brackets ([::1]:9042)"));
            }
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if host.is_empty() {
        return Err(if s.is_empty() {
            "an empty host in the list of hosts".to_owned()
        } else {
            format!("'{s}': no host")
        });
    }
    if host.contains(|c: char| c.is_whitespace() || "/?#@[]".contains(c)) {
        return Err(format!("'{host}' is not a host"));
    }
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| format!("'{s}': '{p}' is not a port"))?,
        ),
    };
    Ok(HostPort { host: host.to_owned(), port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(e: &io::Error) -> &UrlError {
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        e.get_ref().and_then(|inner| inner.downcast_ref::<UrlError>()).expect("a UrlError")
    }

    #[test]
    fn secrets_are_never_shown() {
        assert_eq!(
            shown("s3://b/p?size=1MiB&secret-access-key=hunter2&access-key-id=AK#f"),
            "s3://b/p?size=1MiB&secret-access-key=******&access-key-id=AK#f"
        );
        assert_eq!(
            shown("redis://user:pass%40word@h:6379/0?prefix=x"),
            "redis://user:******@h:6379/0?prefix=x"
        );
        assert_eq!(shown("redis://:pass@h"), "redis://:******@h");
        assert_eq!(shown("r3map+plain://h/x?token=t0ps3cret"), "r3map+plain://h/x?token=******");
        assert_eq!(shown("memory:4GiB"), "memory:4GiB");
        assert_eq!(shown("file:///srv/a%20b?size=1"), "file:///srv/a%20b?size=1");
        let e = Params::parse("s3://b?secret-access-key=hunter2&size=1&size=2").unwrap_err().to_string();
        assert!(!e.contains("hunter2") && e.contains("******"), "{e}");
        let mut p = Params::parse("nbd://h/x?token=hunter2&colour=red").unwrap();
        assert_eq!(p.take("token").as_deref(), Some("hunter2"), "values are the real ones");
        assert!(!format!("{p:?}").contains("hunter2"));
        let e = p.finish().unwrap_err().to_string();
        assert!(!e.contains("hunter2") && e.contains("'colour'"), "{e}");
        let e = BackendUrl::parse("cassandra://u:hunter2@a,,b").unwrap_err().to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn typed_getters_take_their_parameter() {
        let mut p = Params::parse("x://h/p?size=64KiB&n=7&on&off=no&path=/a%20b&name=a+b#frag=1").unwrap();
        assert_eq!(p.size("size").unwrap(), Some(64 << 10));
        assert_eq!(p.number::<u32>("n", "a number").unwrap(), Some(7));
        assert_eq!(p.flag("on").unwrap(), Some(true));
        assert_eq!(p.flag("off").unwrap(), Some(false));
        assert_eq!(p.path("path").unwrap(), Some(PathBuf::from("/a b")));
        assert_eq!(p.take("name").as_deref(), Some("a b"));
        assert!(!p.contains("frag"), "the fragment is not part of the query");
        assert_eq!(p.size("size").unwrap(), None, "taken once");
        p.finish().unwrap();
    }

    #[test]
    fn bad_values_name_the_url_and_the_key() {
        let url = "x://h?size=lots&chunk-size=0&n=many&t=maybe&p=";
        let mut p = Params::parse(url).unwrap();
        let e = p.size("size").unwrap_err();
        assert_eq!(problem(&e).key(), Some("size"));
        assert_eq!(problem(&e).url(), url);
        assert!(e.to_string().starts_with(&format!("bad backend URL '{url}': size=lots: ")), "{e}");
        assert!(p.size("chunk-size").unwrap_err().to_string().contains("chunk-size must not be zero"));
        let e = p.number::<usize>("n", "a number of files").unwrap_err();
        assert!(e.to_string().contains("n=many is not a number of files"), "{e}");
        assert!(p.flag("t").unwrap_err().to_string().contains("t=maybe is neither true nor false"));
        assert!(p.path("p").unwrap_err().to_string().contains("p= needs a path"));
    }

    #[test]
    fn repeated_and_unknown_parameters_are_errors() {
        let e = Params::parse("x://h?a=1&b=2&a=3").unwrap_err();
        assert_eq!(problem(&e).key(), Some("a"));
        assert!(e.to_string().contains("the parameter 'a' is given twice"), "{e}");
        // Percent-encoded names are the same name.
        assert!(Params::parse("x://h?a=1&%61=2").is_err());

        let mut p = Params::parse("x://h?keep=1&colour=blue").unwrap();
        p.take("keep");
        let e = p.finish().unwrap_err();
        assert_eq!(problem(&e).key(), Some("colour"));
        assert!(e.to_string().ends_with(": unknown parameter 'colour'"), "{e}");
        let e = Params::parse("x://h?b=1&a=2").unwrap().finish().unwrap_err();
        assert!(e.to_string().contains("unknown parameters 'a', 'b'"), "{e}");
        Params::parse("memory:4GiB").unwrap().finish().unwrap();
    }

    #[test]
    fn several_hosts_with_and_without_ports() {
        let u = BackendUrl::parse("Cassandra://us%40er:p%3Ass@h1:9042,h2,[::1]:9043,[fe80::1]/?keyspace=k")
            .unwrap();
        assert_eq!(u.scheme(), "cassandra");
        assert_eq!(u.user(), Some("us@er"));
        assert_eq!(u.password(), Some("p:ss"));
        let hosts: Vec<String> = u.hosts().iter().map(ToString::to_string).collect();
        assert_eq!(hosts, ["h1:9042", "h2", "[::1]:9043", "[fe80::1]"]);
        assert_eq!(u.hosts()[2], HostPort { host: "::1".into(), port: Some(9043) });
        assert_eq!(u.hosts()[1].with_port(9042), "h2:9042");
        assert_eq!(u.path(), "/");
        assert!(u.host().unwrap_err().to_string().contains("takes one host, not a list"));
        let mut params = u.into_params();
        assert_eq!(params.take("keyspace").as_deref(), Some("k"));
    }

    #[test]
    fn a_port_on_every_host_which_url_cannot_parse() {
        assert!(url::Url::parse("cassandra://a:9042,b:9043").is_err());
        let u = BackendUrl::parse("cassandra://a:9042,b:9043").unwrap();
        assert_eq!(
            u.hosts(),
            [
                HostPort { host: "a".into(), port: Some(9042) },
                HostPort { host: "b".into(), port: Some(9043) }
            ]
        );
    }

    #[test]
    fn urls_without_hosts() {
        let u = BackendUrl::parse("file:///srv/a%20b.img?size=1GiB").unwrap();
        assert!(u.hosts().is_empty());
        assert_eq!(u.path(), "/srv/a%20b.img");
        let u = BackendUrl::parse("memory:4GiB").unwrap();
        assert_eq!(u.path(), "4GiB");
        assert!(u.host().unwrap_err().to_string().contains("no host: memory://HOST[:PORT]"));
        let u = BackendUrl::parse("redis://:secret@h:6379/2").unwrap();
        assert_eq!((u.user(), u.password()), (Some(""), Some("secret")));
        assert!(format!("{u:?}").contains("<redacted>") && !format!("{u:?}").contains("secret"));
    }

    #[test]
    fn malformed_authorities_say_what_is_wrong() {
        for (url, wanted) in [
            ("cassandra://a,,b", "an empty host"),
            ("cassandra://a:x", "'a:x': 'x' is not a port"),
            ("cassandra://a:0", "'0' is not a port"),
            ("cassandra://a:70000", "'70000' is not a port"),
            ("cassandra://::1", "IPv6 address in brackets"),
            ("cassandra://[::1", "without its ']'"),
            ("cassandra://[::1]9042", "':' must follow ']'"),
            ("cassandra://:9042", "no host"),
            ("cassandra://us%4@h", "the user name has a '%' without two hex digits"),
            ("cassandra://u:%ff@h", "the password is not UTF-8"),
            ("no scheme", "no scheme"),
            (":x", "no scheme"),
        ] {
            let e = BackendUrl::parse(url).unwrap_err();
            assert!(e.to_string().contains(wanted), "{url}: {e}");
            assert_eq!(problem(&e).url(), shown(url));
        }
    }
}
