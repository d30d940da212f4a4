//! Integration tests of r3map-grpc: servers on 127.0.0.1:0, our clients and the raw generated
//! clients against them, and a Go peer built from the same `.proto` files (`go_peer`).

// Test code: small sizes, so the casts cannot truncate.
#![allow(clippy::cast_possible_truncation)]

mod backend;
mod go_peer;
mod seeder;
mod tls;
mod wire;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use r3map_core::{Backend, Capabilities, Extent, Memory, SharedBackend};
use r3map_grpc::{GrpcBackend, GrpcClientOptions, GrpcExport, GrpcServer};

/// Any free port on the loopback address.
pub(crate) fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

pub(crate) fn http(server: &GrpcServer) -> String {
    format!("http://{}", server.local_addr())
}

/// A client and the server it talks to (ours, or a Go peer's process), as one backend: dropping
/// it drops the client first, then shuts the server down.
pub(crate) struct Served<S = GrpcServer> {
    pub(crate) client: GrpcBackend,
    pub(crate) _server: S,
}

impl Served {
    pub(crate) fn memory(size: u64, options: GrpcClientOptions) -> Self {
        let server =
            GrpcServer::start(any_port(), GrpcExport::new(Arc::new(Memory::new(size)))).expect("start");
        let client = GrpcBackend::connect(&http(&server), size, options).expect("connect");
        Self { client, _server: server }
    }
}

impl<S: Send + Sync> Backend for Served<S> {
    fn size(&self) -> u64 {
        self.client.size()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.client.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.client.write_at(buf, off)
    }
    fn flush(&self) -> io::Result<()> {
        self.client.flush()
    }
    fn capabilities(&self) -> Capabilities {
        self.client.capabilities()
    }
    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.client.trim(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64) -> io::Result<()> {
        self.client.write_zeroes(off, len)
    }
    fn extents(&self, off: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.client.extents(off, len)
    }
}

pub(crate) fn shared(backend: impl Backend + 'static) -> SharedBackend {
    Arc::new(backend)
}

/// A runtime for the raw generated clients.
pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
}
