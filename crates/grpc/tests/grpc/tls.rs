//! TLS: a round trip with certificates made by rcgen, mutual TLS, and clients that must be
//! refused.

use std::io;
use std::sync::Arc;

use r3map_core::{Backend, Memory};
use r3map_grpc::{
    ClientTls, GrpcBackend, GrpcClientOptions, GrpcExport, GrpcSecurity, GrpcServer, ServerTls, TlsIdentity,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use crate::any_port;

/// A CA that signs leaf certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self { pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    fn leaf(&self, name: &str, sans: &[&str]) -> TlsIdentity {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        TlsIdentity::from_pem(cert.pem(), key.serialize_pem())
    }
}

fn tls_server(ca: &Ca, client_ca: Option<&Ca>) -> GrpcServer {
    let identity = ca.leaf("r3map test server", &["localhost", "127.0.0.1"]);
    let security =
        GrpcSecurity::Tls(ServerTls { identity, client_ca_pem: client_ca.map(|c| c.pem.clone().into()) });
    let export = GrpcExport { security, ..GrpcExport::new(Arc::new(Memory::new(1 << 20))) };
    GrpcServer::start(any_port(), export).unwrap()
}

fn https(server: &GrpcServer) -> String {
    format!("https://{}", server.local_addr())
}

fn options(tls: ClientTls) -> GrpcClientOptions {
    GrpcClientOptions { tls: Some(tls), ..GrpcClientOptions::default() }
}

fn round_trip(client: &GrpcBackend) {
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    client.write_at(&data, 1000).unwrap();
    let mut back = vec![0u8; data.len()];
    client.read_at(&mut back, 1000).unwrap();
    assert!(back == data);
    client.flush().unwrap();
}

#[test]
fn a_round_trip_over_tls() {
    let ca = Ca::new("r3map test CA");
    let server = tls_server(&ca, None);
    // By IP address (the certificate names 127.0.0.1) and by the name in the certificate.
    let client =
        GrpcBackend::connect(&https(&server), 1 << 20, options(ClientTls::new(ca.pem.clone()))).unwrap();
    round_trip(&client);
    let by_name = ClientTls { domain: Some("localhost".into()), ..ClientTls::new(ca.pem.clone()) };
    round_trip(&GrpcBackend::connect(&https(&server), 1 << 20, options(by_name)).unwrap());
}

#[test]
fn a_client_that_does_not_trust_the_servers_ca_is_refused() {
    let server = tls_server(&Ca::new("r3map test CA"), None);
    let stranger = Ca::new("some other CA");
    let err =
        GrpcBackend::connect(&https(&server), 1 << 20, options(ClientTls::new(stranger.pem))).unwrap_err();
    assert!(err.to_string().starts_with("cannot connect to https://"), "{err}");
    assert!(err.to_string().to_lowercase().contains("certificate"), "the cause is named: {err}");
}

#[test]
fn a_certificate_for_another_name_is_refused() {
    let ca = Ca::new("r3map test CA");
    let server = tls_server(&ca, None);
    let wrong = ClientTls { domain: Some("elsewhere.example".into()), ..ClientTls::new(ca.pem.clone()) };
    assert!(GrpcBackend::connect(&https(&server), 1 << 20, options(wrong)).is_err());
}

#[test]
fn mutual_tls_needs_a_client_certificate_from_the_client_ca() {
    let ca = Ca::new("r3map test CA");
    let clients = Ca::new("r3map client CA");
    let server = tls_server(&ca, Some(&clients));

    let with_cert = ClientTls {
        identity: Some(clients.leaf("r3map test client", &["client.r3map.test"])),
        ..ClientTls::new(ca.pem.clone())
    };
    round_trip(&GrpcBackend::connect(&https(&server), 1 << 20, options(with_cert)).unwrap());

    // No certificate, or one from another CA: the handshake (or the first call on it) fails.
    let stranger = Ca::new("some other CA");
    let bad_cert = ClientTls {
        identity: Some(stranger.leaf("intruder", &["intruder.example"])),
        ..ClientTls::new(ca.pem.clone())
    };
    for tls in [ClientTls::new(ca.pem.clone()), bad_cert] {
        let refused = GrpcBackend::connect(&https(&server), 1 << 20, options(tls))
            .and_then(|client| client.read_at(&mut [0u8; 1], 0));
        assert!(refused.is_err(), "a client without a valid certificate was served");
    }
}

#[test]
fn plaintext_and_tls_do_not_mix_by_accident() {
    let ca = Ca::new("r3map test CA");
    let server = tls_server(&ca, None);
    // A plaintext client against a TLS server fails rather than talking.
    let http = format!("http://{}", server.local_addr());
    let plain = GrpcBackend::connect(&http, 1 << 20, GrpcClientOptions::default())
        .and_then(|client| client.read_at(&mut [0u8; 1], 0));
    assert!(plain.is_err());
    // TLS settings with an http:// endpoint are refused before anything is sent.
    let err = GrpcBackend::connect(&http, 1 << 20, options(ClientTls::new(ca.pem.clone()))).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
}

#[test]
fn unusable_tls_material_is_refused_at_start() {
    let security = GrpcSecurity::Tls(ServerTls {
        identity: TlsIdentity::from_pem(b"not a certificate".to_vec(), b"not a key".to_vec()),
        client_ca_pem: None,
    });
    let export = GrpcExport { security, ..GrpcExport::new(Arc::new(Memory::new(1))) };
    let err = GrpcServer::start(any_port(), export).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");
}
