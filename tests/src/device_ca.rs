//! The X.509 device CA as an operator sets it up (azure-dps-register's README): a KMS key
//! (`ECC_NIST_P256`) whose certificate request, signed in KMS, the operator's root signs as a
//! CA that may sign only end entities. For the tests and `make bench` against the local
//! endpoint's KMS.

use aws_sdk_kms::types::{KeySpec, KeyUsageType};
use rcgen::{
    BasicConstraints, CertificateSigningRequestParams, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use shared::ca::KmsKey;

use crate::tls::certificate_authority;

/// The device CA: its KMS key, its certificate, and the operator's root above it.
pub struct DeviceCa {
    pub key_id: String,
    pub intermediate_pem: String,
    pub root_pem: String,
    root: Issuer<'static, KeyPair>,
    request_pem: String,
}

impl DeviceCa {
    /// The device CA's certificate renewed by the same root for the same KMS key, as an
    /// operator does before the first one expires: another serial, the same key.
    pub fn renewed(&self) -> Result<String, String> {
        intermediate(&self.request_pem, &self.root)
    }
}

/// The root's certificate for the device CA's key, from its KMS-signed request.
fn intermediate(request_pem: &str, root: &Issuer<'static, KeyPair>) -> Result<String, String> {
    // Parsing verifies the request's signature: KMS signed exactly what rcgen built.
    let mut csr =
        CertificateSigningRequestParams::from_pem(request_pem).map_err(|e| e.to_string())?;
    csr.params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    csr.params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut serial = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| "no randomness for a serial".to_owned())?;
    serial[0] &= 0x7f; // a positive INTEGER
    csr.params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(csr.signed_by(root).map_err(|e| e.to_string())?.pem())
}

/// A new KMS signing key of `spec`; its id.
pub async fn signing_key(kms: &aws_sdk_kms::Client, spec: KeySpec) -> Result<String, String> {
    let key = kms
        .create_key()
        .key_spec(spec)
        .key_usage(KeyUsageType::SignVerify)
        .send()
        .await
        .map_err(|e| format!("CreateKey: {e}"))?;
    key.key_metadata
        .map(|m| m.key_id)
        .ok_or_else(|| "CreateKey returned no key".to_owned())
}

/// A new device CA in `kms`, its certificate made through `KmsKey::certificate_request`.
pub async fn kms_device_ca(kms: &aws_sdk_kms::Client) -> Result<DeviceCa, String> {
    let key_id = signing_key(kms, KeySpec::EccNistP256).await?;
    let kms_key = KmsKey::new(kms.clone(), &key_id)
        .await
        .map_err(|e| e.to_string())?;
    let request = kms_key
        .certificate_request("soracom-provisioning device CA")
        .await
        .map_err(|e| e.to_string())?;
    let (root, root_pem) = certificate_authority("operator root CA").map_err(|e| e.to_string())?;
    Ok(DeviceCa {
        key_id,
        intermediate_pem: intermediate(&request, &root)?,
        root_pem,
        root,
        request_pem: request,
    })
}
