//! One decision. Deny by default: every path that is not a complete, successful check ends in
//! `allowProvisioning: false` with a reason code in the log.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use shared::clock::unix_now;
use shared::registry::{
    ClaimLog, ClaimRecord, ClaimUse, DeviceRecord, EntryRefusal, ProvisioningState,
    ProvisioningWrite, RegistryError, Replaces, SerialRegistry,
};

use crate::config::Config;

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

/// Why a device was denied. The code is stable, for log queries and alarms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    MalformedRequest,
    MissingSerialParameter,
    SerialFormat,
    UnknownSerial,
    SerialBlocked,
    SerialExpired,
    AlreadyProvisioned,
    ClaimBoundElsewhere,
    ClaimExpired,
    ClaimAlreadyUsed,
    ClaimUnknown,
    RegistryUnavailable,
    RegistryThrottled,
    RegistryMalformed,
    Deadline,
}

impl Reason {
    /// Every reason, for checks against what alarms and documents name.
    pub const ALL: [Reason; 15] = [
        Self::MalformedRequest,
        Self::MissingSerialParameter,
        Self::SerialFormat,
        Self::UnknownSerial,
        Self::SerialBlocked,
        Self::SerialExpired,
        Self::AlreadyProvisioned,
        Self::ClaimBoundElsewhere,
        Self::ClaimExpired,
        Self::ClaimAlreadyUsed,
        Self::ClaimUnknown,
        Self::RegistryUnavailable,
        Self::RegistryThrottled,
        Self::RegistryMalformed,
        Self::Deadline,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Self::MalformedRequest => "malformed-request",
            Self::MissingSerialParameter => "missing-serial-parameter",
            Self::SerialFormat => "serial-format",
            Self::UnknownSerial => "unknown-serial",
            Self::SerialBlocked => "serial-blocked",
            Self::SerialExpired => "serial-expired",
            Self::AlreadyProvisioned => "already-provisioned",
            Self::ClaimBoundElsewhere => "claim-bound-elsewhere",
            Self::ClaimExpired => "claim-expired",
            Self::ClaimAlreadyUsed => "claim-already-used",
            Self::ClaimUnknown => "claim-unknown",
            Self::RegistryUnavailable => "registry-unavailable",
            Self::RegistryThrottled => "registry-throttled",
            Self::RegistryMalformed => "registry-malformed",
            Self::Deadline => "deadline",
        }
    }
}

/// A denial: its reason, and what exactly was found (for the log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub code: Reason,
    pub detail: String,
}

fn deny(code: Reason, detail: impl Into<String>) -> Denial {
    Denial {
        code,
        detail: detail.into(),
    }
}

/// What the hook reads and writes: the serials and the claims claim-issuer recorded.
pub trait Registry: SerialRegistry + ClaimLog {}
impl<T: SerialRegistry + ClaimLog> Registry for T {}

/// Decides for one request and logs the decision. Never returns an error: AWS IoT would deny
/// anyway, but without our reason.
pub async fn handle(event: Value, config: &Config, registry: &impl Registry) -> HookResponse {
    let started = tokio::time::Instant::now();
    let (decision, ctx) = evaluate(event, config, registry).await;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let outcome = match &decision {
        Ok(_) => "allowed",
        Err(denial) => denial.code.code(),
    };
    lambda_support::metrics::emit(outcome, &[]);
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
                allowed = false, reason = denial.code.code(), detail = %denial.detail, serial = %ctx.serial,
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
    registry: &impl Registry,
) -> (Result<BTreeMap<String, String>, Denial>, RequestSummary) {
    let mut ctx = RequestSummary::default();
    // Boxed: the decision's future nests deep enough to exceed the compiler's layout depth.
    let decision = tokio::time::timeout(
        config.budget,
        Box::pin(decide(event, config, registry, &mut ctx)),
    )
    .await;
    let decision = decision.unwrap_or_else(|_| {
        Err(deny(
            Reason::Deadline,
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
    registry: &impl Registry,
    ctx: &mut RequestSummary,
) -> Result<BTreeMap<String, String>, Denial> {
    let request: HookRequest = serde_json::from_value(event).map_err(|e| {
        deny(
            Reason::MalformedRequest,
            format!("payload does not parse: {e}"),
        )
    })?;
    ctx.template = request.template_arn.clone().unwrap_or_default();
    ctx.claim_certificate_id = request.claim_certificate_id.clone().unwrap_or_default();
    let certificate_id = request
        .certificate_id
        .clone()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| deny(Reason::MalformedRequest, "certificateId missing"))?;
    ctx.certificate_id = certificate_id.clone();
    let serial = serial(&request, config)?;
    ctx.serial = serial.clone();
    check(&request, &serial, &certificate_id, config, registry).await
}

/// The serial parameter, under the configured name, in the configured form.
fn serial(request: &HookRequest, config: &Config) -> Result<String, Denial> {
    let serial = match request.parameters.get(&config.serial_parameter) {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(deny(
                Reason::SerialFormat,
                format!("parameter '{}' is not a string", config.serial_parameter),
            ))
        }
        None => {
            let mut present: Vec<&str> = request.parameters.keys().map(String::as_str).collect();
            present.sort_unstable();
            return Err(deny(
                Reason::MissingSerialParameter,
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
            Reason::SerialFormat,
            "serial does not match SERIAL_PATTERN",
        ));
    }
    Ok(serial)
}

async fn check(
    request: &HookRequest,
    serial: &str,
    certificate_id: &str,
    config: &Config,
    registry: &impl Registry,
) -> Result<BTreeMap<String, String>, Denial> {
    // Known and allowed.
    let now = unix_now();
    let record = registry
        .serial(serial)
        .await
        .map_err(registry_denial)?
        .ok_or_else(|| deny(Reason::UnknownSerial, "serial is not in the device table"))?;
    if let Some(why) = record.refusal(now) {
        return Err(match why {
            EntryRefusal::Expired => deny(Reason::SerialExpired, "serial is expired"),
            EntryRefusal::Unlisted => deny(
                Reason::UnknownSerial,
                "serial is not listed in the device table",
            ),
            EntryRefusal::Blocked => deny(Reason::SerialBlocked, "serial is blocked"),
        });
    }

    // The claim: recorded claims are bound, short-lived and good for one device.
    let claim_id = request
        .claim_certificate_id
        .as_deref()
        .filter(|c| !c.is_empty());
    let claim = match claim_id {
        Some(id) => registry.claim(id).await.map_err(registry_denial)?,
        None => None,
    };
    let issued_to = claim.as_ref().map(|c| c.issued_to.as_str());

    // What the new certificate replaces, if it may replace anything.
    let replaces = replaces(&record, certificate_id, now, config.pending, issued_to)?;
    let spend_claim = check_claim(claim.as_ref(), serial, certificate_id, now, config)?;

    // Record it; the conditions of one transaction let exactly one of two concurrent requests
    // through, for the serial and for the claim.
    let write = ProvisioningWrite {
        serial: serial.to_owned(),
        certificate_id: certificate_id.to_owned(),
        claim_certificate_id: claim_id.map(str::to_owned),
        spend_claim,
        issued_to: issued_to.map(str::to_owned),
        at: now,
        replaces,
    };
    registry
        .record_provisioning(&write)
        .await
        .map_err(|e| match e {
            RegistryError::Conflict(_) => deny(
                Reason::AlreadyProvisioned,
                "another certificate won the race for this serial",
            ),
            RegistryError::ClaimSpent(_) => deny(
                Reason::ClaimAlreadyUsed,
                "the claim certificate was spent by a concurrent request",
            ),
            other => registry_denial(other),
        })?;

    // Overrides come from the device record, never from what the device sent.
    Ok(record.overrides)
}

/// Whether `certificate_id` may become the serial's certificate, and what it replaces: nothing
/// yet, itself (AWS IoT retrying), the old one once through `allow_reprovision`, or a pending
/// one that never connected within `pending` (AWS IoT failed after the hook's yes, or the
/// device lost its new key) — and then only through a claim of the installer whose claim made
/// it (`issued_to`): another installer's claim for a live serial must not take the device over.
fn replaces(
    record: &DeviceRecord,
    certificate_id: &str,
    now: u64,
    pending: Duration,
    issued_to: Option<&str>,
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
    let same_installer = match (previous.issued_to.as_deref(), issued_to) {
        (Some(before), Some(now)) => before == now,
        // Unknown on either side: nobody can show it is the same installer.
        _ => false,
    };
    if previous.state == ProvisioningState::Pending
        && previous.provisioned_at <= pending_since_before
        && same_installer
    {
        return Ok(Replaces::StalePending {
            old,
            pending_since_before,
            issued_to: issued_to.unwrap_or_default().to_owned(),
        });
    }
    Err(deny(
        Reason::AlreadyProvisioned,
        match previous.state {
            ProvisioningState::Confirmed => "serial's device connected with another certificate",
            ProvisioningState::Pending if !same_installer => {
                "serial is pending with another certificate, from another installer's claim"
            }
            ProvisioningState::Pending => "serial is pending with another certificate",
        },
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
                Reason::ClaimUnknown,
                "claim certificate was not issued by claim-issuer",
            ))
        } else {
            Ok(None)
        };
    };
    if claim.serial.as_deref().is_some_and(|bound| bound != serial) {
        return Err(deny(
            Reason::ClaimBoundElsewhere,
            "claim certificate is bound to another serial",
        ));
    }
    // TLS checked the certificate when the connection opened; a connection may outlive it.
    if claim.valid_until <= now {
        return Err(deny(Reason::ClaimExpired, "claim certificate has expired"));
    }
    if claim
        .used
        .as_ref()
        .is_some_and(|used| used.certificate_id != certificate_id)
    {
        return Err(deny(
            Reason::ClaimAlreadyUsed,
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
        RegistryError::Malformed { .. } => deny(Reason::RegistryMalformed, e.to_string()),
        RegistryError::Throttled => deny(Reason::RegistryThrottled, e.to_string()),
        _ => deny(Reason::RegistryUnavailable, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shared::memory::MemoryTable;
    use shared::registry::{ClaimUsed, DeviceId, DeviceStatus, Provisioning};

    fn config(extra: &[(&str, &str)]) -> Config {
        let env: HashMap<String, String> = [("DEVICES_TABLE", "devices")]
            .iter()
            .chain(extra)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_env(&env).unwrap()
    }

    fn request(serial: &str, certificate: &str, claim: &str) -> Value {
        json!({
            "claimCertificateId": claim, "certificateId": certificate,
            "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/fleet",
            "clientId": "claim.x", "parameters": {"SerialNumber": serial},
        })
    }

    fn allowed(serial: &str) -> DeviceRecord {
        DeviceRecord::allowed(DeviceId::Serial(serial.into()))
    }

    fn claim(id: &str, serial: Option<&str>, valid_until: u64) -> ClaimRecord {
        ClaimRecord {
            certificate_id: id.into(),
            issued_to: "installer".into(),
            serial: serial.map(str::to_owned),
            issued_at: valid_until.saturating_sub(300),
            valid_until,
            retain_until: valid_until + 86_400,
            used: None,
        }
    }

    /// A table with SN-1 allowed (override Location=tokyo-1) and a claim for it.
    fn table() -> MemoryTable {
        let table = MemoryTable::new();
        let mut sn1 = allowed("SN-1");
        sn1.overrides.insert("Location".into(), "tokyo-1".into());
        table.put(sn1);
        table.put_claim(claim("claim-1", Some("SN-1"), unix_now() + 300));
        table
    }

    async fn reason(event: Value, config: &Config, table: &MemoryTable) -> Reason {
        match evaluate(event, config, table).await.0 {
            Err(denial) => denial.code,
            Ok(overrides) => panic!("allowed with {overrides:?}"),
        }
    }

    #[tokio::test]
    async fn an_allowed_serial_gets_the_tables_overrides_and_spends_its_claim() {
        let table = table();
        let mut event = request("SN-1", "cert-1", "claim-1");
        event["parameters"]["Location"] = json!("attacker-chosen");
        let response = handle(event, &config(&[]), &table).await;
        assert!(response.allow_provisioning);
        assert_eq!(response.parameter_overrides["Location"], "tokyo-1");
        let used = table.get_claim("claim-1").unwrap().used.unwrap();
        assert_eq!(
            (used.certificate_id.as_str(), used.serial.as_str()),
            ("cert-1", "SN-1")
        );
        let record = table.get(&DeviceId::Serial("SN-1".into())).unwrap();
        assert_eq!(
            record.provisioning.unwrap().state,
            ProvisioningState::Pending
        );
    }

    #[tokio::test]
    async fn requests_that_name_no_certificate_or_serial_are_denied() {
        let (table, c) = (table(), config(&[]));
        assert_eq!(
            reason(json!("x"), &c, &table).await,
            Reason::MalformedRequest
        );
        let no_certificate = json!({"parameters": {"SerialNumber": "SN-1"}});
        assert_eq!(
            reason(no_certificate, &c, &table).await,
            Reason::MalformedRequest
        );
        let misnamed = json!({"certificateId": "c", "parameters": {"device_serial": "SN-1"}});
        assert_eq!(
            reason(misnamed, &c, &table).await,
            Reason::MissingSerialParameter
        );
        for bad in [json!("SN.1"), json!(7), json!("SN 1; DROP")] {
            let mut event = request("SN-1", "c", "claim-1");
            event["parameters"]["SerialNumber"] = bad;
            assert_eq!(reason(event, &c, &table).await, Reason::SerialFormat);
        }
        assert_eq!(table.calls(), 0, "nothing reached the table");
    }

    #[tokio::test]
    async fn unknown_unlisted_blocked_and_expired_serials_are_denied() {
        let (table, c) = (table(), config(&[]));
        let mut unlisted = allowed("SN-U");
        unlisted.status = DeviceStatus::Unlisted;
        let mut blocked = allowed("SN-B");
        blocked.status = DeviceStatus::Blocked;
        let mut expired = allowed("SN-E");
        expired.valid_until = Some(unix_now());
        for record in [unlisted, blocked, expired] {
            table.put(record);
        }
        for (serial, expected) in [
            ("SN-404", Reason::UnknownSerial),
            ("SN-U", Reason::UnknownSerial),
            ("SN-B", Reason::SerialBlocked),
            ("SN-E", Reason::SerialExpired),
        ] {
            assert_eq!(
                reason(request(serial, "c", "none"), &c, &table).await,
                expected,
                "{serial}"
            );
        }
    }

    /// A claim for SN-1 issued to `installer`.
    fn installer_claim(table: &MemoryTable, id: &str, installer: &str) {
        let mut c = claim(id, Some("SN-1"), unix_now() + 300);
        c.issued_to = installer.into();
        table.put_claim(c);
    }

    fn provisioning(table: &MemoryTable) -> Provisioning {
        table
            .get(&DeviceId::Serial("SN-1".into()))
            .unwrap()
            .provisioning
            .unwrap()
    }

    /// Mutation testing: `check_claim`'s `!=` flipped to `==` survived (only the store's
    /// transaction stood in the way); so did `replaces`' `&&` flipped to `||` and `Reason::code`
    /// returning "". The rules, without a store.
    #[test]
    fn a_claim_spent_by_another_certificate_is_refused_by_the_rule_itself() {
        let c = config(&[("REQUIRE_CLAIM_RECORD", "true")]);
        let now = unix_now();
        let mut spent = claim("claim-1", Some("SN-1"), now + 300);
        spent.used = Some(ClaimUsed {
            certificate_id: "first".into(),
            serial: "SN-1".into(),
            at: now,
        });
        let denied = check_claim(Some(&spent), "SN-1", "second", now, &c).unwrap_err();
        assert_eq!(denied.code, Reason::ClaimAlreadyUsed);
        // AWS IoT retrying with the certificate that spent it.
        let retry = check_claim(Some(&spent), "SN-1", "first", now, &c).unwrap();
        assert_eq!(
            retry.map(|u| u.claim_certificate_id),
            Some("claim-1".into())
        );
        let elsewhere = check_claim(Some(&spent), "SN-2", "first", now, &c).unwrap_err();
        assert_eq!(elsewhere.code, Reason::ClaimBoundElsewhere);
        let expired = claim("claim-2", None, now);
        let denied = check_claim(Some(&expired), "SN-1", "c", now, &c).unwrap_err();
        assert_eq!(denied.code, Reason::ClaimExpired);
    }

    #[test]
    fn only_a_stale_pending_provisioning_of_the_same_installer_is_replaced() {
        let now = unix_now();
        let pending = Duration::from_secs(600);
        let record = |state, age: u64, installer: &str| {
            let mut r = allowed("SN-1");
            r.provisioning = Some(Provisioning {
                certificate_id: "old".into(),
                claim_certificate_id: None,
                provisioned_at: now - age,
                state,
                replaced_certificate_id: None,
                issued_to: Some(installer.into()),
                confirmed_at: None,
            });
            r
        };
        let stale = record(ProvisioningState::Pending, 601, "me");
        assert!(matches!(
            replaces(&stale, "new", now, pending, Some("me")),
            Ok(Replaces::StalePending { .. })
        ));
        // The log says which rule refused (an operator reads it to tell a retry from an attack).
        for (r, who, why) in [
            (
                record(ProvisioningState::Pending, 10, "me"),
                "me",
                "serial is pending with another certificate",
            ),
            (
                record(ProvisioningState::Confirmed, 601, "me"),
                "me",
                "serial's device connected with another certificate",
            ),
            (
                stale.clone(),
                "someone-else",
                "serial is pending with another certificate, from another installer's claim",
            ),
        ] {
            let denied = replaces(&r, "new", now, pending, Some(who)).unwrap_err();
            assert_eq!(denied.code, Reason::AlreadyProvisioned);
            assert_eq!(denied.detail, why);
        }
        assert!(replaces(&stale, "new", now, pending, None).is_err());
        assert!(matches!(
            replaces(&stale, "old", now, pending, None),
            Ok(Replaces::Itself)
        ));
    }

    #[test]
    fn every_reason_has_its_own_code() {
        let codes: Vec<&str> = Reason::ALL.iter().map(|r| r.code()).collect();
        let unique: std::collections::BTreeSet<&str> = codes.iter().copied().collect();
        assert_eq!(unique.len(), codes.len(), "{codes:?}");
        for code in &codes {
            assert!(
                !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'),
                "{code:?}"
            );
        }
        assert_eq!(Reason::ClaimAlreadyUsed.code(), "claim-already-used");
        assert_eq!(Reason::AlreadyProvisioned.code(), "already-provisioned");
    }

    /// The hole: nothing ever confirmed a provisioning, so after PENDING_SECONDS any installer
    /// could get a claim for a live serial and give its thing a certificate of their own.
    #[tokio::test]
    async fn an_installer_cannot_take_over_a_provisioned_device_after_pending_seconds() {
        use shared::registry::{Confirmation, Confirmations};
        let stale = config(&[("PENDING_SECONDS", "0")]);
        // Provisioned with cert-1 through installer A's claim; the device connected.
        let table = table();
        for (id, installer) in [
            ("a-1", "installer-a"),
            ("a-2", "installer-a"),
            ("b-1", "installer-b"),
        ] {
            installer_claim(&table, id, installer);
        }
        assert!(evaluate(request("SN-1", "cert-1", "a-1"), &stale, &table)
            .await
            .0
            .is_ok());
        assert_eq!(
            provisioning(&table).issued_to.as_deref(),
            Some("installer-a")
        );
        assert_eq!(
            table.confirm("SN-1", "cert-1", unix_now()).await,
            Ok(Confirmation::Recorded {
                newly: true,
                replaced: None
            })
        );
        for claim in ["a-2", "b-1"] {
            assert_eq!(
                reason(request("SN-1", "cert-2", claim), &stale, &table).await,
                Reason::AlreadyProvisioned,
                "{claim} replaced a confirmed device"
            );
        }
        assert_eq!(provisioning(&table).certificate_id, "cert-1");

        // Never connected: only installer A's own claim may replace it.
        let table = self::table();
        for (id, installer) in [
            ("a-1", "installer-a"),
            ("a-2", "installer-a"),
            ("b-1", "installer-b"),
        ] {
            installer_claim(&table, id, installer);
        }
        assert!(evaluate(request("SN-1", "cert-1", "a-1"), &stale, &table)
            .await
            .0
            .is_ok());
        assert_eq!(
            reason(request("SN-1", "cert-2", "b-1"), &stale, &table).await,
            Reason::AlreadyProvisioned
        );
        // Nor without a recorded claim at all: nobody could show it is the same installer.
        assert_eq!(
            reason(request("SN-1", "cert-2", "none"), &stale, &table).await,
            Reason::AlreadyProvisioned
        );
        assert!(evaluate(request("SN-1", "cert-2", "a-2"), &stale, &table)
            .await
            .0
            .is_ok());
        let p = provisioning(&table);
        assert_eq!(
            (
                p.certificate_id.as_str(),
                p.replaced_certificate_id.as_deref()
            ),
            ("cert-2", Some("cert-1"))
        );
        // Within PENDING_SECONDS not even installer A may.
        installer_claim(&table, "a-3", "installer-a");
        assert_eq!(
            reason(request("SN-1", "cert-3", "a-3"), &config(&[]), &table).await,
            Reason::AlreadyProvisioned
        );
    }

    #[tokio::test]
    async fn a_provisioned_serial_takes_no_other_certificate_unless_allowed_once_or_stale() {
        let (table, c) = (table(), config(&[]));
        installer_claim(&table, "a-1", "installer");
        installer_claim(&table, "a-2", "installer");
        assert!(evaluate(request("SN-1", "c1", "a-1"), &c, &table)
            .await
            .0
            .is_ok());
        // AWS IoT retrying the same certificate.
        assert!(evaluate(request("SN-1", "c1", "a-1"), &c, &table)
            .await
            .0
            .is_ok());
        assert_eq!(
            reason(request("SN-1", "c2", "a-2"), &c, &table).await,
            Reason::AlreadyProvisioned
        );
        // Pending longer than PENDING_SECONDS: replaceable by the same installer.
        let patient = config(&[("PENDING_SECONDS", "0")]);
        assert!(evaluate(request("SN-1", "c2", "a-2"), &patient, &table)
            .await
            .0
            .is_ok());
        // Confirmed: only allow_reprovision, once.
        let mut record = table.get(&DeviceId::Serial("SN-1".into())).unwrap();
        record.provisioning = Some(Provisioning {
            state: ProvisioningState::Confirmed,
            ..record.provisioning.clone().unwrap()
        });
        record.allow_reprovision = true;
        table.put(record);
        assert!(evaluate(request("SN-1", "c3", "none"), &patient, &table)
            .await
            .0
            .is_ok());
        assert_eq!(
            reason(request("SN-1", "c4", "none"), &c, &table).await,
            Reason::AlreadyProvisioned
        );
    }

    #[tokio::test]
    async fn claims_are_bound_valid_recorded_and_good_for_one_device() {
        let table = table();
        let strict = config(&[("REQUIRE_CLAIM_RECORD", "true")]);
        table.put(allowed("SN-2"));
        assert_eq!(
            reason(request("SN-2", "c", "claim-1"), &strict, &table).await,
            Reason::ClaimBoundElsewhere
        );
        assert_eq!(
            reason(request("SN-1", "c", "not-recorded"), &strict, &table).await,
            Reason::ClaimUnknown
        );
        table.put_claim(claim("old", None, unix_now()));
        assert_eq!(
            reason(request("SN-2", "c", "old"), &strict, &table).await,
            Reason::ClaimExpired
        );
        let mut spent = claim("spent", None, unix_now() + 300);
        spent.used = Some(ClaimUsed {
            certificate_id: "other".into(),
            serial: "SN-9".into(),
            at: unix_now(),
        });
        table.put_claim(spent);
        assert_eq!(
            reason(request("SN-2", "c", "spent"), &strict, &table).await,
            Reason::ClaimAlreadyUsed
        );
        assert_eq!(
            table
                .get(&DeviceId::Serial("SN-2".into()))
                .unwrap()
                .provisioning,
            None
        );
    }

    #[tokio::test]
    async fn table_failures_deny_with_their_reason() {
        let (table, c) = (table(), config(&[]));
        for (failure, expected) in [
            (RegistryError::Throttled, Reason::RegistryThrottled),
            (
                RegistryError::Unavailable("timed out".into()),
                Reason::RegistryUnavailable,
            ),
            (
                RegistryError::Malformed {
                    key: "serial#SN-1".into(),
                    field: "status",
                },
                Reason::RegistryMalformed,
            ),
        ] {
            table.fail_with(Some(failure));
            assert_eq!(
                reason(request("SN-1", "c", "claim-1"), &c, &table).await,
                expected
            );
        }
    }

    /// On tokio's paused clock: the table hangs for an hour of virtual time, and the decision
    /// comes at the budget, not after it.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_table_is_denied_at_the_budget() {
        let table = table();
        table.delay(Some(Duration::from_secs(3600)));
        let c = config(&[("DECISION_BUDGET_MS", "100")]);
        let started = tokio::time::Instant::now();
        let (decision, summary) = evaluate(request("SN-1", "c", "claim-1"), &c, &table).await;
        assert_eq!(decision.unwrap_err().code, Reason::Deadline);
        assert_eq!(summary.serial, "SN-1");
        assert_eq!(started.elapsed(), Duration::from_millis(100));
    }

    /// Two requests that both read the serial as unprovisioned before either writes: the
    /// write's condition lets exactly one through (what concurrency looks like to the table).
    #[tokio::test]
    async fn two_requests_that_read_before_either_writes_let_one_through() {
        let (table, c) = (table(), config(&[]));
        let record = table.get(&DeviceId::Serial("SN-1".into())).unwrap();
        let now = unix_now();
        let write = |cert: &str| ProvisioningWrite {
            serial: "SN-1".into(),
            certificate_id: cert.into(),
            claim_certificate_id: None,
            spend_claim: None,
            issued_to: None,
            at: now,
            replaces: replaces(&record, cert, now, c.pending, None).unwrap(),
        };
        let (first, second) = (write("c1"), write("c2"));
        assert_eq!(first.replaces, Replaces::Nothing);
        assert_eq!(second.replaces, Replaces::Nothing);
        assert!(table.record_provisioning(&first).await.is_ok());
        assert_eq!(
            table.record_provisioning(&second).await,
            Err(RegistryError::Conflict("serial#SN-1".into()))
        );
    }

    /// The samples in `events/fleet-prehook/` are decided as their names say, against a table
    /// holding the serials the local stack seeds (SN-0001 allowed, SN-0666 blocked).
    #[tokio::test]
    async fn every_sample_event_gets_the_decision_its_name_promises() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events/fleet-prehook");
        let read = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
        };
        let table = MemoryTable::new();
        table.put(allowed("SN-0001"));
        let mut blocked = allowed("SN-0666");
        blocked.status = DeviceStatus::Blocked;
        table.put(blocked);
        let c = config(&[]);
        for (name, expected) in [
            ("blocked-serial.json", Reason::SerialBlocked),
            ("unknown-serial.json", Reason::UnknownSerial),
            ("malformed.json", Reason::MalformedRequest),
            ("misnamed-parameter.json", Reason::MissingSerialParameter),
            ("serial-format.json", Reason::SerialFormat),
        ] {
            assert_eq!(reason(read(name), &c, &table).await, expected, "{name}");
        }
        assert!(evaluate(read("allowed.json"), &c, &table).await.0.is_ok());
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
        /// Any payload: denied (no serial is known here) with a reason from the documented
        /// set, never a panic and never an allow.
        #[test]
        fn any_hook_payload_is_denied_with_a_reason(event in shared::strategies::json_with_keys(KEYS)) {
            let config = config(&[]);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (decision, _) = runtime.block_on(evaluate(event, &config, &MemoryTable::new()));
            let denial = decision.expect_err("nothing may be allowed by an empty table");
            proptest::prop_assert!(
                [Reason::MalformedRequest, Reason::MissingSerialParameter, Reason::SerialFormat, Reason::UnknownSerial]
                    .contains(&denial.code),
                "{denial:?}"
            );
            // The misnamed-parameter denial names the parameter the template should have.
            if denial.code == Reason::MissingSerialParameter {
                proptest::prop_assert!(denial.detail.contains("'SerialNumber'"), "{}", denial.detail);
            }
        }
    }
}
