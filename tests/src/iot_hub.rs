//! An Azure IoT Hub registry stand-in (service REST API, devices only), as strict as the DPS
//! simulator: HTTPS with a certificate for each hub's name, every request authorized by a
//! service SAS of the hub's shared access policy (signature, expiry, policy name, `sr` naming
//! the hub), `api-version` required, 404 for unknown devices, and updates conditional on the
//! device's etag (`If-Match`; 412 when it is stale or missing), as IoT Hub does.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use shared::keys::SymmetricKey;
use shared::sas::{percent_decode, ParsedSas};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::local_aws::random_key_base64;
use crate::mqtt_io::lock;
use crate::tls::local_pki;

/// The policy every hub here has, with registry read and write.
pub const POLICY: &str = "registryReadWrite";

/// A device as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDevice {
    pub status: String,
    pub status_reason: String,
    pub etag: String,
}

struct Hub {
    key_base64: String,
    key: SymmetricKey,
    devices: HashMap<String, HubDevice>,
}

#[derive(Default)]
pub struct HubStats {
    pub refused: Vec<String>,
    pub updates: u64,
}

struct State {
    hubs: Mutex<HashMap<String, Hub>>,
    stats: Mutex<HubStats>,
    etags: std::sync::atomic::AtomicU64,
    /// TCP connections accepted (counted before the TLS handshake).
    connections: std::sync::atomic::AtomicU64,
}

pub struct IotHubRegistry {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<State>,
    _task: crate::serve::Background,
}

impl IotHubRegistry {
    /// One registry serving every hub in `hubs` (host names), each with its own policy key.
    pub async fn start(hubs: &[&str]) -> Result<Self, String> {
        let pki = local_pki("iot-hub-standin-ca", hubs).map_err(|e| e.to_string())?;
        let tls = pki.server_config(None).map_err(|e| e.to_string())?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let mut map = HashMap::new();
        for hub in hubs {
            let key_base64 = random_key_base64();
            let key = SymmetricKey::from_base64(&key_base64).map_err(|e| e.to_string())?;
            map.insert(
                hub.to_ascii_lowercase(),
                Hub {
                    key_base64,
                    key,
                    devices: HashMap::new(),
                },
            );
        }
        let state = Arc::new(State {
            hubs: Mutex::new(map),
            stats: Mutex::new(HubStats::default()),
            etags: std::sync::atomic::AtomicU64::new(1),
            connections: std::sync::atomic::AtomicU64::new(0),
        });
        let shared = Arc::clone(&state);
        let counted = Arc::clone(&state);
        let _task = crate::serve::tls(
            listener,
            TlsAcceptor::from(tls),
            move || {
                counted
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            },
            move |stream| {
                let state = Arc::clone(&shared);
                async move {
                    let Ok(stream) = stream else { return };
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, std::convert::Infallible>(answer(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            },
        );
        Ok(Self {
            addr,
            ca_pem: pki.ca_pem,
            state,
            _task,
        })
    }

    /// `127.0.0.1:PORT`: where every hub's name resolves to, for `IOT_HUB_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The hub's service connection string (what the Azure portal shows for the policy).
    pub fn connection_string(&self, hub: &str) -> Option<String> {
        let hubs = lock(&self.state.hubs);
        hubs.get(hub).map(|h| {
            format!(
                "HostName={hub};SharedAccessKeyName={POLICY};SharedAccessKey={}",
                h.key_base64
            )
        })
    }

    /// Creates an enabled device, as DPS does when it assigns one to the hub.
    pub fn add_device(&self, hub: &str, device_id: &str) {
        let etag = self.next_etag();
        if let Some(h) = lock(&self.state.hubs).get_mut(hub) {
            h.devices.insert(
                device_id.to_owned(),
                HubDevice {
                    status: "enabled".into(),
                    status_reason: String::new(),
                    etag,
                },
            );
        }
    }

    pub fn device(&self, hub: &str, device_id: &str) -> Option<HubDevice> {
        lock(&self.state.hubs)
            .get(hub)
            .and_then(|h| h.devices.get(device_id).cloned())
    }

    /// Changes a device behind the caller's back (a new etag), as another service client would.
    pub fn touch(&self, hub: &str, device_id: &str) {
        let etag = self.next_etag();
        if let Some(d) = lock(&self.state.hubs)
            .get_mut(hub)
            .and_then(|h| h.devices.get_mut(device_id))
        {
            d.etag = etag;
        }
    }

    /// Requests refused, each with why; and the updates made.
    pub fn refused(&self) -> Vec<String> {
        lock(&self.state.stats).refused.clone()
    }

    pub fn updates(&self) -> u64 {
        lock(&self.state.stats).updates
    }

    /// Connections clients opened (each costs a TLS handshake).
    pub fn connections(&self) -> u64 {
        self.state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn next_etag(&self) -> String {
        next_etag(&self.state)
    }
}

fn next_etag(state: &State) -> String {
    let n = state
        .etags
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    base64::engine::general_purpose::STANDARD.encode(n.to_be_bytes())
}

/// IoT Hub's error body: `{"Message": "ErrorCode:<code>;<text>", "ExceptionMessage": …}`.
fn error(state: &State, status: StatusCode, code: &str, text: &str) -> Response<Full<Bytes>> {
    lock(&state.stats)
        .refused
        .push(format!("{} {code}: {text}", status.as_u16()));
    let body = json!({
        "Message": format!("ErrorCode:{code};{text}"),
        "ExceptionMessage": format!("Tracking ID:standin-{}", status.as_u16()),
    });
    reply(status, &body, None)
}

fn reply(status: StatusCode, body: &Value, etag: Option<&str>) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8");
    if let Some(etag) = etag {
        response = response.header("etag", format!("\"{etag}\""));
    }
    response
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

fn device_json(id: &str, d: &HubDevice) -> Value {
    json!({
        "deviceId": id,
        "generationId": "638000000000000000",
        "etag": d.etag,
        "connectionState": "Disconnected",
        "status": d.status,
        "statusReason": if d.status_reason.is_empty() { Value::Null } else { Value::from(d.status_reason.clone()) },
        "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
        "statusUpdatedTime": "0001-01-01T00:00:00Z",
        "lastActivityTime": "0001-01-01T00:00:00Z",
        "cloudToDeviceMessageCount": 0,
        "authentication": {"type": "sas", "symmetricKey": {"primaryKey": null, "secondaryKey": null}},
        "capabilities": {"iotEdge": false}
    })
}

/// Why a request's authorization does not hold for `hub`, if it does not.
fn unauthorized(hub: &Hub, host: &str, header: Option<&str>) -> Option<String> {
    let token = header?;
    let sas = match ParsedSas::parse(token) {
        Ok(sas) => sas,
        Err(e) => return Some(e.to_string()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let resource = sas.resource.to_ascii_lowercase();
    if resource != host && !resource.starts_with(&format!("{host}/")) {
        return Some(format!("sr {} is not this hub", sas.resource));
    }
    if sas.key_name.as_deref() != Some(POLICY) {
        return Some("skn names no policy of this hub".into());
    }
    if sas.expiry <= now {
        return Some("token expired".into());
    }
    (!sas.verify(&hub.key)).then(|| "signature does not verify".into())
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let host = parts
        .headers
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(':')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let authorization = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let if_match = parts
        .headers
        .get(hyper::header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_matches('"').to_owned());
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();

    let query = parts.uri.query().unwrap_or("");
    if !query
        .split('&')
        .any(|p| p.starts_with("api-version=") && p.len() > 12)
    {
        return error(
            state,
            StatusCode::BAD_REQUEST,
            "InvalidProtocolVersion",
            "api-version is required",
        );
    }
    let Some(device_id) = parts
        .uri
        .path()
        .strip_prefix("/devices/")
        .and_then(percent_decode)
        .filter(|id| !id.is_empty() && !id.contains('/'))
    else {
        return error(
            state,
            StatusCode::NOT_FOUND,
            "InvalidOperation",
            "only /devices/{id} is served here",
        );
    };

    let mut hubs = lock(&state.hubs);
    let Some(hub) = hubs.get_mut(&host) else {
        drop(hubs);
        return error(
            state,
            StatusCode::NOT_FOUND,
            "IotHubNotFound",
            "no such hub",
        );
    };
    if let Some(why) = match authorization.as_deref() {
        None => Some("no Authorization header".to_owned()),
        some => unauthorized(hub, &host, some),
    } {
        drop(hubs);
        return error(
            state,
            StatusCode::UNAUTHORIZED,
            "IotHubUnauthorizedAccess",
            &why,
        );
    }
    match parts.method {
        Method::GET => match hub.devices.get(&device_id) {
            Some(d) => reply(StatusCode::OK, &device_json(&device_id, d), Some(&d.etag)),
            None => {
                drop(hubs);
                error(
                    state,
                    StatusCode::NOT_FOUND,
                    "DeviceNotFound",
                    "device not registered",
                )
            }
        },
        Method::PUT => {
            let update: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(_) => {
                    drop(hubs);
                    return error(
                        state,
                        StatusCode::BAD_REQUEST,
                        "ArgumentInvalid",
                        "body is not a device",
                    );
                }
            };
            let status = update["status"].as_str().unwrap_or("");
            if update["deviceId"] != device_id.as_str() || !matches!(status, "enabled" | "disabled")
            {
                drop(hubs);
                return error(
                    state,
                    StatusCode::BAD_REQUEST,
                    "ArgumentInvalid",
                    "deviceId or status invalid",
                );
            }
            let etag = next_etag(state);
            let Some(device) = hub.devices.get_mut(&device_id) else {
                drop(hubs);
                return error(
                    state,
                    StatusCode::PRECONDITION_FAILED,
                    "PreconditionFailed",
                    "no such device to update",
                );
            };
            match if_match.as_deref() {
                Some(tag) if tag == "*" || tag == device.etag => {}
                _ => {
                    drop(hubs);
                    return error(
                        state,
                        StatusCode::PRECONDITION_FAILED,
                        "PreconditionFailed",
                        "etag does not match",
                    );
                }
            }
            device.status = status.to_owned();
            device.status_reason = update["statusReason"].as_str().unwrap_or("").to_owned();
            device.etag = etag;
            let answer = reply(
                StatusCode::OK,
                &device_json(&device_id, device),
                Some(&device.etag),
            );
            drop(hubs);
            lock(&state.stats).updates += 1;
            answer
        }
        _ => {
            drop(hubs);
            error(
                state,
                StatusCode::METHOD_NOT_ALLOWED,
                "InvalidOperation",
                "GET or PUT",
            )
        }
    }
}
