//! Azure DPS device registration over MQTT 3.1.1 / TLS (rumqttc's MQTT codec, rustls on ring).
//!
//! The connection can be opened ahead ([`open`], TCP + TLS only, nothing about the device) while
//! the caller still decides whether the device may register, then handed to
//! [`register_over`]. One registration connects as the device, subscribes to `$dps/registrations/res/#`,
//! publishes the registration, polls the operation until DPS answers `assigned` or fails it,
//! and disconnects. Everything is bounded by the caller's deadline: an invocation that cannot
//! finish in time says so and says when to retry, instead of hanging until Lambda kills it (the
//! Node SDK's behaviour on a dropped connection).
//!
//! Retry policy: only what says "this device may not register" is final: a CONNACK refusing
//! the credentials, a 4xx answer, an enrollment failed or disabled for a device reason, and a
//! server certificate that does not verify. Everything else may pass on its own and is retried
//! within the deadline, then reported as retryable: 429 and 5xx after `retry-after` (plus
//! jitter), a registration failed with a 5xxxxx error code, 412 (another registration of the
//! same id in progress), a CONNACK "server unavailable", a connection reset or closed (also
//! during the TLS handshake) on a new connection, and an operation DPS no longer knows (404 on
//! a poll: it expired) by registering again.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::{Connect, Packet, PubAck, Publish, Subscribe};
use rumqttc::mqttbytes::QoS;
use rumqttc::{ConnectReturnCode, SubscribeReasonCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::ClientConfig;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::{sleep_until, timeout_at, Instant};

use domain::clock::unix_now;
use domain::config::HostPort;
use domain::keys::SymmetricKey;
use domain::sas;

mod wire;
use wire::Wire;
pub use wire::{open, Line};

/// API version of the device registration API.
pub const API_VERSION: &str = "2019-03-31";
/// Where every response arrives.
pub const RESPONSE_TOPIC_FILTER: &str = "$dps/registrations/res/#";
/// Wait before polling when DPS sends no `retry-after`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(2);
/// Throttled or failed requests retried within one registration, at most.
const MAX_REQUEST_RETRIES: u32 = 10;
/// Connections tried, at most, when the connection drops.
const MAX_CONNECTIONS: u32 = 3;
/// Lifetime of the SAS token presented to DPS: long enough for one registration only.
const TOKEN_LIFETIME: Duration = Duration::from_secs(300);
/// MQTT keep-alive announced in CONNECT; a PINGREQ goes out after 3/4 of it without traffic.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Time allowed for a clean MQTT DISCONNECT after the outcome is known.
const DISCONNECT_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum DpsError {
    #[error("DPS refused the connection ({0}): check id scope, registration id and key")]
    Unauthorized(String),
    #[error("DPS rejected the registration: status {status}, error code {error_code}")]
    Rejected { status: u16, error_code: i64 },
    #[error("DPS did not assign the device: enrollment {status}, error code {error_code}")]
    NotAssigned { status: String, error_code: i64 },
    #[error("DPS is throttling; retry after {} s", retry_after.as_secs())]
    Throttled { retry_after: Duration },
    #[error("DPS server error {status}")]
    Upstream { status: u16 },
    #[error("no DPS result before the deadline; retry after {} s", retry_after.as_secs())]
    Deadline { retry_after: Duration },
    #[error("connection to DPS failed: {0}")]
    Connection(String),
    #[error("unexpected DPS response: {0}")]
    Protocol(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

impl DpsError {
    /// When the caller may usefully try again, for errors that are worth retrying.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after } | Self::Deadline { retry_after } => Some(*retry_after),
            Self::Upstream { .. } | Self::Connection(_) => Some(DEFAULT_RETRY_AFTER),
            _ => None,
        }
    }
}

/// The outcome of a successful registration.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub registration_id: String,
    pub assigned_hub: String,
    pub device_id: String,
    pub status: String,
    pub substatus: Option<String>,
    /// Data returned by a custom allocation policy, if any.
    pub payload: Option<Value>,
}

/// How the device proves itself to DPS.
#[derive(Clone, Copy)]
pub enum Attestation<'a> {
    /// A SAS token of this key (the group-derived or individual device key) as the password.
    SymmetricKey(&'a SymmetricKey),
    /// The client certificate `tls` presents in the handshake ([`tls_config_with_certificate`]);
    /// no password. DPS takes the registration id from the certificate's CN.
    X509,
}

/// What to register and where.
pub struct RegistrationRequest<'a> {
    pub endpoint: &'a HostPort,
    pub id_scope: &'a str,
    pub registration_id: &'a str,
    pub attestation: Attestation<'a>,
    /// Custom allocation data (`payload` of the register request).
    pub payload: Option<&'a Value>,
    pub tls: Arc<ClientConfig>,
}

/// TLS client configuration trusting the system roots plus, for local simulators, the PEM
/// certificates in `extra_roots_pem`. Certificate verification is never turned off.
pub fn tls_config(extra_roots_pem: Option<&[u8]>) -> Result<Arc<ClientConfig>, DpsError> {
    TrustedRoots::load(extra_roots_pem)?.config()
}

/// [`tls_config`] presenting a client certificate: `chain_pem` (the device certificate, then
/// the intermediates up to the enrolled CA) and its PKCS#8 `key_pem`. For X.509 attestation;
/// one configuration per device.
pub fn tls_config_with_certificate(
    extra_roots_pem: Option<&[u8]>,
    chain_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, DpsError> {
    TrustedRoots::load(extra_roots_pem)?.config_with_certificate(chain_pem, key_pem)
}

/// The certificates DPS's server certificate must chain to: the system's roots plus, for local
/// simulators, extra PEM roots. Loaded once: reading the system's roots is most of what a TLS
/// configuration costs, and X.509 attestation needs a configuration per device.
#[derive(Clone)]
pub struct TrustedRoots(Arc<rustls::RootCertStore>);

impl TrustedRoots {
    pub fn load(extra_roots_pem: Option<&[u8]>) -> Result<Self, DpsError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        let (added, _ignored) = roots.add_parsable_certificates(native.certs);
        let mut extra = 0;
        if let Some(pem) = extra_roots_pem {
            extra = add_extra_roots(&mut roots, pem)?;
        }
        if added + extra == 0 {
            return Err(DpsError::Tls("no trusted root certificates found".into()));
        }
        Ok(Self(Arc::new(roots)))
    }

    /// On ring with safe protocol versions.
    fn builder(
        &self,
    ) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, DpsError>
    {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| DpsError::Tls(e.to_string()))?
            .with_root_certificates(Arc::clone(&self.0)))
    }

    /// A configuration presenting no client certificate (symmetric-key attestation).
    pub fn config(&self) -> Result<Arc<ClientConfig>, DpsError> {
        Ok(Arc::new(self.builder()?.with_no_client_auth()))
    }

    /// A configuration presenting `chain_pem` (the device certificate, then the intermediates
    /// up to the enrolled CA) with its PKCS#8 `key_pem`.
    pub fn config_with_certificate(
        &self,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Arc<ClientConfig>, DpsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| DpsError::Tls("device certificate chain is not PEM".into()))?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| DpsError::Tls("device key is not a PEM private key".into()))?;
        let config = self
            .builder()?
            .with_client_auth_cert(chain, key)
            .map_err(|e| DpsError::Tls(format!("device certificate unusable: {e}")))?;
        Ok(Arc::new(config))
    }
}

/// Checks that `pem` holds certificates usable as trust roots, without loading the system's.
pub fn tls_config_roots_check(pem: &[u8]) -> Result<(), DpsError> {
    add_extra_roots(&mut rustls::RootCertStore::empty(), pem).map(|_| ())
}

fn add_extra_roots(roots: &mut rustls::RootCertStore, pem: &[u8]) -> Result<usize, DpsError> {
    let mut extra = 0;
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| DpsError::Tls(format!("extra root is not PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| DpsError::Tls(format!("extra root rejected: {e}")))?;
        extra += 1;
    }
    if extra == 0 {
        return Err(DpsError::Tls("extra root file holds no certificate".into()));
    }
    Ok(extra)
}

/// The MQTT user name DPS expects.
pub fn username(id_scope: &str, registration_id: &str) -> String {
    format!("{id_scope}/registrations/{registration_id}/api-version={API_VERSION}")
}

pub fn register_topic(rid: u64) -> String {
    format!("$dps/registrations/PUT/iotdps-register/?$rid={rid}")
}

pub fn poll_topic(rid: u64, operation_id: &str) -> String {
    format!(
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={}",
        sas::percent_encode(operation_id)
    )
}

/// A parsed `$dps/registrations/res/{status}/?$rid=..&retry-after=..` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseTopic {
    pub status: u16,
    pub rid: String,
    pub retry_after: Option<Duration>,
}

impl ResponseTopic {
    pub fn parse(topic: &str) -> Option<Self> {
        let rest = topic.strip_prefix("$dps/registrations/res/")?;
        let (status, query) = rest.split_once("/?")?;
        let status = status.parse().ok()?;
        let (mut rid, mut retry_after) = (None, None);
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            match name.as_ref() {
                "$rid" => rid = Some(value.into_owned()),
                // Capped: a hostile or broken peer must not park us for hours.
                "retry-after" => {
                    retry_after = value
                        .parse::<u64>()
                        .ok()
                        .map(|s| Duration::from_secs(s.min(60)))
                }
                _ => {}
            }
        }
        Some(Self {
            status,
            rid: rid?,
            retry_after,
        })
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ResponseBody {
    operation_id: Option<String>,
    status: Option<String>,
    registration_state: Option<RegistrationState>,
    error_code: Option<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RegistrationState {
    registration_id: Option<String>,
    assigned_hub: Option<String>,
    device_id: Option<String>,
    status: Option<String>,
    substatus: Option<String>,
    error_code: Option<i64>,
    payload: Option<Value>,
}

/// Up to +20 % so that many devices throttled together do not come back together.
fn with_jitter(delay: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut byte = [0u8; 1];
    let spread = ring::rand::SystemRandom::new()
        .fill(&mut byte)
        .map(|_| u32::from(byte[0]))
        .unwrap_or(0);
    delay + delay * spread / (255 * 5)
}

/// Registers the device, within `deadline`, on a connection of its own.
pub async fn register(
    request: &RegistrationRequest<'_>,
    deadline: Instant,
) -> Result<Assignment, DpsError> {
    register_over(request, None, deadline).await
}

/// Registers the device, within `deadline`: first on `opened`, the connection the caller
/// opened for it ahead of time (if opening it failed, that counts as the first connection's
/// failure), then on connections of its own.
pub async fn register_over(
    request: &RegistrationRequest<'_>,
    opened: Option<Result<Line, DpsError>>,
    deadline: Instant,
) -> Result<Assignment, DpsError> {
    let mut opened = opened;
    let mut last = DpsError::Deadline {
        retry_after: DEFAULT_RETRY_AFTER,
    };
    for connection in 0..MAX_CONNECTIONS {
        if connection > 0 {
            let backoff = with_jitter(Duration::from_millis(250 << connection));
            if Instant::now() + backoff >= deadline {
                break;
            }
            tokio::time::sleep(backoff).await;
        }
        match session(request, opened.take(), deadline).await {
            Ok(assignment) => return Ok(assignment),
            Err(Outcome::Final(e)) => return Err(e),
            Err(Outcome::Reconnect(e)) => {
                tracing::warn!(attempt = connection + 1, error = %e, "DPS connection lost");
                last = e;
            }
        }
    }
    Err(last)
}

enum Outcome {
    Final(DpsError),
    Reconnect(DpsError),
}

/// The request to send next, and when.
enum Pending {
    Register,
    Poll(String),
}

/// What woke the conversation up.
enum Step {
    Packet(Result<Packet, DpsError>),
    Due,
    Ping,
}

async fn session(
    request: &RegistrationRequest<'_>,
    opened: Option<Result<Line, DpsError>>,
    deadline: Instant,
) -> Result<Assignment, Outcome> {
    let too_late = || {
        Outcome::Final(DpsError::Deadline {
            retry_after: DEFAULT_RETRY_AFTER,
        })
    };
    let line = match opened {
        Some(line) => line,
        None => timeout_at(deadline, open(request.endpoint, request.tls.clone()))
            .await
            .map_err(|_| too_late())?,
    };
    // A certificate that does not verify is final; a network that fails may not be.
    let line = line.map_err(|e| match e {
        DpsError::Tls(_) => Outcome::Final(e),
        e => Outcome::Reconnect(e),
    })?;
    let mut wire = Wire::new(line);
    let mut conversation = Conversation::new(request, deadline);
    let outcome = match timeout_at(deadline, conversation.run(&mut wire)).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Outcome::Final(DpsError::Deadline {
            retry_after: conversation.retry_hint,
        })),
    };
    if conversation.connected {
        let limit = deadline.min(Instant::now() + DISCONNECT_GRACE);
        if wire.queue(Packet::Disconnect).is_ok() {
            let _ = timeout_at(limit, wire.flush()).await;
        }
    }
    outcome
}

/// The MQTT CONNECT of this device: DPS's user name and, with a symmetric key, a SAS token good
/// for one registration (with X.509 the TLS handshake has proved the device; no password).
fn connect_packet(request: &RegistrationRequest<'_>) -> Connect {
    let password = match request.attestation {
        Attestation::SymmetricKey(key) => sas::registration_token(
            request.id_scope,
            request.registration_id,
            key,
            unix_now() + TOKEN_LIFETIME.as_secs(),
        )
        .as_str()
        .to_owned(),
        Attestation::X509 => String::new(),
    };
    let mut connect = Connect::new(request.registration_id);
    connect.keep_alive = KEEP_ALIVE.as_secs() as u16;
    connect.clean_session = true;
    connect.set_login(
        username(request.id_scope, request.registration_id),
        password,
    );
    connect
}

struct Conversation<'a> {
    request: &'a RegistrationRequest<'a>,
    next_rid: u64,
    next_packet_id: u16,
    awaiting_rid: Option<String>,
    pending: Option<(Instant, Pending)>,
    deadline: Instant,
    connected: bool,
    last_operation: Option<String>,
    retries: u32,
    retry_hint: Duration,
}

impl<'a> Conversation<'a> {
    fn new(request: &'a RegistrationRequest<'a>, deadline: Instant) -> Self {
        Self {
            deadline,
            connected: false,
            request,
            next_rid: 0,
            next_packet_id: 0,
            awaiting_rid: None,
            pending: None,
            last_operation: None,
            retries: 0,
            retry_hint: DEFAULT_RETRY_AFTER,
        }
    }

    /// A broken connection: worth another one, and not worth a DISCONNECT.
    fn lost(&mut self, error: DpsError) -> Outcome {
        self.connected = false;
        Outcome::Reconnect(error)
    }

    fn packet_id(&mut self) -> u16 {
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        self.next_packet_id
    }

    async fn flush(&mut self, wire: &mut Wire) -> Result<Instant, Outcome> {
        wire.flush().await.map_err(|e| self.lost(e))?;
        Ok(Instant::now() + KEEP_ALIVE * 3 / 4)
    }

    async fn run(&mut self, wire: &mut Wire) -> Result<Assignment, Outcome> {
        wire.queue(Packet::Connect(connect_packet(self.request)))
            .map_err(Outcome::Final)?;
        self.flush(wire).await?;
        match wire.next().await.map_err(|e| self.lost(e))? {
            Packet::ConnAck(ack) => match ack.code {
                ConnectReturnCode::Success => self.connected = true,
                ConnectReturnCode::ServiceUnavailable => {
                    return Err(Outcome::Reconnect(DpsError::Connection(
                        "DPS answered CONNACK server unavailable".into(),
                    )))
                }
                code => return Err(Outcome::Final(DpsError::Unauthorized(format!("{code:?}")))),
            },
            _ => {
                return Err(self.lost(DpsError::Protocol(
                    "DPS did not answer CONNECT with CONNACK".into(),
                )))
            }
        }
        // SUBSCRIBE and the register PUBLISH in one flight: MQTT servers handle a connection's
        // packets in order, so the subscription exists before the answer is published, and
        // one round trip is saved (`make bench` measures it).
        let mut subscribe = Subscribe::new(RESPONSE_TOPIC_FILTER, QoS::AtLeastOnce);
        subscribe.pkid = self.packet_id();
        wire.queue(Packet::Subscribe(subscribe))
            .map_err(Outcome::Final)?;
        self.send(wire, Pending::Register)?;
        let mut ping_at = self.flush(wire).await?;
        loop {
            let wake = self.pending.as_ref().map(|(at, _)| *at);
            let step = tokio::select! {
                packet = wire.next() => Step::Packet(packet),
                _ = sleep_until(wake.unwrap_or(self.deadline)), if wake.is_some() => Step::Due,
                _ = sleep_until(ping_at) => Step::Ping,
            };
            match step {
                Step::Packet(packet) => {
                    let packet = packet.map_err(|e| self.lost(e))?;
                    if let Some(done) = self.on_packet(wire, packet)? {
                        return Ok(done);
                    }
                }
                Step::Due => {
                    if let Some((_, next)) = self.pending.take() {
                        self.send(wire, next)?;
                    }
                }
                Step::Ping => wire.queue(Packet::PingReq).map_err(Outcome::Final)?,
            }
            // Whatever the step queued (an acknowledgement, a request, a ping) leaves now.
            ping_at = self.flush(wire).await?;
        }
    }

    fn on_packet(
        &mut self,
        wire: &mut Wire,
        packet: Packet,
    ) -> Result<Option<Assignment>, Outcome> {
        match packet {
            Packet::SubAck(ack) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure));
                if refused {
                    return Err(Outcome::Final(DpsError::Protocol(
                        "subscription to responses refused".into(),
                    )));
                }
                Ok(None)
            }
            Packet::Publish(publish) => {
                if publish.qos == QoS::AtLeastOnce {
                    wire.queue(Packet::PubAck(PubAck::new(publish.pkid)))
                        .map_err(Outcome::Final)?;
                }
                self.on_response(&publish.topic, &publish.payload)
            }
            _ => Ok(None),
        }
    }

    /// Queues the request (the caller flushes it).
    fn send(&mut self, wire: &mut Wire, next: Pending) -> Result<(), Outcome> {
        self.next_rid += 1;
        let rid = self.next_rid;
        let (topic, body) = match &next {
            Pending::Register => {
                let mut body =
                    serde_json::json!({ "registrationId": self.request.registration_id });
                if let Some(payload) = self.request.payload {
                    body["payload"] = payload.clone();
                }
                (register_topic(rid), body.to_string().into_bytes())
            }
            Pending::Poll(operation_id) => (poll_topic(rid, operation_id), b" ".to_vec()),
        };
        self.awaiting_rid = Some(rid.to_string());
        let mut publish = Publish::new(topic, QoS::AtLeastOnce, body);
        publish.pkid = self.packet_id();
        wire.queue(Packet::Publish(publish)).map_err(Outcome::Final)
    }

    /// Schedules `next` after `delay`, or gives up with `give_up` if that is past the deadline
    /// or retries are exhausted.
    fn schedule(
        &mut self,
        next: Pending,
        delay: Duration,
        give_up: DpsError,
    ) -> Result<Option<Assignment>, Outcome> {
        self.retry_hint = delay.max(Duration::from_secs(1));
        let at = Instant::now() + delay;
        // Waiting past the deadline is pointless: say now that it cannot finish, and when to
        // come back, while there is still time to answer the device.
        if self.retries > MAX_REQUEST_RETRIES || at >= self.deadline {
            return Err(Outcome::Final(give_up));
        }
        self.pending = Some((at, next));
        Ok(None)
    }

    fn on_response(&mut self, topic: &str, body: &[u8]) -> Result<Option<Assignment>, Outcome> {
        let Some(response) = ResponseTopic::parse(topic) else {
            return Err(Outcome::Final(DpsError::Protocol(format!(
                "response topic {topic}"
            ))));
        };
        if self.awaiting_rid.as_deref() != Some(response.rid.as_str()) {
            // A late answer to an earlier request: the current one is still outstanding.
            return Ok(None);
        }
        self.awaiting_rid = None;
        let parsed: ResponseBody = serde_json::from_slice(body).unwrap_or_default();
        let retry_after = response.retry_after;
        match response.status {
            200 | 202 => self.on_operation(parsed, retry_after),
            429 => {
                self.retries += 1;
                let delay = with_jitter(retry_after.unwrap_or(DEFAULT_RETRY_AFTER));
                let next = self.repeat_last();
                self.schedule(next, delay, DpsError::Throttled { retry_after: delay })
            }
            status @ 500..=599 => {
                self.retries += 1;
                let delay = with_jitter(retry_after.unwrap_or(DEFAULT_RETRY_AFTER));
                let next = self.repeat_last();
                self.schedule(next, delay, DpsError::Upstream { status })
            }
            // The operation expired (DPS keeps them for a limited time): register again.
            404 if self.last_operation.is_some() => self.register_again(
                retry_after.unwrap_or(Duration::ZERO),
                DpsError::Upstream { status: 404 },
            ),
            // Another registration of this id is in progress (the device retried meanwhile).
            412 => self.register_again(
                with_jitter(retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
                DpsError::Upstream { status: 412 },
            ),
            status => Err(Outcome::Final(DpsError::Rejected {
                status,
                error_code: parsed.error_code.unwrap_or_default(),
            })),
        }
    }

    /// Starts over with a new registration after `delay`, within the deadline and retries.
    fn register_again(
        &mut self,
        delay: Duration,
        give_up: DpsError,
    ) -> Result<Option<Assignment>, Outcome> {
        self.retries += 1;
        self.last_operation = None;
        self.schedule(Pending::Register, delay, give_up)
    }

    /// What to repeat after a throttled or failed request.
    fn repeat_last(&self) -> Pending {
        match &self.last_operation {
            Some(op) => Pending::Poll(op.clone()),
            None => Pending::Register,
        }
    }

    /// An `assigned` answer: the device's hub and id, which must both be there.
    fn assigned(
        &self,
        state: RegistrationState,
        status: String,
    ) -> Result<Option<Assignment>, Outcome> {
        match (state.assigned_hub, state.device_id) {
            (Some(hub), Some(device)) if !hub.is_empty() && !device.is_empty() => {
                Ok(Some(Assignment {
                    registration_id: state
                        .registration_id
                        .unwrap_or_else(|| self.request.registration_id.to_owned()),
                    assigned_hub: hub,
                    device_id: device,
                    status,
                    substatus: state.substatus,
                    payload: state.payload,
                }))
            }
            _ => Err(Outcome::Final(DpsError::Protocol(
                "assigned without hub or device id".into(),
            ))),
        }
    }

    fn on_operation(
        &mut self,
        body: ResponseBody,
        retry_after: Option<Duration>,
    ) -> Result<Option<Assignment>, Outcome> {
        let status = body
            .status
            .clone()
            .or_else(|| {
                body.registration_state
                    .as_ref()
                    .and_then(|s| s.status.clone())
            })
            .unwrap_or_default();
        match status.as_str() {
            "assigned" => self.assigned(body.registration_state.unwrap_or_default(), status),
            "assigning" | "unassigned" => {
                let Some(operation) = body.operation_id.filter(|o| !o.is_empty()) else {
                    return Err(Outcome::Final(DpsError::Protocol("no operationId".into())));
                };
                self.last_operation = Some(operation.clone());
                self.retries += 1;
                let delay = retry_after.unwrap_or(DEFAULT_RETRY_AFTER);
                self.schedule(
                    Pending::Poll(operation),
                    delay,
                    DpsError::Deadline { retry_after: delay },
                )
            }
            "failed" | "disabled" => {
                let error_code = body
                    .registration_state
                    .and_then(|s| s.error_code)
                    .or(body.error_code)
                    .unwrap_or_default();
                // 5xxxxx: DPS failed on its side (an allocation or IoT Hub error), not the device.
                if status == "failed" && (500_000..600_000).contains(&error_code) {
                    return self.register_again(
                        with_jitter(retry_after.unwrap_or(DEFAULT_RETRY_AFTER)),
                        DpsError::Upstream { status: 500 },
                    );
                }
                Err(Outcome::Final(DpsError::NotAssigned { status, error_code }))
            }
            other => Err(Outcome::Final(DpsError::Protocol(format!(
                "status '{other}'"
            )))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_response_topics_in_any_key_order() {
        let t = ResponseTopic::parse("$dps/registrations/res/202/?$rid=7&retry-after=3").unwrap();
        assert_eq!(
            t,
            ResponseTopic {
                status: 202,
                rid: "7".into(),
                retry_after: Some(Duration::from_secs(3))
            }
        );
        let t = ResponseTopic::parse("$dps/registrations/res/429/?retry-after=5&$rid=1").unwrap();
        assert_eq!(t.retry_after, Some(Duration::from_secs(5)));
        let t = ResponseTopic::parse("$dps/registrations/res/200/?$rid=2").unwrap();
        assert_eq!((t.status, t.retry_after), (200, None));
        let t =
            ResponseTopic::parse("$dps/registrations/res/429/?$rid=2&retry-after=86400").unwrap();
        assert_eq!(t.retry_after, Some(Duration::from_secs(60)));
        for bad in [
            "$dps/registrations/res/abc/?$rid=1",
            "$dps/registrations/res/200/?retry-after=1",
            "$dps/registrations/res/200",
            "devices/x/messages",
        ] {
            assert_eq!(ResponseTopic::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn topics_and_username_have_the_documented_shape() {
        assert_eq!(
            username("0ne00000001", "440103123456789"),
            "0ne00000001/registrations/440103123456789/api-version=2019-03-31"
        );
        assert_eq!(
            register_topic(3),
            "$dps/registrations/PUT/iotdps-register/?$rid=3"
        );
        assert_eq!(
            poll_topic(4, "4.abc.def"),
            "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=4&operationId=4.abc.def"
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for _ in 0..100 {
            let d = with_jitter(Duration::from_secs(10));
            assert!(
                d >= Duration::from_secs(10) && d <= Duration::from_secs(12),
                "{d:?}"
            );
        }
    }

    #[test]
    fn extra_roots_must_be_certificates() {
        assert!(matches!(
            tls_config(Some(b"not a pem")),
            Err(DpsError::Tls(_))
        ));
    }

    mod hostile {
        use super::*;
        use domain::strategies::{json_with_keys, text};
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "operationId",
            "status",
            "registrationState",
            "registrationId",
            "assignedHub",
            "deviceId",
            "substatus",
            "errorCode",
            "payload",
        ];

        proptest! {
            /// Response topics from a hostile or broken server: parsed or ignored, and a
            /// retry-after never parks the client for more than a minute.
            #[test]
            fn any_response_topic_is_parsed_or_ignored(
                raw in text(),
                status in text(), rid in text(), retry in text(),
            ) {
                let structured = format!("$dps/registrations/res/{status}/?$rid={rid}&retry-after={retry}");
                for topic in [raw, structured] {
                    if let Some(parsed) = ResponseTopic::parse(&topic) {
                        prop_assert!(parsed.retry_after.is_none_or(|d| d <= Duration::from_secs(60)));
                    }
                }
            }

            /// A body is read only if it is a JSON object (anything else is treated as an
            /// empty answer), and what is read is what the object says.
            #[test]
            fn any_response_body_deserializes_or_is_refused(body in json_with_keys(KEYS), raw in text()) {
                for text in [body.to_string(), raw] {
                    let value = serde_json::from_str::<Value>(&text).ok();
                    if let Ok(parsed) = serde_json::from_str::<ResponseBody>(&text) {
                        let value = value.unwrap_or_default();
                        prop_assert!(value.is_object());
                        prop_assert_eq!(parsed.status.as_deref(), value["status"].as_str());
                        prop_assert_eq!(parsed.operation_id.as_deref(), value["operationId"].as_str());
                    }
                }
            }
        }
    }
}
