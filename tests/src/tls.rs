//! Certificates for the simulators, made at run time: throwaway CAs, a server certificate for
//! `localhost` and `127.0.0.1`, and the server configurations that use them. Private keys live
//! only in memory; only CA certificates are written out, for clients to trust.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

#[derive(Debug, Clone, Copy)]
enum ClientAuth {
    Required,
    Optional,
}

/// A CA and a server identity signed by it.
pub struct LocalPki {
    pub ca_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("certificate setup failed: {0}")]
pub struct PkiError(String);

fn err(e: impl std::fmt::Display) -> PkiError {
    PkiError(e.to_string())
}

/// A self-signed CA named `name`: the issuer (with its key, in memory) and its certificate PEM.
pub fn certificate_authority(name: &str) -> Result<(Issuer<'static, KeyPair>, String), PkiError> {
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(err)?;
    Ok((Issuer::new(params, key), cert.pem()))
}

/// The identifier AWS IoT gives a certificate: the hex SHA-256 of its DER encoding.
pub fn certificate_id(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Makes a CA named `ca_name` and a server certificate for `names` (DNS names or IP addresses).
pub fn local_pki(ca_name: &str, names: &[&str]) -> Result<LocalPki, PkiError> {
    let (issuer, ca_pem) = certificate_authority(ca_name)?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(err)?;
    let server_key = KeyPair::generate().map_err(err)?;
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = CertificateParams::new(names).map_err(err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_cert = params.signed_by(&server_key, &issuer).map_err(err)?;
    Ok(LocalPki {
        ca_pem,
        chain: vec![server_cert.der().clone(), ca_der],
        key_der: server_key.serialize_der(),
    })
}

impl LocalPki {
    /// A TLS server configuration with this identity. With `client_roots`, clients must present
    /// a certificate that chains to one of them and is within its validity period (checked
    /// against the system clock, as AWS IoT checks it); without, no client certificate is asked.
    pub fn server_config(
        &self,
        client_roots: Option<RootCertStore>,
    ) -> Result<Arc<ServerConfig>, PkiError> {
        self.server_config_for(client_roots.map(|roots| (roots, ClientAuth::Required)))
    }

    /// As [`Self::server_config`], with the client certificate asked for but optional: a
    /// client that presents one must chain to `client_roots` and be within its validity, a
    /// client that presents none proves itself otherwise (DPS: X.509 or SAS devices alike).
    pub fn server_config_optional_clients(
        &self,
        client_roots: RootCertStore,
    ) -> Result<Arc<ServerConfig>, PkiError> {
        self.server_config_for(Some((client_roots, ClientAuth::Optional)))
    }

    fn server_config_for(
        &self,
        clients: Option<(RootCertStore, ClientAuth)>,
    ) -> Result<Arc<ServerConfig>, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(err)?;
        let builder = match clients {
            Some((roots, auth)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider);
                let verifier = match auth {
                    ClientAuth::Required => verifier,
                    ClientAuth::Optional => verifier.allow_unauthenticated(),
                };
                builder.with_client_cert_verifier(verifier.build().map_err(err)?)
            }
            None => builder.with_no_client_auth(),
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()));
        let config = builder
            .with_single_cert(self.chain.clone(), key)
            .map_err(err)?;
        Ok(Arc::new(config))
    }
}

/// The common name of a DER certificate's subject, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The certificates in a PEM text, as trust roots.
pub fn roots_from_pem(pems: &[&str]) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.map_err(err)?).map_err(err)?;
        }
    }
    if roots.is_empty() {
        return Err(PkiError("no CA certificate given".into()));
    }
    Ok(roots)
}
