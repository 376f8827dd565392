//! A strict stand-in for Azure DPS's MQTT device registration API.
//!
//! It checks what DPS checks: client id, user name, the SAS token's resource, key name, expiry
//! and signature (against individual keys, or keys derived from its enrollment-group keys), the
//! subscription, the request topics and that the body names the connected registration id. It
//! answers register with `202` + `retry-after`, then `200 assigned` on polling, assigning a hub
//! from its list and returning the enrollment's custom allocation data, if any. Faults can be
//! injected for tests.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use shared::keys::SymmetricKey;
use shared::sas::ParsedSas;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::mqtt_io::{granted, lock, read_packet, write_packet};
use crate::tls::{common_name, local_pki, roots_from_pem};
use shared::clock::unix_now;

const API_VERSION: &str = "2019-03-31";
/// The topic filter DPS publishes its answers under.
const RESPONSE_FILTER: &str = "$dps/registrations/res/#";

/// A fault to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer the first N register requests with 429.
    ThrottleRegister(u32),
    /// Answer the first N polls with 429.
    ThrottlePoll(u32),
    /// Answer this percentage of register and poll requests with 429 (deterministic spread).
    ThrottlePercent(u32),
    /// Answer register with this error status (401, 403, 404, 500, ...).
    RegisterStatus(u16),
    /// The enrollment is disabled: polling ends with status `disabled`.
    Disabled,
    /// Close the connection right after a successful CONNACK.
    DropAfterConnack,
    /// Delay every response by this long.
    Slow(Duration),
    /// Keep answering `assigning`.
    NeverAssign,
    /// Refuse the first N connections with CONNACK "server unavailable".
    ConnackUnavailable(u32),
    /// Reset the first N TCP connections before the TLS handshake completes.
    ResetHandshake(u32),
    /// Answer the first N polls `failed` with a server-side (5xxxxx) error code.
    FailServerError(u32),
    /// Answer the first N polls 404: the operation expired.
    ExpireOperation(u32),
}

impl Fault {
    /// The kind's name, for counting "first N" faults.
    fn kind(&self) -> &'static str {
        match self {
            Fault::ConnackUnavailable(_) => "connack-unavailable",
            Fault::ResetHandshake(_) => "reset-handshake",
            Fault::FailServerError(_) => "fail-server-error",
            Fault::ExpireOperation(_) => "expire-operation",
            _ => "other",
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `throttle-register[:N]`, `throttle-poll[:N]`, `throttle-percent:P`, `status:CODE`,
    /// `disabled`, `drop-after-connack`, `slow:MS`, `never-assign`, `connack-unavailable[:N]`,
    /// `reset-handshake[:N]`, `fail-server-error[:N]`, `expire-operation[:N]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        let number = |default: u64| -> Result<u64, String> {
            if arg.is_empty() {
                Ok(default)
            } else {
                arg.parse()
                    .map_err(|_| format!("fault {kind}: '{arg}' is not a number"))
            }
        };
        Ok(match kind {
            "throttle-register" => Fault::ThrottleRegister(number(1)? as u32),
            "throttle-poll" => Fault::ThrottlePoll(number(1)? as u32),
            "throttle-percent" => Fault::ThrottlePercent(number(20)?.min(100) as u32),
            "status" => Fault::RegisterStatus(number(500)? as u16),
            "disabled" => Fault::Disabled,
            "drop-after-connack" => Fault::DropAfterConnack,
            "slow" => Fault::Slow(Duration::from_millis(number(1000)?)),
            "never-assign" => Fault::NeverAssign,
            "connack-unavailable" => Fault::ConnackUnavailable(number(1)? as u32),
            "reset-handshake" => Fault::ResetHandshake(number(1)? as u32),
            "fail-server-error" => Fault::FailServerError(number(1)? as u32),
            "expire-operation" => Fault::ExpireOperation(number(1)? as u32),
            _ => return Err(format!("unknown fault '{s}'")),
        })
    }
}

/// How the simulator behaves.
#[derive(Debug, Clone)]
pub struct DpsSimConfig {
    pub id_scope: String,
    pub group_keys: Vec<SymmetricKey>,
    /// Individual enrollments, by registration id (compared case-insensitively).
    pub device_keys: HashMap<String, SymmetricKey>,
    pub hubs: Vec<String>,
    pub faults: Vec<Fault>,
    /// `retry-after` sent with 202 and 429, in seconds (DPS sends 3; tests use 0 or 1).
    pub retry_after: u64,
    /// Polls answered `assigning` before `assigned`.
    pub polls_before_assign: u32,
    /// The names its server certificate is for (default `localhost` and `127.0.0.1`).
    pub tls_names: Vec<String>,
    /// Seconds the simulator's clock is ahead of this machine's (negative: behind), for
    /// clock-skew tests of SAS token expiry.
    pub clock_offset_secs: i64,
    /// What the enrollment's custom allocation policy returns to its devices (DPS's
    /// `registrationState.payload`); without one DPS returns no payload, whatever the device
    /// sent.
    pub return_data: Option<Value>,
    /// DPS's service limits, enforced as DPS does (429 with `retry-after`).
    pub limits: DpsLimits,
    /// How long after its register request an operation is assigned (DPS takes about 1–3 s in
    /// the cloud); polls before then answer `assigning`.
    pub assignment_delay: Duration,
    /// X.509 enrollment groups: the PEM of each enrolled (root or intermediate) CA. A device
    /// presenting a TLS client certificate that chains to one of them, within its validity,
    /// registers as its certificate's CN, without a SAS token.
    pub x509_cas: Vec<String>,
}

/// DPS's quotas ("Azure IoT Hub DPS limits"): device registrations per minute per service
/// instance, and device polling operations per device per 10 seconds. `None`: not enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DpsLimits {
    pub registrations_per_minute: Option<u32>,
    pub polls_per_device_per_10s: Option<u32>,
}

impl DpsLimits {
    /// What DPS enforces: 1,000 registrations a minute, 5 polls per device in 10 s.
    pub const DPS: DpsLimits = DpsLimits {
        registrations_per_minute: Some(1000),
        polls_per_device_per_10s: Some(5),
    };
    /// Nothing enforced (tests of other behaviour that poll freely).
    pub const NONE: DpsLimits = DpsLimits {
        registrations_per_minute: None,
        polls_per_device_per_10s: None,
    };
}

impl DpsSimConfig {
    pub fn new(id_scope: &str) -> Self {
        Self {
            id_scope: id_scope.to_owned(),
            group_keys: Vec::new(),
            device_keys: HashMap::new(),
            hubs: vec!["sim-hub-1.azure-devices.net".into()],
            faults: Vec::new(),
            retry_after: 0,
            polls_before_assign: 0,
            tls_names: vec!["localhost".into(), "127.0.0.1".into()],
            clock_offset_secs: 0,
            return_data: None,
            limits: DpsLimits::NONE,
            assignment_delay: Duration::ZERO,
            x509_cas: Vec::new(),
        }
    }
}

/// A registration the simulator assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct Assigned {
    pub registration_id: String,
    pub assigned_hub: String,
    pub payload: Option<Value>,
}

/// Counters for assertions ("no retry storm") and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    /// TCP connections accepted, counted before the TLS handshake (so a client that refuses
    /// our certificate is counted by the time it has seen it).
    pub accepted: AtomicU64,
    /// MQTT CONNECTs received (a TLS connection opened ahead and dropped sends none).
    pub connects: AtomicU64,
    pub refused: AtomicU64,
    pub registers: AtomicU64,
    pub polls: AtomicU64,
    /// Requests answered 429, injected or over a quota.
    pub throttled: AtomicU64,
    /// Requests answered 429 because they exceeded one of DPS's quotas (`DpsLimits`).
    pub over_quota: AtomicU64,
    /// Answers published to a client not subscribed to the response topic (lost).
    pub undelivered: AtomicU64,
}

struct Shared {
    config: DpsSimConfig,
    stats: Stats,
    assigned: Mutex<Vec<Assigned>>,
    operations: Mutex<HashMap<String, Operation>>,
    sequence: AtomicU64,
    /// The `sig` of every accepted SAS token, as sent: secrets the log checks look for.
    signatures: Mutex<Vec<String>>,
    /// How often each "first N" fault kind has fired.
    fired: Mutex<HashMap<&'static str, u32>>,
    /// Registrations in the last minute (all devices).
    registrations: Mutex<Window>,
    /// Polls in the last 10 s, per registration id.
    polls: Mutex<HashMap<String, Window>>,
}

impl Shared {
    /// Whether the configured "first N" fault matching `which` fires now (and counts it).
    fn fires(&self, which: impl Fn(&Fault) -> Option<u32>) -> bool {
        let Some((kind, limit)) = self
            .config
            .faults
            .iter()
            .find_map(|f| which(f).map(|n| (f.kind(), n)))
        else {
            return false;
        };
        let mut fired = lock(&self.fired);
        let count = fired.entry(kind).or_insert(0);
        if *count >= limit {
            return false;
        }
        *count += 1;
        true
    }
}

struct Operation {
    registration_id: String,
    payload: Option<Value>,
    polls: u32,
    /// When its register request arrived (for the assignment delay).
    created: Instant,
}

/// Times of recent events in a sliding window: DPS's way of counting its limits.
#[derive(Default)]
struct Window(VecDeque<Instant>);

impl Window {
    /// Counts an event now if fewer than `limit` happened within `span`; otherwise the seconds
    /// until one leaves the window (at least 1).
    fn admit(&mut self, limit: u32, span: Duration) -> Result<(), u64> {
        let now = Instant::now();
        while self
            .0
            .front()
            .is_some_and(|t| now.duration_since(*t) >= span)
        {
            self.0.pop_front();
        }
        if self.0.len() >= limit as usize {
            let oldest = self.0.front().copied().unwrap_or(now);
            let wait = span.saturating_sub(now.duration_since(oldest));
            return Err(wait.as_secs_f64().ceil().max(1.0) as u64);
        }
        self.0.push_back(now);
        Ok(())
    }
}

/// A running simulator; stops when dropped.
pub struct DpsSimulator {
    addr: SocketAddr,
    ca_pem: String,
    shared: Arc<Shared>,
    _task: crate::serve::Background,
}

impl DpsSimulator {
    /// Listens on `listen` (use port 0 for a free port) with a fresh CA.
    pub async fn start(config: DpsSimConfig, listen: SocketAddr) -> std::io::Result<Self> {
        let names: Vec<&str> = config.tls_names.iter().map(String::as_str).collect();
        let pki = local_pki("dps-simulator local CA", &names).map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            stats: Stats::default(),
            assigned: Mutex::new(Vec::new()),
            operations: Mutex::new(HashMap::new()),
            sequence: AtomicU64::new(0),
            signatures: Mutex::new(Vec::new()),
            fired: Mutex::new(HashMap::new()),
            registrations: Mutex::new(Window::default()),
            polls: Mutex::new(HashMap::new()),
        });
        // With X.509 enrollments a client certificate is asked for, and verified if presented
        // (chain to an enrolled CA, validity); SAS devices present none.
        let server = if shared.config.x509_cas.is_empty() {
            pki.server_config(None)
        } else {
            let cas: Vec<&str> = shared.config.x509_cas.iter().map(String::as_str).collect();
            roots_from_pem(&cas).and_then(|roots| pki.server_config_optional_clients(roots))
        };
        let acceptor = TlsAcceptor::from(server.map_err(std::io::Error::other)?);
        let counted = Arc::clone(&shared);
        let state = Arc::clone(&shared);
        let _task = crate::serve::tls(
            listener,
            acceptor,
            move || {
                counted.stats.accepted.fetch_add(1, Ordering::Relaxed);
                !counted.fires(|f| match f {
                    Fault::ResetHandshake(n) => Some(*n),
                    _ => None,
                })
            },
            move |stream| {
                let state = Arc::clone(&state);
                async move {
                    if let Ok(tls) = stream {
                        // The certificate was verified in the handshake; its CN is who it is.
                        let client_cn = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(|leaf| common_name(leaf.as_ref()).unwrap_or_default());
                        let _ = serve(tls, &state, client_cn).await;
                    }
                }
            },
        );
        Ok(Self {
            addr,
            ca_pem: pki.ca_pem,
            shared,
            _task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA certificate (PEM) clients must trust (`DPS_TRUSTED_CA_FILE`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// The signatures of the SAS tokens it accepted (percent-encoded, as sent).
    pub fn accepted_signatures(&self) -> Vec<String> {
        lock(&self.shared.signatures).clone()
    }

    pub fn assigned(&self) -> Vec<Assigned> {
        lock(&self.shared.assigned).clone()
    }
}

/// Checks CONNECT as DPS does; `Ok(registration id)` or the CONNACK refusal code.
fn authenticate(
    config: &DpsSimConfig,
    connect: &rumqttc::mqttbytes::v4::Connect,
    client_cn: Option<&str>,
) -> Result<String, ConnectReturnCode> {
    use ConnectReturnCode::*;
    let registration_id = connect.client_id.as_str();
    let valid_id = !registration_id.is_empty()
        && registration_id.len() <= 128
        && registration_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'));
    if !valid_id {
        return Err(BadClientId);
    }
    let login = connect.login.as_ref().ok_or(BadUserNamePassword)?;
    // {idScope}/registrations/{registrationId}/api-version=2019-03-31[&ClientVersion=...]
    let expected_prefix = format!("{}/registrations/{}/", config.id_scope, registration_id);
    let user = login.username.as_str();
    let user_ok = user.len() > expected_prefix.len()
        && user[..expected_prefix.len()].eq_ignore_ascii_case(&expected_prefix)
        && user[expected_prefix.len()..]
            .split('&')
            .any(|p| p == format!("api-version={API_VERSION}"));
    if !user_ok {
        return Err(BadUserNamePassword);
    }
    // X.509 attestation: the registration id is the certificate's CN, exactly; no token.
    if let Some(cn) = client_cn {
        return if cn == registration_id {
            Ok(registration_id.to_owned())
        } else {
            Err(NotAuthorized)
        };
    }
    let token = ParsedSas::parse(&login.password).map_err(|_| BadUserNamePassword)?;
    let (scope, token_id) = token.registration().ok_or(NotAuthorized)?;
    if !scope.eq_ignore_ascii_case(&config.id_scope)
        || !token_id.eq_ignore_ascii_case(registration_id)
    {
        return Err(NotAuthorized);
    }
    if token
        .key_name
        .as_deref()
        .is_some_and(|k| k != "registration")
        || token.expiry <= unix_now().saturating_add_signed(config.clock_offset_secs)
    {
        return Err(NotAuthorized);
    }
    let individual = config
        .device_keys
        .iter()
        .find(|(id, _)| id.eq_ignore_ascii_case(registration_id))
        .map(|(_, key)| key);
    let verified = match individual {
        Some(key) => token.verify(key),
        None => config
            .group_keys
            .iter()
            .any(|g| token.verify(&g.derive_device_key(registration_id))),
    };
    if verified {
        Ok(registration_id.to_owned())
    } else {
        Err(NotAuthorized)
    }
}

/// A value of a topic's query (`?$rid=1&operationId=...`), decoded.
fn query_value(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    state: &Shared,
    client_cn: Option<String>,
) -> std::io::Result<()> {
    let config = &state.config;
    let mut buf = BytesMut::with_capacity(4096);
    state.stats.connections.fetch_add(1, Ordering::Relaxed);
    let Some(registration_id) = accept(&mut stream, &mut buf, state, client_cn.as_deref()).await?
    else {
        return Ok(());
    };
    if config.faults.contains(&Fault::DropAfterConnack) {
        return Ok(());
    }
    // Answers are published to the response topic: a client that has not subscribed (yet)
    // receives none, as with DPS.
    let mut subscribed = false;
    while let Some(packet) = read_packet(&mut stream, &mut buf).await {
        match packet {
            Packet::Subscribe(sub) => {
                let codes = sub
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path == RESPONSE_FILTER {
                            subscribed = true;
                            SubscribeReasonCode::Success(granted(f.qos))
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                write_packet(&mut stream, Packet::SubAck(SubAck::new(sub.pkid, codes))).await?;
            }
            Packet::Publish(publish) => {
                if publish.qos == QoS::AtLeastOnce {
                    write_packet(&mut stream, Packet::PubAck(PubAck::new(publish.pkid))).await?;
                }
                let Some(reply) = reply(state, &registration_id, &publish).await else {
                    // Not a DPS request topic: DPS closes the connection.
                    return Ok(());
                };
                if subscribed {
                    write_packet(&mut stream, Packet::Publish(reply)).await?;
                } else {
                    state.stats.undelivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            // The Node SDK unsubscribes before disconnecting and waits for the UNSUBACK.
            Packet::Unsubscribe(unsub) => {
                if unsub.topics.iter().any(|t| t == RESPONSE_FILTER) {
                    subscribed = false;
                }
                write_packet(&mut stream, Packet::UnsubAck(UnsubAck::new(unsub.pkid))).await?
            }
            Packet::PingReq => write_packet(&mut stream, Packet::PingResp).await?,
            Packet::Disconnect => return Ok(()),
            _ => {}
        }
    }
    Ok(())
}

/// The CONNECT and its CONNACK: the registration id the device authenticated as, or `None`
/// when the connection was refused (or never sent a CONNECT).
async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    state: &Shared,
    client_cn: Option<&str>,
) -> std::io::Result<Option<String>> {
    let Some(Packet::Connect(connect)) = read_packet(stream, buf).await else {
        return Ok(None);
    };
    state.stats.connects.fetch_add(1, Ordering::Relaxed);
    let unavailable = state.fires(|f| match f {
        Fault::ConnackUnavailable(n) => Some(*n),
        _ => None,
    });
    let verdict = if unavailable {
        Err(ConnectReturnCode::ServiceUnavailable)
    } else {
        authenticate(&state.config, &connect, client_cn)
    };
    let registration_id = match verdict {
        Ok(id) => id,
        Err(code) => {
            state.stats.refused.fetch_add(1, Ordering::Relaxed);
            write_packet(stream, Packet::ConnAck(ConnAck::new(code, false))).await?;
            return Ok(None);
        }
    };
    if let Some(login) = connect.login.as_ref().filter(|_| client_cn.is_none()) {
        let sig = login
            .password
            .split('&')
            .find_map(|p| p.strip_prefix("sig="))
            .unwrap_or_default();
        lock(&state.signatures).push(sig.to_owned());
    }
    let success = ConnAck::new(ConnectReturnCode::Success, false);
    write_packet(stream, Packet::ConnAck(success)).await?;
    Ok(Some(registration_id))
}

/// DPS's answer to a request, on the response topic with the request's `$rid` (and
/// `retry-after` if it says when to come back); `None` for a topic DPS does not serve.
async fn reply(state: &Shared, registration_id: &str, publish: &Publish) -> Option<Publish> {
    let (status, body, retry_after) = respond(state, registration_id, publish)?;
    let slow = state.config.faults.iter().find_map(|f| match f {
        Fault::Slow(d) => Some(*d),
        _ => None,
    });
    if let Some(delay) = slow {
        tokio::time::sleep(delay).await;
    }
    let rid = publish
        .topic
        .split_once('?')
        .and_then(|(_, q)| query_value(q, "$rid"))
        .unwrap_or_default();
    let mut topic = format!("$dps/registrations/res/{status}/?$rid={rid}");
    if let Some(seconds) = retry_after {
        topic.push_str(&format!("&retry-after={seconds}"));
    }
    Some(Publish::new(topic, QoS::AtMostOnce, body.to_string()))
}

/// Whether request number `n` falls in the throttled `percent`, spread evenly.
fn throttled_share(n: u64, percent: u32) -> bool {
    (n * u64::from(percent)) % 100 < u64::from(percent) && percent > 0
}

/// Whether this request is to be answered 429: a first-N fault for its kind, or the request's
/// share of a percentage fault. Counts it as throttled.
fn injected_throttle(
    state: &Shared,
    first_n: impl Fn(&Fault) -> bool,
    percent: Option<u32>,
    n: u64,
) -> bool {
    let throttled =
        state.config.faults.iter().any(first_n) || percent.is_some_and(|p| throttled_share(n, p));
    if throttled {
        state.stats.throttled.fetch_add(1, Ordering::Relaxed);
    }
    throttled
}

/// A DPS answer: status, body, `retry-after`.
type Answer = (u16, Value, Option<u64>);

/// Which of DPS's quotas a request counts against.
enum Limit {
    Registrations,
    Polls,
}

/// The seconds to wait if this request exceeds its quota (counted as throttled), else `None`
/// (and the request is counted).
fn over_limit(state: &Shared, registration_id: &str, limit: Limit) -> Option<u64> {
    let limits = state.config.limits;
    let verdict = match limit {
        Limit::Registrations => {
            let per_minute = limits.registrations_per_minute?;
            lock(&state.registrations).admit(per_minute, Duration::from_secs(60))
        }
        Limit::Polls => {
            let per_10s = limits.polls_per_device_per_10s?;
            let mut polls = lock(&state.polls);
            let device = polls
                .entry(registration_id.to_ascii_lowercase())
                .or_default();
            device.admit(per_10s, Duration::from_secs(10))
        }
    };
    let wait = verdict.err()?;
    state.stats.throttled.fetch_add(1, Ordering::Relaxed);
    state.stats.over_quota.fetch_add(1, Ordering::Relaxed);
    Some(wait)
}

/// DPS's answer to a request over its quota.
fn limited(wait: u64) -> Answer {
    let body = error_body(429002, "Operations are being throttled: quota exceeded.");
    (429, body, Some(wait))
}

fn error_body(code: u64, message: &str) -> Value {
    json!({"errorCode": code, "trackingId": "sim", "message": message})
}

/// The status, body and `retry-after` for a request, or `None` for a topic DPS does not serve.
fn respond(state: &Shared, registration_id: &str, publish: &Publish) -> Option<Answer> {
    let (path, query) = publish.topic.split_once("/?")?;
    query_value(query, "$rid").filter(|r| !r.is_empty())?;
    let n = state.sequence.fetch_add(1, Ordering::Relaxed) + 1;
    let percent = state.config.faults.iter().find_map(|f| match f {
        Fault::ThrottlePercent(p) => Some(*p),
        _ => None,
    });
    let throttle = || {
        let body = error_body(429001, "Operations are being throttled for this tenant.");
        Some((429, body, Some(state.config.retry_after)))
    };
    match path {
        "$dps/registrations/PUT/iotdps-register" => {
            let count = state.stats.registers.fetch_add(1, Ordering::Relaxed) + 1;
            let first_n =
                |f: &Fault| matches!(f, Fault::ThrottleRegister(k) if count <= u64::from(*k));
            if injected_throttle(state, first_n, percent, n) {
                return throttle();
            }
            if let Some(wait) = over_limit(state, registration_id, Limit::Registrations) {
                return Some(limited(wait));
            }
            Some(register(state, registration_id, &publish.payload, n))
        }
        "$dps/registrations/GET/iotdps-get-operationstatus" => {
            let count = state.stats.polls.fetch_add(1, Ordering::Relaxed) + 1;
            let first_n = |f: &Fault| matches!(f, Fault::ThrottlePoll(k) if count <= u64::from(*k));
            if injected_throttle(state, first_n, percent, n) {
                return throttle();
            }
            if let Some(wait) = over_limit(state, registration_id, Limit::Polls) {
                return Some(limited(wait));
            }
            Some(poll(
                state,
                registration_id,
                &query_value(query, "operationId")?,
            ))
        }
        _ => None,
    }
}

/// Register: the body must name the connected registration id; answers 202 with an operation.
fn register(state: &Shared, registration_id: &str, payload: &[u8], n: u64) -> Answer {
    let config = &state.config;
    if let Some(status) = config.faults.iter().find_map(|f| match f {
        Fault::RegisterStatus(s) => Some(*s),
        _ => None,
    }) {
        return (
            status,
            error_body(u64::from(status) * 1000 + 1, "injected"),
            None,
        );
    }
    let body: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
    let named = body.get("registrationId").and_then(Value::as_str);
    if !named.is_some_and(|id| id.eq_ignore_ascii_case(registration_id)) {
        let message = "registrationId does not match the connection";
        return (400, error_body(400004, message), None);
    }
    let payload = body.get("payload").filter(|p| !p.is_null()).cloned();
    let operation_id = format!("4.sim{:016x}.{n}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let operation = Operation {
        registration_id: registration_id.to_owned(),
        payload,
        polls: 0,
        created: Instant::now(),
    };
    lock(&state.operations).insert(operation_id.clone(), operation);
    let body = json!({"operationId": operation_id, "status": "assigning"});
    (202, body, Some(config.retry_after))
}

/// Poll: `assigning` for a while, then the operation's outcome (or an injected one).
fn poll(state: &Shared, registration_id: &str, operation_id: &str) -> Answer {
    let config = &state.config;
    if state.fires(|f| match f {
        Fault::ExpireOperation(n) => Some(*n),
        _ => None,
    }) {
        lock(&state.operations).remove(operation_id);
    }
    let mut operations = lock(&state.operations);
    let Some(op) = operations
        .get_mut(operation_id)
        .filter(|op| op.registration_id.eq_ignore_ascii_case(registration_id))
    else {
        return (404, error_body(404201, "Operation not found"), None);
    };
    op.polls += 1;
    let assigning = op.created.elapsed() < config.assignment_delay;
    if assigning
        || config.faults.contains(&Fault::NeverAssign)
        || op.polls <= config.polls_before_assign
    {
        let body = json!({"operationId": operation_id, "status": "assigning"});
        return (202, body, Some(config.retry_after));
    }
    let not_assigned = |status: &str, code: u64, message: &str| {
        json!({"operationId": operation_id, "status": status, "registrationState": {
            "registrationId": op.registration_id, "status": status, "errorCode": code,
            "errorMessage": message, "createdDateTimeUtc": NOW, "lastUpdatedDateTimeUtc": NOW}})
    };
    if state.fires(|f| match f {
        Fault::FailServerError(n) => Some(*n),
        _ => None,
    }) {
        let body = not_assigned("failed", 500_000, "Internal server error");
        return (200, body, Some(config.retry_after));
    }
    if config.faults.contains(&Fault::Disabled) {
        return (
            200,
            not_assigned("disabled", 401010, "Enrollment disabled"),
            None,
        );
    }
    (200, assign(state, op, operation_id), None)
}

/// The time the simulator reports in registration states.
const NOW: &str = "2026-01-01T00:00:00.000Z";

/// Assigns the operation's device to one of the hubs (the same one for the same id), records it
/// (with the payload the device sent), and returns the `assigned` body, with the custom
/// allocation's return data if the enrollment has one.
fn assign(state: &Shared, op: &Operation, operation_id: &str) -> Value {
    let hubs = &state.config.hubs;
    let hub_index = op.registration_id.bytes().map(usize::from).sum::<usize>() % hubs.len().max(1);
    let hub = hubs.get(hub_index).cloned().unwrap_or_default();
    lock(&state.assigned).push(Assigned {
        registration_id: op.registration_id.clone(),
        assigned_hub: hub.clone(),
        payload: op.payload.clone(),
    });
    let mut registration_state = json!({
        "registrationId": op.registration_id, "assignedHub": hub, "deviceId": op.registration_id,
        "status": "assigned", "substatus": "initialAssignment", "etag": "\"sim\"",
        "createdDateTimeUtc": NOW, "lastUpdatedDateTimeUtc": NOW,
    });
    if let Some(data) = &state.config.return_data {
        registration_state["payload"] = data.clone();
    }
    json!({"operationId": operation_id, "status": "assigned", "registrationState": registration_state})
}
