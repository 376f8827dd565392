//! The TLS identity a device connects with: a client certificate and key from PEM files, and the
//! roots it trusts for the server (a CA file, or the system roots for AWS IoT Core's Amazon Root
//! CA). Verification of the server is never turned off.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::DeviceError;

/// ALPN protocol AWS IoT Core needs for MQTT with client certificates on port 443.
const AWS_IOT_ALPN_443: &[u8] = b"x-amzn-mqtt-ca";

fn setup(message: String) -> DeviceError {
    DeviceError::Setup(message)
}

pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, DeviceError> {
    let bytes = std::fs::read(path)
        .map_err(|e| setup(format!("cannot read certificate {}: {e}", path.display())))?;
    certificates_from_pem(&bytes, &path.display().to_string())
}

pub fn certificates_from_pem(
    pem: &[u8],
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, DeviceError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|_| setup(format!("{what} is not a PEM certificate")))?;
    if certs.is_empty() {
        return Err(setup(format!("{what} holds no certificate")));
    }
    Ok(certs)
}

/// The key from a PEM file. Errors name the file, never its content.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, DeviceError> {
    let bytes = std::fs::read(path)
        .map_err(|e| setup(format!("cannot read private key {}: {e}", path.display())))?;
    private_key_from_pem(&bytes, &path.display().to_string())
}

pub fn private_key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, DeviceError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|_| {
        setup(format!(
            "{what} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)"
        ))
    })
}

fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, DeviceError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            for cert in read_certificates(path)? {
                roots
                    .add(cert)
                    .map_err(|e| setup(format!("CA {} rejected: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            if roots.is_empty() {
                return Err(setup(
                    "no system root certificates found; give --ca (Amazon Root CA 1 for AWS IoT)"
                        .into(),
                ));
            }
        }
    }
    Ok(roots)
}

/// A client configuration presenting `chain` and `key`.
pub fn client_config(
    ca_file: Option<&Path>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    port: u16,
) -> Result<Arc<ClientConfig>, DeviceError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| setup(e.to_string()))?
        .with_root_certificates(roots(ca_file)?)
        .with_client_auth_cert(chain, key)
        .map_err(|e| {
            setup(format!(
                "the certificate and key do not form a usable identity: {e}"
            ))
        })?;
    if port == 443 {
        config.alpn_protocols = vec![AWS_IOT_ALPN_443.to_vec()];
    }
    Ok(Arc::new(config))
}
