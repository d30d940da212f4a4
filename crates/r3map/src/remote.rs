//! Servers as backends: r3map (`r3map://` and its plaintext and Unix forms), gRPC and NBD. Each
//! protocol's client parses its own URLs; this only hands them the runtime and describes them.

use std::io;
use std::sync::Arc;

use crate::params::Params;
use crate::{OpenOptions, Opened};

/// A URL without its query (which may hold a token).
#[cfg(feature = "net")]
fn without_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// `r3map://`, `r3map+plain://`, `r3map+unix://` ([`r3map_net::ClientOptions::from_url`]).
#[cfg(feature = "net")]
pub(crate) fn open_r3map(url: &str, _: Params, options: &OpenOptions) -> io::Result<Opened> {
    let (address, mut client) = r3map_net::ClientOptions::from_url(url)?;
    client.io = Some(options.io());
    let remote = r3map_net::RemoteBackend::connect(address, client)?;
    let description = format!("r3map server {}", without_query(url));
    Ok(Opened::new(Arc::new(remote), description))
}

/// `grpc://HOST:PORT?size=SIZE`: the service has no size call, so the URL gives it.
#[cfg(feature = "grpc")]
pub(crate) fn open_grpc(url: &str, _: Params, options: &OpenOptions) -> io::Result<Opened> {
    let parsed = crate::BackendUrl::parse(url)?;
    let host = parsed.host().map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "a gRPC URL needs a host: grpc://HOST:PORT?size=SIZE")
    })?;
    let endpoint = format!("http://{}", host.with_port(r3map_net::client::DEFAULT_PORT));
    let mut params = parsed.into_params();
    let size = params.size("size")?.ok_or_else(|| {
        params.error("size", "a gRPC remote has no size call: add ?size=SIZE (the size the server exports)")
    })?;
    params.finish()?;
    let client = r3map_grpc::GrpcClientOptions { io: Some(options.io()), ..Default::default() };
    let remote = r3map_grpc::GrpcBackend::connect(&endpoint, size, client)?;
    Ok(Opened::new(Arc::new(remote), format!("gRPC server {endpoint}")))
}

/// `nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://` ([`r3map_nbd::NbdClientOptions::from_url`]).
#[cfg(feature = "nbd")]
pub(crate) fn open_nbd(url: &str, _: Params, options: &OpenOptions) -> io::Result<Opened> {
    let (address, client) = r3map_nbd::NbdClientOptions::from_url(url)?;
    let remote = r3map_nbd::NbdBackend::connect_on(address, client, &options.io())?;
    let description = nbd_description(&remote);
    Ok(Opened::new(Arc::new(remote), description))
}

/// `NBD server 127.0.0.1:10809 export 'disk'`, or `... default export`, with ` over TLS` when
/// it is.
#[cfg(feature = "nbd")]
fn nbd_description(remote: &r3map_nbd::NbdBackend) -> String {
    let (address, export) = (remote.address(), remote.export());
    let tls = if remote.tls() { " over TLS" } else { "" };
    if export.is_empty() {
        format!("NBD server {address} default export{tls}")
    } else {
        format!("NBD server {address} export '{export}'{tls}")
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use r3map_core::{Backend as _, Memory};
    use r3map_testkit::HeldPort;

    use super::*;
    use crate::open;

    fn err(url: &str) -> String {
        open(url, &OpenOptions::default()).unwrap_err().to_string()
    }

    fn ok(url: &str) -> Opened {
        open(url, &OpenOptions::default()).unwrap()
    }

    #[cfg(feature = "grpc")]
    #[test]
    fn grpc_urls_need_their_size() {
        let opts = OpenOptions { chunk_size: 4096, ..OpenOptions::default() };
        let err = open("grpc://127.0.0.1:1", &opts).err().unwrap().to_string();
        assert!(err.contains("?size=SIZE"), "{err}");
        let e = open("grpc://127.0.0.1:1?size=1MiB&colour=blue", &opts).err().unwrap().to_string();
        assert!(e.contains("unknown parameter 'colour'"), "{e}");
        let e = open("grpc:///?size=1MiB", &opts).err().unwrap().to_string();
        assert!(e.contains("needs a host"), "{e}");
    }

    #[cfg(feature = "net")]
    #[test]
    fn r3map_urls_name_what_is_missing() {
        let opts = OpenOptions { chunk_size: 4096, ..OpenOptions::default() };
        let nobody = HeldPort::new();
        let addr = nobody.addr().to_string();
        let err = open(&format!("r3map+plain://{addr}/default"), &opts).err().unwrap().to_string();
        assert!(err.contains(&addr), "{err}");
        let err = open("r3map://127.0.0.1:1/default", &opts).err().unwrap().to_string();
        assert!(err.contains("?ca=PATH"), "{err}");
    }

    #[cfg(feature = "net")]
    #[test]
    fn r3map_urls_open_an_r3map_server_on_the_given_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("r3map.sock");
        let backend: r3map_core::SharedBackend = Arc::new(Memory::new(65536));
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = {
            let _entered = runtime.enter();
            tokio::net::UnixListener::bind(&socket).unwrap()
        };
        let config = r3map_net::ServerConfig::new(
            r3map_net::Export::new("default", backend),
            r3map_net::ServerSecurity::Plaintext,
        );
        let server = r3map_net::Server::new(config).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served =
            runtime.spawn(async move { server.serve_unix(listener, async { drop(stopped.await) }).await });
        let io = r3map_net::Io::from_handle(runtime.handle().clone());
        let options = OpenOptions { io: Some(io), ..OpenOptions::default() };
        let opened = open(&format!("r3map+unix:///default?socket={}", socket.display()), &options).unwrap();
        assert_eq!(opened.backend.size(), 65536);
        assert!(
            opened.description.starts_with("r3map server r3map+unix:///default"),
            "{}",
            opened.description
        );
        opened.backend.write_at(b"there", 7).unwrap();
        let mut back = [0u8; 5];
        opened.backend.read_at(&mut back, 7).unwrap();
        assert_eq!(&back, b"there");
        drop(opened);
        stop.send(()).unwrap();
        runtime.block_on(served).unwrap().unwrap();
    }

    #[cfg(feature = "nbd")]
    #[test]
    fn nbd_urls_say_what_is_wrong() {
        let e = err("nbd://127.0.0.1:1/disk?colour=blue");
        assert!(e.contains("cannot open the backend") && e.contains("unknown parameter 'colour'"), "{e}");
        let e = err("nbd+unix:///disk");
        assert!(e.contains("?socket=PATH"), "{e}");
        let e = err("nbds://example.com/disk");
        assert!(e.contains("TLS needs the CA") && e.contains("tls-certificates=DIR"), "{e}");
        let e = err("nbd://example.com/disk?tls-certificates=/etc/pki");
        assert!(e.contains("use nbds:// for TLS"), "{e}");
        let nobody = HeldPort::new();
        let addr = nobody.addr();
        let e = err(&format!("nbd://{addr}/disk"));
        assert!(e.contains(&format!("NBD server at {addr}")), "{e}");
    }

    /// Serves `server` on a Unix socket at `socket` in a thread; sending on the channel stops it.
    #[cfg(feature = "nbd")]
    fn serve_nbd_unix(
        server: r3map_nbd::NbdServer,
        socket: &Path,
    ) -> (tokio::sync::oneshot::Sender<()>, std::thread::JoinHandle<std::io::Result<()>>) {
        let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            r3map_net::Io::shared().block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                server.serve_unix(listener, async { drop(stopped.await) }).await
            })
        });
        (stop, thread)
    }
    #[cfg(feature = "nbd")]
    #[test]
    fn nbd_urls_open_an_nbd_server() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let backend: r3map_core::SharedBackend = Arc::new(Memory::new(65536));
        let server = r3map_nbd::NbdServer::new(vec![r3map_nbd::NbdExport::new("disk", backend)]).unwrap();
        let (stop, thread) = serve_nbd_unix(server, &socket);
        let opened = ok(&format!("nbd+unix:///disk?socket={}", socket.display()));
        assert_eq!(opened.backend.size(), 65536);
        assert_eq!(opened.description, format!("NBD server unix:{} export 'disk'", socket.display()));
        let default = ok(&format!("nbd+unix:///?socket={}", socket.display()));
        assert!(default.description.ends_with("default export"), "{}", default.description);
        drop((opened, default));
        stop.send(()).unwrap();
        thread.join().unwrap().unwrap();
    }

    #[test]
    fn nbds_urls_open_an_nbd_server_over_tls() {
        let dir = tempfile::tempdir().unwrap();
        let ca = r3map_net::certs::Authority::new("cli test CA").unwrap();
        let pem = ca.server(&["localhost"]).unwrap();
        std::fs::write(dir.path().join("ca-cert.pem"), &ca.pem().cert).unwrap();
        let config = r3map_net::server_tls(pem.cert.as_bytes(), pem.key.as_bytes(), None).unwrap();
        let socket = dir.path().join("nbd.sock");
        let backend: r3map_core::SharedBackend = Arc::new(Memory::new(65536));
        let server = r3map_nbd::NbdServer::new(vec![r3map_nbd::NbdExport::new("disk", backend)])
            .unwrap()
            .with_tls(r3map_nbd::NbdTls { config, mode: r3map_nbd::TlsMode::Require });
        let (stop, thread) = serve_nbd_unix(server, &socket);
        let url = format!(
            "nbds+unix:///disk?socket={}&tls-certificates={}",
            socket.display(),
            dir.path().display()
        );
        let opened = ok(&url);
        assert_eq!(opened.backend.size(), 65536);
        assert_eq!(
            opened.description,
            format!("NBD server unix:{} export 'disk' over TLS", socket.display())
        );
        drop(opened);
        stop.send(()).unwrap();
        thread.join().unwrap().unwrap();
    }
}
