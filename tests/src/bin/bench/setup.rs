//! The stand-ins both sides of the comparison share, and each side's process environment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator};
use local_emulators::stack::{LocalStack, DEVICE_CA_PARAMETER, ID_SCOPE};

use crate::{release_bin, root};

pub(crate) const FUNCTIONS: [&str; 3] = ["azure-dps-register", "fleet-prehook", "claim-issuer"];

/// What `make bench` builds before running this: the release binaries and the baseline's
/// Node.js packages.
pub(crate) fn check_prerequisites() -> Result<(), String> {
    for f in FUNCTIONS {
        if !release_bin(f).exists() {
            return Err(format!(
                "{} is missing: run `make bench` (it builds the release binaries)",
                release_bin(f).display()
            ));
        }
    }
    if !root().join("bench/node/node_modules").exists() {
        return Err("bench/node/node_modules is missing: run `make bench`".into());
    }
    Ok(())
}

/// Both sides of the DPS comparison, and the simulators they share.
pub(crate) struct Bench {
    pub(crate) stack: LocalStack,
    /// A second DPS simulator that assigns at once (the stack's says retry-after 1 s).
    pub(crate) immediate: DpsSimulator,
    /// A DPS simulator with an X.509 enrollment group on the operator's root, assigning at once.
    pub(crate) x509: DpsSimulator,
    ca_dir: PathBuf,
    imsi: AtomicU64,
}

impl Bench {
    pub(crate) async fn start() -> Result<Self, String> {
        let stack = LocalStack::start().await.map_err(|e| e.to_string())?;
        let mut config = DpsSimConfig::new(ID_SCOPE);
        config.group_keys.push(stack.group_key.clone());
        config.retry_after = 0;
        let immediate = DpsSimulator::start(config, ([127, 0, 0, 1], 0).into())
            .await
            .map_err(|e| e.to_string())?;
        // The stack's device CA (KMS key, certificate in SSM): this simulator enrols its root.
        let mut config = DpsSimConfig::new(ID_SCOPE);
        config.x509_cas.push(stack.device_ca.root_pem.clone());
        config.retry_after = 0;
        let x509 = DpsSimulator::start(config, ([127, 0, 0, 1], 0).into())
            .await
            .map_err(|e| e.to_string())?;
        let ca_dir = stack.dir().to_owned();
        Ok(Self {
            stack,
            immediate,
            x509,
            ca_dir,
            imsi: AtomicU64::new(0),
        })
    }

    pub(crate) fn next_imsi(&self) -> String {
        let n = self.imsi.fetch_add(1, Ordering::Relaxed);
        format!("{}", 440_100_000_000_000u64 + n)
    }

    pub(crate) fn ca_file(&self, sim: &DpsSimulator) -> PathBuf {
        let path = self.ca_dir.join(format!("dps-{}.pem", sim.addr().port()));
        let _ = std::fs::write(&path, sim.ca_pem());
        path
    }

    /// The deployed function's environment, pointed at the local stack and `sim`.
    pub(crate) fn rust_env(&self, function: &str, sim: &DpsSimulator) -> Vec<(String, String)> {
        let mut env: BTreeMap<String, String> = self.stack.env().into_iter().collect();
        env.insert(
            "DPS_ENDPOINT".into(),
            format!("127.0.0.1:{}", sim.addr().port()),
        );
        env.insert(
            "DPS_TRUSTED_CA_FILE".into(),
            self.ca_file(sim).display().to_string(),
        );
        env.insert("CLAIMS_PER_WINDOW".into(), "1000000".into());
        // The runs measure latency in bursts far above any fleet's budget: the limits are
        // `make bench-storm`'s subject, not this one's.
        env.insert("DPS_REGISTRATIONS_PER_MINUTE".into(), "1000000".into());
        for (k, v) in [
            ("AWS_LAMBDA_FUNCTION_NAME", function),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "128"),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
            ("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/bench"),
            ("AWS_LAMBDA_LOG_STREAM_NAME", "bench"),
        ] {
            env.insert(k.into(), v.into());
        }
        env.into_iter().collect()
    }

    /// `rust_env` for X.509 attestation against the X.509 simulator.
    pub(crate) fn x509_env(&self) -> Vec<(String, String)> {
        let mut env = self.rust_env("azure-dps-register", &self.x509);
        env.extend(
            [
                ("ATTESTATION", "x509".to_owned()),
                ("CA_KMS_KEY_ID", self.stack.device_ca.key_id.clone()),
                ("CA_CERTIFICATE_PARAMETER", DEVICE_CA_PARAMETER.to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        env
    }

    /// The seed 000 handler's environment: its per-device key variables for `imsis`.
    pub(crate) fn node_env(&self, sim: &DpsSimulator, imsis: &[String]) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "PROVISIONING_HOST".to_owned(),
                format!("localhost:{}", sim.addr().port()),
            ),
            ("PROVISIONING_IDSCOPE".to_owned(), ID_SCOPE.to_owned()),
            (
                "NODE_EXTRA_CA_CERTS".to_owned(),
                self.ca_file(sim).display().to_string(),
            ),
        ];
        for imsi in imsis {
            env.push((
                format!("PROVISIONING_SYMMETRIC_KEY_{imsi}"),
                self.stack.group_key.derive_device_key(imsi).to_base64(),
            ));
        }
        env
    }
}
