//! One invocation: who is calling (client context only), may they register, with which key,
//! what DPS says, and the answer in the shape the device firmware parses.

use std::time::{Duration, SystemTime};

use base64::Engine;
use lambda_runtime::Context;
use serde::Serialize;
use serde_json::Value;
use shared::dps::{self, Assignment, DpsError, RegistrationRequest};
use shared::keys::SymmetricKey;
use shared::registry::{DeviceId, DeviceRegistry, DeviceStatus, Registration, RegistryError};
use shared::secrets::{load_key, KeyLookupError, SecretError};
use shared::soracom::SimIdentity;

use crate::config::KeySource;
use crate::state::State;
use shared::clock::unix_now;

/// Largest accepted device body (serialized JSON): custom allocation data, not telemetry.
pub const MAX_BODY_BYTES: usize = 4096;
/// Kept free before the Lambda deadline to answer and log.
const DEADLINE_MARGIN: Duration = Duration::from_millis(700);

/// What Funk hands back to the device. The firmware reads `statusCode` and `body`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub status_code: u16,
    /// On success `HostName=...;DeviceId=...;SharedAccessKey=...`; otherwise a short reason.
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// Seconds after which a retry may succeed (throttling, timeouts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// A refusal: status, stable code for logs and clients, and a short secret-free reason.
#[derive(Debug)]
struct Refusal {
    status: u16,
    code: &'static str,
    reason: String,
    retry_after: Option<u64>,
}

fn refuse(status: u16, code: &'static str, reason: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        reason: reason.into(),
        retry_after: None,
    }
}

impl Refusal {
    fn retry_in(mut self, after: Duration) -> Self {
        self.retry_after = Some(after.as_secs().max(1));
        self
    }
}

/// Handles one Funk invocation. Never fails: every outcome is a `Response`.
pub async fn handle(event: Value, context: &Context, state: &State) -> Response {
    let started = tokio::time::Instant::now();
    let imsi = context
        .client_context
        .as_ref()
        .and_then(|c| c.custom.get("imsi"))
        .cloned()
        .unwrap_or_default();
    match register(event, context, state).await {
        Ok((registration_id, assignment, key)) => {
            tracing::info!(
                outcome = "registered", imsi = %imsi, registration_id = %registration_id,
                assigned_hub = %assignment.assigned_hub, device_id = %assignment.device_id,
                substatus = assignment.substatus.as_deref().unwrap_or(""),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "device registered with DPS"
            );
            Response {
                status_code: 200,
                body: format!(
                    "HostName={};DeviceId={};SharedAccessKey={}",
                    assignment.assigned_hub,
                    assignment.device_id,
                    key.to_base64()
                ),
                error: None,
                retry_after: None,
                assigned_hub: Some(assignment.assigned_hub),
                device_id: Some(assignment.device_id),
            }
        }
        Err(refusal) => {
            tracing::warn!(
                outcome = "refused", imsi = %imsi, status = refusal.status, error = refusal.code,
                reason = %refusal.reason, elapsed_ms = started.elapsed().as_millis() as u64,
                "device not registered"
            );
            Response {
                status_code: refusal.status,
                body: refusal.reason,
                error: Some(refusal.code),
                retry_after: refusal.retry_after,
                assigned_hub: None,
                device_id: None,
            }
        }
    }
}

async fn register(
    event: Value,
    context: &Context,
    state: &State,
) -> Result<(String, Assignment, SymmetricKey), Refusal> {
    let config = &state.config;
    // Identity comes only from the client context that Funk sets, never from the body.
    let custom = context
        .client_context
        .as_ref()
        .map(|c| &c.custom)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            refuse(
                403,
                "no-identity",
                "no SORACOM identity: invoke through SORACOM Funk",
            )
        })?;
    let sim =
        SimIdentity::from_custom(custom).map_err(|e| refuse(403, "bad-identity", e.to_string()))?;
    if !config.allowed_operators.is_empty() && !config.allowed_operators.contains(&sim.operator_id)
    {
        return Err(refuse(
            403,
            "operator-not-allowed",
            "SIM belongs to an operator that is not allowed",
        ));
    }

    let payload = device_payload(&event).map_err(|reason| refuse(400, "bad-request", reason))?;

    let registration_id = config
        .registration_id
        .render(&sim.imsi, sim.sim_id.as_deref())
        .ok_or_else(|| {
            refuse(
                403,
                "bad-identity",
                "client context lacks simId, which REGISTRATION_ID_TEMPLATE needs",
            )
        })?;
    if !is_registration_id(&registration_id) {
        return Err(refuse(
            500,
            "misconfigured",
            "registration id is not 1-128 of a-z A-Z 0-9 - . _ :",
        ));
    }

    // The SIM's entry and its key, fetched together: a cold start waits for one round trip
    // instead of two (measured by `make bench`). A refused SIM's key is dropped unused.
    let sim_id = DeviceId::Sim(sim.imsi.clone());
    let (record, key) = tokio::join!(
        state.registry.get(&sim_id),
        device_key(state, &sim.imsi, &registration_id)
    );
    let record = record.map_err(registry_refusal)?;
    // A SIM known only from its own earlier registrations was never listed: it is treated as
    // not in the table (found by the fault tests: it used to read as blocked, so every unlisted
    // SIM could register exactly once).
    let listed = record
        .as_ref()
        .filter(|r| r.status != DeviceStatus::Unlisted);
    match listed {
        Some(r) => {
            if let Some(why) = r.refusal(unix_now()) {
                return Err(refuse(
                    403,
                    if why == "expired" {
                        "sim-expired"
                    } else {
                        "sim-blocked"
                    },
                    format!("SIM is {why}"),
                ));
            }
        }
        None if config.require_allowlist => {
            return Err(refuse(403, "sim-unknown", "SIM is not in the device table"));
        }
        None => {}
    }

    let key = key?;

    let deadline = dps_deadline(context, config.dps_budget);
    let tls = state.tls.get().await.map_err(dps_refusal)?;
    let request = RegistrationRequest {
        endpoint: &config.endpoint,
        id_scope: &config.id_scope,
        registration_id: &registration_id,
        device_key: &key,
        payload: payload.as_ref(),
        tls,
    };
    let assignment = dps::register(&request, deadline)
        .await
        .map_err(dps_refusal)?;

    let recorded = Registration {
        registration_id: registration_id.clone(),
        assigned_hub: assignment.assigned_hub.clone(),
        device_id: assignment.device_id.clone(),
        registered_at: unix_now(),
    };
    // DPS has registered the device; failing the device now would only make it retry. The
    // record is for operators, so a failed write is logged loudly instead.
    if let Err(e) = state
        .registry
        .record_registration(&sim.imsi, &recorded)
        .await
    {
        tracing::error!(imsi = %sim.imsi, error = %e, "registration not recorded in the device table");
    }
    Ok((registration_id, assignment, key))
}

/// The Lambda deadline less a margin, and never more than `budget` from now.
fn dps_deadline(context: &Context, budget: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let remaining = context
        .deadline()
        .duration_since(SystemTime::now())
        .ok()
        .filter(|_| context.deadline > 0)
        .map(|d| d.saturating_sub(DEADLINE_MARGIN))
        .unwrap_or(budget);
    now + remaining.min(budget)
}

fn is_registration_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

async fn device_key(
    state: &State,
    imsi: &str,
    registration_id: &str,
) -> Result<SymmetricKey, Refusal> {
    let lookup = match &state.config.key_source {
        KeySource::Group { parameter } => load_key(&state.keys, parameter)
            .await
            .map(|group| group.derive_device_key(registration_id))
            .map_err(|e| (e, false)),
        KeySource::IndividualSsm { prefix } => {
            load_key(&state.keys, &format!("{prefix}{registration_id}"))
                .await
                .map_err(|e| (e, true))
        }
        KeySource::IndividualDynamoDb => {
            load_key(&state.keys, &DeviceId::Sim(imsi.to_owned()).key())
                .await
                .map_err(|e| (e, true))
        }
    };
    lookup.map_err(|(error, per_device)| match error {
        // No individual key: this SIM has no enrollment. No group key: the function is broken.
        KeyLookupError::Secret(SecretError::NotFound(_)) if per_device => refuse(
            403,
            "no-enrollment",
            "no individual enrollment for this SIM",
        ),
        KeyLookupError::Secret(e) if e.is_transient() => {
            refuse(503, "key-store-unavailable", "key store unavailable")
                .retry_in(Duration::from_secs(2))
        }
        other => {
            tracing::error!(error = %other, "device key unavailable");
            refuse(500, "misconfigured", "device key unavailable")
        }
    })
}

fn registry_refusal(e: RegistryError) -> Refusal {
    match e {
        RegistryError::Malformed { .. } => refuse(500, "misconfigured", e.to_string()),
        _ => refuse(503, "registry-unavailable", "device table unavailable")
            .retry_in(Duration::from_secs(2)),
    }
}

fn dps_refusal(e: DpsError) -> Refusal {
    let reason = e.to_string();
    match &e {
        DpsError::Unauthorized(_) => refuse(403, "enrollment-refused", reason),
        DpsError::Rejected {
            status: 401 | 403 | 404,
            ..
        } => refuse(403, "enrollment-refused", reason),
        DpsError::NotAssigned { .. } => refuse(403, "enrollment-not-assigned", reason),
        DpsError::Throttled { retry_after } | DpsError::Deadline { retry_after } => refuse(
            503,
            if matches!(e, DpsError::Throttled { .. }) {
                "dps-throttled"
            } else {
                "dps-timeout"
            },
            reason,
        )
        .retry_in(*retry_after),
        DpsError::Upstream { .. } | DpsError::Connection(_) => refuse(502, "dps-failed", reason)
            .retry_in(e.retry_after().unwrap_or(Duration::from_secs(2))),
        DpsError::Rejected { .. } | DpsError::Protocol(_) | DpsError::Tls(_) => {
            refuse(502, "dps-failed", reason)
        }
    }
}

/// The custom allocation payload from the device's body. Funk passes JSON bodies as they are,
/// and wraps the "text" and "binary" formats as `{"payload": "..."}` (binary base64-encoded).
fn device_payload(event: &Value) -> Result<Option<Value>, String> {
    let unwrapped = match event {
        Value::Null => return Ok(None),
        Value::Object(map) if map.len() == 1 => match map.get("payload") {
            Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
            Some(Value::String(s)) => Some(decode_wrapped(s)?),
            _ => None,
        },
        Value::Object(_) => None,
        _ => return Err("body must be a JSON object".into()),
    };
    let body = unwrapped.unwrap_or_else(|| event.clone());
    let size = body.to_string().len();
    if size > MAX_BODY_BYTES {
        return Err(format!(
            "body is {size} bytes; at most {MAX_BODY_BYTES} are accepted"
        ));
    }
    match body {
        Value::Object(map) if map.is_empty() => Ok(None),
        Value::Object(_) => Ok(Some(body)),
        _ => Err("body must be a JSON object".into()),
    }
}

fn decode_wrapped(s: &str) -> Result<Value, String> {
    if s.len() > MAX_BODY_BYTES * 2 {
        return Err(format!("body exceeds {MAX_BODY_BYTES} bytes"));
    }
    if let Ok(v) = serde_json::from_str::<Value>(s) {
        return Ok(v);
    }
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| "payload is neither JSON nor base64-encoded JSON".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bodies_become_payloads() {
        assert_eq!(device_payload(&json!({})).unwrap(), None);
        assert_eq!(device_payload(&Value::Null).unwrap(), None);
        assert_eq!(
            device_payload(&json!({"a": 1})).unwrap(),
            Some(json!({"a": 1}))
        );
        // Funk "text" and "binary" formats.
        assert_eq!(
            device_payload(&json!({"payload": "{\"a\":1}"})).unwrap(),
            Some(json!({"a": 1}))
        );
        assert_eq!(
            device_payload(&json!({"payload": "eyJhIjoxfQ=="})).unwrap(),
            Some(json!({"a": 1}))
        );
        assert_eq!(device_payload(&json!({"payload": ""})).unwrap(), None);
        // A JSON body whose only field is a non-string payload is the device's own data.
        assert_eq!(
            device_payload(&json!({"payload": {"x": 1}})).unwrap(),
            Some(json!({"payload": {"x": 1}}))
        );
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        for bad in [
            json!([1]),
            json!("text"),
            json!(3),
            json!({"payload": "not json"}),
            json!({"payload": "WzFd"}),
        ] {
            assert!(device_payload(&bad).is_err(), "{bad}");
        }
        let big = json!({"blob": "x".repeat(MAX_BODY_BYTES)});
        assert!(device_payload(&big).unwrap_err().contains("at most 4096"));
    }

    #[test]
    fn registration_ids() {
        assert!(is_registration_id("440103123456789"));
        assert!(is_registration_id("soracom:a-b_c.d"));
        assert!(!is_registration_id(""));
        assert!(!is_registration_id("a/b"));
        assert!(!is_registration_id(&"a".repeat(129)));
    }

    #[test]
    fn deadline_respects_budget_and_lambda_deadline() {
        let budget = Duration::from_secs(8);
        let no_deadline = Context::default();
        let d = dps_deadline(&no_deadline, budget) - tokio::time::Instant::now();
        assert!(d <= budget && d > Duration::from_secs(7));

        let mut soon = Context::default();
        let in_two = SystemTime::now() + Duration::from_secs(2);
        soon.deadline = in_two
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let d = dps_deadline(&soon, budget) - tokio::time::Instant::now();
        assert!(d <= Duration::from_millis(1300), "{d:?}");
    }

    const KEYS: &[&str] = &["payload", "body", "data", "isBase64Encoded", "a"];

    proptest::proptest! {
        /// Any body a device sends through Funk: a payload for DPS or a refusal with a reason.
        #[test]
        fn any_body_becomes_a_payload_or_a_reason(event in shared::strategies::json_with_keys(KEYS)) {
            match device_payload(&event) {
                Ok(_) => {}
                Err(reason) => proptest::prop_assert!(!reason.is_empty()),
            }
        }
    }
}
