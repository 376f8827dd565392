//! The device CA whose key stays in KMS (moto's KMS signs with ECC_NIST_P256): device
//! certificates it issues chain to the operator's root through the intermediate whose key KMS
//! holds, as webpki (rustls' client-certificate verifier, what the DPS simulator and IoT Hub
//! stand-ins use) checks them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_kms::types::{KeySpec, KeyUsageType};
use local_emulators::fault_proxy::{FaultProxy, Mode};
use local_emulators::local_aws::{local_sdk_config, LocalAws};
use local_emulators::tls::{certificate_authority, roots_from_pem};
use rcgen::{BasicConstraints, CertificateSigningRequestParams, IsCa, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use shared::ca::{CaError, KmsCa, KmsKey};

const DAY: Duration = Duration::from_secs(86_400);

/// A KMS key and the intermediate CA certificate for it, made as the README tells an operator:
/// a certificate request signed in KMS (`KmsKey::certificate_request`), which the operator's
/// root signs as a CA; returns the key id, the intermediate's PEM and the root's PEM.
async fn intermediate(kms: &aws_sdk_kms::Client) -> (String, String, String) {
    let key_id = signing_key(kms, KeySpec::EccNistP256).await;
    let kms_key = KmsKey::new(kms.clone(), &key_id).await.unwrap();
    let request = kms_key
        .certificate_request("soracom-provisioning device CA")
        .await
        .unwrap();
    // Parsing verifies the request's signature: KMS signed exactly what rcgen built.
    let mut csr = CertificateSigningRequestParams::from_pem(&request).unwrap();
    csr.params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    csr.params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let (root, root_pem) = certificate_authority("operator root CA").unwrap();
    let cert = csr.signed_by(&root).unwrap();
    (key_id, cert.pem(), root_pem)
}

/// A new KMS signing key of `spec`; its id.
async fn signing_key(kms: &aws_sdk_kms::Client, spec: KeySpec) -> String {
    let key = kms
        .create_key()
        .key_spec(spec)
        .key_usage(KeyUsageType::SignVerify)
        .send()
        .await
        .unwrap();
    key.key_metadata.unwrap().key_id
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// webpki's verdict on `leaf` (with `intermediate`) as a client certificate under `root`.
fn verify(root: &str, leaf: &str, intermediate: &str) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(roots_from_pem(&[root]).unwrap());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .unwrap();
    verifier
        .verify_client_cert(&der(leaf), &[der(intermediate)], UnixTime::now())
        .map(|_| ())
}

#[tokio::test]
async fn device_certificates_signed_in_kms_chain_to_the_operators_root() {
    let aws = LocalAws::start().await.unwrap();
    let kms = aws_sdk_kms::Client::new(&aws.sdk_config().await);
    let (key_id, intermediate_pem, root_pem) = intermediate(&kms).await;
    let ca = KmsCa::new(kms.clone(), &key_id, &intermediate_pem)
        .await
        .unwrap();

    let issued = ca.issue("x509-kms-0001", 365 * DAY).await.unwrap();
    verify(&root_pem, &issued.certificate_pem, &intermediate_pem).expect("chains to the root");
    let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate_pem.as_bytes()).unwrap();
    let cert = pem.parse_x509().unwrap();
    let cn = cert.subject().iter_common_name().next().unwrap();
    assert_eq!(cn.as_str().unwrap(), "x509-kms-0001");
    assert_eq!(hex_of(cert.raw_serial()), issued.serial);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(lifetime, (365 * DAY).as_secs() as i64 + 60);
    // The key parses as the PKCS #8 key of the certificate's public key, and Debug hides it.
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(issued.private_key_pem.as_bytes())
        .expect("a PEM private key");
    assert!(matches!(key, rustls::pki_types::PrivateKeyDer::Pkcs8(_)));
    let pair = rcgen::KeyPair::from_pem(&issued.private_key_pem).unwrap();
    assert_eq!(
        pair.public_key_raw(),
        cert.public_key().subject_public_key.data.as_ref()
    );
    let body = issued.private_key_pem.lines().nth(1).unwrap();
    assert!(!format!("{issued:?}").contains(body));

    // Each device its own key and serial.
    let other = ca.issue("x509-kms-0002", DAY).await.unwrap();
    assert_ne!(other.serial, issued.serial);
    assert_ne!(*other.private_key_pem, *issued.private_key_pem);
    // Another root does not vouch for them.
    let (_, stranger) = certificate_authority("someone else's root").unwrap();
    assert!(verify(&stranger, &issued.certificate_pem, &intermediate_pem).is_err());
    assert!(issued.not_after > SystemTime::now() + 364 * DAY);
}

#[tokio::test]
async fn a_ca_certificate_for_another_key_or_an_unreachable_kms_issues_nothing() {
    let aws = LocalAws::start().await.unwrap();
    let kms = aws_sdk_kms::Client::new(&aws.sdk_config().await);
    let (key_id, intermediate_pem, root_pem) = intermediate(&kms).await;
    // The root's certificate is not the KMS key's: refused at start, not at the first device.
    match KmsCa::new(kms.clone(), &key_id, &root_pem).await {
        Err(CaError::Misconfigured(_)) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }

    let proxy = FaultProxy::start(aws.endpoint()).await.unwrap();
    let through = aws_sdk_kms::Client::new(&local_sdk_config(&proxy.endpoint()).await);
    let ca = KmsCa::new(through, &key_id, &intermediate_pem)
        .await
        .unwrap();
    proxy.set(Mode::Throttle);
    match ca.issue("x509-kms-0003", DAY).await {
        Err(CaError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {:?}", other.map(|c| c.serial)),
    }
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The whole X.509 path below the function: KMS issues, the function's DPS client presents
/// the certificate with its chain in the TLS handshake (no SAS token), and the DPS simulator,
/// with the operator's root enrolled, assigns the device its CN.
#[tokio::test]
async fn the_dps_client_registers_a_kms_issued_certificate_by_x509_attestation() {
    use dps_client::{register, tls_config_with_certificate, Attestation, RegistrationRequest};
    use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator};
    use shared::config::HostPort;

    let aws = LocalAws::start().await.unwrap();
    let kms = aws_sdk_kms::Client::new(&aws.sdk_config().await);
    let (key_id, intermediate_pem, root_pem) = intermediate(&kms).await;
    let ca = KmsCa::new(kms, &key_id, &intermediate_pem).await.unwrap();
    let device = "x509-kms-0100";
    let issued = ca.issue(device, DAY).await.unwrap();

    let mut config = DpsSimConfig::new(crate::dps_fixture::SCOPE);
    config.x509_cas.push(root_pem);
    let sim = DpsSimulator::start(config, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let endpoint = HostPort::parse(&format!("localhost:{}", sim.addr().port()), 8883).unwrap();
    let chain = format!("{}{}", issued.certificate_pem, intermediate_pem);
    let tls = tls_config_with_certificate(
        Some(sim.ca_pem().as_bytes()),
        &chain,
        &issued.private_key_pem,
    )
    .unwrap();
    let request = |registration_id| RegistrationRequest {
        endpoint: &endpoint,
        id_scope: crate::dps_fixture::SCOPE,
        registration_id,
        attestation: Attestation::X509,
        payload: None,
        tls: tls.clone(),
    };
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(10);

    let assignment = register(&request(device), deadline()).await.unwrap();
    assert_eq!(assignment.device_id, device);
    assert!(
        sim.accepted_signatures().is_empty(),
        "no SAS token was sent"
    );
    // The same certificate for another registration id: DPS refuses it at CONNACK.
    assert!(register(&request("x509-kms-0101"), deadline())
        .await
        .is_err());
    assert_eq!(sim.assigned().len(), 1);
}

/// `provisioning-admin ca request`, as an operator types it: the request is KMS-signed (its
/// signature verifies) and names the device CA.
#[tokio::test]
async fn the_operator_gets_a_kms_signed_request_for_the_device_ca() {
    use clap::Parser;
    use provisioning_admin::cli::{Cli, Command};

    let aws = LocalAws::start().await.unwrap();
    let kms = aws_sdk_kms::Client::new(&aws.sdk_config().await);
    let key_id = signing_key(&kms, KeySpec::EccNistP256).await;
    let cli = Cli::try_parse_from([
        "provisioning-admin",
        "ca",
        "request",
        "--kms-key-id",
        &key_id,
        "--common-name",
        "Fleet 7 device CA",
    ])
    .unwrap();
    let Command::Ca(ca) = &cli.command else {
        panic!("not a ca command");
    };
    let mut out = Vec::new();
    provisioning_admin::run_ca(ca, kms.clone(), &mut out)
        .await
        .unwrap();
    let pem = String::from_utf8(out).unwrap();
    let csr = CertificateSigningRequestParams::from_pem(&pem).expect("a valid, KMS-signed request");
    let names: Vec<String> = csr
        .params
        .distinguished_name
        .iter()
        .map(|(_, v)| format!("{v:?}"))
        .collect();
    assert!(
        names.iter().any(|n| n.contains("Fleet 7 device CA")),
        "{names:?}"
    );

    // An RSA or encryption key is no P-256 signing key: a usage error, nothing printed.
    let rsa = signing_key(&kms, KeySpec::Rsa2048).await;
    let cli =
        Cli::try_parse_from(["provisioning-admin", "ca", "request", "--kms-key-id", &rsa]).unwrap();
    let Command::Ca(ca) = &cli.command else {
        panic!("not a ca command");
    };
    let mut out = Vec::new();
    let err = provisioning_admin::run_ca(ca, kms, &mut out)
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 2, "{err}");
    assert!(out.is_empty());
}
