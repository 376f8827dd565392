//! The official Azure IoT device SDKs (Python, Node.js) registering through the DPS simulator.

use std::sync::atomic::Ordering;
use std::time::Duration;

use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator};
use local_emulators::local_aws::random_key_base64;
use serde_json::json;
use shared::keys::SymmetricKey;

use crate::dps_fixture::*;

/// must accept what real devices send (its `sr` encoding, no `skn`, TLS 1.2, persistent session).
mod official_python_sdk {
    use super::*;
    use local_emulators::local_aws::venv_bin;

    /// The Python SDK always dials port 8883.
    const SDK_PORT: u16 = 8883;

    async fn run_sdk(
        ca: &std::path::Path,
        key: &SymmetricKey,
        payload: &str,
    ) -> std::process::Output {
        let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("interop/python_dps_register.py");
        let mut command = tokio::process::Command::new(venv_bin("python"));
        command
            .arg(script)
            .args([
                "--host",
                "localhost",
                "--scope",
                SCOPE,
                "--registration-id",
                IMSI,
            ])
            .args(["--key", &key.to_base64(), "--payload", payload])
            .arg("--ca")
            .arg(ca)
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("the SDK finished within 60 s")
            .expect("python from .venv (run `make tools`)")
    }

    #[tokio::test]
    async fn python_sdk_registers_and_is_refused_with_a_wrong_key() {
        let group_key = SymmetricKey::from_base64(&random_key_base64()).unwrap();
        let mut config = DpsSimConfig::new(SCOPE);
        config.group_keys.push(group_key.clone());
        config.retry_after = 1;
        config.return_data = Some(json!({"tier": "gold"}));
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], SDK_PORT));
        let sim = DpsSimulator::start(config, listen)
            .await
            .unwrap_or_else(|e| {
                panic!("port {SDK_PORT} must be free for the Python SDK test: {e}")
            });
        let dir = local_emulators::stack::temp_dir("dps-sdk").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, sim.ca_pem()).unwrap();

        let output = run_sdk(
            &ca,
            &group_key.derive_device_key(IMSI),
            r#"{"modelId":"dtmi:demo;1"}"#,
        )
        .await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(result["status"], "assigned");
        assert_eq!(result["deviceId"], IMSI);
        assert_eq!(result["payload"], json!({"tier": "gold"}));
        assert_eq!(
            sim.assigned()[0].payload,
            Some(json!({"modelId": "dtmi:demo;1"}))
        );

        let wrong = SymmetricKey::from_base64(&random_key_base64()).unwrap();
        let refused = run_sdk(&ca, &wrong, "{}").await;
        assert!(!refused.status.success());
        assert!(sim.stats().refused.load(Ordering::Relaxed) >= 1);
        assert_eq!(sim.assigned().len(), 1);
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
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(result["status"], "assigned");
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
