//! One claim request: who (JWT claims only), may they (group, rate limit), what (serial binding,
//! template), then `CreateProvisioningClaim`, the audit record, and the answer.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Value};
use shared::quota::{DynamoQuota, Quota, Verdict};
use shared::registry::{ClaimLog, ClaimRecord, DynamoRegistry};

use crate::config::Config;
use crate::iot::{ClaimMinter, IssuedClaim, MintError};
use crate::request::{ClaimRequest, HttpApiRequest, Installer};

/// Cold-start state: the configuration and what the handler calls, by the traits it needs
/// (the deployed function's: AWS IoT and the device table; the unit tests': in memory).
pub struct State<M = aws_sdk_iot::Client, L = DynamoRegistry, Q = DynamoQuota> {
    pub config: Config,
    pub iot: M,
    pub registry: L,
    pub quota: Q,
}

impl State {
    pub fn new(config: Config, sdk: &aws_config::SdkConfig) -> Self {
        Self::from_clients(
            config,
            aws_sdk_iot::Client::new(sdk),
            aws_sdk_dynamodb::Client::new(sdk),
        )
    }

    /// The cold-start state from clients built elsewhere (tests point AWS IoT and DynamoDB at
    /// different local endpoints).
    pub fn from_clients(
        config: Config,
        iot: aws_sdk_iot::Client,
        dynamodb: aws_sdk_dynamodb::Client,
    ) -> Self {
        Self {
            iot,
            registry: DynamoRegistry::new(dynamodb.clone(), &config.devices_table),
            quota: DynamoQuota::new(
                dynamodb,
                &config.devices_table,
                "installer",
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
pub async fn handle<M: ClaimMinter, L: ClaimLog, Q: Quota>(
    event: Value,
    now: u64,
    state: &State<M, L, Q>,
) -> HttpResponse {
    let mut summary = Summary::default();
    match issue(event, now, state, &mut summary).await {
        Ok(body) => {
            lambda_support::metrics::emit("issued", &[]);
            tracing::info!(
                outcome = "issued", sub = %summary.sub, serial = %summary.serial, template = %summary.template,
                certificate_id = %summary.certificate_id, "claim certificate issued"
            );
            HttpResponse::json(200, body)
        }
        Err(Refusal { refused, detail }) => {
            lambda_support::metrics::emit(refused.code(), &[]);
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

async fn issue<M: ClaimMinter, L: ClaimLog, Q: Quota>(
    event: Value,
    now: u64,
    state: &State<M, L, Q>,
    summary: &mut Summary,
) -> Result<Value, Refusal> {
    let config = &state.config;
    let request: HttpApiRequest = serde_json::from_value(event)
        .map_err(|e| refuse(Refused::BadRequest, format!("not an HTTP API request: {e}")))?;
    let installer = verified_installer(&request, config, summary)?;
    let claim = claim_request(&request, config, summary)?;
    let template = summary.template.clone();
    spend_quota(&state.quota, config, &installer.sub, now).await?;
    let issued = state.iot.mint(&template).await.map_err(|e| {
        let refused = match e {
            MintError::Throttled => Refused::Throttled,
            MintError::NoSuchTemplate | MintError::Failed(_) | MintError::Incomplete => {
                Refused::Upstream
            }
        };
        refuse(refused, format!("template '{template}': {e}"))
    })?;
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
        .record_claim(&audit)
        .await
        .map_err(|e| refuse(Refused::Unavailable, format!("claim not recorded: {e}")))?;
    Ok(claim_body(issued, template, claim.serial, config))
}

/// The caller as the JWT authorizer verified it, if it is an installer.
fn verified_installer(
    request: &HttpApiRequest,
    config: &Config,
    summary: &mut Summary,
) -> Result<Installer, Refusal> {
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
    Ok(installer)
}

/// Takes one claim from the installer's window, before anything is minted.
async fn spend_quota(
    quota: &impl Quota,
    config: &Config,
    sub: &str,
    now: u64,
) -> Result<(), Refusal> {
    match quota.consume(sub, now).await {
        Ok(Verdict::Allowed { .. }) => Ok(()),
        Ok(Verdict::Exceeded { retry_after }) => Err(refuse(
            Refused::RateLimited { retry_after },
            format!(
                "at most {} claims per {} s",
                config.claims_per_window, config.window_seconds
            ),
        )),
        Err(e) => Err(refuse(Refused::Unavailable, e.to_string())),
    }
}

/// The installer's answer: the claim certificate, its key, and where to use them.
fn claim_body(
    issued: IssuedClaim,
    template: String,
    serial: Option<String>,
    config: &Config,
) -> Value {
    let mut body = json!({
        "certificateId": issued.certificate_id,
        "certificatePem": issued.certificate_pem,
        "privateKey": issued.private_key,
        "expiration": issued.expiration,
        "templateName": template,
    });
    if let Some(serial) = serial {
        body["serial"] = Value::String(serial);
    }
    if let Some(endpoint) = &config.iot_data_endpoint {
        body["iotEndpoint"] = Value::String(endpoint.clone());
    }
    body
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iot::IssuedClaim;
    use shared::memory::{MemoryQuota, MemoryTable};
    use shared::quota::QuotaError;
    use shared::registry::RegistryError;
    use std::sync::Mutex;

    /// AWS IoT as the handler sees it: issues, or fails as told.
    #[derive(Default)]
    struct Minter {
        failure: Mutex<Option<MintError>>,
        issued: Mutex<u32>,
    }

    impl ClaimMinter for Minter {
        async fn mint(&self, _template: &str) -> Result<IssuedClaim, MintError> {
            if let Some(e) = self.failure.lock().unwrap().clone() {
                return Err(e);
            }
            let mut n = self.issued.lock().unwrap();
            *n += 1;
            Ok(IssuedClaim {
                certificate_id: format!("cert-{n}"),
                certificate_pem: format!("certificate-{n}"),
                // A stand-in made here, not key material: the tests check where it goes.
                private_key: format!("private-key-of-cert-{n}"),
                expiration: NOW + 300,
            })
        }
    }

    const NOW: u64 = 1_800_000_000;

    fn state(extra: &[(&str, &str)]) -> State<Minter, MemoryTable, MemoryQuota> {
        let env: std::collections::HashMap<String, String> = [
            ("DEVICES_TABLE", "devices"),
            ("PROVISIONING_TEMPLATE", "fleet"),
            ("CLAIMS_PER_WINDOW", "2"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let config = Config::from_env(&env).unwrap();
        State {
            quota: MemoryQuota::new(config.claims_per_window, config.window_seconds),
            config,
            iot: Minter::default(),
            registry: MemoryTable::new(),
        }
    }

    fn event(claims: Value, body: &str) -> Value {
        json!({
            "requestContext": {"authorizer": {"jwt": {"claims": claims}}},
            "body": body, "isBase64Encoded": false,
        })
    }

    fn installer(body: &str) -> Value {
        event(
            json!({"sub": "u-1", "cognito:groups": "[installers]"}),
            body,
        )
    }

    fn answer(r: &HttpResponse) -> (u16, String) {
        let body: Value = serde_json::from_str(&r.body).unwrap();
        (
            r.status_code,
            body["error"].as_str().unwrap_or("").to_owned(),
        )
    }

    #[tokio::test]
    async fn an_installer_gets_a_recorded_claim_bound_to_the_serial() {
        let s = state(&[]);
        let r = handle(installer(r#"{"serial":"SN-1"}"#), NOW, &s).await;
        assert_eq!(r.status_code, 200);
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let body: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["privateKey"], "private-key-of-cert-1");
        let claim = s.registry.get_claim("cert-1").unwrap();
        assert_eq!(
            (claim.issued_to.as_str(), claim.serial.as_deref()),
            ("u-1", Some("SN-1"))
        );
        assert_eq!(claim.valid_until, NOW + 300);
    }

    #[tokio::test]
    async fn who_may_ask_is_checked_before_anything_else() {
        let s = state(&[]);
        let outsider = event(
            json!({"sub": "u-2", "cognito:groups": "[admins]"}),
            r#"{"serial":"SN-1"}"#,
        );
        let cases = [
            (json!({"body": "{}"}), 401, "unauthenticated"),
            (event(json!({"sub": " "}), "{}"), 401, "unauthenticated"),
            (outsider, 403, "not-an-installer"),
            (json!("not an API event"), 400, "bad-request"),
        ];
        for (event, status, code) in cases {
            assert_eq!(
                answer(&handle(event, NOW, &s).await),
                (status, code.to_owned())
            );
        }
        assert_eq!(*s.iot.issued.lock().unwrap(), 0);
    }

    #[tokio::test]
    async fn what_they_ask_for_is_checked() {
        let s = state(&[("ALLOWED_TEMPLATES", "other")]);
        for (body, code) in [
            (r#"{"serial": 7}"#, "bad-request"),
            (r#"{"serial":"SN.1"}"#, "bad-request"),
            (r#"{"serial":"SN-1","extra":1}"#, "bad-request"),
            ("{}", "serial-required"),
            (
                r#"{"serial":"SN-1","templateName":"someone-elses"}"#,
                "template-not-allowed",
            ),
        ] {
            assert_eq!(
                answer(&handle(installer(body), NOW, &s).await),
                (400, code.to_owned()),
                "{body}"
            );
        }
        let other = r#"{"serial":"SN-1","templateName":"other"}"#;
        assert_eq!(handle(installer(other), NOW, &s).await.status_code, 200);
        let unbound = state(&[("ALLOW_UNBOUND_CLAIMS", "true")]);
        assert_eq!(
            handle(installer("{}"), NOW, &unbound).await.status_code,
            200
        );
    }

    #[tokio::test]
    async fn the_quota_limits_each_installer_and_says_when_to_return() {
        let s = state(&[("CLAIM_WINDOW_SECONDS", "600")]);
        for t in [NOW, NOW + 1] {
            assert_eq!(
                handle(installer(r#"{"serial":"SN-1"}"#), t, &s)
                    .await
                    .status_code,
                200
            );
        }
        let limited = handle(installer(r#"{"serial":"SN-1"}"#), NOW + 100, &s).await;
        assert_eq!(answer(&limited), (429, "rate-limited".to_owned()));
        assert_eq!(limited.header("retry-after"), Some("500"));
        s.quota.fail_with(Some(QuotaError::Throttled));
        let unavailable = handle(installer(r#"{"serial":"SN-1"}"#), NOW + 700, &s).await;
        assert_eq!(answer(&unavailable), (503, "unavailable".to_owned()));
        assert_eq!(unavailable.header("retry-after"), Some("2"));
    }

    #[tokio::test]
    async fn aws_iot_and_table_failures_answer_with_fixed_sentences() {
        let s = state(&[("CLAIMS_PER_WINDOW", "100")]);
        for (failure, expected) in [
            (MintError::NoSuchTemplate, (502, "upstream")),
            (
                MintError::Failed("InternalFailureException".into()),
                (502, "upstream"),
            ),
            (MintError::Incomplete, (502, "upstream")),
            (MintError::Throttled, (503, "throttled")),
        ] {
            *s.iot.failure.lock().unwrap() = Some(failure);
            let r = handle(installer(r#"{"serial":"SN-1"}"#), NOW, &s).await;
            assert_eq!(answer(&r), (expected.0, expected.1.to_owned()));
            let body: Value = serde_json::from_str(&r.body).unwrap();
            let refused = Refused::ALL
                .into_iter()
                .find(|x| x.code() == expected.1)
                .unwrap();
            assert_eq!(body["message"], refused.message());
            assert!(!r.body.contains("InternalFailure") && !r.body.contains("fleet"));
        }
        // Not recorded, not handed out: the hook could not enforce the claim's binding.
        *s.iot.failure.lock().unwrap() = None;
        s.registry.fail_with(Some(RegistryError::Throttled));
        let r = handle(installer(r#"{"serial":"SN-1"}"#), NOW, &s).await;
        assert_eq!(answer(&r), (503, "unavailable".to_owned()));
        assert!(!r.body.contains("private-key-of"));
    }

    /// The samples in `events/claim-issuer/` answer as their names say.
    #[tokio::test]
    async fn every_sample_event_gets_the_answer_its_name_promises() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../events/claim-issuer");
        let read = |name: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
        };
        let s = state(&[("PROVISIONING_TEMPLATE", "fleet-template")]);
        for (name, expected) in [
            ("issue.json", (200, "")),
            ("issue-sn-0002.json", (200, "")),
            ("bad-body.json", (400, "bad-request")),
            ("no-claims.json", (401, "unauthenticated")),
            ("not-in-group.json", (403, "not-an-installer")),
            ("template-not-allowed.json", (400, "template-not-allowed")),
            ("serial-required.json", (400, "serial-required")),
        ] {
            let r = handle(read(name), NOW, &s).await;
            assert_eq!(answer(&r), (expected.0, expected.1.to_owned()), "{name}");
        }
    }
}
