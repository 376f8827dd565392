//! `make demo`: the project's parts working together on a local AWS endpoint.
//!
//! Each step prints what it did and what came out; a step whose outcome is not the expected one
//! makes the demo exit non-zero, so CI can run it as a test.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_ssm::types::ParameterType;
use local_emulators::local_aws::{random_key_base64, LocalAws};
use shared::config::{self, ConfigError};
use shared::registry::{DeviceId, DeviceRecord, DeviceRegistry, DeviceStatus, DynamoRegistry};
use shared::sas::{registration_token, ParsedSas};
use shared::secrets::{load_key, CachedSecretStore, SsmSecretStore};
use shared::soracom::SimIdentity;

const TABLE: &str = "devices";
const GROUP_KEY_PARAMETER: &str = "/soracom-dps/group-key";
const ID_SCOPE: &str = "0ne00DEMO01";

struct Steps {
    failed: usize,
}

impl Steps {
    fn check(&mut self, title: &str, outcome: Result<String, String>) {
        match outcome {
            Ok(detail) => println!("  ok    {title}\n        {detail}"),
            Err(detail) => {
                self.failed += 1;
                println!("  FAIL  {title}\n        {detail}");
            }
        }
    }
}

fn events_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../events")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Shows the first characters of a key and its length: enough to compare, not enough to use.
fn masked(value: &str) -> String {
    format!("{}… ({} chars)", &value[..6.min(value.len())], value.len())
}

fn identity(file: &str) -> Result<SimIdentity, String> {
    let path = events_dir().join("azure-dps-register").join(file);
    let json = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    SimIdentity::from_client_context_json(&json).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut steps = Steps { failed: 0 };
    println!("Starting the local AWS endpoint (moto server)…");
    let aws = match LocalAws::start().await {
        Ok(aws) => aws,
        Err(e) => {
            eprintln!("cannot start the local AWS endpoint: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("  AWS_ENDPOINT_URL={}\n", aws.endpoint());

    println!(
        "Seeding: device table '{TABLE}', group key as SSM SecureString {GROUP_KEY_PARAMETER}"
    );
    let group_key = random_key_base64();
    let seeded = async {
        aws.create_devices_table(TABLE).await?;
        aws.put_parameter(GROUP_KEY_PARAMETER, &group_key, ParameterType::SecureString)
            .await?;
        aws.put_parameter("/soracom-dps/plain", &group_key, ParameterType::String)
            .await?;
        aws.put_parameter(
            "/soracom-dps/broken",
            "not base64!",
            ParameterType::SecureString,
        )
        .await
    }
    .await;
    if let Err(e) = seeded {
        eprintln!("cannot seed the local AWS endpoint: {e}");
        return ExitCode::FAILURE;
    }
    let registry = DynamoRegistry::new(aws.dynamodb().await, TABLE);
    let mut blocked = DeviceRecord::allowed(DeviceId::Sim("440103999999999".into()));
    blocked.status = DeviceStatus::Blocked;
    if let Err(e) = registry.put(&blocked).await {
        eprintln!("cannot seed the device table: {e}");
        return ExitCode::FAILURE;
    }
    println!(
        "  group key: {} (random, made for this run)\n",
        masked(&group_key)
    );

    println!("1. A SIM calls through SORACOM Funk");
    let sim = identity("client-context.json");
    steps.check(
        "identity from the Funk client context (events/azure-dps-register/client-context.json)",
        sim.clone()
            .map(|s| format!("IMSI {} of operator {}", s.imsi, s.operator_id)),
    );
    let Ok(sim) = sim else {
        return ExitCode::FAILURE;
    };

    let store = CachedSecretStore::new(
        SsmSecretStore::new(aws.ssm().await),
        Duration::from_secs(300),
    );
    let key = load_key(&store, GROUP_KEY_PARAMETER).await;
    steps.check(
        "group key read back from SSM (decrypted, cached for warm invocations)",
        match &key {
            Ok(k) if k.to_base64() == group_key => Ok(format!("matches: {}", masked(&group_key))),
            Ok(_) => Err("read a different key".into()),
            Err(e) => Err(e.to_string()),
        },
    );
    let Ok(key) = key else {
        return ExitCode::FAILURE;
    };

    let device_key = key.derive_device_key(&sim.imsi);
    steps.check(
        "device key derived for registration id = IMSI",
        Ok(format!(
            "HMAC-SHA256(group key, \"{}\") = {}",
            sim.imsi,
            masked(&device_key.to_base64())
        )),
    );
    let token = registration_token(ID_SCOPE, &sim.imsi, &device_key, now() + 3600);
    steps.check(
        "SAS token for DPS, verified as DPS would",
        match ParsedSas::parse(token.as_str()) {
            Ok(p) if p.verify(&device_key) && p.registration() == Some((ID_SCOPE, &sim.imsi)) => {
                Ok(format!(
                    "sr={} se={} skn=registration sig=[redacted]",
                    p.resource_as_sent, p.expiry
                ))
            }
            Ok(_) => Err("token did not verify".into()),
            Err(e) => Err(e.to_string()),
        },
    );

    println!("\n2. A blocked SIM calls");
    let blocked_sim = identity("client-context-blocked.json");
    let refusal = match &blocked_sim {
        Ok(s) => registry
            .get(&DeviceId::Sim(s.imsi.clone()))
            .await
            .map_err(|e| e.to_string())
            .map(|r| r.and_then(|r| r.refusal(now()))),
        Err(e) => Err(e.clone()),
    };
    steps.check(
        "device table refuses it before anything reaches DPS",
        match refusal {
            Ok(Some(reason)) => Ok(format!("refused: {reason}")),
            Ok(None) => Err("the blocked SIM was allowed".into()),
            Err(e) => Err(e),
        },
    );

    println!("\n3. Misconfiguration gives one clear line, never a secret");
    let expect_error = |got: Result<String, String>, expected: &str| match got {
        Err(line) if line == expected => Ok(line),
        Err(line) => Err(format!("unexpected error: {line}")),
        Ok(_) => Err("accepted a bad configuration".into()),
    };
    let missing = config::required(&[("DPS_ID_SCOPE", ID_SCOPE)], "GROUP_KEY_PARAMETER")
        .map_err(|e: ConfigError| e.to_string());
    steps.check(
        "missing variable",
        expect_error(missing, "missing environment variable GROUP_KEY_PARAMETER"),
    );
    for (name, expected) in [
        (
            "/soracom-dps/unknown",
            "secret /soracom-dps/unknown not found".to_owned(),
        ),
        (
            "/soracom-dps/plain",
            "secret /soracom-dps/plain is stored as plain text; store it as an SSM SecureString"
                .to_owned(),
        ),
        (
            "/soracom-dps/broken",
            "secret /soracom-dps/broken does not hold a usable key: key is not valid base64"
                .to_owned(),
        ),
    ] {
        let got = load_key(&store, name)
            .await
            .map(|_| String::new())
            .map_err(|e| {
                let line = e.to_string();
                // Whatever the error, the group key must not be in it.
                if line.contains(&group_key) {
                    "error text contains the key".to_owned()
                } else {
                    line
                }
            });
        let kind = match name {
            "/soracom-dps/unknown" => "unknown parameter",
            "/soracom-dps/plain" => "key stored as plain String",
            _ => "malformed base64 key",
        };
        steps.check(kind, expect_error(got, &expected));
    }

    println!();
    if steps.failed == 0 {
        println!("demo: every step gave the expected outcome");
        ExitCode::SUCCESS
    } else {
        println!("demo: {} step(s) gave an unexpected outcome", steps.failed);
        ExitCode::FAILURE
    }
}
