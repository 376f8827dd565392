//! One invocation: who is calling (client context only), may they register, with which key,
//! whether their recorded registration answers or DPS must (within the SIM's and the fleet's
//! limits), and the answer in the shape the device firmware parses.

use std::time::{Duration, SystemTime};

use base64::Engine;
use dps_client::{Assignment, DpsError};
use lambda_runtime::Context;
use serde_json::{json, Value};
use shared::keys::SymmetricKey;
use shared::registry::{
    DeviceRecord, DeviceStatus, EntryRefusal, Registration, RegistryError, SimRegistry,
};
use shared::soracom::SimIdentity;
use tokio::time::{timeout_at, Instant};

pub use crate::answer::{Refused, Response, Source};
use crate::config::{Attestation, Config};
use crate::opening::Opening;
use crate::ports::{
    Admission, Credentials, DeviceCa, DeviceKeys, Dps, DpsLimits, Enrollment, KeyFailure, Proof,
};
use crate::state::State;
use shared::clock::unix_now;

/// Largest accepted device body (serialized JSON): custom allocation data, not telemetry.
pub const MAX_BODY_BYTES: usize = 4096;
/// Kept free before the Lambda deadline to answer and log.
const DEADLINE_MARGIN: Duration = Duration::from_millis(700);
/// Without a Lambda deadline (tests, local tools): time for the table and the record besides
/// the DPS budget.
const UNBOUNDED_EXTRA: Duration = Duration::from_secs(4);
/// Retry hint when the cause says nothing better.
pub(crate) const RETRY_SOON: Duration = Duration::from_secs(2);
/// Attempts at recording a registration, and the pause between them.
const RECORD_ATTEMPTS: u32 = 3;
const RECORD_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A refusal, with the detail that only the log sees.
#[derive(Debug)]
pub(crate) struct Refusal {
    refused: Refused,
    detail: String,
    retry_after: Option<Duration>,
    /// How long DPS took, if it was asked.
    dps_ms: Option<f64>,
}

/// The device table (or a store beside it) did not answer in time or at all: worth a retry.
pub(crate) fn store_unavailable(detail: impl Into<String>) -> Refusal {
    refuse(Refused::RegistryUnavailable, detail).retry_in(RETRY_SOON)
}

pub(crate) fn refuse(refused: Refused, detail: impl Into<String>) -> Refusal {
    Refusal {
        refused,
        detail: detail.into(),
        retry_after: None,
        dps_ms: None,
    }
}

impl Refusal {
    pub(crate) fn retry_in(mut self, after: Duration) -> Self {
        self.retry_after = Some(after.max(Duration::from_secs(1)));
        self
    }

    /// A refusal of DPS's, which took `ms`.
    pub(crate) fn after_dps(mut self, ms: f64) -> Self {
        self.dps_ms = Some(ms);
        self
    }
}

/// The answer's metrics: the outcome, and DPS's latency when DPS was asked.
fn emit_metrics(outcome: &str, dps_ms: Option<f64>) {
    let latency: Vec<(&str, f64)> = dps_ms.map(|ms| ("DpsLatency", ms)).into_iter().collect();
    lambda_support::metrics::emit(outcome, &latency);
}

/// What the device authenticates to IoT Hub with.
pub(crate) enum Granted {
    Key(SymmetricKey),
    Certificate(Credentials),
}

/// A device's connection: from DPS, or from its recorded registration.
pub(crate) struct Registered {
    registration_id: String,
    assigned_hub: String,
    device_id: String,
    granted: Granted,
    source: Source,
    /// What a custom allocation policy returned (DPS answers only).
    return_data: Option<Value>,
    /// How long DPS took (DPS answers only).
    dps_ms: Option<f64>,
}

impl Registered {
    fn from_record(recorded: Registration, key: SymmetricKey) -> Self {
        Self {
            registration_id: recorded.registration_id,
            assigned_hub: recorded.assigned_hub,
            device_id: recorded.device_id,
            granted: Granted::Key(key),
            source: Source::Record,
            // Written by this function from DPS's answer; unreadable text is dropped rather
            // than refusing a working connection string.
            return_data: recorded
                .return_data
                .and_then(|text| serde_json::from_str(&text).ok()),
            dps_ms: None,
        }
    }

    pub(crate) fn from_dps(
        registration_id: String,
        assignment: Assignment,
        granted: Granted,
        dps_ms: f64,
    ) -> Self {
        Self {
            registration_id,
            assigned_hub: assignment.assigned_hub,
            device_id: assignment.device_id,
            granted,
            source: Source::Dps,
            return_data: assignment.payload,
            dps_ms: Some(dps_ms),
        }
    }
}

/// Handles one Funk invocation. Never fails: every outcome is a `Response`.
pub async fn handle<R: SimRegistry, K: DeviceKeys, D: Dps, L: DpsLimits, C: DeviceCa>(
    event: Value,
    context: &Context,
    state: &State<R, K, D, L, C>,
) -> Response {
    let sim = identify(context);
    answer(event, sim, context, state).await
}

/// Handles a SIM that SORACOM Beam identified (its signature verified by `beam`): the same
/// checks, limits and answers as a Funk invocation from here on.
pub async fn handle_identified<R: SimRegistry, K: DeviceKeys, D: Dps, L: DpsLimits, C: DeviceCa>(
    event: Value,
    sim: SimIdentity,
    context: &Context,
    state: &State<R, K, D, L, C>,
) -> Response {
    answer(event, Ok(sim), context, state).await
}

async fn answer<R: SimRegistry, K: DeviceKeys, D: Dps, L: DpsLimits, C: DeviceCa>(
    event: Value,
    sim: Result<SimIdentity, Refusal>,
    context: &Context,
    state: &State<R, K, D, L, C>,
) -> Response {
    let started = Instant::now();
    let imsi = sim.as_ref().map(|s| s.imsi.clone()).unwrap_or_default();
    // Boxed: the registration's future nests deep enough to exceed the compiler's layout depth.
    match Box::pin(register(event, sim, context, state)).await {
        Ok(r) => {
            emit_metrics(r.source.as_str(), r.dps_ms);
            tracing::info!(
                outcome = "registered", source = r.source.as_str(), imsi = %imsi,
                registration_id = %r.registration_id, assigned_hub = %r.assigned_hub,
                device_id = %r.device_id, elapsed_ms = started.elapsed().as_millis() as u64,
                "device has its connection string"
            );
            match &r.granted {
                Granted::Key(key) => Response::connection(
                    r.assigned_hub,
                    r.device_id,
                    &key.to_base64(),
                    r.source,
                    r.return_data,
                ),
                Granted::Certificate(credentials) => {
                    Response::certificate(r.assigned_hub, r.device_id, credentials, r.return_data)
                }
            }
        }
        Err(refusal) => {
            emit_metrics(refusal.refused.code(), refusal.dps_ms);
            tracing::warn!(
                outcome = "refused", imsi = %imsi, status = refusal.refused.status(),
                error = refusal.refused.code(), reason = %refusal.detail,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "device not registered"
            );
            Response::refused(refusal.refused, refusal.retry_after)
        }
    }
}

/// When the invocation must have its answer, and until when DPS may be waited for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    pub(crate) answer_by: Instant,
    pub(crate) dps_until: Instant,
}

/// The Lambda deadline less a margin (already past if the deadline is), and DPS's share of it:
/// never more than `budget` from now.
fn deadlines(context: &Context, budget: Duration) -> Deadlines {
    let now = Instant::now();
    let unbounded = now + budget + UNBOUNDED_EXTRA;
    let answer_by = match context.deadline().duration_since(SystemTime::now()) {
        _ if context.deadline == 0 => unbounded,
        Ok(left) => now + left.saturating_sub(DEADLINE_MARGIN),
        Err(_) => now,
    };
    Deadlines {
        answer_by,
        dps_until: answer_by.min(now + budget),
    }
}

async fn register<R: SimRegistry, K: DeviceKeys, D: Dps, L: DpsLimits, C: DeviceCa>(
    event: Value,
    sim: Result<SimIdentity, Refusal>,
    context: &Context,
    state: &State<R, K, D, L, C>,
) -> Result<Registered, Refusal> {
    let config = &state.config;
    let deadlines = deadlines(context, config.dps_budget);
    if deadlines.answer_by <= Instant::now() {
        return Err(refuse(
            Refused::DpsTimeout,
            "the invocation deadline has passed; nothing attempted",
        )
        .retry_in(RETRY_SOON));
    }
    let sim = sim?;
    operator_allowed(&sim, config)?;
    let x509 = match &config.attestation {
        Attestation::X509(settings) => Some(settings),
        Attestation::SymmetricKey(_) => None,
    };
    let request = device_request(&event, x509.is_some())
        .map_err(|reason| refuse(Refused::BadRequest, reason))?;
    let registration_id = registration_id(config, &sim)?;
    if let Some(settings) = x509 {
        return crate::x509::register(state, &sim, registration_id, request, deadlines, settings)
            .await;
    }

    // A device that will not be answered from its record, whatever the table says, has its
    // connection to DPS opened while the table is read (if the fleet's budget is not known
    // spent): a cleared SIM then does not wait for TCP and TLS.
    let mut opening = if (request.reprovision || config.reregister_after.is_zero())
        && state.limits.likely_admitted(unix_now())
    {
        Opening::start(state.dps.open())
    } else {
        Opening::none()
    };
    // The SIM's entries and its key, fetched together: a cold start waits for one round trip
    // instead of two (measured by `make bench`). A refused SIM's key is dropped unused.
    let lookups = timeout_at(deadlines.answer_by, async {
        tokio::join!(
            check_sim(state, &sim),
            state.keys.device_key(&sim.imsi, &registration_id)
        )
    });
    let (cleared, key) = opening.alongside(lookups).await.map_err(|_| {
        store_unavailable("device table or key store gave no answer before the deadline")
    })?;
    let recorded = cleared?;
    let key = key.map_err(key_refusal)?;
    let sim = ClearedSim {
        identity: &sim,
        imsi: &sim.imsi,
        registration_id,
        fingerprint: key.fingerprint(),
        key,
        recorded,
    };
    connect(state, sim, request, deadlines, opening).await
}

/// A SIM the device table allows, with its device key and its recorded registration.
struct ClearedSim<'a> {
    identity: &'a SimIdentity,
    imsi: &'a str,
    registration_id: String,
    key: SymmetricKey,
    /// `key`'s fingerprint, computed once: compared with the record, and recorded.
    fingerprint: String,
    recorded: Option<Registration>,
}

impl ClearedSim<'_> {
    /// The recorded registration if it was made for this registration id with this key: its
    /// connection string works as long as IoT Hub keeps the device.
    fn usable_record(&self) -> Option<Registration> {
        self.recorded
            .clone()
            .filter(|r| r.registration_id == self.registration_id)
            .filter(|r| r.key_fingerprint.as_deref() == Some(self.fingerprint.as_str()))
    }
}

/// The connection string of a cleared SIM: from its record while that is usable and younger
/// than `REREGISTER_AFTER_SECONDS` (unless the device asks for a new registration), else
/// from DPS within the SIM's and the fleet's limits; past a limit, from a usable record
/// again, or a refusal that says when to come back.
async fn connect<'s, R: SimRegistry, K, D: Dps, L: DpsLimits, C>(
    state: &'s State<R, K, D, L, C>,
    sim: ClearedSim<'_>,
    request: DeviceRequest,
    deadlines: Deadlines,
    mut opening: Opening<'s, D::Line>,
) -> Result<Registered, Refusal> {
    let config = &state.config;
    let now = unix_now();
    let usable = sim.usable_record();
    let young =
        |r: &Registration| now.saturating_sub(r.registered_at) < config.reregister_after.as_secs();
    if let Some(r) = usable.clone().filter(|r| young(r) && !request.reprovision) {
        return Ok(Registered::from_record(r, sim.key));
    }
    // DPS it is, if the limits admit it: the connection opens while they are asked.
    if !opening.is_started() && state.limits.likely_admitted(now) {
        opening = Opening::start(state.dps.open());
    }
    let admission = admit_or(state, sim.imsi, &request, usable, now, deadlines);
    if let Some(r) = opening.alongside(admission).await? {
        return Ok(Registered::from_record(r, sim.key));
    }
    let payload = dps_payload(request.payload, config.model_id.as_deref());
    let enrollment = Enrollment {
        registration_id: &sim.registration_id,
        proof: Proof::Key(&sim.key),
        payload: payload.as_ref(),
    };
    let asked = Instant::now();
    let opened = opening.finish(deadlines.dps_until).await;
    let result = state
        .dps
        .register(&enrollment, opened, deadlines.dps_until)
        .await;
    let dps_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let assignment = result.map_err(|e| dps_refusal(e).after_dps(dps_ms))?;
    let recorded = Registration {
        key_fingerprint: Some(sim.fingerprint.clone()),
        ..registration(&sim.registration_id, &assignment)
    };
    record(state, sim.identity, &recorded, deadlines).await?;
    Ok(Registered::from_dps(
        sim.registration_id,
        assignment,
        Granted::Key(sim.key),
        dps_ms,
    ))
}

/// Leave to start a DPS registration (`None`), or the record to answer with instead: past the
/// SIM's limit a usable record answers, and past the fleet's too unless the device asked for a
/// new registration (it said its record does not work); without one, a refusal that says when
/// to come back. The limits live in the device table: if it cannot say in time, nothing is
/// started (deny by default). (X.509 devices have no record to answer with: `T` is then a
/// type without values.)
pub(crate) async fn admit_or<T, R, K, D, L: DpsLimits, C>(
    state: &State<R, K, D, L, C>,
    imsi: &str,
    request: &DeviceRequest,
    usable: Option<T>,
    now: u64,
    deadlines: Deadlines,
) -> Result<Option<T>, Refusal> {
    let config = &state.config;
    let admission = timeout_at(deadlines.answer_by, state.limits.admit(imsi, now))
        .await
        .map_err(|_| store_unavailable("DPS limits gave no answer before the deadline"))?
        .map_err(|e| store_unavailable(format!("DPS limits: {e}")))?;
    let (refusal, record) = match admission {
        Admission::Admitted => return Ok(None),
        Admission::SimLimited { retry_after } => (
            refuse(
                Refused::SimRateLimited,
                format!(
                    "{} DPS registrations within the hour",
                    config.dps_per_sim_per_hour
                ),
            )
            .retry_in(retry_after),
            usable,
        ),
        Admission::OverBudget { retry_after } => (
            refuse(
                Refused::DpsBudget,
                format!(
                    "{} DPS registrations this minute across the fleet",
                    config.dps_registrations_per_minute
                ),
            )
            .retry_in(retry_after),
            usable.filter(|_| !request.reprovision),
        ),
    };
    match record {
        Some(r) => {
            tracing::info!(imsi = %imsi, limit = refusal.refused.code(), reason = %refusal.detail,
                "DPS limit reached: answering from the record");
            Ok(Some(r))
        }
        None => Err(refusal),
    }
}

/// The SIM as SORACOM identifies it, from the client context only (never the body), of an
/// allowed operator.
/// The SIM Funk names in the client context (only Funk, through its role, can invoke with one).
fn identify(context: &Context) -> Result<SimIdentity, Refusal> {
    let custom = context
        .client_context
        .as_ref()
        .map(|c| &c.custom)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| refuse(Refused::NoIdentity, "no client context"))?;
    SimIdentity::from_custom(custom).map_err(|e| refuse(Refused::BadIdentity, e.to_string()))
}

fn operator_allowed(sim: &SimIdentity, config: &Config) -> Result<(), Refusal> {
    if !config.allowed_operators.is_empty() && !config.allowed_operators.contains(&sim.operator_id)
    {
        return Err(refuse(
            Refused::OperatorNotAllowed,
            format!(
                "operator {} is not in ALLOWED_OPERATOR_IDS",
                sim.operator_id
            ),
        ));
    }
    Ok(())
}

fn registration_id(config: &Config, sim: &SimIdentity) -> Result<String, Refusal> {
    let id = config
        .registration_id
        .render(&sim.imsi, sim.sim_id.as_deref())
        .ok_or_else(|| {
            refuse(
                Refused::BadIdentity,
                "client context lacks simId, which REGISTRATION_ID_TEMPLATE needs",
            )
        })?;
    if !is_registration_id(&id) {
        return Err(refuse(
            Refused::Misconfigured,
            "registration id is not 1-128 of a-z A-Z 0-9 - . _ :",
        ));
    }
    Ok(id)
}

/// The device table's say on this SIM: its IMSI's entry and, when Funk names the SIM card, the
/// card's entry, so that blocking a multi-IMSI SIM holds whichever subscription it uses.
pub(crate) async fn check_sim<R: SimRegistry, K, D, L, C>(
    state: &State<R, K, D, L, C>,
    sim: &SimIdentity,
) -> Result<Option<Registration>, Refusal> {
    if state.config.require_sim_id && sim.sim_id.is_none() {
        return Err(refuse(
            Refused::BadIdentity,
            "no SIM ID (REQUIRE_SIM_ID: the table lists SIM cards; Beam must add x-soracom-sim-id)",
        ));
    }
    let entries = state
        .registry
        .sim(&sim.imsi, sim.sim_id.as_deref())
        .await
        .map_err(registry_refusal)?;
    let recorded = entries
        .by_imsi
        .as_ref()
        .and_then(|r| r.registration.clone());
    sim_verdict(
        &[entries.by_imsi, entries.by_card],
        unix_now(),
        state.config.require_allowlist,
    )?;
    Ok(recorded)
}

/// Either entry blocked or expired refuses; with the allowlist required, one must allow. An
/// entry nobody listed (only this function's own records on it) counts as absent, never as
/// allowed and never as blocked.
fn sim_verdict(
    entries: &[Option<DeviceRecord>],
    now: u64,
    require_allowlist: bool,
) -> Result<(), Refusal> {
    let listed: Vec<&DeviceRecord> = entries
        .iter()
        .flatten()
        .filter(|r| r.status != DeviceStatus::Unlisted)
        .collect();
    let refusals: Vec<EntryRefusal> = listed.iter().filter_map(|r| r.refusal(now)).collect();
    if refusals.contains(&EntryRefusal::Blocked) {
        return Err(refuse(Refused::SimBlocked, "SIM or SIM card is blocked"));
    }
    if refusals.contains(&EntryRefusal::Expired) {
        return Err(refuse(Refused::SimExpired, "SIM or SIM card entry expired"));
    }
    if listed.is_empty() && require_allowlist {
        return Err(refuse(
            Refused::SimUnknown,
            "neither the IMSI nor the SIM ID is in the device table",
        ));
    }
    Ok(())
}

/// What DPS assigned, to be recorded (with what the device proved itself by).
pub(crate) fn registration(registration_id: &str, assignment: &Assignment) -> Registration {
    Registration {
        registration_id: registration_id.to_owned(),
        assigned_hub: assignment.assigned_hub.clone(),
        device_id: assignment.device_id.clone(),
        registered_at: unix_now(),
        key_fingerprint: None,
        return_data: assignment.payload.as_ref().map(Value::to_string),
        certificate: None,
    }
}

/// Records the registration for operators. DPS has registered the device; failing the device
/// now would only make it retry, so a failed or late write is logged loudly instead, and it
/// never holds the answer past the deadline. A SIM blocked while its registration was in
/// flight (the write's condition) is refused: it gets no key and no certificate.
pub(crate) async fn record<R: SimRegistry, K, D, L, C>(
    state: &State<R, K, D, L, C>,
    sim: &SimIdentity,
    recorded: &Registration,
    deadlines: Deadlines,
) -> Result<(), Refusal> {
    let imsi = sim.imsi.as_str();
    // Retried while the invocation has time: a registration not recorded costs a DPS
    // registration at the device's next boot (the 10,000-SIM storm lost some to the local
    // endpoint's queue). A blocked SIM's refusal (a conflict) is final.
    for attempt in 1..=RECORD_ATTEMPTS {
        let write = state
            .registry
            .record_registration(imsi, sim.sim_id.as_deref(), recorded);
        let (passing, error) = match timeout_at(deadlines.answer_by, write).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(RegistryError::Conflict(_))) => {
                tracing::warn!(imsi = %imsi, registration_id = %recorded.registration_id,
                    "SIM blocked while its registration was in flight: nothing is sent");
                return Err(refuse(
                    Refused::SimBlocked,
                    "the SIM was blocked while DPS registered it",
                ));
            }
            Ok(Err(e)) => (
                matches!(e, RegistryError::Throttled | RegistryError::Unavailable(_)),
                e.to_string(),
            ),
            Err(_) => (
                true,
                "the device table did not answer before the deadline".to_owned(),
            ),
        };
        let retry = passing
            && attempt < RECORD_ATTEMPTS
            && Instant::now() + RECORD_RETRY_PAUSE < deadlines.answer_by;
        if !retry {
            tracing::error!(imsi = %imsi, attempt, error = %error,
                "registration not recorded in the device table");
            return Ok(());
        }
        tracing::warn!(imsi = %imsi, attempt, error = %error, "recording the registration again");
        tokio::time::sleep(RECORD_RETRY_PAUSE).await;
    }
    Ok(())
}

fn is_registration_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
}

fn key_refusal(failure: KeyFailure) -> Refusal {
    let detail = failure.to_string();
    match failure {
        KeyFailure::NoEnrollment => refuse(Refused::NoEnrollment, detail),
        KeyFailure::Unavailable(_) => {
            refuse(Refused::KeyStoreUnavailable, detail).retry_in(RETRY_SOON)
        }
        KeyFailure::Misconfigured(_) => refuse(Refused::Misconfigured, detail),
    }
}

fn registry_refusal(e: RegistryError) -> Refusal {
    match e {
        RegistryError::Malformed { .. } => refuse(Refused::Misconfigured, e.to_string()),
        _ => refuse(Refused::RegistryUnavailable, e.to_string()).retry_in(RETRY_SOON),
    }
}

/// Final only when the device may not register; everything that may pass on its own comes
/// with `retryAfter`.
pub(crate) fn dps_refusal(e: DpsError) -> Refusal {
    let detail = e.to_string();
    match &e {
        DpsError::Unauthorized(_)
        | DpsError::Rejected {
            status: 401 | 403 | 404,
            ..
        } => refuse(Refused::EnrollmentRefused, detail),
        DpsError::NotAssigned { .. } => refuse(Refused::EnrollmentNotAssigned, detail),
        DpsError::Throttled { retry_after } => {
            refuse(Refused::DpsThrottled, detail).retry_in(*retry_after)
        }
        DpsError::Deadline { retry_after } => {
            refuse(Refused::DpsTimeout, detail).retry_in(*retry_after)
        }
        DpsError::Upstream { .. } | DpsError::Connection(_) => {
            refuse(Refused::DpsFailed, detail).retry_in(e.retry_after().unwrap_or(RETRY_SOON))
        }
        DpsError::Rejected { .. } | DpsError::Protocol(_) | DpsError::Tls(_) => {
            refuse(Refused::DpsFailed, detail)
        }
    }
}

/// What the device's body asks for: the custom allocation payload, and whether to register
/// with DPS again although its record answers (`"reprovision": true`, for example after IoT
/// Hub refused the connection string), or, with X.509 attestation, a new certificate although
/// its own is far from expiry (`"rotate": true`). Both flags are ours, never sent to DPS.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct DeviceRequest {
    pub(crate) payload: Option<Value>,
    pub(crate) reprovision: bool,
    pub(crate) rotate: bool,
}

fn device_request(event: &Value, x509: bool) -> Result<DeviceRequest, String> {
    let mut payload = device_payload(event)?;
    let mut take = |name: &str| {
        let flag = payload
            .as_mut()
            .and_then(Value::as_object_mut)
            .and_then(|body| body.remove(name));
        match flag {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(b),
            Some(_) => Err(format!("{name} must be true or false")),
        }
    };
    let reprovision = take("reprovision")?;
    // A symmetric-key device's `rotate` is its own allocation data, as it always was.
    let rotate = if x509 { take("rotate")? } else { false };
    Ok(DeviceRequest {
        payload: payload.filter(|p| p.as_object().is_some_and(|o| !o.is_empty())),
        reprovision,
        rotate,
    })
}

/// What DPS receives: the device's payload, with `modelId` added from `MODEL_ID` unless the
/// device sent its own (IoT Plug and Play devices announce their model at registration).
pub(crate) fn dps_payload(payload: Option<Value>, model_id: Option<&str>) -> Option<Value> {
    let Some(model_id) = model_id else {
        return payload;
    };
    let mut payload = payload.unwrap_or_else(|| json!({}));
    if let Some(body) = payload.as_object_mut() {
        body.entry("modelId")
            .or_insert_with(|| Value::String(model_id.to_owned()));
    }
    Some(payload)
}

/// The custom allocation payload from the device's body. Funk passes JSON bodies as they are,
/// and wraps the "text" and "binary" formats as `{"payload": "..."}` (binary base64-encoded).
fn device_payload(event: &Value) -> Result<Option<Value>, String> {
    let unwrapped = match event {
        Value::Null => return Ok(None),
        Value::Object(map) if map.len() == 1 => match map.get("payload") {
            Some(Value::String(s)) if s.trim().is_empty() => return Ok(None),
            Some(Value::String(s)) => Some(decode_wrapped(s)?),
            _ => None,
        },
        Value::Object(_) => None,
        _ => return Err("body must be a JSON object".into()),
    };
    let body = unwrapped.unwrap_or_else(|| event.clone());
    let size = body.to_string().len();
    if size > MAX_BODY_BYTES {
        return Err(format!(
            "body is {size} bytes; at most {MAX_BODY_BYTES} are accepted"
        ));
    }
    match body {
        Value::Object(map) if map.is_empty() => Ok(None),
        Value::Object(_) => Ok(Some(body)),
        _ => Err("body must be a JSON object".into()),
    }
}

fn decode_wrapped(s: &str) -> Result<Value, String> {
    if s.len() > MAX_BODY_BYTES * 2 {
        return Err(format!("body exceeds {MAX_BODY_BYTES} bytes"));
    }
    if let Ok(v) = serde_json::from_str::<Value>(s) {
        return Ok(v);
    }
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| "payload is neither JSON nor base64-encoded JSON".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use shared::registry::DeviceId;

    #[test]
    fn bodies_become_payloads() {
        assert_eq!(device_payload(&json!({})).unwrap(), None);
        assert_eq!(device_payload(&Value::Null).unwrap(), None);
        assert_eq!(
            device_payload(&json!({"a": 1})).unwrap(),
            Some(json!({"a": 1}))
        );
        // Funk "text" and "binary" formats.
        assert_eq!(
            device_payload(&json!({"payload": "{\"a\":1}"})).unwrap(),
            Some(json!({"a": 1}))
        );
        assert_eq!(
            device_payload(&json!({"payload": "eyJhIjoxfQ=="})).unwrap(),
            Some(json!({"a": 1}))
        );
        assert_eq!(device_payload(&json!({"payload": ""})).unwrap(), None);
        // A JSON body whose only field is a non-string payload is the device's own data.
        assert_eq!(
            device_payload(&json!({"payload": {"x": 1}})).unwrap(),
            Some(json!({"payload": {"x": 1}}))
        );
    }

    #[test]
    fn bad_bodies_are_refused_with_a_reason() {
        for bad in [
            json!([1]),
            json!("text"),
            json!(3),
            json!({"payload": "not json"}),
            json!({"payload": "WzFd"}),
        ] {
            assert!(device_payload(&bad).is_err(), "{bad}");
        }
        let big = json!({"blob": "x".repeat(MAX_BODY_BYTES)});
        assert!(device_payload(&big).unwrap_err().contains("at most 4096"));
    }

    /// Mutation testing: the limits' `>` turned `>=` survived. The exact edges: 4096 bytes of
    /// body are accepted, 4097 not; a wrapped payload of 8192 characters is decoded, 8193 not.
    #[test]
    fn body_limits_hold_at_their_exact_edges() {
        // `{"blob":"` + n + `"}`
        let body = |n: usize| json!({"blob": "x".repeat(n)});
        assert_eq!(body(MAX_BODY_BYTES - 11).to_string().len(), MAX_BODY_BYTES);
        assert!(device_payload(&body(MAX_BODY_BYTES - 11)).is_ok());
        assert!(device_payload(&body(MAX_BODY_BYTES - 10)).is_err());
        let padded = |len: usize| format!("{{\"a\":1}}{}", " ".repeat(len - 7));
        assert_eq!(padded(2 * MAX_BODY_BYTES).len(), 2 * MAX_BODY_BYTES);
        assert_eq!(
            decode_wrapped(&padded(2 * MAX_BODY_BYTES)),
            Ok(json!({"a": 1}))
        );
        assert!(decode_wrapped(&padded(2 * MAX_BODY_BYTES + 1))
            .unwrap_err()
            .contains("exceeds"));
    }

    #[test]
    fn registration_ids() {
        assert!(is_registration_id("440103123456789"));
        assert!(is_registration_id("soracom:a-b_c.d"));
        assert!(!is_registration_id(""));
        assert!(!is_registration_id("a/b"));
        assert!(!is_registration_id(&"a".repeat(129)));
    }

    fn context_with_deadline_in(offset: Duration, past: bool) -> Context {
        let mut context = Context::default();
        let at = if past {
            SystemTime::now() - offset
        } else {
            SystemTime::now() + offset
        };
        context.deadline = at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        context
    }

    #[test]
    fn deadlines_respect_budget_and_lambda_deadline() {
        let budget = Duration::from_secs(8);
        let d = deadlines(&Context::default(), budget);
        let dps = d.dps_until - Instant::now();
        assert!(dps <= budget && dps > Duration::from_secs(7), "{dps:?}");
        assert!(d.answer_by > d.dps_until);

        let soon = deadlines(
            &context_with_deadline_in(Duration::from_secs(2), false),
            budget,
        );
        let dps = soon.dps_until - Instant::now();
        assert!(dps <= Duration::from_millis(1300), "{dps:?}");
        assert_eq!(soon.dps_until, soon.answer_by);
    }

    #[test]
    fn a_passed_lambda_deadline_leaves_no_time_at_all() {
        // It used to fall back to the 8 s budget: work for an invocation Lambda had given up on.
        let passed = deadlines(
            &context_with_deadline_in(Duration::from_secs(1), true),
            Duration::from_secs(8),
        );
        assert!(passed.answer_by <= Instant::now());
        assert!(passed.dps_until <= Instant::now());
    }

    fn entry(id: DeviceId, status: DeviceStatus, valid_until: Option<u64>) -> Option<DeviceRecord> {
        let mut record = DeviceRecord::allowed(id);
        record.status = status;
        record.valid_until = valid_until;
        Some(record)
    }

    #[test]
    fn blocking_follows_the_sim_card_not_one_of_its_imsis() {
        let imsi = || DeviceId::Sim("440103123456789".into());
        let card = || DeviceId::SimCard("8981100012345678901".into());
        let verdict = |entries: &[Option<DeviceRecord>], require| {
            sim_verdict(entries, 100, require).map_err(|r| r.refused)
        };
        // The other IMSI of a blocked card: its own entry is absent or unlisted.
        let blocked_card = entry(card(), DeviceStatus::Blocked, None);
        assert_eq!(
            verdict(&[None, blocked_card.clone()], false),
            Err(Refused::SimBlocked)
        );
        let unlisted = entry(imsi(), DeviceStatus::Unlisted, None);
        assert_eq!(
            verdict(&[unlisted, blocked_card.clone()], false),
            Err(Refused::SimBlocked)
        );
        // Blocked wins over allowed, whichever entry says it.
        let allowed_imsi = entry(imsi(), DeviceStatus::Allowed, None);
        assert_eq!(
            verdict(&[allowed_imsi.clone(), blocked_card], true),
            Err(Refused::SimBlocked)
        );
        let expired_card = entry(card(), DeviceStatus::Allowed, Some(100));
        assert_eq!(
            verdict(&[allowed_imsi.clone(), expired_card], true),
            Err(Refused::SimExpired)
        );
        // The allowlist is satisfied by either entry.
        let allowed_card = entry(card(), DeviceStatus::Allowed, None);
        assert_eq!(verdict(&[None, allowed_card], true), Ok(()));
        assert_eq!(verdict(&[allowed_imsi, None], true), Ok(()));
        assert_eq!(verdict(&[None, None], true), Err(Refused::SimUnknown));
        assert_eq!(verdict(&[None, None], false), Ok(()));
    }

    mod failures {
        use super::*;
        use proptest::prelude::*;
        use shared::strategies::text;

        /// Internal text with a marker no sentence contains, so a leak is unmistakable.
        fn internal() -> impl Strategy<Value = String> {
            text().prop_map(|t| format!("INTERNAL<{t}>"))
        }

        fn dps_error() -> impl Strategy<Value = DpsError> {
            let secs = (0u64..120).prop_map(Duration::from_secs);
            prop_oneof![
                internal().prop_map(DpsError::Unauthorized),
                (any::<u16>(), any::<i64>())
                    .prop_map(|(status, error_code)| DpsError::Rejected { status, error_code }),
                (internal(), any::<i64>())
                    .prop_map(|(status, error_code)| DpsError::NotAssigned { status, error_code }),
                secs.clone()
                    .prop_map(|retry_after| DpsError::Throttled { retry_after }),
                any::<u16>().prop_map(|status| DpsError::Upstream { status }),
                secs.prop_map(|retry_after| DpsError::Deadline { retry_after }),
                internal().prop_map(DpsError::Connection),
                internal().prop_map(DpsError::Protocol),
                internal().prop_map(DpsError::Tls),
            ]
        }

        fn registry_error() -> impl Strategy<Value = RegistryError> {
            prop_oneof![
                internal().prop_map(RegistryError::Conflict),
                internal().prop_map(RegistryError::ClaimSpent),
                Just(RegistryError::Throttled),
                internal().prop_map(RegistryError::Unavailable),
                internal().prop_map(|key| RegistryError::Malformed {
                    key,
                    field: "status"
                }),
            ]
        }

        fn key_error() -> impl Strategy<Value = KeyFailure> {
            prop_oneof![
                Just(KeyFailure::NoEnrollment),
                internal().prop_map(KeyFailure::Unavailable),
                internal().prop_map(KeyFailure::Misconfigured),
            ]
        }

        /// A context as the runtime builds it from the Runtime API's raw-JSON header.
        fn client_context(custom: Vec<(String, String)>) -> Option<Context> {
            let custom: serde_json::Map<String, Value> = custom
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect();
            let json = serde_json::json!({ "custom": custom }).to_string();
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "lambda-runtime-client-context",
                http::HeaderValue::from_bytes(json.as_bytes()).ok()?,
            );
            headers.insert(
                "lambda-runtime-deadline-ms",
                http::HeaderValue::from_static("0"),
            );
            Context::new("test", Default::default(), &headers).ok()
        }

        fn checked(refusal: Refusal) -> Result<(), TestCaseError> {
            let response = Response::refused(refusal.refused, refusal.retry_after);
            prop_assert!(
                Refused::ALL.iter().any(|r| r.sentence() == response.body
                    && Some(r.code()) == response.error
                    && r.status() == response.status_code),
                "not a fixed answer: {}",
                response.outline()
            );
            prop_assert!(!response.body.contains("INTERNAL<"));
            Ok(())
        }

        proptest! {
            /// Every failure path the handler maps (DPS, the device table, the key store, the
            /// SIM identity, the body) answers with its code's fixed sentence and nothing of
            /// the cause's own text.
            #[test]
            fn every_failure_answers_a_fixed_sentence(
                dps in dps_error(),
                registry in registry_error(),
                key in key_error(),
                custom in proptest::collection::vec(
                    (prop_oneof![Just("imsi".to_owned()), Just("operatorId".to_owned()), Just("srn".to_owned()), internal()], internal()),
                    0..4,
                ),
                body in shared::strategies::json_with_keys(KEYS),
            ) {
                checked(dps_refusal(dps))?;
                checked(registry_refusal(registry))?;
                checked(key_refusal(key))?;
                let config = crate::config::Config::from_env(&[
                    ("DPS_ID_SCOPE", "0ne00000001"),
                    ("GROUP_KEY_PARAMETER", "/k"),
                    ("DEVICES_TABLE", "d"),
                    ("ALLOWED_OPERATOR_IDS", "OP0012345678"),
                ]).unwrap();
                if let Some(context) = client_context(custom) {
                    match identify(&context) {
                        Err(refusal) => checked(refusal)?,
                        Ok(sim) => {
                            if let Err(refusal) = operator_allowed(&sim, &config) {
                                checked(refusal)?;
                            }
                        }
                    }
                }
                if let Err(refusal) = identify(&Context::default()) {
                    checked(refusal)?;
                }
                if let Err(reason) = device_payload(&body) {
                    checked(refuse(Refused::BadRequest, reason))?;
                }
            }
        }
    }

    const KEYS: &[&str] = &["payload", "body", "data", "isBase64Encoded", "a"];

    proptest::proptest! {
        /// Any body a device sends through Funk: a payload for DPS or a refusal with a reason.
        #[test]
        fn any_body_becomes_a_payload_or_a_reason(event in shared::strategies::json_with_keys(KEYS)) {
            // What DPS gets is an object of at most MAX_BODY_BYTES, or nothing; a refusal is
            // never of a plain object that small without Funk's `payload` wrapping.
            match device_payload(&event) {
                Ok(Some(payload)) => {
                    proptest::prop_assert!(payload.is_object());
                    proptest::prop_assert!(payload.to_string().len() <= MAX_BODY_BYTES);
                }
                Ok(None) => proptest::prop_assert!(
                    event.is_null() || event.as_object().is_some_and(|o| o.is_empty() || o.contains_key("payload"))
                ),
                Err(_) => {
                    let plain_small_object = event.as_object().is_some_and(|o| {
                        !(o.len() == 1 && o.get("payload").is_some_and(Value::is_string))
                    }) && event.to_string().len() <= MAX_BODY_BYTES;
                    proptest::prop_assert!(!plain_small_object, "{event}");
                }
            }
        }
    }
}
