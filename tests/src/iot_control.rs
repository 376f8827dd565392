//! A strict stand-in for the AWS IoT control plane's `CreateProvisioningClaim`, reachable by the
//! real aws-sdk-iot client through the endpoint URL (REST-JSON over HTTP on loopback), and, once
//! given the MQTT simulator's [`Fleet`], for `ListThingPrincipals`, `UpdateCertificate` and
//! `DetachThingPrincipal` on the things and certificates the simulator provisioned.
//!
//! It rejects requests that carry no SigV4 `Authorization` header for the `iot` service, answers
//! `ResourceNotFoundException` for templates it does not know, and issues real X.509 claim
//! certificates (ECDSA P-256, signed by its own CA, valid 5 minutes) whose CA the AWS IoT MQTT
//! simulator can trust. Faults can be injected.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use rcgen::{CertificateParams, DnType, Issuer, KeyPair};

use crate::iot_mqtt::Fleet;
use crate::mqtt_io::lock;
use crate::tls::{certificate_authority, certificate_id};
use serde_json::json;
use shared::clock::unix_now;
use tokio::net::TcpListener;

/// How long a claim certificate is valid, as AWS IoT issues them.
pub const CLAIM_VALIDITY: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IotFault {
    /// `ThrottlingException` for every claim request.
    Throttle,
    /// `InternalFailureException` for every claim request.
    ServerError,
}

/// A claim certificate the double issued.
#[derive(Debug, Clone)]
pub struct IssuedClaim {
    pub certificate_id: String,
    pub template: String,
    pub certificate_pem: String,
    pub not_after: u64,
}

struct State {
    templates: Vec<String>,
    faults: Mutex<Vec<IotFault>>,
    issuer: Issuer<'static, KeyPair>,
    issued: Mutex<Vec<IssuedClaim>>,
    requests: AtomicU64,
    unauthenticated: AtomicU64,
    fleet: std::sync::OnceLock<Fleet>,
}

/// A running control-plane double; stops when dropped.
pub struct IotControlPlane {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<State>,
    _task: crate::serve::Background,
}

impl IotControlPlane {
    /// Serves the given provisioning templates on a free loopback port.
    pub async fn start(templates: &[&str]) -> std::io::Result<Self> {
        let (issuer, ca_pem) = certificate_authority("IoT control-plane double claim CA")
            .map_err(std::io::Error::other)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            templates: templates.iter().map(|t| (*t).to_owned()).collect(),
            faults: Mutex::new(Vec::new()),
            issuer,
            issued: Mutex::new(Vec::new()),
            requests: AtomicU64::new(0),
            unauthenticated: AtomicU64::new(0),
            fleet: std::sync::OnceLock::new(),
        });
        let shared = Arc::clone(&state);
        let _task = crate::serve::http(
            listener,
            || true,
            move |req| {
                let state = Arc::clone(&shared);
                async move { route(&state, req).await }
            },
        );
        Ok(Self {
            addr,
            ca_pem,
            state,
            _task,
        })
    }

    /// The value for `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_IOT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The CA that signs claim certificates (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Serves the things and certificates of an MQTT simulator (once; later calls are ignored).
    pub fn serve_fleet(&self, fleet: Fleet) {
        let _ = self.state.fleet.set(fleet);
    }

    pub fn set_faults(&self, faults: &[IotFault]) {
        *lock(&self.state.faults) = faults.to_vec();
    }

    pub fn issued(&self) -> Vec<IssuedClaim> {
        lock(&self.state.issued).clone()
    }

    /// A claim certificate valid from `not_before` to `not_after` (Unix seconds), as the API
    /// would return it: for tests of expired or not-yet-valid claims.
    pub fn issue_with_validity(
        &self,
        template: &str,
        not_before: u64,
        not_after: u64,
    ) -> Result<serde_json::Value, String> {
        let body =
            issue(&self.state, template, not_before, not_after).map_err(|e| e.to_string())?;
        serde_json::from_str(&body).map_err(|e| e.to_string())
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    pub fn unauthenticated(&self) -> u64 {
        self.state.unauthenticated.load(Ordering::Relaxed)
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-amzn-ErrorType", kind)
        .body(Full::new(Bytes::from(
            json!({ "message": message }).to_string(),
        )))
        .unwrap_or_default()
}

/// A SigV4 header for the `iot` service: `AWS4-HMAC-SHA256 Credential=AK/date/region/iot/
/// aws4_request, SignedHeaders=..., Signature=...`, plus the `x-amz-date` it signs.
fn is_signed(req: &Request<Incoming>) -> bool {
    let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
    let Some(auth) = header("authorization") else {
        return false;
    };
    let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return false;
    };
    let field = |name: &str| {
        rest.split(", ")
            .find_map(|p| p.strip_prefix(name))
            .filter(|v| !v.is_empty())
    };
    let scope_ok = field("Credential=")
        .is_some_and(|c| c.split('/').nth(3) == Some("iot") && c.ends_with("/aws4_request"));
    let signature_ok = field("Signature=")
        .is_some_and(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()));
    scope_ok && signature_ok && field("SignedHeaders=").is_some() && header("x-amz-date").is_some()
}

async fn route(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    state.requests.fetch_add(1, Ordering::Relaxed);
    if !is_signed(&req) {
        state.unauthenticated.fetch_add(1, Ordering::Relaxed);
        return error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        );
    }
    let path = req.uri().path().to_owned();
    if let Some(answer) = fleet_operation(state, &req) {
        return answer;
    }
    let template = path
        .strip_prefix("/provisioning-templates/")
        .and_then(|rest| rest.strip_suffix("/provisioning-claim"))
        .map(str::to_owned);
    let (Some(template), true) = (template, req.method() == hyper::Method::POST) else {
        return error(
            StatusCode::NOT_FOUND,
            "UnknownOperationException",
            "not served by this double",
        );
    };
    // Drain the body (the SDK sends none for this operation).
    let _ = req.into_body().collect().await;

    let faults = lock(&state.faults).clone();
    if faults.contains(&IotFault::Throttle) {
        return error(
            StatusCode::BAD_REQUEST,
            "ThrottlingException",
            "Rate exceeded",
        );
    }
    if faults.contains(&IotFault::ServerError) {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            "injected",
        );
    }
    if !state.templates.contains(&template) {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            &format!("The provisioning template {template} does not exist"),
        );
    }
    let now = unix_now();
    match issue(
        state,
        &template,
        now.saturating_sub(1),
        now + CLAIM_VALIDITY.as_secs(),
    ) {
        Ok(body) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailureException",
            &e.to_string(),
        ),
    }
}

/// ListThingPrincipals, UpdateCertificate and DetachThingPrincipal, if `req` is one of them
/// and a fleet is served.
fn fleet_operation(state: &State, req: &Request<Incoming>) -> Option<Response<Full<Bytes>>> {
    let fleet = state.fleet.get()?;
    let path = req.uri().path();
    let query: std::collections::HashMap<String, String> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let result = if let Some(thing) = path
        .strip_prefix("/things/")
        .and_then(|rest| rest.strip_suffix("/principals"))
    {
        let thing = decode(thing);
        match *req.method() {
            hyper::Method::GET => fleet
                .principals(&thing)
                .map(|principals| json!({"principals": principals})),
            hyper::Method::DELETE => {
                let principal = req
                    .headers()
                    .get("x-amzn-principal")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                fleet.detach(&thing, principal).map(|()| json!({}))
            }
            _ => return None,
        }
    } else if let Some(id) = path.strip_prefix("/certificates/") {
        if *req.method() != hyper::Method::PUT {
            return None;
        }
        let status = query.get("newStatus").map(String::as_str).unwrap_or("");
        fleet
            .update_certificate(&decode(id), status)
            .map(|()| json!({}))
    } else {
        return None;
    };
    Some(match result {
        Ok(body) => Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap_or_default(),
        Err((status, kind, message)) => error(
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            kind,
            &message,
        ),
    })
}

fn issue(
    state: &State,
    template: &str,
    not_before: u64,
    not_after: u64,
) -> Result<String, rcgen::Error> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "AWS IoT Certificate");
    let to_time = |secs: u64| {
        time::OffsetDateTime::from_unix_timestamp(secs as i64)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    params.not_before = to_time(not_before);
    params.not_after = to_time(not_after);
    let cert = params.signed_by(&key, &state.issuer)?;
    let certificate_id = certificate_id(cert.der());
    let certificate_pem = cert.pem();
    lock(&state.issued).push(IssuedClaim {
        certificate_id: certificate_id.clone(),
        template: template.to_owned(),
        certificate_pem: certificate_pem.clone(),
        not_after,
    });
    Ok(json!({
        "certificateId": certificate_id,
        "certificatePem": certificate_pem,
        "keyPair": {"PublicKey": key.public_key_pem(), "PrivateKey": key.serialize_pem()},
        "expiration": not_after,
    })
    .to_string())
}
