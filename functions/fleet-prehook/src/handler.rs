//! One decision. Deny by default: every path that is not a complete, successful check ends in
//! `allowProvisioning: false` with a reason code in the log.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

use shared::registry::{
    ClaimRecord, ClaimUse, DeviceId, DeviceRecord, DeviceRegistry, EntryRefusal, ProvisioningState,
    ProvisioningWrite, RegistryError, Replaces,
};

use crate::config::Config;
use shared::clock::unix_now;

/// What AWS IoT sends (payload version 2020-04-01). Unknown fields are ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookRequest {
    pub claim_certificate_id: Option<String>,
    pub certificate_id: Option<String>,
    pub template_arn: Option<String>,
    pub client_id: Option<String>,
    #[serde(default)]
    pub parameters: HashMap<String, Value>,
}

/// What AWS IoT expects. Built fresh for every invocation: a response object kept across warm
/// invocations let a denied device inherit an earlier `true` in the published samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookResponse {
    pub allow_provisioning: bool,
    pub parameter_overrides: BTreeMap<String, String>,
}

/// Why a device was denied; the code is stable for log queries and alarms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: &'static str,
    pub detail: String,
}

fn deny(code: &'static str, detail: impl Into<String>) -> Denial {
    Denial {
        code,
        detail: detail.into(),
    }
}

/// Decides for one request and logs the decision. Never returns an error: AWS IoT would deny
/// anyway, but without our reason.
pub async fn handle(event: Value, config: &Config, registry: &impl DeviceRegistry) -> HookResponse {
    let started = tokio::time::Instant::now();
    let (decision, ctx) = evaluate(event, config, registry).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    match decision {
        Ok(overrides) => {
            tracing::info!(
                allowed = true, reason = "allowed", serial = %ctx.serial, certificate_id = %ctx.certificate_id,
                claim_certificate_id = %ctx.claim_certificate_id, template = %ctx.template, elapsed_ms,
                "provisioning allowed"
            );
            HookResponse {
                allow_provisioning: true,
                parameter_overrides: overrides,
            }
        }
        Err(denial) => {
            tracing::warn!(
                allowed = false, reason = denial.code, detail = %denial.detail, serial = %ctx.serial,
                certificate_id = %ctx.certificate_id, claim_certificate_id = %ctx.claim_certificate_id,
                template = %ctx.template, elapsed_ms,
                "provisioning denied"
            );
            HookResponse {
                allow_provisioning: false,
                parameter_overrides: BTreeMap::new(),
            }
        }
    }
}

/// The decision, within the configured budget, and what was understood of the request.
pub async fn evaluate(
    event: Value,
    config: &Config,
    registry: &impl DeviceRegistry,
) -> (Result<BTreeMap<String, String>, Denial>, RequestSummary) {
    let mut ctx = RequestSummary::default();
    let decision =
        tokio::time::timeout(config.budget, decide(event, config, registry, &mut ctx)).await;
    let decision = decision.unwrap_or_else(|_| {
        Err(deny(
            "deadline",
            format!("no decision within {} ms", config.budget.as_millis()),
        ))
    });
    (decision, ctx)
}

/// What the log line says about the request, filled in as far as it was understood.
#[derive(Debug, Default)]
pub struct RequestSummary {
    pub serial: String,
    pub certificate_id: String,
    pub claim_certificate_id: String,
    pub template: String,
}

async fn decide(
    event: Value,
    config: &Config,
    registry: &impl DeviceRegistry,
    ctx: &mut RequestSummary,
) -> Result<BTreeMap<String, String>, Denial> {
    let request: HookRequest = serde_json::from_value(event)
        .map_err(|e| deny("malformed-request", format!("payload does not parse: {e}")))?;
    ctx.template = request.template_arn.clone().unwrap_or_default();
    ctx.claim_certificate_id = request.claim_certificate_id.clone().unwrap_or_default();
    check(&request, config, registry, ctx).await
}

async fn check(
    request: &HookRequest,
    config: &Config,
    registry: &impl DeviceRegistry,
    ctx: &mut RequestSummary,
) -> Result<BTreeMap<String, String>, Denial> {
    let certificate_id = request
        .certificate_id
        .as_deref()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| deny("malformed-request", "certificateId missing"))?;
    ctx.certificate_id = certificate_id.to_owned();

    // 1. The serial parameter, under the configured name, in the configured form.
    let serial = match request.parameters.get(&config.serial_parameter) {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(deny(
                "serial-format",
                format!("parameter '{}' is not a string", config.serial_parameter),
            ))
        }
        None => {
            let mut present: Vec<&str> = request.parameters.keys().map(String::as_str).collect();
            present.sort_unstable();
            return Err(deny(
                "missing-serial-parameter",
                format!(
                    "template parameter '{}' missing (SERIAL_PARAMETER); parameters present: [{}]",
                    config.serial_parameter,
                    present.join(", ")
                ),
            ));
        }
    };
    if !config.serial_pattern.is_match(&serial) {
        return Err(deny(
            "serial-format",
            "serial does not match SERIAL_PATTERN",
        ));
    }
    ctx.serial = serial.clone();

    // 2. Known and allowed.
    let now = unix_now();
    let record = registry
        .get(&DeviceId::Serial(serial.clone()))
        .await
        .map_err(registry_denial)?
        .ok_or_else(|| deny("unknown-serial", "serial is not in the device table"))?;
    if let Some(why) = record.refusal(now) {
        return Err(match why {
            EntryRefusal::Expired => deny("serial-expired", "serial is expired"),
            EntryRefusal::Unlisted => {
                deny("unknown-serial", "serial is not listed in the device table")
            }
            EntryRefusal::Blocked => deny("serial-blocked", "serial is blocked"),
        });
    }

    // 3. What the new certificate replaces, if it may replace anything.
    let replaces = replaces(&record, certificate_id, now, config.pending)?;

    // 4. The claim: recorded claims are bound, short-lived and good for one device.
    let claim_id = request
        .claim_certificate_id
        .as_deref()
        .filter(|c| !c.is_empty());
    let claim = match claim_id {
        Some(id) => registry.get_claim(id).await.map_err(registry_denial)?,
        None => None,
    };
    let spend_claim = check_claim(claim.as_ref(), &serial, certificate_id, now, config)?;

    // 5. Record it; the conditions of one transaction let exactly one of two concurrent
    //    requests through, for the serial and for the claim.
    let write = ProvisioningWrite {
        serial: serial.clone(),
        certificate_id: certificate_id.to_owned(),
        claim_certificate_id: claim_id.map(str::to_owned),
        spend_claim,
        at: now,
        replaces,
    };
    registry
        .record_provisioning(&write)
        .await
        .map_err(|e| match e {
            RegistryError::Conflict(_) => deny(
                "already-provisioned",
                "another certificate won the race for this serial",
            ),
            RegistryError::ClaimSpent(_) => deny(
                "claim-already-used",
                "the claim certificate was spent by a concurrent request",
            ),
            other => registry_denial(other),
        })?;

    // Overrides come from the device record, never from what the device sent.
    Ok(record.overrides)
}

/// Whether `certificate_id` may become the serial's certificate, and what it replaces: nothing
/// yet, itself (AWS IoT retrying), the old one once through `allow_reprovision`, or a pending
/// one nobody confirmed within `pending` (AWS IoT failed after the hook's yes, or the device
/// lost its new key).
fn replaces(
    record: &DeviceRecord,
    certificate_id: &str,
    now: u64,
    pending: Duration,
) -> Result<Replaces, Denial> {
    let Some(previous) = &record.provisioning else {
        return Ok(Replaces::Nothing);
    };
    let old = previous.certificate_id.clone();
    if old == certificate_id {
        return Ok(Replaces::Itself);
    }
    if record.allow_reprovision {
        return Ok(Replaces::Reprovisioning { old });
    }
    let pending_since_before = now.saturating_sub(pending.as_secs());
    if previous.state == ProvisioningState::Pending
        && previous.provisioned_at <= pending_since_before
    {
        return Ok(Replaces::StalePending {
            old,
            pending_since_before,
        });
    }
    Err(deny(
        "already-provisioned",
        "serial was provisioned with another certificate",
    ))
}

/// The claim certificate's checks; the claim to spend if claim-issuer recorded it.
fn check_claim(
    claim: Option<&ClaimRecord>,
    serial: &str,
    certificate_id: &str,
    now: u64,
    config: &Config,
) -> Result<Option<ClaimUse>, Denial> {
    let Some(claim) = claim else {
        return if config.require_claim_record {
            Err(deny(
                "claim-unknown",
                "claim certificate was not issued by claim-issuer",
            ))
        } else {
            Ok(None)
        };
    };
    if claim.serial.as_deref().is_some_and(|bound| bound != serial) {
        return Err(deny(
            "claim-bound-elsewhere",
            "claim certificate is bound to another serial",
        ));
    }
    // TLS checked the certificate when the connection opened; a connection may outlive it.
    if claim.valid_until <= now {
        return Err(deny("claim-expired", "claim certificate has expired"));
    }
    if claim
        .used
        .as_ref()
        .is_some_and(|used| used.certificate_id != certificate_id)
    {
        return Err(deny(
            "claim-already-used",
            "claim certificate already provisioned a device",
        ));
    }
    Ok(Some(ClaimUse {
        claim_certificate_id: claim.certificate_id.clone(),
        at: now,
    }))
}

fn registry_denial(e: RegistryError) -> Denial {
    match e {
        RegistryError::Malformed { .. } => deny("registry-malformed", e.to_string()),
        RegistryError::Throttled => deny("registry-throttled", e.to_string()),
        _ => deny("registry-unavailable", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device table that knows no serial and no claim, and answers at once or never.
    struct Unhelpful {
        hangs: bool,
    }

    impl DeviceRegistry for Unhelpful {
        async fn get(&self, _: &DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
            if self.hangs {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            Ok(None)
        }
        async fn put(&self, _: &DeviceRecord) -> Result<(), RegistryError> {
            Ok(())
        }
        async fn record_registration(
            &self,
            _: &str,
            _: &shared::registry::Registration,
        ) -> Result<(), RegistryError> {
            Ok(())
        }
        async fn record_provisioning(&self, _: &ProvisioningWrite) -> Result<(), RegistryError> {
            Ok(())
        }
        async fn put_claim(&self, _: &ClaimRecord) -> Result<(), RegistryError> {
            Ok(())
        }
        async fn get_claim(&self, _: &str) -> Result<Option<ClaimRecord>, RegistryError> {
            Ok(None)
        }
    }

    /// On tokio's paused clock: the table hangs for an hour of virtual time, and the decision
    /// comes at the budget, not after it.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_table_is_denied_at_the_budget() {
        let config =
            Config::from_env(&[("DEVICES_TABLE", "d"), ("DECISION_BUDGET_MS", "100")]).unwrap();
        let event =
            serde_json::json!({"certificateId": "c", "parameters": {"SerialNumber": "SN-1"}});
        let started = tokio::time::Instant::now();
        let (decision, summary) = evaluate(event, &config, &Unhelpful { hangs: true }).await;
        assert_eq!(decision.unwrap_err().code, "deadline");
        assert_eq!(summary.serial, "SN-1");
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    const KEYS: &[&str] = &[
        "claimCertificateId",
        "certificateId",
        "certificatePem",
        "templateArn",
        "clientId",
        "parameters",
        "SerialNumber",
        "device_serial",
    ];

    proptest::proptest! {
        /// Any payload: denied (no serial is known here) with a reason code from the documented
        /// set, never a panic and never an allow.
        #[test]
        fn any_hook_payload_is_denied_with_a_reason(event in shared::strategies::json_with_keys(KEYS)) {
            let config = Config::from_env(&[("DEVICES_TABLE", "d")]).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (decision, _) = runtime.block_on(evaluate(event, &config, &Unhelpful { hangs: false }));
            let denial = decision.expect_err("nothing may be allowed by an empty table");
            proptest::prop_assert!(
                ["malformed-request", "missing-serial-parameter", "serial-format", "unknown-serial"]
                    .contains(&denial.code),
                "{denial:?}"
            );
            // The misnamed-parameter denial names the parameter the template should have.
            if denial.code == "missing-serial-parameter" {
                proptest::prop_assert!(denial.detail.contains("'SerialNumber'"), "{}", denial.detail);
            }
        }
    }
}
