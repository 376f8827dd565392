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

/// The HTTP API (payload 2.0) response. No `Debug`: the body may carry a private key.
#[derive(Clone, PartialEq, Serialize)]
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

/// Why a claim was not issued. Each has a status, a stable code and one fixed sentence for the
/// caller; what exactly happened (AWS error codes, template names) goes to the log only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    BadRequest,
    SerialRequired,
    TemplateNotAllowed,
    Unauthenticated,
    NotAnInstaller,
    RateLimited { retry_after: u64 },
    Upstream,
    Throttled,
    Unavailable,
}

impl Refused {
    /// Every refusal, for tests that check the answers against this list.
    pub const ALL: [Refused; 9] = [
        Self::BadRequest,
        Self::SerialRequired,
        Self::TemplateNotAllowed,
        Self::Unauthenticated,
        Self::NotAnInstaller,
        Self::RateLimited { retry_after: 1 },
        Self::Upstream,
        Self::Throttled,
        Self::Unavailable,
    ];

    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest | Self::SerialRequired | Self::TemplateNotAllowed => 400,
            Self::Unauthenticated => 401,
            Self::NotAnInstaller => 403,
            Self::RateLimited { .. } => 429,
            Self::Upstream => 502,
            Self::Throttled | Self::Unavailable => 503,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::SerialRequired => "serial-required",
            Self::TemplateNotAllowed => "template-not-allowed",
            Self::Unauthenticated => "unauthenticated",
            Self::NotAnInstaller => "not-an-installer",
            Self::RateLimited { .. } => "rate-limited",
            Self::Upstream => "upstream",
            Self::Throttled => "throttled",
            Self::Unavailable => "unavailable",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Self::BadRequest => "The request is malformed: send JSON {\"serial\": \"...\"} with a valid serial and nothing else.",
            Self::SerialRequired => "Name the device's serial: claims are bound to one device.",
            Self::TemplateNotAllowed => "That provisioning template may not be requested.",
            Self::Unauthenticated => "Sign in first: the request carries no verified identity.",
            Self::NotAnInstaller => "Your account is not an installer's.",
            Self::RateLimited { .. } => "Too many claims requested; try again after Retry-After seconds.",
            Self::Upstream => "AWS IoT could not issue the claim certificate.",
            Self::Throttled => "AWS IoT is busy; try again after Retry-After seconds.",
            Self::Unavailable => "The service is unavailable; try again after Retry-After seconds.",
        }
    }

    fn retry_after(self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after } => Some(retry_after),
            Self::Throttled | Self::Unavailable => Some(2),
            _ => None,
        }
    }
}

/// A refusal and, for the log only, what caused it.
struct Refusal {
    refused: Refused,
    detail: String,
}

fn refuse(refused: Refused, detail: impl Into<String>) -> Refusal {
    Refusal {
        refused,
        detail: detail.into(),
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
        Err(Refusal { refused, detail }) => {
            tracing::warn!(
                outcome = "refused", status = refused.status(), error = refused.code(), reason = %detail,
                sub = %summary.sub, serial = %summary.serial, template = %summary.template,
                "claim certificate not issued"
            );
            let mut response = HttpResponse::json(
                refused.status(),
                json!({"error": refused.code(), "message": refused.message()}),
            );
            if let Some(seconds) = refused.retry_after() {
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
        .map_err(|e| refuse(Refused::BadRequest, format!("not an HTTP API request: {e}")))?;
    let installer = request.installer().ok_or_else(|| {
        refuse(
            Refused::Unauthenticated,
            "no verified sub: not called through the JWT authorizer",
        )
    })?;
    summary.sub = installer.sub.clone();
    if !installer.groups.contains(&config.installer_group) {
        return Err(refuse(
            Refused::NotAnInstaller,
            format!("not in group '{}'", config.installer_group),
        ));
    }
    let claim = claim_request(&request, config, summary)?;
    let template = summary.template.clone();

    match state.quota.consume(&installer.sub, now).await {
        Ok(Verdict::Allowed { .. }) => {}
        Ok(Verdict::Exceeded { retry_after }) => {
            return Err(refuse(
                Refused::RateLimited { retry_after },
                format!(
                    "at most {} claims per {} s",
                    config.claims_per_window, config.window_seconds
                ),
            ));
        }
        Err(e) => return Err(refuse(Refused::Unavailable, e.to_string())),
    }

    let issued = create_claim(&state.iot, &template).await?;
    summary.certificate_id = issued.certificate_id.clone();

    // Fail closed: without the record, fleet-prehook cannot enforce the binding and single use.
    let audit = ClaimRecord {
        certificate_id: issued.certificate_id.clone(),
        issued_to: installer.sub.clone(),
        serial: claim.serial.clone(),
        issued_at: now,
        valid_until: issued.expiration,
        retain_until: issued.expiration + config.audit_retention_seconds,
        used: None,
    };
    state
        .registry
        .put_claim(&audit)
        .await
        .map_err(|e| refuse(Refused::Unavailable, format!("claim not recorded: {e}")))?;

    let mut body = json!({
        "certificateId": issued.certificate_id,
        "certificatePem": issued.certificate_pem,
        "privateKey": issued.private_key,
        "expiration": issued.expiration,
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

/// What the installer asked for, checked: a serial in the configured form (required unless
/// unbound claims are allowed) and an allowed template.
fn claim_request(
    request: &HttpApiRequest,
    config: &Config,
    summary: &mut Summary,
) -> Result<ClaimRequest, Refusal> {
    let text = request
        .body_text()
        .map_err(|m| refuse(Refused::BadRequest, m))?;
    let claim: ClaimRequest = if text.trim().is_empty() {
        ClaimRequest::default()
    } else {
        serde_json::from_str(&text)
            .map_err(|e| refuse(Refused::BadRequest, format!("body: {e}")))?
    };
    match &claim.serial {
        Some(serial) if !config.serial_pattern.is_match(serial) => {
            return Err(refuse(
                Refused::BadRequest,
                "serial does not match SERIAL_PATTERN",
            ));
        }
        Some(serial) => summary.serial = serial.clone(),
        // An unbound claim provisions whichever allowed serial its holder names first.
        None if !config.allow_unbound_claims => {
            return Err(refuse(
                Refused::SerialRequired,
                "no serial, and ALLOW_UNBOUND_CLAIMS is off",
            ));
        }
        None => {}
    }
    let template = claim
        .template_name
        .clone()
        .unwrap_or_else(|| config.default_template.clone());
    summary.template = template.clone();
    if !config.allowed_templates.contains(&template) {
        return Err(refuse(
            Refused::TemplateNotAllowed,
            format!("template '{template}' is not one of ALLOWED_TEMPLATES"),
        ));
    }
    Ok(claim)
}

/// A claim certificate as AWS IoT issued it.
struct IssuedClaim {
    certificate_id: String,
    certificate_pem: String,
    private_key: String,
    expiration: u64,
}

async fn create_claim(iot: &aws_sdk_iot::Client, template: &str) -> Result<IssuedClaim, Refusal> {
    let out = iot
        .create_provisioning_claim()
        .template_name(template)
        .send()
        .await
        .map_err(|e| {
            let not_found = matches!(
                e.as_service_error(),
                Some(CreateProvisioningClaimError::ResourceNotFoundException(_))
            );
            match classify(&e) {
                _ if not_found => refuse(
                    Refused::Upstream,
                    format!("AWS IoT has no provisioning template '{template}'"),
                ),
                Failure::Throttled => refuse(Refused::Throttled, "AWS IoT is throttling"),
                Failure::Service(code) | Failure::Unavailable(code) => {
                    refuse(Refused::Upstream, format!("AWS IoT: {code}"))
                }
            }
        })?;
    let missing = || {
        refuse(
            Refused::Upstream,
            "AWS IoT answered without certificate, key or expiration",
        )
    };
    Ok(IssuedClaim {
        certificate_id: out.certificate_id.ok_or_else(missing)?,
        certificate_pem: out.certificate_pem.ok_or_else(missing)?,
        private_key: out
            .key_pair
            .and_then(|k| k.private_key)
            .ok_or_else(missing)?,
        expiration: out
            .expiration
            .map(|t| t.secs().max(0) as u64)
            .ok_or_else(missing)?,
    })
}
