//! [`NbdBackend`]: a [`Backend`] on an export of any NBD server (`nbdkit`, `qemu-nbd`,
//! `nbd-server`, or this crate's [`NbdServer`](crate::NbdServer)).
//!
//! # Design
//! The API is blocking, like every `Backend`. The connections are an [`r3map_net::mux::Mux`]
//! on the runtime the client is opened on ([`r3map_net::Io::shared`] unless the caller gives its
//! own), the same engine as the r3map protocol's client: requests are written as they come (many
//! in flight per connection) and replies matched to them by cookie, in whatever order the server
//! answers. This module brings NBD's negotiation and framing (`connection.rs`, the codec) and the
//! `Backend` on top (`transport.rs`). Large requests are cut at the server's maximum size and
//! their pieces are in flight together; pieces of more than 1 MiB go as background requests, so
//! that small reads are sent before them (and, with several connections, on another one).
//! Callers may be any thread, the runtime's own workers included.
//!
//! When the server's minimum block size is above 1, the export is reached through an
//! [`Aligned`] layer, so that any offset and length still work (partial blocks by
//! read-modify-write); requests on the wire always respect the server's block sizes.
//!
//! A broken connection is reopened with exponential backoff, and requests that had no answer are
//! sent again (every command this client sends is safe to repeat), as long as their deadline
//! ([`NbdClientOptions::timeout`]) allows; after it they fail with `TimedOut`, never with made-up
//! data. A server that breaks the protocol (bad magic, unknown cookie, a chunk outside its
//! request, oversized lengths, missing data) fails the connection and every request pending on it
//! with `InvalidData`; nothing it sends makes the client panic or wait forever.
//!
//! # What it does
//! - URIs `nbd://HOST[:PORT]/[EXPORT]` and `nbd+unix:///[EXPORT]?socket=PATH`, and with TLS
//!   `nbds://HOST[:PORT]/[EXPORT]` and `nbds+unix:///[EXPORT]?socket=PATH`
//!   ([`NbdClientOptions::from_url`]), with `connections=N` and `timeout=SECONDS`.
//! - TLS 1.3 (rustls) with `NBD_OPT_STARTTLS`, right after the greeting, on every connection and
//!   every reconnection ([`NbdClientOptions::tls`], [`NbdClientTls`]). The server's certificate
//!   is always verified against a CA given with the URI (`tls-certificates=DIR` holding
//!   `ca-cert.pem`, as libnbd reads it, or `ca=PATH`), for the URI's host or `tls-hostname=NAME`;
//!   a client certificate (`client-cert.pem` and `client-key.pem` in that directory, or
//!   `cert=PATH` and `key=PATH`) is presented to servers that ask for one. An `nbds` URI never
//!   falls back to plaintext: a server that does not start TLS is an error. A failed TLS handshake
//!   (an untrusted or misnamed certificate, a server refusing the client's certificate) is an
//!   error naming the cause. A server that requires TLS from an `nbd://` URI gets an error saying
//!   to use `nbds://`.
//! - Fixed newstyle negotiation (and plain newstyle servers), `NO_ZEROES` when offered,
//!   structured replies, the `base:allocation` metadata context, `NBD_OPT_GO` with
//!   `NBD_INFO_BLOCK_SIZE`, and `NBD_OPT_EXPORT_NAME` for servers without `NBD_OPT_GO`.
//! - Simple and structured replies: `OFFSET_DATA` and `OFFSET_HOLE` chunks in any order, `NONE`,
//!   `ERROR`, `ERROR_OFFSET` (the server's message is kept in the error) and `BLOCK_STATUS`.
//! - Several connections when the server announces `CAN_MULTI_CONN`.
//! - Capabilities from the transmission flags: `READ_ONLY` (writes fail with `PermissionDenied`
//!   without a round trip), `SEND_WRITE_ZEROES` (both [`Backend::write_zeroes`] and
//!   [`Backend::trim`]), `base:allocation` ([`Backend::extents`], through
//!   `NBD_CMD_BLOCK_STATUS`), `SEND_FLUSH` (otherwise [`Backend::flush`] does nothing), plus
//!   [`NbdBackend::cache`] (`NBD_CMD_CACHE`) and [`NbdBackend::discard`] (`NBD_CMD_TRIM`).
//! - `NBD_CMD_DISC` when the client is dropped.
//!
//! [`Backend::trim`] promises that the range reads as zeroes afterwards, which `NBD_CMD_TRIM` does
//! not (`qemu-nbd` ignores it unless told otherwise), so it is sent as `NBD_CMD_WRITE_ZEROES`
//! without `NBD_CMD_FLAG_NO_HOLE`, which lets the server deallocate. An extent is a hole only when
//! the server reports it both unallocated and reading as zeroes (`NBD_STATE_HOLE` and
//! `NBD_STATE_ZERO`).
//!
//! # What it does not do yet
//! - TLS with pre-shared keys (`tls-type=psk`, `tls-psk-file`), anonymous TLS, certificate
//!   revocation lists (`ca-crl.pem`), the system's trusted roots, TLS 1.2, and opportunistic TLS on
//!   `nbd://` URIs; `tls-verify-peer=false` is refused, since the server's certificate is always
//!   verified.
//! - Extended headers (64-bit lengths), `NBD_CMD_FLAG_FUA`, `NBD_CMD_FLAG_DF`, fast zeroes,
//!   `NBD_CMD_RESIZE`, other metadata contexts, the old-style handshake, vsock.

mod connection;
mod handshake;
mod options;
mod reply;
mod transport;

use std::fmt;
use std::io;
use std::sync::Arc;

use r3map_core::{Aligned, Backend, Capabilities, Extent, check_range};

pub use connection::fuzz_session;
pub use handshake::{MAX_PAYLOAD, NbdExportInfo};
pub use options::{DEFAULT_PORT, NbdAddress, NbdClientOptions, NbdClientTls};

use transport::Transport;

/// A [`Backend`] on an export of an NBD server. See the [module documentation](self).
pub struct NbdBackend {
    transport: Arc<Transport>,
    /// Byte-granular access when the server's minimum block size is above 1.
    aligned: Option<Aligned<Arc<Transport>>>,
}

impl fmt::Debug for NbdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdBackend")
            .field("address", self.transport.address())
            .field("info", &self.transport.info())
            .field("connections", &self.transport.connections())
            .field("tls", &self.transport.tls())
            .field("aligned", &self.aligned.is_some())
            .finish()
    }
}

impl NbdBackend {
    /// Connects to the export an NBD URI names (see [`NbdClientOptions::from_url`]).
    ///
    /// # Errors
    /// A bad URI (`InvalidInput`), TLS this client does not do (`Unsupported`), unreadable
    /// certificate files, or as [`NbdBackend::connect`].
    pub fn open(url: &str) -> io::Result<Self> {
        let (address, options) = NbdClientOptions::from_url(url)?;
        Self::connect(address, options)
    }

    /// Connects to `address` and negotiates the export; every connection is opened now, so that
    /// errors show here.
    ///
    /// # Errors
    /// An unreachable server; one that is not an NBD server or breaks the protocol
    /// (`InvalidData`); an unknown export (`NotFound`); a server that needs TLS the options do not
    /// have, does not start TLS the options require, or speaks the old-style handshake
    /// (`Unsupported`); a failed TLS handshake (`PermissionDenied`: an untrusted or misnamed
    /// server certificate, a client certificate missing or refused); a handshake slower than
    /// [`NbdClientOptions::connect_timeout`] (`TimedOut`).
    pub fn connect(address: NbdAddress, options: NbdClientOptions) -> io::Result<Self> {
        Self::connect_on(address, options, &r3map_net::Io::shared())
    }

    /// As [`NbdBackend::connect`], with the connections running on `io`.
    ///
    /// # Errors
    /// As [`NbdBackend::connect`].
    pub fn connect_on(
        address: NbdAddress,
        options: NbdClientOptions,
        io: &r3map_net::Io,
    ) -> io::Result<Self> {
        let transport = Arc::new(Transport::connect(address, options, io)?);
        let min_block = transport.info().min_block;
        let aligned = if min_block > 1 {
            Some(Aligned::new(Arc::clone(&transport), u64::from(min_block))?)
        } else {
            None
        };
        Ok(Self { transport, aligned })
    }

    /// What the server said about the export.
    #[must_use]
    pub fn info(&self) -> NbdExportInfo {
        self.transport.info()
    }

    /// Where the server is.
    #[must_use]
    pub fn address(&self) -> &NbdAddress {
        self.transport.address()
    }

    /// The export's name (empty for the server's default export).
    #[must_use]
    pub fn export(&self) -> &str {
        self.transport.export()
    }

    /// The connections in use (fewer than asked for when the server does not allow several).
    #[must_use]
    pub fn connections(&self) -> usize {
        self.transport.connections()
    }

    /// Whether the connections run inside TLS.
    #[must_use]
    pub fn tls(&self) -> bool {
        self.transport.tls()
    }

    /// Tells the server that `off..off + len` will be read soon (`NBD_CMD_CACHE`, over the range
    /// widened to whole blocks). Does nothing when the server does not announce the command.
    ///
    /// # Errors
    /// `InvalidInput` for a range past the end; the server's error.
    pub fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        self.transport.cache(off, len)
    }

    /// Tells the server that `off..off + len` is no longer needed (`NBD_CMD_TRIM`, over the whole
    /// blocks inside the range). Unlike [`Backend::trim`], the range's contents are undefined
    /// afterwards. Does nothing when the server does not announce the command.
    ///
    /// # Errors
    /// `InvalidInput` for a range past the end, `PermissionDenied` on a read-only export; the
    /// server's error.
    pub fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        self.transport.discard(off, len)
    }

    /// The layer requests go through.
    fn stack(&self) -> &dyn Backend {
        match &self.aligned {
            Some(aligned) => aligned,
            None => self.transport.as_ref(),
        }
    }

    /// Checks a range and answers an empty one locally.
    fn empty(&self, off: u64, len: u64) -> io::Result<bool> {
        check_range(off, len, self.size())?;
        Ok(len == 0)
    }
}

impl Backend for NbdBackend {
    fn size(&self) -> u64 {
        self.transport.info().size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.empty(off, r3map_core::backend::len64(buf))? {
            return Ok(());
        }
        self.stack().read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.empty(off, r3map_core::backend::len64(buf))? {
            return Ok(());
        }
        self.transport.writable()?;
        self.stack().write_at(buf, off)
    }

    fn flush(&self) -> io::Result<()> {
        self.transport.flush()
    }

    fn capabilities(&self) -> Capabilities {
        self.transport.capabilities()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        if self.capabilities().trim && self.empty(off, len)? {
            return Ok(());
        }
        self.stack().trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        if self.capabilities().write_zeroes && self.empty(off, len)? {
            return Ok(());
        }
        self.stack().write_zeroes(off, len)
    }

    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        if self.capabilities().extents && self.empty(off, len)? {
            return Ok(Vec::new());
        }
        self.stack().extents(off, len)
    }
}
