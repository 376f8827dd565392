//! Certificates for the simulators, made at run time: a throwaway CA and a server certificate
//! for `localhost` and `127.0.0.1`. Private keys live only in memory; only the CA certificate is
//! written out, for clients to trust.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::ServerConfig;

/// A CA and a server identity signed by it.
pub struct LocalPki {
    pub ca_pem: String,
    pub server: Arc<ServerConfig>,
}

#[derive(Debug, thiserror::Error)]
#[error("certificate setup failed: {0}")]
pub struct PkiError(String);

fn err(e: impl std::fmt::Display) -> PkiError {
    PkiError(e.to_string())
}

/// Makes a CA named `ca_name` and a server certificate for `names` (DNS names or IP addresses).
pub fn local_pki(ca_name: &str, names: &[&str]) -> Result<LocalPki, PkiError> {
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(err)?;
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_cert = params.signed_by(&server_key, &issuer).map_err(err)?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let chain: Vec<CertificateDer<'static>> =
        vec![server_cert.der().clone(), ca_cert.der().clone()];
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(err)?;
    Ok(LocalPki {
        ca_pem: ca_cert.pem(),
        server: Arc::new(server),
    })
}
