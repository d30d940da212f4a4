//! TLS settings of both sides, as PEM bytes (rustls with aws-lc-rs underneath, through tonic).

use std::fmt;
use std::io;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct TlsIdentity {
    /// The certificate chain, leaf first, PEM.
    pub cert_pem: Vec<u8>,
    /// The private key of the leaf certificate, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_pem: Vec<u8>,
}

impl TlsIdentity {
    /// An identity from a PEM certificate chain and key.
    pub fn from_pem(cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        Self { cert_pem: cert_pem.into(), key_pem: key_pem.into() }
    }

    fn to_tonic(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// How a server talks to its clients. There is no default: a server says which it wants.
#[derive(Clone, Debug)]
pub enum GrpcSecurity {
    /// Unencrypted HTTP/2 (h2c), what a Go r3map peer runs unless configured otherwise. Anyone on
    /// the path can read and change the data.
    Plaintext,
    /// TLS with the server's identity; with `client_ca_pem`, clients must present a certificate
    /// signed by that CA (mutual TLS).
    Tls(ServerTls),
}

/// Server side TLS settings.
#[derive(Clone, Debug)]
pub struct ServerTls {
    /// The server's certificate chain and key.
    pub identity: TlsIdentity,
    /// When set, clients must present a certificate signed by this CA (PEM); others are refused
    /// during the handshake.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl ServerTls {
    pub(crate) fn to_tonic(&self) -> ServerTlsConfig {
        let mut config = ServerTlsConfig::new().identity(self.identity.to_tonic());
        if let Some(ca) = &self.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        config
    }
}

/// Client side TLS settings: used with an `https://` endpoint.
#[derive(Clone)]
pub struct ClientTls {
    /// The CA (PEM, one or more certificates) the server's certificate must chain to. The system's
    /// roots are not used.
    pub ca_pem: Vec<u8>,
    /// A client certificate and key, for servers that require mutual TLS.
    pub identity: Option<TlsIdentity>,
    /// The name the server's certificate must carry, when it is not the endpoint's host.
    pub domain: Option<String>,
}

impl ClientTls {
    /// Trusts `ca_pem`, presents no client certificate and checks the endpoint's host name.
    pub fn new(ca_pem: impl Into<Vec<u8>>) -> Self {
        Self { ca_pem: ca_pem.into(), identity: None, domain: None }
    }

    pub(crate) fn into_tonic(self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&self.ca_pem));
        if let Some(identity) = &self.identity {
            config = config.identity(identity.to_tonic());
        }
        if let Some(domain) = self.domain {
            config = config.domain_name(domain);
        }
        config
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("identity", &self.identity)
            .field("domain", &self.domain)
            .finish()
    }
}

/// Checks that the endpoint's scheme and the TLS settings agree, so that a forgotten `https` never
/// sends data in the clear and a missing TLS setting fails with a clear message.
pub(crate) fn check_scheme(endpoint: &str, tls: Option<&ClientTls>) -> io::Result<()> {
    let https = endpoint.starts_with("https://");
    let http = endpoint.starts_with("http://");
    match (tls.is_some(), https, http) {
        (true, true, _) | (false, _, true) => Ok(()),
        (true, false, _) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("TLS settings were given but the endpoint {endpoint} is not https://"),
        )),
        (false, true, _) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the endpoint {endpoint} is https:// but no TLS settings were given"),
        )),
        (false, false, false) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the endpoint {endpoint} must start with http:// or https://"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheme_and_tls_must_agree() {
        let tls = ClientTls::new(b"ca".to_vec());
        assert!(check_scheme("http://127.0.0.1:1", None).is_ok());
        assert!(check_scheme("https://localhost:1", Some(&tls)).is_ok());
        for (endpoint, tls) in
            [("http://h:1", Some(&tls)), ("https://h:1", None), ("h:1", None), ("grpc://h:1", Some(&tls))]
        {
            let err = check_scheme(endpoint, tls).expect_err(endpoint);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let id = TlsIdentity::from_pem(b"cert".to_vec(), b"very secret".to_vec());
        let text = format!("{:?}", ClientTls { identity: Some(id), ..ClientTls::new(b"ca".to_vec()) });
        assert!(!text.contains("secret") && text.contains("redacted"), "{text}");
    }
}
