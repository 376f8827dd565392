//! The official Azure IoT device SDKs (Python, Node.js) registering through the DPS simulator.

use std::sync::atomic::Ordering;
use std::time::Duration;

use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator};
use local_emulators::local_aws::random_key_base64;
use serde_json::json;
use shared::keys::SymmetricKey;

use crate::dps_fixture::*;

/// The JSON result an interop script prints for a registration the SDK reports `assigned`.
fn assigned(output: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["status"], "assigned");
    result
}

/// The official Azure IoT Python SDK (`azure-iot-device`) through the simulator, which
/// must accept what real devices send (its `sr` encoding, no `skn`, TLS 1.2, persistent session).
mod official_python_sdk {
    use super::*;
    use local_emulators::local_aws::venv_bin;

    /// The Python SDK always dials port 8883: one test, one simulator on it.
    const SDK_PORT: u16 = 8883;

    /// How the device proves itself: a SAS token of a symmetric key, or an X.509 certificate
    /// (PEM chain file and key file) in the TLS handshake.
    enum Proof<'a> {
        Key(&'a SymmetricKey),
        Certificate(&'a std::path::Path, &'a std::path::Path),
    }

    async fn run_sdk(
        ca: &std::path::Path,
        registration_id: &str,
        proof: Proof<'_>,
        payload: &str,
    ) -> std::process::Output {
        let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("interop/python_dps_register.py");
        let mut command = tokio::process::Command::new(venv_bin("python"));
        command
            .arg(script)
            .args(["--host", "localhost", "--scope", SCOPE])
            .args(["--registration-id", registration_id, "--payload", payload])
            .arg("--ca")
            .arg(ca)
            .kill_on_drop(true);
        match proof {
            Proof::Key(key) => command.args(["--key", &key.to_base64()]),
            Proof::Certificate(cert, key) => {
                command.arg("--cert").arg(cert).arg("--cert-key").arg(key)
            }
        };
        tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("the SDK finished within 60 s")
            .expect("python from .venv (run `make tools`)")
    }

    async fn listen_on_sdk_port(config: DpsSimConfig) -> DpsSimulator {
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], SDK_PORT));
        DpsSimulator::start(config, listen)
            .await
            .unwrap_or_else(|e| panic!("port {SDK_PORT} must be free for the Python SDK test: {e}"))
    }

    #[tokio::test]
    async fn python_sdk_registers_with_a_key_or_a_certificate_and_is_refused_otherwise() {
        let group_key = SymmetricKey::from_base64(&random_key_base64()).unwrap();
        let (enrolled, enrolled_pem) =
            local_emulators::tls::certificate_authority("enrolled device CA").unwrap();
        let mut config = DpsSimConfig::new(SCOPE);
        config.group_keys.push(group_key.clone());
        config.x509_cas.push(enrolled_pem);
        config.retry_after = 1;
        config.return_data = Some(json!({"tier": "gold"}));
        let sim = listen_on_sdk_port(config).await;
        let dir = local_emulators::stack::temp_dir("dps-sdk").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, sim.ca_pem()).unwrap();

        let output = run_sdk(
            &ca,
            IMSI,
            Proof::Key(&group_key.derive_device_key(IMSI)),
            r#"{"modelId":"dtmi:demo;1"}"#,
        )
        .await;
        let result = assigned(&output);
        assert_eq!(result["deviceId"], IMSI);
        assert_eq!(result["payload"], json!({"tier": "gold"}));
        assert_eq!(
            sim.assigned()[0].payload,
            Some(json!({"modelId": "dtmi:demo;1"}))
        );

        let wrong = SymmetricKey::from_base64(&random_key_base64()).unwrap();
        let refused = run_sdk(&ca, IMSI, Proof::Key(&wrong), "{}").await;
        assert!(!refused.status.success());
        assert!(sim.stats().refused.load(Ordering::Relaxed) >= 1);
        assert_eq!(sim.assigned().len(), 1);

        registers_with_x509(&sim, &ca, &enrolled).await;
    }

    /// X.509 attestation (`ProvisioningDeviceClient.create_from_x509_certificate`): a device
    /// certificate issued by the enrolled CA registers as its CN; one whose CN is not the
    /// registration id, one from another CA and an expired one are refused.
    /// Runs after the SAS registrations, on the same simulator (the SDK's port is fixed):
    /// `enrolled` is the CA the simulator has as an X.509 enrollment group.
    async fn registers_with_x509(
        sim: &DpsSimulator,
        ca: &std::path::Path,
        enrolled: &rcgen::Issuer<'static, rcgen::KeyPair>,
    ) {
        use local_emulators::tls::certificate_authority;
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};

        let (stranger, _) = certificate_authority("some other CA").unwrap();
        let dir = local_emulators::stack::temp_dir("dps-x509").unwrap();
        let assigned_before = sim.assigned().len();
        let signatures_before = sim.accepted_signatures().len();
        // A device certificate for `cn` issued by `issuer`, valid from `from` to `until` days
        // from now; written as NAME.pem / NAME.key.
        let issue = |name: &str,
                     cn: &str,
                     issuer: &rcgen::Issuer<'static, KeyPair>,
                     from: i64,
                     until: i64| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now + time::Duration::days(from);
            params.not_after = now + time::Duration::days(until);
            let cert = params.signed_by(&key, issuer).unwrap();
            let (cert_path, key_path) = (
                dir.path().join(format!("{name}.pem")),
                dir.path().join(format!("{name}.key")),
            );
            std::fs::write(&cert_path, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            (cert_path, key_path)
        };
        let device = "x509-device-0001";
        let good = issue("good", device, enrolled, -1, 365);
        let other_cn = issue("other-cn", "x509-device-0002", enrolled, -1, 365);
        let other_ca = issue("other-ca", device, &stranger, -1, 365);
        let expired = issue("expired", device, enrolled, -30, -1);

        let output = run_sdk(ca, device, Proof::Certificate(&good.0, &good.1), "{}").await;
        assert_eq!(assigned(&output)["deviceId"], device);
        // No SAS token was presented: no signature recorded for it.
        assert_eq!(sim.accepted_signatures().len(), signatures_before);

        // Refused where DPS refuses: a certificate that does not verify ends the TLS handshake
        // (no MQTT connection); a verified one for another registration id is not authorized
        // at CONNACK.
        let counter = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        for (what, (cert, key), at_connack) in [
            ("CN is not the registration id", &other_cn, true),
            ("another CA", &other_ca, false),
            ("expired", &expired, false),
        ] {
            let (connections, refused_before) = (
                counter(&sim.stats().connections),
                counter(&sim.stats().refused),
            );
            let refused = run_sdk(ca, device, Proof::Certificate(cert, key), "{}").await;
            assert!(!refused.status.success(), "{what}: registered");
            let connected = counter(&sim.stats().connections) > connections;
            let refused_at_connack = counter(&sim.stats().refused) > refused_before;
            assert_eq!(
                (connected, refused_at_connack),
                (at_connack, at_connack),
                "{what}"
            );
        }
        assert_eq!(sim.assigned().len(), assigned_before + 1);
    }
}

/// The official Azure IoT Node.js SDK (the one the original write-up's Lambda used) through the
/// simulator: `sr` unencoded, `skn=registration`, `&ClientVersion=` in the user name, TLS 1.3.
mod official_node_sdk {
    use super::*;

    async fn run_sdk(
        sim: &DpsSimulator,
        ca: &std::path::Path,
        key: &SymmetricKey,
    ) -> std::process::Output {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop");
        let mut command = tokio::process::Command::new("node");
        command
            .current_dir(&dir)
            .arg("node_dps_register.js")
            .args(["--host", &format!("localhost:{}", sim.addr().port())])
            .args([
                "--scope",
                SCOPE,
                "--registration-id",
                IMSI,
                "--key",
                &key.to_base64(),
            ])
            .args(["--payload", r#"{"modelId":"dtmi:demo;1"}"#])
            .env("NODE_EXTRA_CA_CERTS", ca)
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("the SDK finished within 60 s")
            .expect("node on PATH and tests/interop/node_modules (run `make tools`)")
    }

    #[tokio::test]
    async fn node_sdk_registers_and_is_refused_with_a_wrong_key() {
        let f = simulator(|c| {
            c.retry_after = 1;
            c.return_data = Some(json!({"tier": "gold"}));
        })
        .await;
        let dir = local_emulators::stack::temp_dir("dps-node").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, f.sim.ca_pem()).unwrap();

        let output = run_sdk(&f.sim, &ca, &f.group_key.derive_device_key(IMSI)).await;
        let result = assigned(&output);
        assert_eq!(result["deviceId"], IMSI);
        assert_eq!(result["payload"], json!({"tier": "gold"}));
        assert_eq!(
            f.sim.assigned()[0].payload,
            Some(json!({"modelId": "dtmi:demo;1"}))
        );

        let wrong = SymmetricKey::from_base64(&random_key_base64()).unwrap();
        let refused = run_sdk(&f.sim, &ca, &wrong).await;
        assert!(!refused.status.success());
        assert_eq!(f.sim.stats().refused.load(Ordering::Relaxed), 1);
        assert_eq!(f.sim.assigned().len(), 1);
    }
}
