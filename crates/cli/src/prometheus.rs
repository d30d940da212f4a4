//! The Prometheus endpoint of `r3map serve` (and `ram-ul`, `r3map migrate`): the metrics recorder,
//! installed for the whole process, and a small HTTP server that answers every `GET` with the
//! scrape.
//!
//! The listener is bound by the caller, like the server's other listeners, so `--metrics
//! 127.0.0.1:0` works (the kernel picks a free port) and the address actually bound is the one
//! the server prints.

use std::io;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// How often histograms are compacted (what the exporter crate's own HTTP listener does).
const UPKEEP: Duration = Duration::from_secs(5);

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest request head read; a longer one is refused.
const MAX_HEAD: usize = 16 * 1024;

/// Installs the Prometheus recorder for this process and serves scrapes on `listener`, from tasks
/// of the current tokio runtime (they end with it).
///
/// # Errors
/// Another recorder is installed already.
pub(crate) fn serve(listener: TcpListener) -> anyhow::Result<()> {
    let handle =
        PrometheusBuilder::new().install_recorder().context("cannot install the metrics recorder")?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, handle).await {
                            tracing::debug!(%peer, error = %e, "a metrics request failed");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: the server's clients come first.
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    Ok(())
}

/// Answers one request and closes the connection: the scrape for a `GET` of any path (as the
/// exporter crate's listener does; `/metrics` is the documented one), 405 for other methods.
async fn answer(mut stream: TcpStream, handle: PrometheusHandle) -> io::Result<()> {
    let head = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request within 10 s"))??;
    let response = if head.starts_with(b"GET ") {
        let body = tokio::task::spawn_blocking(move || handle.render()).await.map_err(io::Error::other)?;
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_owned()
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Reads up to the blank line that ends a request's head.
async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !(head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n")) {
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the request head is too long"));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client left before its request ended",
            ));
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One request on a fresh connection to `addr`; the whole response.
    async fn request(addr: std::net::SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[test]
    fn scrapes_are_answered_on_the_port_the_kernel_picked() {
        r3map_net::Io::shared().block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            assert_ne!(addr.port(), 0);
            serve(listener).unwrap();
            metrics::counter!("r3map_prometheus_test_total").increment(3);
            let scrape = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(scrape.starts_with("HTTP/1.1 200 OK\r\n"), "{scrape}");
            assert!(scrape.contains("\r\nContent-Type: text/plain"), "{scrape}");
            assert!(scrape.contains("r3map_prometheus_test_total 3"), "{scrape}");
            let length: usize = scrape
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap();
            assert_eq!(length, scrape.split_once("\r\n\r\n").unwrap().1.len());
            let post = request(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
            assert!(post.starts_with("HTTP/1.1 405"), "{post}");
            // A second recorder cannot be installed in the same process.
            let again = TcpListener::bind("127.0.0.1:0").await.unwrap();
            assert!(serve(again).is_err());
        });
    }
}
