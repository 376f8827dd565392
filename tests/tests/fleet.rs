//! Fleet provisioning: the fleet-prehook function's real handler against the device table on the
//! local AWS endpoint, fed the sample events in events/fleet-prehook/.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_prehook::config::Config;
use fleet_prehook::handler::{evaluate, handle, Denial};
use local_emulators::local_aws::LocalAws;
use serde_json::Value;
use shared::registry::{
    ClaimRecord, DeviceId, DeviceRecord, DeviceRegistry, DeviceStatus, DynamoRegistry,
};

const TABLE: &str = "devices";

fn event(name: &str) -> Value {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events/fleet-prehook")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn with_certificate(mut e: Value, certificate_id: &str) -> Value {
    e["certificateId"] = Value::String(certificate_id.to_owned());
    e
}

fn config(extra: &[(&str, &str)]) -> Config {
    let env: std::collections::HashMap<String, String> = [("DEVICES_TABLE", TABLE)]
        .iter()
        .chain(extra)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Config::from_env(&env).unwrap()
}

/// The local endpoint with SN-0001 allowed (with overrides) and SN-0666 blocked.
async fn setup() -> (LocalAws, DynamoRegistry) {
    let aws = LocalAws::start().await.unwrap();
    aws.create_devices_table(TABLE).await.unwrap();
    let registry = DynamoRegistry::new(aws.dynamodb().await, TABLE);
    let mut allowed = DeviceRecord::allowed(DeviceId::Serial("SN-0001".into()));
    allowed.overrides = BTreeMap::from([("Location".to_owned(), "tokyo-1".to_owned())]);
    registry.put(&allowed).await.unwrap();
    let mut blocked = DeviceRecord::allowed(DeviceId::Serial("SN-0666".into()));
    blocked.status = DeviceStatus::Blocked;
    registry.put(&blocked).await.unwrap();
    (aws, registry)
}

async fn denial(e: Value, config: &Config, registry: &DynamoRegistry) -> Denial {
    match evaluate(e, config, registry).await.0 {
        Err(d) => d,
        Ok(overrides) => panic!("allowed with {overrides:?}"),
    }
}

#[tokio::test]
async fn allowed_serial_gets_overrides_from_the_table_and_is_recorded() {
    let (_aws, registry) = setup().await;
    let mut e = event("allowed.json");
    // A device trying to set its own overrides gets nothing from it.
    e["parameters"]["Location"] = Value::String("attacker-chosen".into());
    let response = handle(e.clone(), &config(&[]), &registry).await;
    assert!(response.allow_provisioning);
    assert_eq!(
        response
            .parameter_overrides
            .get("Location")
            .map(String::as_str),
        Some("tokyo-1")
    );

    let record = registry
        .get(&DeviceId::Serial("SN-0001".into()))
        .await
        .unwrap()
        .unwrap();
    let provisioning = record.provisioning.unwrap();
    assert_eq!(
        provisioning.certificate_id,
        e["certificateId"].as_str().unwrap()
    );
    assert_eq!(
        provisioning.claim_certificate_id.as_deref(),
        e["claimCertificateId"].as_str()
    );

    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json["allowProvisioning"], true);
    assert_eq!(json["parameterOverrides"]["Location"], "tokyo-1");
}

#[tokio::test]
async fn unknown_blocked_and_malformed_are_denied_with_reasons() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    assert_eq!(
        denial(event("unknown-serial.json"), &c, &registry)
            .await
            .code,
        "unknown-serial"
    );
    assert_eq!(
        denial(event("blocked-serial.json"), &c, &registry)
            .await
            .code,
        "serial-blocked"
    );
    assert_eq!(
        denial(event("malformed.json"), &c, &registry).await.code,
        "malformed-request"
    );
    assert_eq!(
        denial(Value::String("x".into()), &c, &registry).await.code,
        "malformed-request"
    );
    let mut bad_serial = event("allowed.json");
    bad_serial["parameters"]["SerialNumber"] = Value::String("SN 0001; DROP".into());
    assert_eq!(
        denial(bad_serial, &c, &registry).await.code,
        "serial-format"
    );

    let response = handle(event("malformed.json"), &c, &registry).await;
    assert!(!response.allow_provisioning && response.parameter_overrides.is_empty());
}

#[tokio::test]
async fn misnamed_serial_parameter_says_which_names_arrived() {
    let (_aws, registry) = setup().await;
    let d = denial(event("misnamed-parameter.json"), &config(&[]), &registry).await;
    assert_eq!(d.code, "missing-serial-parameter");
    assert!(
        d.detail.contains("'SerialNumber'") && d.detail.contains("device_serial"),
        "{}",
        d.detail
    );
    // Configured to the template's actual name, the same request passes.
    let renamed = config(&[("SERIAL_PARAMETER", "device_serial")]);
    assert!(
        evaluate(event("misnamed-parameter.json"), &renamed, &registry)
            .await
            .0
            .is_ok()
    );
}

#[tokio::test]
async fn provisioned_serial_needs_the_same_certificate_or_reprovisioning() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    assert!(evaluate(event("allowed.json"), &c, &registry)
        .await
        .0
        .is_ok());
    // AWS IoT retrying the same certificate is fine.
    assert!(evaluate(event("allowed.json"), &c, &registry)
        .await
        .0
        .is_ok());
    let other = with_certificate(event("allowed.json"), "another-certificate");
    assert_eq!(
        denial(other.clone(), &c, &registry).await.code,
        "already-provisioned"
    );

    let mut record = registry
        .get(&DeviceId::Serial("SN-0001".into()))
        .await
        .unwrap()
        .unwrap();
    record.allow_reprovision = true;
    registry.put(&record).await.unwrap();
    assert!(evaluate(other, &c, &registry).await.0.is_ok());
}

#[tokio::test]
async fn claim_binding_is_enforced() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    let claim_id = event("allowed.json")["claimCertificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    let far = 4_000_000_000;
    registry
        .put_claim(&ClaimRecord {
            certificate_id: claim_id.clone(),
            issued_to: "installer-sub".into(),
            serial: Some("SN-0002".into()),
            issued_at: 1,
            expires_at: far,
        })
        .await
        .unwrap();
    assert_eq!(
        denial(event("allowed.json"), &c, &registry).await.code,
        "claim-bound-elsewhere"
    );

    let strict = config(&[("REQUIRE_CLAIM_RECORD", "true")]);
    let mut unrecorded = event("allowed.json");
    unrecorded["claimCertificateId"] = Value::String("not-from-claim-issuer".into());
    assert_eq!(
        denial(unrecorded, &strict, &registry).await.code,
        "claim-unknown"
    );

    registry
        .put_claim(&ClaimRecord {
            certificate_id: "bound-to-sn-0001".into(),
            issued_to: "installer-sub".into(),
            serial: Some("SN-0001".into()),
            issued_at: 1,
            expires_at: far,
        })
        .await
        .unwrap();
    let mut bound = event("allowed.json");
    bound["claimCertificateId"] = Value::String("bound-to-sn-0001".into());
    assert!(evaluate(bound, &strict, &registry).await.0.is_ok());
}

#[tokio::test]
async fn concurrent_requests_for_one_serial_allow_exactly_one() {
    let (_aws, registry) = setup().await;
    let registry = Arc::new(registry);
    let c = Arc::new(config(&[]));
    let attempts: Vec<_> = (0..6)
        .map(|i| {
            let (registry, c) = (Arc::clone(&registry), Arc::clone(&c));
            tokio::spawn(async move {
                let e = with_certificate(event("allowed.json"), &format!("cert-{i}"));
                handle(e, &c, registry.as_ref()).await.allow_provisioning
            })
        })
        .collect();
    let mut allowed = 0;
    for a in attempts {
        allowed += usize::from(a.await.unwrap());
    }
    assert_eq!(allowed, 1);
}

#[tokio::test]
async fn an_allow_does_not_leak_into_the_next_decision() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    let first = handle(event("allowed.json"), &c, &registry).await;
    assert!(first.allow_provisioning && !first.parameter_overrides.is_empty());
    let second = handle(event("unknown-serial.json"), &c, &registry).await;
    assert!(!second.allow_provisioning);
    assert!(second.parameter_overrides.is_empty());
}

#[tokio::test]
async fn table_unavailable_denies_within_the_budget() {
    let (aws, registry) = setup().await;
    drop(aws);
    let c = config(&[("DECISION_BUDGET_MS", "2000")]);
    let started = Instant::now();
    let d = denial(event("allowed.json"), &c, &registry).await;
    assert!(
        d.code == "registry-unavailable" || d.code == "deadline",
        "{d:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
}
