//! SORACOM Beam as a second front door. A device without Funk posts to Beam's HTTP entry
//! point; Beam adds the SIM's identity headers (`x-soracom-imsi`, `-sim-id`, `-imei`, …), a
//! timestamp and a signature over them with the pre-shared key, and forwards the request to
//! the HTTP API route `POST /register`, which invokes this function with an API Gateway
//! (payload 2.0) event. [`Gate`] verifies the signature (constant time), the timestamp's
//! window and that the signature was never used before; only then is the SIM identified, from
//! those headers alone, and the registration is the Funk path's: same checks, same limits, same
//! answer (as the HTTP response's JSON body, status and `Retry-After`). Anything unsigned,
//! badly signed, stale or replayed gets 403 and nothing else happens.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use lambda_runtime::Context;
use serde_json::{json, Value};
use shared::registry::{beam_key, OnceLog, RegistryError, SimRegistry};
use shared::secrets::{SecretError, SecretStore};
use shared::soracom::{verify_beam, BeamError, BeamHeaders, SimIdentity};

use crate::answer::Response;
use crate::config::BeamConfig;
use crate::handler::{handle_identified, MAX_BODY_BYTES};
use crate::ports::{DeviceCa, DeviceKeys, Dps, DpsLimits};
use crate::state::State;

/// The route Beam's requests arrive on.
pub const ROUTE: &str = "POST /register";

/// Whether `event` is an API Gateway HTTP API request (payload format 2.0) rather than a Funk
/// invocation. Such an event never carries a client context, so it can never pass as Funk.
pub fn is_http_event(event: &Value) -> bool {
    event.get("version").and_then(Value::as_str) == Some("2.0")
        && event["requestContext"]["http"].is_object()
}

/// Why a Beam request was refused before any registration.
#[derive(Debug, thiserror::Error)]
pub enum BeamRefusal {
    #[error("Beam is not configured here: {0}")]
    NotConfigured(&'static str),
    #[error("{0}")]
    Signature(#[from] BeamError),
    #[error("signature used before (a replayed request)")]
    Replayed,
    #[error("x-soracom-imsi is missing or not an IMSI")]
    Identity,
    #[error("{0}")]
    Unavailable(String),
}

impl BeamRefusal {
    /// A refusal an attacker can cause is 403; only our own outage is 503 (retry later).
    fn status(&self) -> u16 {
        match self {
            Self::Unavailable(_) => 503,
            _ => 403,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::NotConfigured(_) => "beam-not-configured",
            Self::Signature(BeamError::Stale) => "beam-stale",
            Self::Signature(_) => "beam-signature",
            Self::Replayed => "beam-replayed",
            Self::Identity => "beam-identity",
            Self::Unavailable(_) => "beam-unavailable",
        }
    }
}

/// Verifies Beam's signature and spends it.
pub struct Gate<S, G> {
    pub config: BeamConfig,
    pub psk: S,
    pub used: G,
}

impl<S: SecretStore, G: OnceLog> Gate<S, G> {
    /// The SIM the headers name, if they are Beam's, fresh and never seen before.
    pub async fn admit(
        &self,
        headers: &BeamHeaders,
        now: SystemTime,
    ) -> Result<SimIdentity, BeamRefusal> {
        let parameter = self
            .config
            .psk_parameter
            .as_deref()
            .ok_or(BeamRefusal::NotConfigured("no BEAM_PSK_PARAMETER"))?;
        let operator = self
            .config
            .operator_id
            .clone()
            .ok_or(BeamRefusal::NotConfigured("no BEAM_OPERATOR_ID"))?;
        let psk = match self.psk.get(parameter).await {
            Ok(psk) => psk,
            Err(SecretError::NotFound(_)) => {
                return Err(BeamRefusal::NotConfigured(
                    "the PSK parameter does not exist",
                ))
            }
            Err(e) if e.is_transient() => return Err(BeamRefusal::Unavailable(e.to_string())),
            Err(e) => return Err(BeamRefusal::NotConfigured(static_reason(&e))),
        };
        let now_ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let skew_ms = self.config.max_skew.as_millis() as u64;
        verify_beam(psk.expose().as_bytes(), headers, now_ms, skew_ms)?;
        let imsi = headers
            .imsi
            .clone()
            .filter(|i| (14..=15).contains(&i.len()) && i.bytes().all(|b| b.is_ascii_digit()))
            .ok_or(BeamRefusal::Identity)?;
        // Verified above, so present; kept until the window has surely passed.
        let signature = headers
            .signature
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let until = (now_ms + 2 * skew_ms) / 1000 + 60;
        match self.used.first_use(&beam_key(&signature), until).await {
            Ok(true) => {}
            Ok(false) => return Err(BeamRefusal::Replayed),
            Err(e) => return Err(BeamRefusal::Unavailable(registry_reason(&e))),
        }
        Ok(SimIdentity {
            srn: format!("srn:soracom:{operator}::Subscriber:{imsi}"),
            resource_id: Some(imsi.clone()),
            imsi,
            operator_id: operator,
            resource_type: Some("Subscriber".into()),
            source_protocol: Some("beam".into()),
            imei: headers.imei.clone(),
            sim_id: headers.sim_id.clone(),
            coverage: None,
        })
    }
}

fn static_reason(e: &SecretError) -> &'static str {
    match e {
        SecretError::NotEncrypted(_) => "the PSK parameter is not a SecureString",
        SecretError::Empty(_) => "the PSK parameter is empty",
        _ => "the PSK parameter is unusable",
    }
}

fn registry_reason(e: &RegistryError) -> String {
    format!("device table: {e}")
}

/// The request's lower-case headers, if it came by the Beam route. Nothing else of the event is
/// read before the gate: the body (up to Lambda's 6 MB) is not decoded for a stranger.
fn headers(event: &Value) -> Result<HashMap<String, String>, &'static str> {
    if event.get("routeKey").and_then(Value::as_str) != Some(ROUTE) {
        return Err("not the POST /register route");
    }
    Ok(event
        .get("headers")
        .and_then(Value::as_object)
        .map(|h| {
            h.iter()
                .filter_map(|(k, v)| Some((k.to_ascii_lowercase(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default())
}

/// The request's body as JSON (`{}` when empty), at most [`MAX_BODY_BYTES`] once decoded:
/// what a Funk device may send, far below what API Gateway and Lambda let through.
fn body(event: &Value) -> Result<Value, String> {
    let raw = event.get("body").and_then(Value::as_str).unwrap_or("");
    let base64 = event.get("isBase64Encoded").and_then(Value::as_bool) == Some(true);
    // Base64 is 4/3 of its bytes: refuse by the text's length before decoding anything.
    let most = if base64 {
        MAX_BODY_BYTES.div_ceil(3) * 4
    } else {
        MAX_BODY_BYTES
    };
    if raw.len() > most {
        return Err(format!("body exceeds {MAX_BODY_BYTES} bytes"));
    }
    let text = if base64 {
        let bytes = STANDARD.decode(raw).map_err(|_| "body is not base64")?;
        String::from_utf8(bytes).map_err(|_| "body is not UTF-8")?
    } else {
        raw.to_owned()
    };
    if text.len() > MAX_BODY_BYTES {
        return Err(format!("body exceeds {MAX_BODY_BYTES} bytes"));
    }
    if text.trim().is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_str(&text).map_err(|_| "body is not JSON".to_owned())
}

/// An HTTP API response with `answer` as its JSON body.
fn http(status: u16, answer: &Value, retry_after: Option<u64>) -> Value {
    let mut headers = json!({"content-type": "application/json", "cache-control": "no-store"});
    if let Some(seconds) = retry_after {
        headers["retry-after"] = json!(seconds.to_string());
    }
    json!({
        "statusCode": status,
        "headers": headers,
        "body": answer.to_string(),
        "isBase64Encoded": false,
    })
}

fn refused(status: u16, code: &str, sentence: &str, retry_after: Option<u64>) -> Value {
    let mut answer = json!({"statusCode": status, "error": code, "body": sentence});
    if let Some(seconds) = retry_after {
        answer["retryAfter"] = json!(seconds);
    }
    http(status, &answer, retry_after)
}

/// Handles one request on the Beam route.
pub async fn handle<R, K, D, L, C, S, G>(
    event: Value,
    context: &Context,
    state: &State<R, K, D, L, C>,
    gate: &Gate<S, G>,
) -> Value
where
    R: SimRegistry,
    K: DeviceKeys,
    D: Dps,
    L: DpsLimits,
    C: DeviceCa,
    S: SecretStore,
    G: OnceLog,
{
    let headers = match headers(&event) {
        Ok(headers) => headers,
        Err(reason) => return bad_request(reason),
    };
    let beam = BeamHeaders::from_lookup(|name| headers.get(name).map(String::as_str));
    let sim = match gate.admit(&beam, SystemTime::now()).await {
        Ok(sim) => sim,
        Err(refusal) => {
            tracing::warn!(
                outcome = "refused", error = refusal.code(), reason = %refusal,
                imsi = beam.imsi.as_deref().unwrap_or(""), "Beam request refused"
            );
            lambda_support::metrics::emit(refusal.code(), &[]);
            return match refusal.status() {
                503 => refused(503, refusal.code(), "Try again later.", Some(RETRY_SECONDS)),
                status => refused(
                    status,
                    refusal.code(),
                    "The request is not signed by SORACOM Beam.",
                    None,
                ),
            };
        }
    };
    // Signed by Beam: only now is the body worth reading.
    let body = match body(&event) {
        Ok(body) => body,
        Err(reason) => return bad_request(&reason),
    };
    let response: Response = handle_identified(body, sim, context, state).await;
    let answer = serde_json::to_value(&response).unwrap_or_else(|_| json!({}));
    http(response.status_code, &answer, response.retry_after)
}

fn bad_request(reason: &str) -> Value {
    tracing::warn!(
        outcome = "refused",
        error = "beam-bad-request",
        reason,
        "Beam request refused"
    );
    lambda_support::metrics::emit("beam-bad-request", &[]);
    refused(
        400,
        "bad-request",
        "The request is not a registration request.",
        None,
    )
}

/// When to retry after our own outage (SSM or the device table).
const RETRY_SECONDS: u64 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn event(headers: Value, body: &str, base64: bool) -> Value {
        json!({
            "version": "2.0",
            "routeKey": ROUTE,
            "rawPath": "/register",
            "headers": headers,
            "requestContext": {"http": {"method": "POST", "path": "/register"}},
            "body": body,
            "isBase64Encoded": base64
        })
    }

    #[test]
    fn an_http_api_event_is_told_from_a_funk_body() {
        assert!(is_http_event(&event(json!({}), "", false)));
        assert!(!is_http_event(&json!({"version": "2.0"})));
        assert!(!is_http_event(&json!({"reprovision": true})));
    }

    #[test]
    fn headers_are_read_case_blind_and_the_body_as_json() {
        let signed = event(
            json!({"X-Soracom-IMSI": "440103123456789"}),
            &STANDARD.encode(br#"{"reprovision": true}"#),
            true,
        );
        assert_eq!(
            headers(&signed).unwrap()["x-soracom-imsi"],
            "440103123456789"
        );
        assert_eq!(body(&signed).unwrap(), json!({"reprovision": true}));
        assert_eq!(body(&event(json!({}), "", false)).unwrap(), json!({}));
        assert!(body(&event(json!({}), "not json", false)).is_err());
        let mut other = event(json!({}), "", false);
        other["routeKey"] = json!("GET /register");
        assert!(headers(&other).is_err());
    }

    #[test]
    fn bodies_are_bounded_at_the_funk_limit_before_and_after_decoding() {
        let at_limit = format!(r#"{{"b":"{}"}}"#, "x".repeat(MAX_BODY_BYTES - 8));
        assert_eq!(at_limit.len(), MAX_BODY_BYTES);
        assert!(body(&event(json!({}), &at_limit, false)).is_ok());
        assert!(body(&event(json!({}), &STANDARD.encode(&at_limit), true)).is_ok());
        let over = format!(r#"{{"b":"{}"}}"#, "x".repeat(MAX_BODY_BYTES - 7));
        for (text, base64) in [(over.clone(), false), (STANDARD.encode(&over), true)] {
            let err = body(&event(json!({}), &text, base64)).unwrap_err();
            assert!(err.contains("exceeds 4096"), "{err}");
        }
        // A huge base64 body is refused by its length, not decoded.
        let huge = "A".repeat(6 * 1024 * 1024);
        assert!(body(&event(json!({}), &huge, true)).is_err());
    }

    #[test]
    fn refusals_are_http_answers_with_the_funk_answer_inside() {
        let answer = refused(503, "beam-unavailable", "Try again later.", Some(5));
        assert_eq!(answer["statusCode"], 503);
        assert_eq!(answer["headers"]["retry-after"], "5");
        let body: Value = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["retryAfter"], 5);
        assert_eq!(body["error"], "beam-unavailable");
    }
}
