//! The device certificate authority of X.509 attestation, whose private key never leaves AWS
//! KMS (`ECC_NIST_P256`, `ECDSA_SHA_256`). Device certificates are built here (rcgen) and their
//! to-be-signed bytes are signed by `kms:Sign`.
//!
//! rcgen signs through a synchronous callback, and KMS is an HTTP call: so each certificate is
//! built twice with the same parameters (fixed serial, validity and key). The first build only
//! captures the exact bytes to sign; those are signed by KMS; the second build, byte for byte
//! the same, takes that signature (and refuses to sign anything else).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{MessageType, SigningAlgorithmSpec};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData, SerialNumber, SignatureAlgorithm, SigningKey, PKCS_ECDSA_P256_SHA256,
};
use x509_parser::prelude::FromDer;

use crate::aws::{classify, Failure};

/// Why a certificate could not be issued. Never carries key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    /// KMS throttled, unreachable or unavailable: a later attempt may pass.
    #[error("KMS unavailable: {0}")]
    Unavailable(String),
    /// KMS refused (access denied, disabled key, wrong key spec): configuration.
    #[error("KMS refused: {0}")]
    Refused(String),
    /// The CA certificate or the key does not fit (not P-256, not the KMS key's certificate).
    #[error("CA misconfigured: {0}")]
    Misconfigured(String),
    #[error("certificate not built: {0}")]
    Build(String),
}

impl CaError {
    pub fn from_failure(failure: Failure) -> Self {
        match failure {
            Failure::Throttled => Self::Unavailable("throttled".into()),
            Failure::Unavailable(what) => Self::Unavailable(what),
            Failure::Service(code) => Self::Refused(code),
        }
    }
}

/// A P-256 public key as rcgen takes it: the uncompressed point.
#[derive(Debug, Clone)]
pub struct P256PublicKey(Vec<u8>);

impl P256PublicKey {
    /// From a SubjectPublicKeyInfo (what KMS `GetPublicKey` returns).
    pub fn from_spki(der: &[u8]) -> Result<Self, CaError> {
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(der).map_err(|_| {
            CaError::Misconfigured("public key is not a SubjectPublicKeyInfo".into())
        })?;
        let point = spki.subject_public_key.data.to_vec();
        // 0x04 || X || Y: an uncompressed P-256 point.
        if point.len() != 65 || point[0] != 4 {
            return Err(CaError::Misconfigured(
                "the KMS key is not ECC_NIST_P256".into(),
            ));
        }
        Ok(Self(point))
    }
}

impl PublicKeyData for P256PublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.0
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// The KMS key as rcgen's signer, for one build: it records what it is asked to sign and
/// answers with `signature` if it has one for exactly those bytes.
struct Deferred {
    public: P256PublicKey,
    asked: Arc<Mutex<Option<Vec<u8>>>>,
    signature: Option<(Vec<u8>, Vec<u8>)>,
}

impl PublicKeyData for Deferred {
    fn der_bytes(&self) -> &[u8] {
        self.public.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl SigningKey for Deferred {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        if let Ok(mut asked) = self.asked.lock() {
            *asked = Some(msg.to_vec());
        }
        match &self.signature {
            Some((signed, signature)) if signed == msg => Ok(signature.clone()),
            Some(_) => Err(rcgen::Error::RemoteKeyError),
            // First build: any DER-shaped placeholder; the bytes are thrown away.
            None => Ok(vec![0x30, 0x00]),
        }
    }
}

/// An `ECC_NIST_P256` signing key in KMS.
#[derive(Clone)]
pub struct KmsKey {
    client: aws_sdk_kms::Client,
    key_id: String,
    public: P256PublicKey,
}

impl KmsKey {
    /// The key `key_id`, with its public key read from KMS.
    pub async fn new(client: aws_sdk_kms::Client, key_id: &str) -> Result<Self, CaError> {
        let out = client
            .get_public_key()
            .key_id(key_id)
            .send()
            .await
            .map_err(|e| CaError::from_failure(classify(&e)))?;
        let spki = out
            .public_key
            .ok_or_else(|| CaError::Misconfigured("KMS returned no public key".into()))?;
        Ok(Self {
            client,
            key_id: key_id.to_owned(),
            public: P256PublicKey::from_spki(spki.as_ref())?,
        })
    }

    pub fn public_key(&self) -> &P256PublicKey {
        &self.public
    }

    /// A PKCS #10 request for a CA certificate of this key (`common_name`), signed in KMS: what
    /// the operator's root signs to make the device CA (README: X.509 devices).
    pub async fn certificate_request(&self, common_name: &str) -> Result<String, CaError> {
        let params = || -> Result<CertificateParams, rcgen::Error> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            Ok(params)
        };
        let csr = self
            .signed(|signer| params()?.serialize_request(&signer))
            .await?;
        csr.pem().map_err(|e| CaError::Build(e.to_string()))
    }

    /// Builds with `build` twice: once to learn the exact bytes to sign, then, after KMS has
    /// signed them, again with that signature.
    async fn signed<T>(
        &self,
        build: impl Fn(Deferred) -> Result<T, rcgen::Error>,
    ) -> Result<T, CaError> {
        let failed = |e: rcgen::Error| CaError::Build(e.to_string());
        let asked = Arc::new(Mutex::new(None));
        build(Deferred {
            public: self.public.clone(),
            asked: Arc::clone(&asked),
            signature: None,
        })
        .map_err(failed)?;
        let tbs = asked
            .lock()
            .ok()
            .and_then(|a| a.clone())
            .ok_or_else(|| CaError::Build("nothing to sign".into()))?;
        let signature = self.sign(&tbs).await?;
        build(Deferred {
            public: self.public.clone(),
            asked: Arc::new(Mutex::new(None)),
            signature: Some((tbs, signature)),
        })
        .map_err(failed)
    }

    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, CaError> {
        let out = self
            .client
            .sign()
            .key_id(&self.key_id)
            .message(Blob::new(message))
            .message_type(MessageType::Raw)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(|e| CaError::from_failure(classify(&e)))?;
        out.signature
            .map(|s| s.into_inner())
            .ok_or_else(|| CaError::Unavailable("KMS returned no signature".into()))
    }
}

/// A device certificate and its key, as the device receives them.
pub struct DeviceCertificate {
    pub certificate_pem: String,
    /// PKCS#8 PEM. Wiped on drop; never logged.
    pub private_key_pem: zeroize::Zeroizing<String>,
    /// Hex, as recorded (random, 16 bytes, positive).
    pub serial: String,
    /// SHA-256 of the certificate's DER, hex: what DPS and IoT Hub call its thumbprint.
    pub fingerprint: String,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for DeviceCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCertificate")
            .field("serial", &self.serial)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// The intermediate CA: its certificate (configuration) and its KMS key.
pub struct KmsCa {
    key: KmsKey,
    /// The CA's own certificate.
    certificate: rustls_pki_types::CertificateDer<'static>,
    /// What devices present above their own certificate: the CA's certificate, then any
    /// intermediates up to the CA enrolled in DPS, PEM.
    chain_pem: String,
}

impl KmsCa {
    /// `chain_pem` starts with the certificate of `key_id`'s public key (checked), followed
    /// by the certificates above it that devices must present, if any.
    pub async fn new(
        client: aws_sdk_kms::Client,
        key_id: &str,
        chain_pem: &str,
    ) -> Result<Self, CaError> {
        let key = KmsKey::new(client, key_id).await?;
        let pem = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes())
            .map_err(|_| CaError::Misconfigured("CA certificate is not PEM".into()))?
            .1;
        let cert = pem
            .parse_x509()
            .map_err(|_| CaError::Misconfigured("CA certificate is not X.509".into()))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public.der_bytes() {
            return Err(CaError::Misconfigured(
                "the CA certificate is not for this KMS key".into(),
            ));
        }
        Ok(Self {
            key,
            certificate: rustls_pki_types::CertificateDer::from(pem.contents.clone()),
            chain_pem: chain_pem.trim().to_owned() + "\n",
        })
    }

    /// The chain devices present above their own certificate, PEM.
    pub fn chain_pem(&self) -> &str {
        &self.chain_pem
    }

    /// A client certificate for `common_name` (the DPS registration id) with a fresh P-256
    /// key, valid for `lifetime` from a minute ago (clock skew).
    pub async fn issue(
        &self,
        common_name: &str,
        lifetime: Duration,
    ) -> Result<DeviceCertificate, CaError> {
        let failed = |e: rcgen::Error| CaError::Build(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(failed)?;
        let mut serial = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
            .map_err(|_| CaError::Build("no randomness".into()))?;
        serial[0] &= 0x7f; // positive, as RFC 5280 wants
        let now = SystemTime::now();
        let not_before = now - Duration::from_secs(60);
        let not_after = now + lifetime;
        let params = || -> Result<CertificateParams, rcgen::Error> {
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.serial_number = Some(SerialNumber::from_slice(&serial));
            params.not_before = not_before.into();
            params.not_after = not_after.into();
            params.use_authority_key_identifier_extension = true;
            Ok(params)
        };
        let cert = self
            .key
            .signed(|signer| {
                let issuer = Issuer::from_ca_cert_der(&self.certificate, signer)?;
                params()?.signed_by(&key, &issuer)
            })
            .await?;
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.der());
        Ok(DeviceCertificate {
            certificate_pem: cert.pem(),
            private_key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
            serial: hex::encode(serial),
            fingerprint: hex::encode(digest.as_ref()),
            not_after,
        })
    }
}
