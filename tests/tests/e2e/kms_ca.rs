//! The device CA whose key stays in KMS (moto's KMS signs with ECC_NIST_P256): device
//! certificates it issues chain to the operator's root through the intermediate whose key KMS
//! holds, as webpki (rustls' client-certificate verifier, what the DPS simulator and IoT Hub
//! stand-ins use) checks them.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_kms::types::KeySpec;
use local_emulators::device_ca::kms_device_ca;
use local_emulators::fault_proxy::{FaultProxy, Mode};
use local_emulators::local_aws::{local_sdk_config, LocalAws};
use local_emulators::tls::{certificate_authority, roots_from_pem};
use rcgen::CertificateSigningRequestParams;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use shared::ca::{CaError, KmsCa};

const DAY: Duration = Duration::from_secs(86_400);

/// A KMS key and the intermediate CA certificate for it, made as the README tells an operator;
/// returns the key id, the intermediate's PEM and the root's PEM.
async fn intermediate(kms: &aws_sdk_kms::Client) -> (String, String, String) {
    let ca = kms_device_ca(kms).await.unwrap();
    (ca.key_id, ca.intermediate_pem, ca.root_pem)
}

async fn signing_key(kms: &aws_sdk_kms::Client, spec: KeySpec) -> String {
    local_emulators::device_ca::signing_key(kms, spec)
        .await
        .unwrap()
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

/// `ATTESTATION=x509` end to end: the function's real state (KMS and SSM at the local AWS
/// endpoint, the device table in moto) and the DPS simulator with the operator's root as its
/// X.509 enrollment group.
mod function {
    use std::collections::HashMap;

    use aws_sdk_ssm::types::ParameterType;
    use azure_dps_register::config::Config;
    use azure_dps_register::handler::{handle, Response};
    use azure_dps_register::state::State;
    use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator};
    use local_emulators::stack::TempDir;
    use serde_json::json;
    use shared::registry::{DynamoRegistry, SimRegistry};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::azure_dps_register::context;

    const IMSI: &str = "440103123450001";
    const CA_PARAMETER: &str = "/soracom-dps/device-ca";

    struct X509Setup {
        aws: LocalAws,
        ca: local_emulators::device_ca::DeviceCa,
        root_pem: String,
        dps: DpsSimulator,
        config: Config,
        state: State,
        _dir: TempDir,
    }

    /// The function with its CA in KMS; DPS enrols `enrolled` (the operator's root if `None`).
    async fn setup(enrolled: Option<String>) -> X509Setup {
        setup_with(enrolled, &[]).await
    }

    /// As `setup`, with more of the function's settings.
    async fn setup_with(enrolled: Option<String>, settings: &[(&str, &str)]) -> X509Setup {
        let aws = LocalAws::start().await.unwrap();
        aws.create_devices_table("devices").await.unwrap();
        let kms = aws_sdk_kms::Client::new(&aws.sdk_config().await);
        let ca = kms_device_ca(&kms).await.unwrap();
        let (key_id, root_pem) = (ca.key_id.clone(), ca.root_pem.clone());
        aws.put_parameter(CA_PARAMETER, &ca.intermediate_pem, ParameterType::String)
            .await
            .unwrap();
        let mut config = DpsSimConfig::new("0ne00X50901");
        config
            .x509_cas
            .push(enrolled.unwrap_or_else(|| root_pem.clone()));
        let dps = DpsSimulator::start(config, "127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let dir = local_emulators::stack::temp_dir("x509-function").unwrap();
        let dps_ca = dir.path().join("dps-ca.pem");
        std::fs::write(&dps_ca, dps.ca_pem()).unwrap();
        let env: HashMap<String, String> = [
            ("ATTESTATION", "x509".to_owned()),
            ("CA_KMS_KEY_ID", key_id.clone()),
            ("CA_CERTIFICATE_PARAMETER", CA_PARAMETER.to_owned()),
            ("DPS_ID_SCOPE", "0ne00X50901".to_owned()),
            ("DPS_ENDPOINT", format!("127.0.0.1:{}", dps.addr().port())),
            ("DPS_TRUSTED_CA_FILE", dps_ca.display().to_string()),
            ("DEVICES_TABLE", "devices".to_owned()),
        ]
        .into_iter()
        .chain(settings.iter().map(|(k, v)| (*k, (*v).to_owned())))
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let config = Config::from_env(&env).unwrap();
        let state = State::new(config.clone(), &aws.sdk_config().await).unwrap();
        X509Setup {
            aws,
            ca,
            root_pem,
            dps,
            config,
            state,
            _dir: dir,
        }
    }

    async fn call(s: &X509Setup, body: serde_json::Value) -> Response {
        let client_context = json!({"custom": {
            "imsi": IMSI, "operatorId": "OP0012345678",
            "srn": format!("srn:soracom:OP0012345678:jp:Subscriber:{IMSI}"),
        }});
        handle(
            body,
            &context(&client_context, Duration::from_secs(10)),
            &s.state,
        )
        .await
    }

    async fn recorded(s: &X509Setup) -> Option<shared::registry::Registration> {
        let registry = DynamoRegistry::new(
            aws_sdk_dynamodb::Client::new(&s.aws.sdk_config().await),
            "devices",
        );
        let entries = registry.sim(IMSI, None).await.unwrap();
        entries.by_imsi.and_then(|r| r.registration)
    }

    /// The SIM's recorded certificate as if issued a day earlier (MIN_ROTATION_HOURS'
    /// default): its device may rotate.
    async fn a_day_later(s: &X509Setup) {
        let registry = DynamoRegistry::new(
            aws_sdk_dynamodb::Client::new(&s.aws.sdk_config().await),
            "devices",
        );
        let id = shared::registry::DeviceId::Sim(IMSI.into());
        let mut record = registry.get(&id).await.unwrap().unwrap();
        if let Some(c) = record
            .registration
            .as_mut()
            .and_then(|r| r.certificate.as_mut())
        {
            c.expires_at -= 86_400;
        }
        registry.put(&record).await.unwrap();
    }

    /// A TLS server like IoT Hub's for X.509 devices (client certificate required, chaining to
    /// the operator's root): what CN the device's handshake proves.
    async fn hub_handshake(root_pem: &str, answer: &Response) -> Result<String, String> {
        let pki = local_emulators::tls::local_pki("hub CA", &["127.0.0.1"]).unwrap();
        let roots = roots_from_pem(&[root_pem]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(Some(roots)).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let cn = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| local_emulators::tls::common_name(c))
                .ok_or("no client certificate")?;
            tls.write_all(b"ok").await.map_err(|e| e.to_string())?;
            Ok::<String, String>(cn)
        });
        // Exactly what the device was given: its certificate, then the chain, and its key.
        let chain = format!(
            "{}{}",
            answer.certificate_pem.as_deref().unwrap(),
            answer.ca_chain_pem.as_deref().unwrap()
        );
        let tls = dps_client::TrustedRoots::load(Some(pki.ca_pem.as_bytes()))
            .unwrap()
            .config_with_certificate(&chain, answer.private_key_pem.as_deref().unwrap())
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut client = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut ok = [0u8; 2];
        client
            .read_exact(&mut ok)
            .await
            .map_err(|e| e.to_string())?;
        server.await.unwrap()
    }

    #[tokio::test]
    async fn a_sim_gets_a_kms_signed_certificate_that_dps_and_a_hub_accept() {
        let s = setup(None).await;
        let r = call(&s, json!({})).await;
        assert_eq!(r.status_code, 200, "{}", r.outline());
        assert_eq!(
            r.body,
            format!(
                "HostName={};DeviceId={IMSI};x509=true",
                r.assigned_hub.clone().unwrap()
            )
        );
        let assigned = s.dps.assigned();
        assert_eq!(assigned.len(), 1);
        assert_eq!(assigned[0].registration_id, IMSI);
        // The certificate chains to the operator's root through the KMS-held intermediate.
        let certificate = r.certificate_pem.clone().unwrap();
        let chain = r.ca_chain_pem.clone().unwrap();
        verify(&s.root_pem, &certificate, &chain).expect("chains to the root");
        // The record names it (serial, thumbprint, expiry), never its key.
        let (_, pem) = x509_parser::pem::parse_x509_pem(certificate.as_bytes()).unwrap();
        let parsed = pem.parse_x509().unwrap();
        let issued = recorded(&s).await.unwrap().certificate.unwrap();
        assert_eq!(issued.serial, hex_of(parsed.raw_serial()));
        assert_eq!(issued.expires_at, r.expires_at.unwrap());
        assert_eq!(
            parsed.validity().not_after.timestamp() as u64,
            issued.expires_at
        );
        assert_eq!(
            issued.fingerprint,
            local_emulators::tls::certificate_id(&pem.contents)
        );

        // The device side: the answer as it is makes a TLS connection to a hub that trusts
        // the operator's root, as the device with that CN.
        assert_eq!(hub_handshake(&s.root_pem, &r).await, Ok(IMSI.to_owned()));

        // It asks again: keep it. Asking to rotate: a new one, recorded in its place.
        let again = call(&s, json!({})).await;
        assert_eq!(
            (again.status_code, again.error),
            (409, Some("certificate-current"))
        );
        a_day_later(&s).await;
        let rotated = call(&s, json!({"rotate": true})).await;
        assert_eq!(rotated.status_code, 200, "{}", rotated.outline());
        assert_ne!(rotated.private_key_pem, r.private_key_pem);
        let last = recorded(&s).await.unwrap().certificate.unwrap();
        assert_ne!(last.serial, issued.serial);
        assert_eq!(s.dps.assigned().len(), 2);
        // Both stay valid in IoT Hub until they expire: operators see both (what
        // `provisioning-admin certificates list` prints).
        let registry = DynamoRegistry::new(
            aws_sdk_dynamodb::Client::new(&s.aws.sdk_config().await),
            "devices",
        );
        let now = shared::clock::unix_now();
        let mut listed: Vec<String> = registry
            .certificates(now)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.serial)
            .collect();
        listed.sort();
        let mut both = vec![issued.serial.clone(), last.serial.clone()];
        both.sort();
        assert_eq!(listed, both);
        assert!(registry
            .certificates(last.expires_at)
            .await
            .unwrap()
            .is_empty());
    }

    /// The operator renews the device CA's certificate and puts it where the function reads it.
    async fn renew_in_ssm(s: &X509Setup) -> String {
        let renewed = s.ca.renewed().unwrap();
        s.aws
            .put_parameter(CA_PARAMETER, &renewed, ParameterType::String)
            .await
            .unwrap();
        renewed
    }

    #[tokio::test]
    async fn a_renewed_ca_certificate_in_ssm_reaches_a_warm_instance() {
        // The CA certificate is read again at every certificate (SECRET_CACHE_SECONDS=0), as
        // a warm instance does once its copy is that old.
        let mut s = setup_with(None, &[("SECRET_CACHE_SECONDS", "0")]).await;
        let proxy = FaultProxy::start(s.aws.endpoint()).await.unwrap();
        s.state = State::new(s.config.clone(), &local_sdk_config(&proxy.endpoint()).await).unwrap();
        let first = call(&s, json!({})).await;
        assert_eq!(first.status_code, 200, "{}", first.outline());
        assert_eq!(
            first.ca_chain_pem.as_deref(),
            Some(s.ca.intermediate_pem.as_str())
        );

        // The operator renews the device CA's certificate (same KMS key, same root).
        let renewed = renew_in_ssm(&s).await;
        assert_ne!(renewed, s.ca.intermediate_pem);
        a_day_later(&s).await;
        let next = call(&s, json!({"rotate": true})).await;
        assert_eq!(next.status_code, 200, "{}", next.outline());
        assert_eq!(next.ca_chain_pem.as_deref(), Some(renewed.as_str()));
        let certificate = next.certificate_pem.clone().unwrap();
        verify(&s.root_pem, &certificate, &renewed).expect("chains through the renewed CA");
        assert_eq!(hub_handshake(&s.root_pem, &next).await, Ok(IMSI.to_owned()));

        // SSM stops answering that parameter: the CA in use goes on issuing. (Another renewal
        // waits in SSM meanwhile: the function issuing under it would mean it read SSM.)
        proxy.set(Mode::ThrottleOperation("AmazonSSM.GetParameter"));
        let unread = renew_in_ssm(&s).await;
        assert_ne!(unread, renewed);
        a_day_later(&s).await;
        let during = call(&s, json!({"rotate": true})).await;
        assert_eq!(during.status_code, 200, "{}", during.outline());
        assert_eq!(during.ca_chain_pem.as_deref(), Some(renewed.as_str()));
        assert_eq!(s.dps.assigned().len(), 3);
    }

    #[tokio::test]
    async fn kms_refusing_or_silent_or_a_ca_dps_does_not_know_issues_and_records_nothing() {
        // The role may not sign (IAM's AccessDenied on kms:Sign), then KMS stops answering.
        let mut s = setup(None).await;
        let proxy = FaultProxy::start(s.aws.endpoint()).await.unwrap();
        s.state = State::new(s.config.clone(), &local_sdk_config(&proxy.endpoint()).await).unwrap();
        for mode in [
            Mode::DenyOperation("TrentService.Sign"),
            Mode::SlowOperation {
                target: "TrentService.Sign",
                containing: "",
                delay: Duration::from_secs(30),
            },
        ] {
            proxy.set(mode);
            let r = call(&s, json!({})).await;
            assert_eq!(
                (r.status_code, r.error),
                (503, Some("ca-unavailable")),
                "{}",
                r.outline()
            );
            assert!(r.retry_after.is_some() && r.private_key_pem.is_none());
        }
        assert!(s.dps.assigned().is_empty());
        assert_eq!(recorded(&s).await, None);

        // DPS enrols another CA: the certificate is refused in its handshake.
        let (_, stranger) = certificate_authority("someone else's root").unwrap();
        let s = setup(Some(stranger)).await;
        let r = call(&s, json!({})).await;
        assert_eq!(r.status_code, 502, "{}", r.outline());
        assert!(r.private_key_pem.is_none());
        assert!(s.dps.assigned().is_empty());
        assert_eq!(recorded(&s).await, None);
    }
}
