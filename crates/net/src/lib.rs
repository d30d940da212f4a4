//! The r3map network protocol: serve any [`Backend`](r3map_core::Backend) over TCP (TLS 1.3 by
//! default), plaintext TCP when asked for, or a Unix socket, and use a remote one as a `Backend`
//! ([`RemoteBackend`]).
//!
//! One connection carries many requests at once, tagged with ids and answered in any order; a
//! client may open several connections. The handshake carries the protocol version, the export
//! name and the credentials one way and the size, chunk size, largest request and capabilities the
//! other, so opening costs no extra round trip. The protocol is specified in `docs/protocol.md`.
//!
//! Not here: gRPC interoperability (`r3map-grpc`), NBD (a later crate).
//!
//! # Layout
//! - [`proto`]: the wire format, encoded and decoded without I/O (the fuzzed decoders).
//! - [`errno`]: error codes on the wire.
//! - [`security`]: TLS configurations and the stream type.
//! - [`serve`]: the server skeleton every protocol's server is built on (accepting, the
//!   connection set, the transmission driver with its in-flight budget, [`ServerHandle`]).
//! - [`server`]: [`Server`] and [`Export`]: the r3map protocol's handshake and requests on it.
//! - [`client`]: [`RemoteBackend`] with reconnection, and its [`Address`] URLs.
//! - [`mux`]: [`Mux`](mux::Mux), the multiplexed client every protocol's client is built on
//!   (pipelining, request classes, deadlines, reconnection).
//! - [`params`]: backend URLs taken apart, for every protocol and store: [`Params`](params::Params),
//!   the query with typed getters, and [`BackendUrl`](params::BackendUrl), whose authority may list
//!   several hosts.
//! - [`pool`]: reusable payload buffers.
//! - [`certs`]: a private CA and the certificates it signs, for mutual TLS.
//! - [`runtime`]: [`Io`], the runtime async work runs on (the caller's, or one shared by the
//!   process), and the bridge from blocking code to it.

pub mod certs;
pub mod client;
pub mod errno;
mod frame_io;
pub mod mux;
pub mod params;
pub mod pool;
pub mod proto;
pub mod runtime;
pub mod security;
pub mod serve;
pub mod server;

pub use client::{Address, ClientOptions, RemoteBackend};
pub use runtime::Io;
pub use security::{ClientSecurity, ServerSecurity, client_tls, server_tls};
pub use server::{Export, Server, ServerConfig, ServerHandle};
