//! gRPC transport of r3map, wire compatible with the Go r3map's services: a Go r3map peer (or any
//! gRPC client) can read and write a backend we export, and we can consume a Go r3map server.
//!
//! The services, kept exactly as the original defines them (package, service, method and message
//! names, field numbers and types; see `proto/`):
//! - `com.pojtinger.felicitas.r3map.mount.v1.Backend`: `ReadAt`, `WriteAt`, `Sync`.
//! - `com.pojtinger.felicitas.r3map.migration.v1.Seeder`: `ReadAt`, `Track`, `Sync` (dirty
//!   **byte offsets**), `Close`.
//!
//! What it gives:
//! - [`GrpcExport`], [`serve`] (async) and [`GrpcServer`] (its own runtime and thread): a
//!   [`Backend`](r3map_core::Backend), and optionally a [`Seeder`](r3map_core::Seeder), on one
//!   server. The semantics of each call (reads across the end, limits, status codes) are in
//!   [`server`](crate::server#semantics).
//! - [`GrpcBackend`]: a `Backend` over the `Backend` service; [`GrpcSeeder`]: a `Seeder` over the
//!   `Seeder` service, with [`GrpcSeederSource`] for its data. Blocking, each with a small tokio
//!   runtime inside: call them from plain threads, not from async tasks.
//! - TLS on both sides (rustls with aws-lc-rs, through tonic), with optional client certificates:
//!   [`GrpcSecurity`], [`ServerTls`], [`ClientTls`]. Plaintext only when asked for by name.
//!
//! What it does not do: a `Size` call (the original dropped it: clients are given the size),
//! `trim`, `write_zeroes` or `extents` (the protocol has none), streaming, compression, retries
//! (the pipeline above retries), or the original's other transports (dRPC, fRPC).
//!
//! # Layout
//! - `proto/`: the `.proto` files. [`proto`]: the code generated from them, committed in
//!   `src/generated/` so that building needs no `protoc`. Regenerate it after editing a `.proto`
//!   with `bash crates/grpc/scripts/gen-grpc.sh` (it builds the generator in `crates/grpc/codegen`,
//!   which brings its own `protoc`); `--check` fails when the committed code is stale.
//! - `server.rs`: the services and the server; `client.rs`: the clients; `status.rs`: error kinds
//!   to status codes and back; `tls.rs`: TLS settings.

pub mod client;
pub mod server;
mod status;
mod tls;

pub use client::{
    DEFAULT_MAX_WRITE, DEFAULT_TIMEOUT, GrpcBackend, GrpcClientOptions, GrpcSeeder, GrpcSeederSource,
};
pub use server::{DEFAULT_SHUTDOWN_GRACE, GrpcExport, GrpcServer, serve};
pub use tls::{ClientTls, GrpcSecurity, ServerTls, TlsIdentity};

/// Messages, clients and servers generated from `proto/` by prost and tonic (see the crate
/// documentation for how to regenerate them).
#[allow(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    clippy::nursery
)]
pub mod proto {
    /// Package `com.pojtinger.felicitas.r3map.mount.v1`: the `Backend` service.
    pub mod mount {
        include!("generated/com.pojtinger.felicitas.r3map.mount.v1.rs");
    }

    /// Package `com.pojtinger.felicitas.r3map.migration.v1`: the `Seeder` service.
    pub mod migration {
        include!("generated/com.pojtinger.felicitas.r3map.migration.v1.rs");
    }
}

/// Default largest `ReadAt` (server and client) and default largest `WriteAt` payload the server
/// accepts: 32 MiB, the original's `MaxChunkSize`.
pub const DEFAULT_MAX_READ: u64 = 32 * 1024 * 1024;

/// Room for the protobuf framing around a payload when sizing tonic's message limits.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// HTTP/2 flow-control windows of both sides: large enough that a 32 MiB message does not stall
/// on window updates (the HTTP/2 default is 64 KiB).
const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;
