//! The device table seeded for the fleet tests (SN-0001 allowed with an override, SN-0666
//! blocked), the sample hook events and the hook configuration.

use std::collections::BTreeMap;

use fleet_prehook::config::Config;
use fleet_prehook::handler::{evaluate, Denial};
use local_emulators::fixtures;
use local_emulators::local_aws::LocalAws;
use serde_json::Value;
use shared::registry::{
    ClaimLog, ClaimRecord, DeviceId, DeviceRecord, DeviceStatus, DynamoRegistry,
};

pub(crate) const TABLE: &str = "devices";

pub(crate) fn event(name: &str) -> Value {
    fixtures::event("fleet-prehook", name)
}

pub(crate) fn with_certificate(mut e: Value, certificate_id: &str) -> Value {
    e["certificateId"] = Value::String(certificate_id.to_owned());
    e
}

pub(crate) fn config(extra: &[(&str, &str)]) -> Config {
    Config::from_env(&fixtures::env(&[("DEVICES_TABLE", TABLE)], extra)).unwrap()
}

/// The local endpoint with SN-0001 allowed (with overrides) and SN-0666 blocked.
pub(crate) async fn setup() -> (LocalAws, DynamoRegistry) {
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

pub(crate) async fn allow_reprovisioning(registry: &DynamoRegistry, serial: &str) {
    let mut record = registry
        .get(&DeviceId::Serial(serial.into()))
        .await
        .unwrap()
        .unwrap();
    record.allow_reprovision = true;
    registry.put(&record).await.unwrap();
}

pub(crate) async fn denial(e: Value, config: &Config, registry: &DynamoRegistry) -> Denial {
    match evaluate(e, config, registry).await.0 {
        Err(d) => d,
        Ok(overrides) => panic!("allowed with {overrides:?}"),
    }
}

/// A recorded claim issued to `installer`, bound to `serial` (or to none), valid until `until`.
pub(crate) async fn record_claim(
    registry: &DynamoRegistry,
    id: &str,
    serial: Option<&str>,
    until: u64,
) {
    registry
        .record_claim(&ClaimRecord {
            certificate_id: id.into(),
            issued_to: "installer-sub".into(),
            serial: serial.map(str::to_owned),
            issued_at: until.saturating_sub(300),
            valid_until: until,
            retain_until: until + 86_400,
            used: None,
        })
        .await
        .unwrap();
}

pub(crate) fn hook_event(serial: &str, certificate: &str, claim: &str) -> Value {
    let mut e = with_certificate(event("allowed.json"), certificate);
    e["parameters"]["SerialNumber"] = Value::String(serial.into());
    e["claimCertificateId"] = Value::String(claim.into());
    e
}
