//! Transport security: TLS 1.3 configurations (rustls, aws-lc-rs) from PEM, and the stream type
//! both sides use.
//!
//! Authentication is a shared-secret token (sent inside TLS in the client's hello), a client
//! certificate signed by a CA the server trusts (mutual TLS), or both. Plaintext is never a
//! default: a server takes it only when told [`ServerSecurity::Plaintext`] or on a Unix socket.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};

/// A byte stream the protocol runs over (TCP, TLS over TCP, a Unix socket).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxedIo = Box<dyn Io>;

/// How a server protects TCP connections.
#[derive(Clone)]
pub enum ServerSecurity {
    /// TLS 1.3 with this configuration (from [`server_tls`]).
    Tls(Arc<rustls::ServerConfig>),
    /// No encryption. Only for trusted networks, and only when asked for.
    Plaintext,
}

impl fmt::Debug for ServerSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tls(_) => "Tls",
            Self::Plaintext => "Plaintext",
        })
    }
}

/// How a client protects a TCP connection.
#[derive(Clone)]
pub enum ClientSecurity {
    /// TLS 1.3; `server_name` overrides the host name the certificate is checked against.
    Tls { config: Arc<rustls::ClientConfig>, server_name: Option<String> },
    /// No encryption. Only for trusted networks, and only when asked for.
    Plaintext,
}

impl fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tls { server_name, .. } => f.debug_struct("Tls").field("server_name", server_name).finish(),
            Self::Plaintext => f.write_str("Plaintext"),
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parses every certificate in a PEM document.
///
/// # Errors
/// `InvalidInput` when it holds none or a malformed one.
pub fn certs_from_pem(pem: &[u8], what: &str) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(format!("the {what} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(format!("the {what} holds no certificate")));
    }
    Ok(certs)
}

/// Parses a private key (PKCS#8, PKCS#1 or SEC1) from PEM.
///
/// # Errors
/// `InvalidInput` when there is no usable key.
pub fn key_from_pem(pem: &[u8], what: &str) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem)
        .map_err(|e| invalid(format!("the {what} holds no usable private key: {e}")))
}

/// Reads a file, naming it in the error.
///
/// # Errors
/// The read error, with the path.
pub fn read_pem(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))
}

fn roots(ca_pem: &[u8], what: &str) -> io::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs_from_pem(ca_pem, what)? {
        roots.add(cert).map_err(|e| invalid(format!("the {what} cannot be used as a trust anchor: {e}")))?;
    }
    Ok(roots)
}

/// A TLS 1.3 server configuration from a certificate chain and key in PEM. With `client_ca_pem`,
/// clients must present a certificate signed by that CA (mutual TLS); they are refused during the
/// TLS handshake otherwise.
///
/// # Errors
/// `InvalidInput` for unusable PEM or a key that does not match the certificate.
pub fn server_tls(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> io::Result<Arc<rustls::ServerConfig>> {
    let chain = certs_from_pem(cert_pem, "server certificate")?;
    let key = key_from_pem(key_pem, "server key")?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(format!("TLS 1.3 is not available: {e}")))?;
    let builder = match client_ca_pem {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca, "client CA")?),
                provider(),
            )
            .build()
            .map_err(|e| invalid(format!("the client CA cannot verify clients: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| invalid(format!("the server certificate and key do not fit together: {e}")))?;
    Ok(Arc::new(config))
}

/// A TLS 1.3 client configuration that trusts `ca_pem`, presenting `identity` (certificate chain and
/// key PEM) to servers that ask for one.
///
/// # Errors
/// `InvalidInput` for unusable PEM.
pub fn client_tls(ca_pem: &[u8], identity: Option<(&[u8], &[u8])>) -> io::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| invalid(format!("TLS 1.3 is not available: {e}")))?
        .with_root_certificates(roots(ca_pem, "CA certificate")?);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                certs_from_pem(cert, "client certificate")?,
                key_from_pem(key, "client key")?,
            )
            .map_err(|e| invalid(format!("the client certificate and key do not fit together: {e}")))?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Compares two secrets in time that does not depend on where they differ.
#[must_use]
pub fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(same_secret(b"", b""));
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let err = server_tls(b"nonsense", b"nonsense", None).unwrap_err();
        assert!(err.to_string().contains("server certificate"), "{err}");
        let err = client_tls(b"", None).unwrap_err();
        assert!(err.to_string().contains("holds no certificate"), "{err}");
    }
}
