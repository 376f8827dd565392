//! One claim request: who (JWT claims only), may they (group, rate limit), what (serial binding,
//! template), then `CreateProvisioningClaim`, the audit record, and the answer.

use std::collections::BTreeMap;

use aws_sdk_iot::operation::create_provisioning_claim::CreateProvisioningClaimError;
use serde::Serialize;
use serde_json::{json, Value};
use shared::aws::{classify, Failure};
use shared::quota::{Quota, Verdict};
use shared::registry::{ClaimRecord, DeviceRegistry, DynamoRegistry};

use crate::config::Config;
use crate::request::{ClaimRequest, HttpApiRequest};

/// Cold-start state.
pub struct State {
    pub config: Config,
    pub iot: aws_sdk_iot::Client,
    pub registry: DynamoRegistry,
    pub quota: Quota,
}

impl State {
    pub fn new(config: Config, sdk: &aws_config::SdkConfig) -> Self {
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        Self {
            iot: aws_sdk_iot::Client::new(sdk),
            registry: DynamoRegistry::new(dynamodb.clone(), &config.devices_table),
            quota: Quota::new(
                dynamodb,
                &config.devices_table,
                config.claims_per_window,
                config.window_seconds,
            ),
            config,
        }
    }
}

/// The HTTP API (payload 2.0) response.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpResponse {
    pub status_code: u16,
    pub headers: BTreeMap<String, String>,
    pub body: String,
    pub is_base64_encoded: bool,
}

impl HttpResponse {
    fn json(status_code: u16, body: Value) -> Self {
        let headers = BTreeMap::from([
            ("content-type".to_owned(), "application/json".to_owned()),
            // The body may carry a private key: no cache anywhere may keep it.
            ("cache-control".to_owned(), "no-store".to_owned()),
        ]);
        Self {
            status_code,
            headers,
            body: body.to_string(),
            is_base64_encoded: false,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// A refusal with its status, stable code and message.
struct Refusal {
    status: u16,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

fn refuse(status: u16, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        message: message.into(),
        retry_after: None,
    }
}

/// What the log line says about the request.
#[derive(Default)]
struct Summary {
    sub: String,
    serial: String,
    template: String,
    certificate_id: String,
}

/// Handles one request at `now` (Unix seconds). Never fails: every outcome is a response.
pub async fn handle(event: Value, now: u64, state: &State) -> HttpResponse {
    let mut summary = Summary::default();
    match issue(event, now, state, &mut summary).await {
        Ok(body) => {
            tracing::info!(
                outcome = "issued", sub = %summary.sub, serial = %summary.serial, template = %summary.template,
                certificate_id = %summary.certificate_id, "claim certificate issued"
            );
            HttpResponse::json(200, body)
        }
        Err(refusal) => {
            tracing::warn!(
                outcome = "refused", status = refusal.status, error = refusal.code, reason = %refusal.message,
                sub = %summary.sub, serial = %summary.serial, template = %summary.template,
                "claim certificate not issued"
            );
            let mut response = HttpResponse::json(
                refusal.status,
                json!({"error": refusal.code, "message": refusal.message}),
            );
            if let Some(seconds) = refusal.retry_after {
                response
                    .headers
                    .insert("retry-after".into(), seconds.to_string());
            }
            response
        }
    }
}

async fn issue(
    event: Value,
    now: u64,
    state: &State,
    summary: &mut Summary,
) -> Result<Value, Refusal> {
    let config = &state.config;
    let request: HttpApiRequest = serde_json::from_value(event)
        .map_err(|_| refuse(400, "bad-request", "not an HTTP API request"))?;
    let installer = request.installer().ok_or_else(|| {
        refuse(
            401,
            "unauthenticated",
            "no verified identity; sign in through the API's authorizer",
        )
    })?;
    summary.sub = installer.sub.clone();
    if !installer.groups.contains(&config.installer_group) {
        return Err(refuse(
            403,
            "not-an-installer",
            format!(
                "membership in group '{}' is required",
                config.installer_group
            ),
        ));
    }

    let text = request
        .body_text()
        .map_err(|m| refuse(400, "bad-request", m))?;
    let claim: ClaimRequest = if text.trim().is_empty() {
        ClaimRequest::default()
    } else {
        serde_json::from_str(&text).map_err(|e| refuse(400, "bad-request", format!("body: {e}")))?
    };
    if let Some(serial) = &claim.serial {
        if !config.serial_pattern.is_match(serial) {
            return Err(refuse(
                400,
                "bad-request",
                "serial does not match SERIAL_PATTERN",
            ));
        }
        summary.serial = serial.clone();
    }
    let template = claim
        .template_name
        .clone()
        .unwrap_or_else(|| config.default_template.clone());
    summary.template = template.clone();
    if !config.allowed_templates.contains(&template) {
        return Err(refuse(
            400,
            "template-not-allowed",
            format!("template '{template}' is not one of ALLOWED_TEMPLATES"),
        ));
    }

    match state.quota.consume(&installer.sub, now).await {
        Ok(Verdict::Allowed { .. }) => {}
        Ok(Verdict::Exceeded { retry_after }) => {
            let mut r = refuse(
                429,
                "rate-limited",
                format!(
                    "at most {} claims per {} s",
                    config.claims_per_window, config.window_seconds
                ),
            );
            r.retry_after = Some(retry_after);
            return Err(r);
        }
        Err(e) => {
            let mut r = refuse(503, "unavailable", e.to_string());
            r.retry_after = Some(2);
            return Err(r);
        }
    }

    let out = state
        .iot
        .create_provisioning_claim()
        .template_name(&template)
        .send()
        .await
        .map_err(|e| {
            let not_found = matches!(
                e.as_service_error(),
                Some(CreateProvisioningClaimError::ResourceNotFoundException(_))
            );
            match classify(&e) {
                _ if not_found => refuse(
                    502,
                    "upstream",
                    format!("AWS IoT has no provisioning template '{template}'"),
                ),
                Failure::Throttled => Refusal {
                    retry_after: Some(2),
                    ..refuse(503, "throttled", "AWS IoT is throttling; retry shortly")
                },
                Failure::Service(code) | Failure::Unavailable(code) => {
                    refuse(502, "upstream", format!("AWS IoT: {code}"))
                }
            }
        })?;

    let missing = || {
        refuse(
            502,
            "upstream",
            "AWS IoT answered without certificate, key or expiration",
        )
    };
    let certificate_id = out.certificate_id.ok_or_else(missing)?;
    let certificate_pem = out.certificate_pem.ok_or_else(missing)?;
    let private_key = out
        .key_pair
        .and_then(|k| k.private_key)
        .ok_or_else(missing)?;
    let expiration = out
        .expiration
        .map(|t| t.secs().max(0) as u64)
        .ok_or_else(missing)?;
    summary.certificate_id = certificate_id.clone();

    // Fail closed: without the record, fleet-prehook cannot enforce the serial binding.
    let audit = ClaimRecord {
        certificate_id: certificate_id.clone(),
        issued_to: installer.sub.clone(),
        serial: claim.serial.clone(),
        issued_at: now,
        valid_until: expiration,
        retain_until: expiration + config.audit_retention_seconds,
    };
    state
        .registry
        .put_claim(&audit)
        .await
        .map_err(|e| Refusal {
            retry_after: Some(2),
            ..refuse(503, "unavailable", format!("claim not recorded: {e}"))
        })?;

    let mut body = json!({
        "certificateId": certificate_id,
        "certificatePem": certificate_pem,
        "privateKey": private_key,
        "expiration": expiration,
        "templateName": template,
    });
    if let Some(serial) = claim.serial {
        body["serial"] = Value::String(serial);
    }
    if let Some(endpoint) = &config.iot_data_endpoint {
        body["iotEndpoint"] = Value::String(endpoint.clone());
    }
    Ok(body)
}
