//! A strict stand-in for AWS IoT Core's fleet provisioning MQTT API (MQTT 3.1.1 and MQTT 5 over
//! TLS with client certificates), so the whole trusted-user flow runs on this machine, with
//! `fleet-device` or the official AWS IoT Device SDKs (both their MQTT 3.1.1 and MQTT 5 clients).
//!
//! What it checks, as AWS IoT does:
//! - the TLS client certificate chains to the claim CA of the IoT control-plane double or to the
//!   simulator's own device CA, and is within its validity period (claim certificates live
//!   5 minutes); a certificate it issued may connect only once RegisterThing activated it, and
//!   only with the thing's name as client id;
//! - a claim certificate may connect only with a client id starting `claim.` and publish and
//!   subscribe only under the fleet provisioning topics
//!   (the claim policy in infra/template.yaml); anything else ends the connection; a device
//!   certificate only under `devices/{thing}/`;
//! - replies go to `{request}/accepted` or `{request}/rejected`, only if subscribed, at the QoS
//!   the subscription was granted (QoS 1 at most), with the request's MQTT 5 correlation data;
//! - a persistent session (MQTT 3.1.1 without clean session, MQTT 5 with a session expiry and
//!   without clean start) keeps its subscriptions across connections for up to an hour, and
//!   CONNACK says `session present`;
//! - an ownership token is valid 1 hour, names the certificate it came with, and is used once;
//! - a certificate set INACTIVE (UpdateCertificate) or detached from its thing
//!   (DetachThingPrincipal, through the control-plane double) can no longer connect;
//! - when a device certificate connects, the connect lifecycle event
//!   (`$aws/events/presence/connected/<clientId>`: clientId, timestamp, eventType,
//!   sessionIdentifier, principalIdentifier = the certificate id, ipAddress, versionNumber) goes to
//!   the [`Lifecycle`] rule's function, as the stack's topic rule sends it to fleet-confirm;
//! - RegisterThing calls the template's pre-provisioning hook with the 2020-04-01 payload and
//!   denies when it answers anything but `allowProvisioning: true`, fails, or takes more than
//!   5 seconds; then it applies the template (thing name = prefix + serial parameter, the hook's
//!   `parameterOverrides` merged over the device's parameters) and activates the certificate.
//!
//! Payloads are JSON (`.../json` topics). Differences from AWS: certificates it creates carry
//! ECDSA P-256 keys (AWS creates RSA 2048), and error messages are its own words.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use rcgen::{CertificateParams, CertificateSigningRequestParams, DnType, Issuer, KeyPair};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Map, Value};
use shared::clock::unix_now;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::mqtt_io::{granted, lock};
use crate::mqtt_session::{Sessions, Subscriptions};
use crate::mqtt_wire::{Hello, Message, Refusal, Request, ServerConnection};
use crate::provisioning_template::{Applied, TemplateBody};
use crate::tls::{certificate_authority, certificate_id, local_pki, roots_from_pem};

/// How long AWS IoT waits for a pre-provisioning hook before denying.
pub const HOOK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a certificate ownership token is valid.
pub const TOKEN_VALIDITY: Duration = Duration::from_secs(3600);
/// The not-after AWS IoT puts on the certificates it creates (2049-12-31T23:59:59Z).
const DEVICE_CERT_NOT_AFTER: i64 = 2_524_607_999;

pub type HookFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;

/// Where a template's pre-provisioning hook runs.
#[derive(Clone)]
pub enum Hook {
    /// No hook: every RegisterThing with a valid token is provisioned.
    None,
    /// An in-process handler (the function's own handler, or a faulty one in tests).
    Handler(Arc<dyn Fn(Value) -> HookFuture + Send + Sync>),
    /// A Lambda Invoke API URL, such as `cargo lambda watch`'s
    /// `http://127.0.0.1:9000/2015-03-31/functions/fleet-prehook/invocations`.
    Lambda(String),
}

impl Hook {
    pub fn handler<F, Fut>(f: F) -> Self
    where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, String>> + Send + 'static,
    {
        Hook::Handler(Arc::new(move |v| Box::pin(f(v))))
    }

    /// The function `name` behind a Lambda Invoke API at `base` (`http://HOST:PORT`).
    pub fn lambda(base: &str, name: &str) -> Self {
        Hook::Lambda(format!(
            "{}/2015-03-31/functions/{name}/invocations",
            base.trim_end_matches('/')
        ))
    }

    async fn call(&self, payload: Value) -> Result<Option<Value>, String> {
        match self {
            Hook::None => Ok(None),
            Hook::Handler(f) => f(payload).await.map(Some),
            Hook::Lambda(url) => invoke_lambda(url, &payload).await.map(Some),
        }
    }
}

/// A provisioning template as the simulator applies it: its body and its hook.
#[derive(Clone)]
pub struct Template {
    pub name: String,
    pub body: TemplateBody,
    pub hook: Hook,
}

impl Template {
    /// A template that names the thing `thing_name_prefix` + `SerialNumber` and does nothing
    /// else; [`Template::with_body`] applies a full body (infra/template.yaml's).
    pub fn new(name: &str, thing_name_prefix: &str, hook: Hook) -> Self {
        Self::with_body(
            name,
            TemplateBody::named(thing_name_prefix, "SerialNumber"),
            hook,
        )
    }

    pub fn with_body(name: &str, body: TemplateBody, hook: Hook) -> Self {
        Self {
            name: name.to_owned(),
            body,
            hook,
        }
    }
}

/// The topic rule on connect lifecycle events: `SELECT * FROM
/// '$aws/events/presence/connected/+' WHERE startswith(clientId, prefix) AND NOT
/// startswith(clientId, 'claim.')`, with a Lambda action.
#[derive(Clone)]
pub struct Lifecycle {
    pub client_prefix: String,
    pub function: Hook,
}

#[derive(Clone)]
pub struct IotMqttConfig {
    pub templates: Vec<Template>,
    /// The CA that signs claim certificates (the control-plane double's `ca_pem()`).
    pub claim_ca_pem: String,
    pub hook_timeout: Duration,
    pub token_validity: Duration,
    pub account_id: String,
    pub region: String,
    /// What a claim connection's client id must start with (the claim policy's
    /// `iot:Connect` resource `client/claim.*` in infra/template.yaml).
    pub claim_client_prefix: String,
    /// RegisterThing calls allowed per window, as the account's fleet provisioning quota
    /// throttles them (`None`: unthrottled); beyond it the device gets `429 ThrottlingException`.
    pub register_thing_limit: Option<(u32, Duration)>,
    /// Where connect lifecycle events go (`None`: nowhere).
    pub lifecycle: Option<Lifecycle>,
}

impl IotMqttConfig {
    pub fn new(claim_ca_pem: &str, templates: Vec<Template>) -> Self {
        Self {
            templates,
            claim_ca_pem: claim_ca_pem.to_owned(),
            hook_timeout: HOOK_TIMEOUT,
            token_validity: TOKEN_VALIDITY,
            account_id: "123456789012".to_owned(),
            region: "us-east-1".to_owned(),
            claim_client_prefix: "claim.".to_owned(),
            register_thing_limit: None,
            lifecycle: None,
        }
    }
}

/// A thing the simulator provisioned.
#[derive(Debug, Clone, PartialEq)]
pub struct Thing {
    pub thing_name: String,
    pub template: String,
    pub certificate_id: String,
    pub claim_certificate_id: String,
    /// The device's parameters with the hook's overrides merged over them.
    pub parameters: BTreeMap<String, String>,
    /// What the template made of them.
    pub attributes: BTreeMap<String, String>,
    pub thing_type: Option<String>,
    pub thing_groups: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateStatus {
    PendingActivation,
    Active,
    Inactive,
    Revoked,
}

impl CertificateStatus {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ACTIVE" => Self::Active,
            "INACTIVE" => Self::Inactive,
            "REVOKED" => Self::Revoked,
            "PENDING_ACTIVATION" => Self::PendingActivation,
            _ => return None,
        })
    }
}

/// Counters for assertions and benchmarks.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub certificates_created: AtomicU64,
    pub hook_calls: AtomicU64,
    pub provisioned: AtomicU64,
    pub rejected: AtomicU64,
    /// Requests made on the `.../cbor` topics.
    pub cbor_requests: AtomicU64,
}

/// A connect lifecycle event the rule's function was given, and what it answered.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub event: Value,
    pub answer: Result<Value, String>,
}

struct Certificate {
    status: CertificateStatus,
    thing: Option<String>,
}

struct Token {
    certificate_id: String,
    certificate_pem: String,
    expires_at: u64,
    used: bool,
}

struct State {
    config: IotMqttConfig,
    device_ca: Issuer<'static, KeyPair>,
    certificates: Mutex<HashMap<String, Certificate>>,
    tokens: Mutex<HashMap<String, Token>>,
    things: Mutex<Vec<Thing>>,
    /// Why connections were refused (TLS or CONNECT), newest last. A watch channel, because
    /// the device sees a TLS alert before the simulator has recorded why it sent it: tests wait
    /// for the record instead of reading it at once.
    refusals: tokio::sync::watch::Sender<Vec<String>>,
    sessions: Sessions,
    /// RegisterThing calls in the current throttling window, and when it started.
    register_window: Mutex<(tokio::time::Instant, u32)>,
    stats: Stats,
    /// Lifecycle events delivered to the rule's function, in order of their answers.
    delivered: tokio::sync::watch::Sender<Vec<Delivered>>,
}

/// A running simulator; stops when dropped.
pub struct IotMqttSimulator {
    addr: SocketAddr,
    ca_pem: String,
    device_ca_pem: String,
    state: Arc<State>,
    _task: crate::serve::Background,
}

impl IotMqttSimulator {
    /// Listens on `listen` (port 0 for a free port) with a fresh server CA and device CA.
    pub async fn start(config: IotMqttConfig, listen: SocketAddr) -> std::io::Result<Self> {
        let io = std::io::Error::other;
        let pki = local_pki("iot-simulator local CA", &["localhost", "127.0.0.1"]).map_err(io)?;
        let (device_ca, device_ca_pem) =
            certificate_authority("iot-simulator device CA").map_err(io)?;
        let roots = roots_from_pem(&[&config.claim_ca_pem, &device_ca_pem]).map_err(io)?;
        let acceptor = TlsAcceptor::from(pki.server_config(Some(roots)).map_err(io)?);
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config,
            device_ca,
            certificates: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            things: Mutex::new(Vec::new()),
            refusals: tokio::sync::watch::Sender::new(Vec::new()),
            sessions: Sessions::default(),
            register_window: Mutex::new((tokio::time::Instant::now(), 0)),
            stats: Stats::default(),
            delivered: tokio::sync::watch::Sender::new(Vec::new()),
        });
        let shared = Arc::clone(&state);
        let _task = crate::serve::tls(
            listener,
            acceptor,
            {
                let state = Arc::clone(&state);
                move || {
                    state.stats.connections.fetch_add(1, Ordering::Relaxed);
                    true
                }
            },
            move |stream| {
                let state = Arc::clone(&shared);
                async move {
                    match stream {
                        Ok(tls) => {
                            let peer = tls
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .map(|c| certificate_id(c.as_ref()));
                            if let Some(peer) = peer {
                                let _ = serve(tls, &peer, &state).await;
                            }
                        }
                        Err(why) => refuse(&state, why),
                    }
                }
            },
        );
        Ok(Self {
            addr,
            ca_pem: pki.ca_pem,
            device_ca_pem,
            state,
            _task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA of the simulator's server certificate (what devices must trust; on AWS this is
    /// Amazon Root CA 1).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA that signs the certificates the simulator creates.
    pub fn device_ca_pem(&self) -> &str {
        &self.device_ca_pem
    }

    pub fn stats(&self) -> &Stats {
        &self.state.stats
    }

    pub fn things(&self) -> Vec<Thing> {
        lock(&self.state.things).clone()
    }

    pub fn certificate_status(&self, certificate_id: &str) -> Option<CertificateStatus> {
        lock(&self.state.certificates)
            .get(certificate_id)
            .map(|c| c.status)
    }

    /// The control-plane operations on the fleet's things and certificates, for the
    /// control-plane double to serve (`IotControlPlane::serve_fleet`).
    pub fn fleet(&self) -> Fleet {
        Fleet(Arc::clone(&self.state))
    }

    /// The first `n` lifecycle events delivered to the rule's function, once answered; `None`
    /// if fewer were within `limit`.
    pub async fn delivered(&self, n: usize, limit: Duration) -> Option<Vec<Delivered>> {
        let mut delivered = self.state.delivered.subscribe();
        let all = tokio::time::timeout(limit, delivered.wait_for(|all| all.len() >= n))
            .await
            .ok()?
            .ok()?
            .clone();
        Some(all)
    }

    pub fn refusals(&self) -> Vec<String> {
        self.state.refusals.borrow().clone()
    }

    /// The first refusal containing `text`, once recorded; `None` if none is within `limit`.
    pub async fn refusal_containing(&self, text: &str, limit: Duration) -> Option<String> {
        let mut recorded = self.state.refusals.subscribe();
        let found = tokio::time::timeout(
            limit,
            recorded.wait_for(|all| all.iter().any(|r| r.contains(text))),
        )
        .await
        .ok()?
        .ok()?
        .iter()
        .find(|r| r.contains(text))
        .cloned();
        found
    }
}

fn refuse(state: &State, why: String) {
    state.refusals.send_modify(|all| all.push(why));
}

/// Who is connected, as the certificate says.
enum Peer {
    Claim { certificate_id: String },
    Device { thing: String },
}

impl Peer {
    /// The topic prefixes this identity's policy allows.
    fn allowed_prefixes(&self) -> Vec<String> {
        match self {
            Peer::Claim { .. } => vec![
                "$aws/certificates/create/".into(),
                "$aws/certificates/create-from-csr/".into(),
                "$aws/provisioning-templates/".into(),
            ],
            Peer::Device { thing } => vec![format!("devices/{thing}/")],
        }
    }

    fn allows(&self, topic: &str) -> bool {
        let allowed = self
            .allowed_prefixes()
            .iter()
            .any(|p| topic.starts_with(p.as_str()));
        // Under $aws/provisioning-templates/ only {name}/provision/... is a fleet topic.
        allowed
            && (!topic.starts_with("$aws/provisioning-templates/")
                || topic
                    .split('/')
                    .nth(3)
                    .is_some_and(|segment| segment == "provision"))
    }
}

/// Checks CONNECT against the certificate; the peer, or the CONNACK refusal and why.
fn admit(state: &State, certificate_id: &str, client_id: &str) -> Result<Peer, (Refusal, String)> {
    if client_id.is_empty() || client_id.len() > 128 {
        return Err((
            Refusal::BadClientId,
            "client id must be 1 to 128 characters".into(),
        ));
    }
    let certificates = lock(&state.certificates);
    let Some(certificate) = certificates.get(certificate_id) else {
        // Not one of ours, yet it passed TLS verification: signed by the claim CA. Its policy
        // admits only client ids no device can have.
        if !client_id.starts_with(&state.config.claim_client_prefix) {
            return Err((
                Refusal::NotAuthorized,
                format!(
                    "client id '{client_id}' is not allowed for a claim certificate (the claim policy admits '{}*')",
                    state.config.claim_client_prefix
                ),
            ));
        }
        return Ok(Peer::Claim {
            certificate_id: certificate_id.to_owned(),
        });
    };
    match (&certificate.status, &certificate.thing) {
        (CertificateStatus::Active, Some(thing)) if thing == client_id => Ok(Peer::Device {
            thing: thing.clone(),
        }),
        (CertificateStatus::Active, Some(thing)) => Err((
            Refusal::NotAuthorized,
            format!("client id '{client_id}' is not the thing name '{thing}' of its certificate"),
        )),
        // The device policy's iot:Connection.Thing.IsAttached.
        (CertificateStatus::Active, None) => Err((
            Refusal::NotAuthorized,
            "certificate is attached to no thing".into(),
        )),
        (CertificateStatus::Inactive | CertificateStatus::Revoked, _) => Err((
            Refusal::NotAuthorized,
            format!(
                "certificate is {}",
                if certificate.status == CertificateStatus::Inactive {
                    "INACTIVE"
                } else {
                    "REVOKED"
                }
            ),
        )),
        _ => Err((
            Refusal::NotAuthorized,
            "certificate is not active (RegisterThing has not accepted it)".into(),
        )),
    }
}

/// Whether an MQTT topic filter matches a topic (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for part in filter.split('/') {
        match (part, levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (p, Some(level)) if p == level => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    certificate_id: &str,
    state: &State,
) -> std::io::Result<()> {
    let Some((mut connection, hello)) = ServerConnection::accept(stream).await else {
        return Ok(());
    };
    let peer = match admit(state, certificate_id, &hello.client_id) {
        Ok(peer) => peer,
        Err((code, why)) => {
            refuse(state, format!("CONNECT: {why}"));
            connection.refuse(code).await?;
            return Ok(());
        }
    };
    let (mut subscriptions, session_present) = state.sessions.resume(&hello);
    connection.connack(session_present).await?;
    if let Peer::Device { thing } = &peer {
        publish_connected(state, thing, certificate_id);
    }
    let served = converse(&mut connection, &hello, &peer, &mut subscriptions, state).await;
    state.sessions.keep(&hello, subscriptions);
    served
}

/// The requests of one admitted connection, until it ends.
async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
    connection: &mut ServerConnection<S>,
    hello: &Hello,
    peer: &Peer,
    subscriptions: &mut Subscriptions,
    state: &State,
) -> std::io::Result<()> {
    // AWS IoT drops a client silent for 1.5 keep-alive periods.
    let idle = Duration::from_secs(u64::from(hello.keep_alive.max(1)) * 3 / 2 + 1);
    let mut packet_ids = 0u16;
    loop {
        let Ok(Some(request)) = tokio::time::timeout(idle, connection.next()).await else {
            return Ok(());
        };
        match request {
            Request::Subscribe { pkid, filters } => {
                let mut granted_qos = Vec::new();
                for (filter, qos) in filters {
                    if peer.allows(&filter) {
                        subscriptions.retain(|(f, _)| *f != filter);
                        subscriptions.push((filter, granted(qos)));
                        granted_qos.push(Some(granted(qos)));
                    } else {
                        granted_qos.push(None);
                    }
                }
                connection.suback(pkid, &granted_qos).await?;
            }
            Request::Publish(publish) => {
                if !peer.allows(&publish.topic) {
                    // A policy violation: AWS IoT disconnects the client.
                    return Ok(());
                }
                if publish.qos == QoS::AtLeastOnce {
                    connection.puback(publish.pkid).await?;
                }
                let reply = answer(state, peer, &hello.client_id, &publish, subscriptions).await;
                if let Some(mut reply) = reply {
                    if reply.qos == QoS::AtLeastOnce {
                        packet_ids = packet_ids.checked_add(1).unwrap_or(1);
                        reply.pkid = packet_ids;
                    }
                    connection.publish(reply).await?;
                }
            }
            Request::Unsubscribe { pkid, filters } => {
                subscriptions.retain(|(f, _)| !filters.contains(f));
                connection.unsuback(pkid, filters.len()).await?
            }
            Request::Ping => connection.pong().await?,
            Request::Disconnect => return Ok(()),
            Request::Other => {}
        }
    }
}

/// The reply to a claim connection's request, on `<topic>/accepted` or `/rejected`, if the
/// client subscribed to it (AWS IoT publishes either way; unsubscribed, it is lost), at the
/// QoS the subscription was granted, with the request's MQTT 5 correlation data.
async fn answer(
    state: &State,
    peer: &Peer,
    client_id: &str,
    publish: &Message,
    subscriptions: &Subscriptions,
) -> Option<Message> {
    let Peer::Claim {
        certificate_id: claim_id,
    } = peer
    else {
        return None;
    };
    let (accepted, body) = respond(state, claim_id, client_id, publish).await?;
    if !accepted {
        state.stats.rejected.fetch_add(1, Ordering::Relaxed);
    }
    let verdict = if accepted { "accepted" } else { "rejected" };
    let topic = format!("{}/{verdict}", publish.topic);
    let qos = subscriptions
        .iter()
        .filter(|(f, _)| topic_matches(f, &topic))
        .map(|(_, qos)| *qos)
        .max_by_key(|qos| *qos as u8)?;
    let mut reply = Message::new(topic, qos, body);
    reply.correlation_data = publish.correlation_data.clone();
    Some(reply)
}

fn rejected(status: u16, code: &str, message: &str) -> (bool, Value) {
    (
        false,
        json!({"statusCode": status, "errorCode": code, "errorMessage": message}),
    )
}

/// The reply to a request topic: `(accepted, body)`, or `None` for a topic that is not a request.
/// The payload encodings of the fleet provisioning topics, by their last level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Json,
    Cbor,
}

impl Encoding {
    /// A request topic's operation (the topic without its encoding) and encoding.
    fn of(topic: &str) -> Option<(&str, Encoding)> {
        if let Some(base) = topic.strip_suffix("/json") {
            Some((base, Encoding::Json))
        } else {
            Some((topic.strip_suffix("/cbor")?, Encoding::Cbor))
        }
    }

    fn decode(self, payload: &[u8]) -> Option<Value> {
        match self {
            Encoding::Json => serde_json::from_slice(payload).ok(),
            Encoding::Cbor => ciborium::from_reader(payload).ok(),
        }
    }

    fn encode(self, body: &Value) -> Vec<u8> {
        match self {
            Encoding::Json => body.to_string().into_bytes(),
            Encoding::Cbor => {
                let mut out = Vec::new();
                // Into a Vec: no I/O to fail, and every JSON value has a CBOR form.
                let _ = ciborium::into_writer(body, &mut out);
                out
            }
        }
    }
}

/// The reply to a request topic, JSON or CBOR as the request was: `(accepted, body)`, or
/// `None` for a topic that is not a request.
async fn respond(
    state: &State,
    claim_id: &str,
    client_id: &str,
    publish: &Message,
) -> Option<(bool, Vec<u8>)> {
    let (operation, encoding) = Encoding::of(&publish.topic)?;
    if encoding == Encoding::Cbor {
        state.stats.cbor_requests.fetch_add(1, Ordering::Relaxed);
    }
    let (accepted, body) = reply(state, claim_id, client_id, publish, operation, encoding).await?;
    Some((accepted, encoding.encode(&body)))
}

async fn reply(
    state: &State,
    claim_id: &str,
    client_id: &str,
    publish: &Message,
    operation: &str,
    encoding: Encoding,
) -> Option<(bool, Value)> {
    let body = encoding.decode(&publish.payload);
    let invalid = || {
        let name = match encoding {
            Encoding::Json => "JSON",
            Encoding::Cbor => "CBOR",
        };
        rejected(
            400,
            "InvalidPayload",
            &format!("the payload is not a {name} map"),
        )
    };
    Some(match operation {
        // The request has no fields: `{}` or, as AWS IoT also takes it, an empty payload.
        "$aws/certificates/create" => match body {
            Some(Value::Object(_)) => create_certificate(state, None),
            None if publish.payload.is_empty() => create_certificate(state, None),
            _ => invalid(),
        },
        "$aws/certificates/create-from-csr" => {
            match body
                .as_ref()
                .and_then(|b| b.get("certificateSigningRequest"))
                .and_then(Value::as_str)
            {
                Some(csr) => create_certificate(state, Some(csr)),
                None => rejected(
                    400,
                    "InvalidPayload",
                    "certificateSigningRequest is missing or not a string",
                ),
            }
        }
        _ => {
            let template = operation
                .strip_prefix("$aws/provisioning-templates/")?
                .strip_suffix("/provision")?;
            match body {
                Some(Value::Object(request)) => {
                    register_thing(state, template, claim_id, client_id, &request).await
                }
                _ => invalid(),
            }
        }
    })
}

fn create_certificate(state: &State, csr_pem: Option<&str>) -> (bool, Value) {
    let made = match csr_pem {
        Some(pem) => sign_csr(state, pem).map(|cert| (cert, None)),
        None => create_keys_and_certificate(state).map(|(cert, key)| (cert, Some(key))),
    };
    let (certificate, private_key) = match made {
        Ok(made) => made,
        Err(CsrError(message)) => {
            return rejected(400, "InvalidCertificateSigningRequest", &message)
        }
    };
    let id = certificate_id(certificate.der());
    let certificate_pem = certificate.pem();
    lock(&state.certificates).insert(
        id.clone(),
        Certificate {
            status: CertificateStatus::PendingActivation,
            thing: None,
        },
    );
    let token = ownership_token();
    lock(&state.tokens).insert(
        token.clone(),
        Token {
            certificate_id: id.clone(),
            certificate_pem: certificate_pem.clone(),
            expires_at: unix_now() + state.config.token_validity.as_secs(),
            used: false,
        },
    );
    state
        .stats
        .certificates_created
        .fetch_add(1, Ordering::Relaxed);
    let mut reply = json!({
        "certificateId": id,
        "certificatePem": certificate_pem,
        "certificateOwnershipToken": token,
    });
    if let Some(key) = private_key {
        reply["privateKey"] = Value::String(key);
    }
    (true, reply)
}

struct CsrError(String);

fn device_cert_validity(params: &mut CertificateParams) {
    let time = |secs: i64| {
        time::OffsetDateTime::from_unix_timestamp(secs).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    params.not_before = time(unix_now() as i64 - 60);
    params.not_after = time(DEVICE_CERT_NOT_AFTER);
}

fn create_keys_and_certificate(state: &State) -> Result<(rcgen::Certificate, String), CsrError> {
    let fail = |e: rcgen::Error| CsrError(format!("cannot create a certificate: {e}"));
    let key = KeyPair::generate().map_err(fail)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "AWS IoT Certificate");
    device_cert_validity(&mut params);
    let cert = params.signed_by(&key, &state.device_ca).map_err(fail)?;
    Ok((cert, key.serialize_pem()))
}

/// Signs a CSR after checking its own signature (proof that the device holds the key).
fn sign_csr(state: &State, pem: &str) -> Result<rcgen::Certificate, CsrError> {
    let mut csr = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| CsrError(format!("the CSR is not valid: {e}")))?;
    device_cert_validity(&mut csr.params);
    csr.params.is_ca = rcgen::IsCa::NoCa;
    csr.signed_by(&state.device_ca)
        .map_err(|e| CsrError(format!("cannot sign the CSR: {e}")))
}

fn ownership_token() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 48];
    // SystemRandom fails only without an OS RNG, where nothing here could work anyway.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A rejection as the device receives it: `(false, {statusCode, errorCode, errorMessage})`.
type Rejected = (bool, Value);

async fn register_thing(
    state: &State,
    template_name: &str,
    claim_id: &str,
    client_id: &str,
    request: &Map<String, Value>,
) -> (bool, Value) {
    match provision(state, template_name, claim_id, client_id, request).await {
        Ok(applied) => (
            true,
            json!({"deviceConfiguration": applied.device_configuration, "thingName": applied.thing_name}),
        ),
        Err(rejected) => rejected,
    }
}

/// RegisterThing's steps, in AWS IoT's order: template, parameters, ownership token, hook,
/// thing name; then the token is spent, the certificate activated and the thing recorded.
async fn provision(
    state: &State,
    template_name: &str,
    claim_id: &str,
    client_id: &str,
    request: &Map<String, Value>,
) -> Result<Applied, Rejected> {
    throttle(state)?;
    let template = state
        .config
        .templates
        .iter()
        .find(|t| t.name == template_name)
        .ok_or_else(|| {
            rejected(
                404,
                "ResourceNotFound",
                &format!("provisioning template {template_name} does not exist"),
            )
        })?;
    let mut parameters = request_parameters(request)?;
    let token_value = request
        .get("certificateOwnershipToken")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (certificate_id, certificate_pem) = valid_token(state, token_value)?;
    let hook_request = json!({
        "claimCertificateId": claim_id,
        "certificateId": certificate_id,
        "certificatePem": certificate_pem,
        "templateArn": format!(
            "arn:aws:iot:{}:{}:provisioningtemplate/{}",
            state.config.region, state.config.account_id, template.name
        ),
        "clientId": client_id,
        "parameters": parameters,
    });
    parameters.extend(call_hook(state, template, hook_request).await?);
    let applied = template
        .body
        .apply(&parameters)
        .map_err(|m| rejected(400, "InvalidParameters", &m))?;
    check_thing_name(&applied.thing_name)?;
    spend_token(state, token_value)?;
    record_thing(
        state,
        template,
        &certificate_id,
        claim_id,
        &applied,
        parameters,
    );
    Ok(applied)
}

fn invalid_token(message: &str) -> Rejected {
    rejected(400, "InvalidCertificateOwnershipToken", message)
}

/// The request's `parameters`: an object of strings, or nothing.
fn request_parameters(request: &Map<String, Value>) -> Result<BTreeMap<String, String>, Rejected> {
    let mut parameters = BTreeMap::new();
    match request.get("parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (name, value) in map {
                let value = value.as_str().ok_or_else(|| {
                    rejected(
                        400,
                        "InvalidPayload",
                        &format!("parameter {name} is not a string"),
                    )
                })?;
                parameters.insert(name.clone(), value.to_owned());
            }
        }
        Some(_) => {
            return Err(rejected(
                400,
                "InvalidPayload",
                "parameters is not an object",
            ))
        }
    }
    Ok(parameters)
}

/// The certificate an unused, unexpired ownership token names: its id and PEM.
fn valid_token(state: &State, token_value: &str) -> Result<(String, String), Rejected> {
    if token_value.is_empty() {
        return Err(invalid_token(
            "Certificate ownership token cannot be empty.",
        ));
    }
    let tokens = lock(&state.tokens);
    match tokens.get(token_value) {
        None => Err(invalid_token("Certificate ownership token is invalid.")),
        Some(t) if t.used => Err(invalid_token(
            "Certificate ownership token has already been used.",
        )),
        Some(t) if t.expires_at <= unix_now() => {
            Err(invalid_token("Certificate ownership token has expired."))
        }
        Some(t) => Ok((t.certificate_id.clone(), t.certificate_pem.clone())),
    }
}

/// The template's hook, within the hook timeout: its overrides if it allows the device.
async fn call_hook(
    state: &State,
    template: &Template,
    hook_request: Value,
) -> Result<BTreeMap<String, String>, Rejected> {
    if matches!(template.hook, Hook::None) {
        return Ok(BTreeMap::new());
    }
    state.stats.hook_calls.fetch_add(1, Ordering::Relaxed);
    let denied = |message: &str| rejected(403, "AccessDenied", message);
    let answer = tokio::time::timeout(state.config.hook_timeout, template.hook.call(hook_request))
        .await
        .map_err(|_| {
            denied(&format!(
                "the pre-provisioning hook did not answer within {} ms",
                state.config.hook_timeout.as_millis()
            ))
        })?
        .map_err(|e| denied(&format!("the pre-provisioning hook failed: {e}")))?
        .unwrap_or(Value::Null);
    if answer.get("allowProvisioning") != Some(&Value::Bool(true)) {
        return Err(denied("the pre-provisioning hook denied the request"));
    }
    let overrides = answer
        .get("parameterOverrides")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(name, value)| Some((name.clone(), value.as_str()?.to_owned())))
        .collect();
    Ok(overrides)
}

/// The thing name the template builds (prefix + serial parameter), if AWS IoT would take it.
/// The account's RegisterThing quota: refused before anything else is looked at.
fn throttle(state: &State) -> Result<(), Rejected> {
    let Some((limit, window)) = state.config.register_thing_limit else {
        return Ok(());
    };
    let mut current = lock(&state.register_window);
    let now = tokio::time::Instant::now();
    if now.duration_since(current.0) >= window {
        *current = (now, 0);
    }
    current.1 += 1;
    if current.1 > limit {
        return Err(rejected(429, "ThrottlingException", "Rate exceeded"));
    }
    Ok(())
}

fn check_thing_name(thing_name: &str) -> Result<(), Rejected> {
    let valid = !thing_name.is_empty()
        && thing_name.len() <= 128
        && thing_name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'));
    if !valid {
        return Err(rejected(
            400,
            "InvalidParameters",
            "the thing name the template builds is not a valid thing name",
        ));
    }
    Ok(())
}

/// Single use: the token is spent only after every check passed; a second RegisterThing
/// racing this one finds it used.
fn spend_token(state: &State, token_value: &str) -> Result<(), Rejected> {
    let mut tokens = lock(&state.tokens);
    match tokens.get_mut(token_value) {
        Some(t) if !t.used => {
            t.used = true;
            Ok(())
        }
        _ => Err(invalid_token(
            "Certificate ownership token has already been used.",
        )),
    }
}

fn record_thing(
    state: &State,
    template: &Template,
    certificate_id: &str,
    claim_id: &str,
    applied: &Applied,
    parameters: BTreeMap<String, String>,
) {
    let thing_name = applied.thing_name.as_str();
    if let Some(certificate) = lock(&state.certificates).get_mut(certificate_id) {
        certificate.status = CertificateStatus::Active;
        certificate.thing = Some(thing_name.to_owned());
    }
    let mut things = lock(&state.things);
    things.retain(|t| t.thing_name != thing_name || t.certificate_id == certificate_id);
    things.push(Thing {
        thing_name: thing_name.to_owned(),
        template: template.name.clone(),
        certificate_id: certificate_id.to_owned(),
        claim_certificate_id: claim_id.to_owned(),
        parameters,
        attributes: applied.attributes.clone(),
        thing_type: applied.thing_type.clone(),
        thing_groups: applied.thing_groups.clone(),
    });
    state.stats.provisioned.fetch_add(1, Ordering::Relaxed);
}

/// The connect lifecycle event of a device certificate, to the rule's function if its WHERE
/// clause holds; asynchronously, as a topic rule's Lambda action invokes (the connection does
/// not wait for it).
fn publish_connected(state: &State, thing: &str, certificate_id: &str) {
    let Some(rule) = &state.config.lifecycle else {
        return;
    };
    if !thing.starts_with(&rule.client_prefix) || thing.starts_with("claim.") {
        return;
    }
    use ring::rand::SecureRandom;
    let mut session = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut session);
    let timestamp_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let event = json!({
        "clientId": thing,
        "timestamp": timestamp_ms,
        "eventType": "connected",
        "sessionIdentifier": session.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "principalIdentifier": certificate_id,
        "ipAddress": "127.0.0.1",
        "versionNumber": 0,
    });
    let function = rule.function.clone();
    let delivered = state.delivered.clone();
    tokio::spawn(async move {
        let answer = match function.call(event.clone()).await {
            Ok(answer) => Ok(answer.unwrap_or(Value::Null)),
            Err(e) => Err(e),
        };
        delivered.send_modify(|all| all.push(Delivered { event, answer }));
    });
}

/// Control-plane operations on the fleet's things and certificates, in AWS IoT's words.
#[derive(Clone)]
pub struct Fleet(Arc<State>);

/// A control-plane refusal: HTTP status, error type, message.
pub type ControlError = (u16, &'static str, String);

impl Fleet {
    fn arn(&self, certificate_id: &str) -> String {
        format!(
            "arn:aws:iot:{}:{}:cert/{certificate_id}",
            self.0.config.region, self.0.config.account_id
        )
    }

    fn thing_exists(&self, thing: &str) -> Result<(), ControlError> {
        if lock(&self.0.things).iter().any(|t| t.thing_name == thing) {
            Ok(())
        } else {
            Err((
                404,
                "ResourceNotFoundException",
                format!("Thing {thing} cannot be found."),
            ))
        }
    }

    /// ListThingPrincipals: the ARNs of the certificates attached to `thing`.
    pub fn principals(&self, thing: &str) -> Result<Vec<String>, ControlError> {
        self.thing_exists(thing)?;
        let certificates = lock(&self.0.certificates);
        let mut ids: Vec<&String> = certificates
            .iter()
            .filter(|(_, c)| c.thing.as_deref() == Some(thing))
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        Ok(ids.into_iter().map(|id| self.arn(id)).collect())
    }

    /// UpdateCertificate: a REVOKED certificate stays revoked, as in AWS IoT.
    pub fn update_certificate(&self, id: &str, status: &str) -> Result<(), ControlError> {
        let Some(new) =
            CertificateStatus::parse(status).filter(|s| *s != CertificateStatus::PendingActivation)
        else {
            return Err((
                400,
                "InvalidRequestException",
                format!("newStatus {status} is not ACTIVE, INACTIVE or REVOKED"),
            ));
        };
        let mut certificates = lock(&self.0.certificates);
        let Some(certificate) = certificates.get_mut(id) else {
            return Err((
                404,
                "ResourceNotFoundException",
                format!("The certificate {id} does not exist"),
            ));
        };
        if certificate.status == CertificateStatus::Revoked && new != CertificateStatus::Revoked {
            return Err((
                400,
                "CertificateStateException",
                "a revoked certificate cannot change status".into(),
            ));
        }
        certificate.status = new;
        Ok(())
    }

    /// DetachThingPrincipal (a principal that is not attached: nothing to do).
    pub fn detach(&self, thing: &str, principal_arn: &str) -> Result<(), ControlError> {
        self.thing_exists(thing)?;
        let Some((_, id)) = principal_arn.rsplit_once(":cert/") else {
            return Err((
                400,
                "InvalidRequestException",
                "principal is not a certificate ARN".into(),
            ));
        };
        if let Some(c) = lock(&self.0.certificates).get_mut(id) {
            if c.thing.as_deref() == Some(thing) {
                c.thing = None;
            }
        }
        Ok(())
    }
}

/// Calls a Lambda Invoke API (`POST .../invocations`), as AWS IoT invokes the hook. A function
/// error (`X-Amz-Function-Error`) or a non-JSON answer is an error.
pub async fn invoke_lambda(url: &str, payload: &Value) -> Result<Value, String> {
    let answer = crate::http_client::send(
        hyper::Method::POST,
        url,
        &[("content-type", "application/json")],
        payload.to_string(),
    )
    .await?;
    if !answer.status.is_success() || answer.headers.contains_key("x-amz-function-error") {
        return Err(format!(
            "invoke answered {}: {}",
            answer.status,
            answer.text().chars().take(200).collect::<String>()
        ));
    }
    serde_json::from_slice(&answer.body).map_err(|e| format!("answer is not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters_match_like_mqtt() {
        let t = "$aws/certificates/create/json/accepted";
        assert!(topic_matches(t, t));
        assert!(topic_matches("$aws/certificates/create/json/+", t));
        assert!(topic_matches("$aws/certificates/#", t));
        assert!(!topic_matches("$aws/certificates/create/json", t));
        assert!(!topic_matches("$aws/certificates/create/+", t));
        assert!(!topic_matches(
            "$aws/certificates/create-from-csr/json/+",
            t
        ));
    }

    #[test]
    fn the_claim_policy_allows_only_fleet_provisioning_topics() {
        let claim = Peer::Claim {
            certificate_id: "c".into(),
        };
        assert!(claim.allows("$aws/certificates/create/json"));
        assert!(claim.allows("$aws/provisioning-templates/t/provision/json/accepted"));
        assert!(!claim.allows("$aws/provisioning-templates/t/other"));
        assert!(!claim.allows("$aws/things/x/shadow/update"));
        assert!(!claim.allows("devices/x/telemetry"));
        let device = Peer::Device { thing: "x".into() };
        assert!(device.allows("devices/x/telemetry"));
        assert!(!device.allows("devices/y/telemetry"));
        assert!(!device.allows("$aws/certificates/create/json"));
    }
}
