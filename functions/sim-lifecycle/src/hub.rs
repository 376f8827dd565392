//! Azure IoT Hub's registry (service REST API, `api-version=2021-04-12`): read a device, then
//! write it back with another `status`, conditional on its etag (`If-Match`), as the service
//! SDKs do. Authorized by a service SAS made from the hub's shared access policy
//! (`registryReadWrite`); the key never leaves this module, and no error carries it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde_json::Value;
use shared::keys::SymmetricKey;
use shared::sas::{percent_encode, service_token};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub const API_VERSION: &str = "2021-04-12";
/// One request (connect, TLS, answer) may take this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Reads and conditional writes before giving up on a device whose etag keeps changing.
const ROUNDS: usize = 3;
/// A device's JSON is small; anything bigger is not IoT Hub.
const MAX_BODY: usize = 64 * 1024;

/// A hub's service credentials, from its connection string.
pub struct HubCredentials {
    pub host: String,
    policy: String,
    key: SymmetricKey,
}

impl std::fmt::Debug for HubCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubCredentials")
            .field("host", &self.host)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl HubCredentials {
    /// `HostName=…;SharedAccessKeyName=…;SharedAccessKey=…`, as the Azure portal shows a
    /// policy's connection string. Errors name the missing part, never a value.
    pub fn from_connection_string(text: &str) -> Result<Self, HubError> {
        let mut parts = std::collections::HashMap::new();
        for part in text.trim().split(';').filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| HubError::Credentials("a part is not NAME=VALUE".into()))?;
            parts.insert(name.trim(), value.trim());
        }
        let get = |name: &str| {
            parts
                .get(name)
                .filter(|v| !v.is_empty())
                .copied()
                .ok_or_else(|| HubError::Credentials(format!("{name} is missing")))
        };
        let key = SymmetricKey::from_base64(get("SharedAccessKey")?)
            .map_err(|_| HubError::Credentials("SharedAccessKey is not base64".into()))?;
        Ok(Self {
            host: get("HostName")?.to_ascii_lowercase(),
            policy: get("SharedAccessKeyName")?.to_owned(),
            key,
        })
    }

    fn authorization(&self) -> String {
        let expiry = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            + 300;
        service_token(&self.host, &self.policy, &self.key, expiry)
            .as_str()
            .to_owned()
    }
}

/// The `status` of an IoT Hub device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    Enabled,
    Disabled,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "enabled",
            Self::Disabled => "disabled",
        }
    }
}

/// What setting a device's state found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HubOutcome {
    Changed,
    AlreadySo,
    /// The hub has no such device (deleted, or never created).
    NoSuchDevice,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("IoT Hub connection string unusable: {0}")]
    Credentials(String),
    #[error("IoT Hub refused the service credentials ({0}): wrong key, or a policy without registry write")]
    Unauthorized(u16),
    #[error("IoT Hub unavailable: {0}")]
    Unavailable(String),
    #[error("IoT Hub answered {0}")]
    Unexpected(u16),
    #[error("IoT Hub device kept changing (etag) through {ROUNDS} attempts")]
    Conflict,
}

pub struct HubClient {
    tls: TlsConnector,
    /// Where to connect instead of `<hub>:443` (local runs).
    endpoint: Option<String>,
}

struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl HubClient {
    pub fn new(tls: Arc<ClientConfig>, endpoint: Option<String>) -> Self {
        Self {
            tls: TlsConnector::from(tls),
            endpoint,
        }
    }

    /// Sets `device_id`'s status to `state` (with `reason` as its `statusReason`): the read and
    /// the conditional write (and any repeat after a changed etag) over one connection.
    pub async fn set_state(
        &self,
        hub: &HubCredentials,
        device_id: &str,
        state: DeviceState,
        reason: &str,
    ) -> Result<HubOutcome, HubError> {
        let mut line = Line {
            sender: self.connect(&hub.host).await?,
            authorization: hub.authorization(),
            host: &hub.host,
            path: format!(
                "/devices/{}?api-version={API_VERSION}",
                percent_encode(device_id)
            ),
        };
        for _ in 0..ROUNDS {
            let got = line.send(Method::GET, None, None).await?;
            match got.status {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(HubOutcome::NoSuchDevice),
                other => return Err(refusal(other)),
            }
            let mut device: Value = serde_json::from_slice(&got.body)
                .map_err(|_| HubError::Unavailable("device is not JSON".into()))?;
            if device["status"] == state.as_str() {
                return Ok(HubOutcome::AlreadySo);
            }
            let etag = device["etag"]
                .as_str()
                .ok_or_else(|| HubError::Unavailable("device has no etag".into()))?
                .to_owned();
            device["status"] = Value::from(state.as_str());
            device["statusReason"] = Value::from(reason);
            let body =
                serde_json::to_vec(&device).map_err(|e| HubError::Unavailable(e.to_string()))?;
            let put = line.send(Method::PUT, Some(body), Some(&etag)).await?;
            match put.status {
                StatusCode::OK => return Ok(HubOutcome::Changed),
                // Someone changed the device since it was read: read it again.
                StatusCode::PRECONDITION_FAILED => continue,
                StatusCode::NOT_FOUND => return Ok(HubOutcome::NoSuchDevice),
                other => return Err(refusal(other)),
            }
        }
        Err(HubError::Conflict)
    }

    /// TCP, TLS (the hub's name) and HTTP/1.1 to `host`, within one request's time.
    async fn connect(&self, host: &str) -> Result<SendRequest<Full<Bytes>>, HubError> {
        let unavailable =
            |what: &str, e: &dyn std::fmt::Display| HubError::Unavailable(format!("{what}: {e}"));
        let address = self
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("{host}:443"));
        let name =
            ServerName::try_from(host.to_owned()).map_err(|e| unavailable("host name", &e))?;
        let open = async {
            let tcp = TcpStream::connect(&address)
                .await
                .map_err(|e| unavailable("connect", &e))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| unavailable("TLS", &e))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| unavailable("HTTP", &e))?;
            tokio::spawn(connection);
            Ok(sender)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, open)
            .await
            .map_err(|_| HubError::Unavailable("connect timed out".into()))?
    }
}

/// One device's resource on an open connection to its hub.
struct Line<'a> {
    sender: SendRequest<Full<Bytes>>,
    authorization: String,
    host: &'a str,
    path: String,
}

impl Line<'_> {
    async fn send(
        &mut self,
        method: Method,
        body: Option<Vec<u8>>,
        if_match: Option<&str>,
    ) -> Result<Answer, HubError> {
        let unavailable =
            |what: &str, e: &dyn std::fmt::Display| HubError::Unavailable(format!("{what}: {e}"));
        let mut request = Request::builder()
            .method(method)
            .uri(&self.path)
            .header(http::header::HOST, self.host)
            .header(http::header::AUTHORIZATION, &self.authorization)
            .header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            );
        if let Some(etag) = if_match {
            request = request.header(http::header::IF_MATCH, format!("\"{etag}\""));
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| unavailable("request not built", &e))?;
        let exchange = async {
            self.sender
                .ready()
                .await
                .map_err(|e| unavailable("HTTP", &e))?;
            let response = self
                .sender
                .send_request(request)
                .await
                .map_err(|e| unavailable("HTTP", &e))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| unavailable("body", &e))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| HubError::Unavailable("timed out".into()))?
    }
}

fn refusal(status: StatusCode) -> HubError {
    match status.as_u16() {
        code @ (401 | 403) => HubError::Unauthorized(code),
        code @ (429 | 500..=599) => HubError::Unavailable(format!("status {code}")),
        code => HubError::Unexpected(code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy key made for the test, as Azure makes them (64 random bytes, base64).
    fn random_key_base64() -> String {
        let mut bytes = vec![0u8; 64];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
        SymmetricKey::from_bytes(bytes).unwrap().to_base64()
    }

    #[test]
    fn a_connection_string_is_read_by_name_and_never_shown() {
        let key = random_key_base64();
        let key = key.as_str();
        let hub = HubCredentials::from_connection_string(&format!(
            "HostName=Hub-1.azure-devices.net;SharedAccessKeyName=registryReadWrite;SharedAccessKey={key}"
        ))
        .unwrap();
        assert_eq!(hub.host, "hub-1.azure-devices.net");
        assert!(!format!("{hub:?}").contains(key));
        let token = hub.authorization();
        assert!(token.starts_with("SharedAccessSignature sr=hub-1.azure-devices.net&sig="));
        assert!(token.ends_with("&skn=registryReadWrite"));

        let missing =
            HubCredentials::from_connection_string(&format!("HostName=h;SharedAccessKey={key}"))
                .unwrap_err();
        assert_eq!(
            missing,
            HubError::Credentials("SharedAccessKeyName is missing".into())
        );
        let garbage = HubCredentials::from_connection_string(
            "HostName=h;SharedAccessKeyName=p;SharedAccessKey=not*base64-TOPSECRET",
        )
        .unwrap_err();
        assert!(!garbage.to_string().contains("TOPSECRET"));
    }
}
