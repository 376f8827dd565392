//! The Beam gate's rules with the state in memory: what a stranger on the public route can make
//! the function do (nothing but one cached PSK lookup), and every refusal's status and code.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use lambda_runtime::Context;
use serde_json::{json, Value};
use shared::memory::MemoryTable;
use shared::registry::{beam_key, DeviceId, DeviceStatus, RegistryError};
use shared::secrets::{CachedSecretStore, Secret, SecretError, SecretStore};
use shared::soracom::{beam_signature, BeamHeaders};

use crate::beam::{handle, Gate, ROUTE};
use crate::config::BeamConfig;
use crate::handler::MAX_BODY_BYTES;
use crate::handler_tests::{entry, state, TestState, IMSI};

const PSK: &str = "beam-test-psk";
const OPERATOR: &str = "OP0012345678";
const SKEW: Duration = Duration::from_secs(300);

/// The PSK's parameter as SSM would answer: the key, or a failure; lookups counted.
struct PskStore {
    answer: Result<&'static str, SecretError>,
    lookups: AtomicUsize,
}

impl SecretStore for PskStore {
    async fn get(&self, _name: &str) -> Result<Secret, SecretError> {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.answer.clone().map(|psk| Secret::new(psk.to_owned()))
    }
}

type TestGate = Gate<CachedSecretStore<PskStore>, MemoryTable>;

/// A gate as `main` builds it: the PSK behind the 5-minute cache.
fn gate(answer: Result<&'static str, SecretError>) -> TestGate {
    Gate {
        config: BeamConfig {
            psk_parameter: Some("/beam/psk".into()),
            operator_id: Some(OPERATOR.into()),
            max_skew: SKEW,
        },
        psk: CachedSecretStore::new(
            PskStore {
                answer,
                lookups: AtomicUsize::new(0),
            },
            Duration::from_secs(300),
        ),
        used: MemoryTable::new(),
    }
}

fn lookups(gate: &TestGate) -> usize {
    gate.psk.uncached().lookups.load(Ordering::SeqCst)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Beam's headers for `imsi` at `timestamp_ms`, signed with `psk` (unsigned: `None`).
fn headers(imsi: &str, timestamp_ms: u64, psk: Option<&str>) -> Value {
    let mut beam = BeamHeaders {
        imsi: Some(imsi.into()),
        sim_id: Some("8981100012345678901".into()),
        timestamp: Some(timestamp_ms.to_string()),
        signature_version: Some("20151001".into()),
        ..BeamHeaders::default()
    };
    beam.signature = psk.map(|psk| beam_signature(psk.as_bytes(), &beam));
    let mut out = json!({
        "x-soracom-imsi": imsi,
        "x-soracom-sim-id": beam.sim_id,
        "x-soracom-timestamp": beam.timestamp,
        "x-soracom-signature-version": "20151001",
    });
    if let Some(signature) = beam.signature {
        out["x-soracom-signature"] = json!(signature);
    }
    out
}

fn event(headers: Value, body: &str, base64: bool) -> Value {
    json!({
        "version": "2.0",
        "routeKey": ROUTE,
        "rawPath": "/register",
        "headers": headers,
        "requestContext": {"http": {"method": "POST", "path": "/register"}},
        "body": body,
        "isBase64Encoded": base64,
    })
}

/// The HTTP status and the answer's `error` (`-` for none).
async fn send(state: &TestState, gate: &TestGate, event: Value) -> (u16, String) {
    let response = handle(event, &Context::default(), state, gate).await;
    let status = response["statusCode"].as_u64().unwrap() as u16;
    let body: Value = serde_json::from_str(response["body"].as_str().unwrap()).unwrap();
    let error = body["error"].as_str().unwrap_or("-").to_owned();
    (status, error)
}

fn listed_state() -> TestState {
    let state = state(&[("REQUIRE_SIM_ALLOWLIST", "true")]);
    state.registry.put(entry(
        DeviceId::Sim(IMSI.into()),
        DeviceStatus::Allowed,
        None,
    ));
    state
}

/// The hole: the body was decoded and parsed before the gate, so a stranger's megabytes cost
/// the function work; now an unsigned request is refused whatever it carries.
#[tokio::test]
async fn an_unsigned_request_is_refused_at_the_gate_before_its_body_is_read() {
    let (state, gate) = (listed_state(), gate(Ok(PSK)));
    for (body, base64) in [
        ("not json", false),
        ("%%% not base64 %%%", true),
        (&*"x".repeat(2 * MAX_BODY_BYTES), false),
    ] {
        let unsigned = event(headers(IMSI, now_ms(), None), body, base64);
        assert_eq!(
            send(&state, &gate, unsigned).await,
            (403, "beam-signature".into())
        );
        let forged = event(headers(IMSI, now_ms(), Some("guessed")), body, base64);
        assert_eq!(
            send(&state, &gate, forged).await,
            (403, "beam-signature".into())
        );
    }
    assert_eq!(state.registry.calls(), 0, "nothing read the device table");
    assert_eq!(gate.used.calls(), 0, "no signature was spent");
    assert!(state.dps.registered.lock().unwrap().is_empty());
}

/// The hole: a missing PSK was looked up on every request, so a flood of unsigned requests
/// throttled SSM for the whole account (the group key and the hubs' credentials with it).
#[tokio::test]
async fn a_hundred_unsigned_requests_cost_at_most_one_psk_lookup() {
    let state = listed_state();
    let missing = gate(Err(SecretError::NotFound("/beam/psk".into())));
    let present = gate(Ok(PSK));
    for _ in 0..100 {
        let unsigned = event(headers(IMSI, now_ms(), None), "", false);
        assert_eq!(
            send(&state, &missing, unsigned.clone()).await,
            (403, "beam-not-configured".into())
        );
        assert_eq!(
            send(&state, &present, unsigned).await,
            (403, "beam-signature".into())
        );
    }
    assert_eq!((lookups(&missing), lookups(&present)), (1, 1));
}

#[tokio::test]
async fn a_signed_request_registers_once_and_its_replay_is_refused() {
    let (state, gate) = (listed_state(), gate(Ok(PSK)));
    let at = now_ms();
    let signed = event(headers(IMSI, at, Some(PSK)), &STANDARD.encode(b"{}"), true);
    assert_eq!(send(&state, &gate, signed.clone()).await, (200, "-".into()));
    assert_eq!(state.dps.registered.lock().unwrap().len(), 1);
    // Kept past the last moment the timestamp verifies, with a minute to spare.
    let signature = headers(IMSI, at, Some(PSK))["x-soracom-signature"]
        .as_str()
        .unwrap()
        .to_owned();
    let until = gate.used.used_until(&beam_key(&signature)).unwrap();
    assert_eq!(until, (at + 2 * SKEW.as_millis() as u64) / 1000 + 60);
    assert_eq!(
        send(&state, &gate, signed).await,
        (403, "beam-replayed".into())
    );
    assert_eq!(state.dps.registered.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_signed_request_with_a_body_too_large_or_not_json_is_a_bad_request() {
    let (state, gate) = (listed_state(), gate(Ok(PSK)));
    let big = format!(r#"{{"b":"{}"}}"#, "x".repeat(MAX_BODY_BYTES));
    for (n, body) in ["not json", big.as_str()].into_iter().enumerate() {
        let signed = event(headers(IMSI, now_ms() + n as u64, Some(PSK)), body, false);
        assert_eq!(
            send(&state, &gate, signed).await,
            (400, "bad-request".into())
        );
    }
    assert!(state.dps.registered.lock().unwrap().is_empty());
}

/// Stale both ways, fresh within the window (its exact edges: `domain soracom::tests`).
#[tokio::test]
async fn timestamps_outside_the_window_are_stale_either_way() {
    let (state, gate) = (listed_state(), gate(Ok(PSK)));
    let skew = SKEW.as_millis() as u64;
    let now = now_ms();
    // The clock moves between signing and verifying: leave the edge cases a second of slack
    // on the side the clock moves to.
    for (at, expected) in [
        (now - skew - 2_000, (403, "beam-stale")),
        (now + skew + 2_000, (403, "beam-stale")),
        (now + skew - 1_000, (200, "-")),
        (now - skew + 2_000, (200, "-")),
    ] {
        let signed = event(headers(IMSI, at, Some(PSK)), "", false);
        let (status, error) = send(&state, &gate, signed).await;
        assert_eq!((status, error.as_str()), expected, "at {at} (now {now})");
    }
}

#[tokio::test]
async fn our_own_outage_is_503_and_a_strangers_fault_403() {
    let state = listed_state();
    let unreachable = gate(Err(SecretError::Throttled("/beam/psk".into())));
    let signed = || event(headers(IMSI, now_ms(), Some(PSK)), "", false);
    assert_eq!(
        send(&state, &unreachable, signed()).await,
        (503, "beam-unavailable".into())
    );
    let plain = gate(Err(SecretError::NotEncrypted("/beam/psk".into())));
    assert_eq!(
        send(&state, &plain, signed()).await,
        (403, "beam-not-configured".into())
    );
    let table_down = gate(Ok(PSK));
    table_down
        .used
        .fail_with(Some(RegistryError::Unavailable("timed out".into())));
    assert_eq!(
        send(&state, &table_down, signed()).await,
        (503, "beam-unavailable".into())
    );
    let no_imsi = event(headers("12345", now_ms(), Some(PSK)), "", false);
    assert_eq!(
        send(&state, &gate(Ok(PSK)), no_imsi).await,
        (403, "beam-identity".into())
    );
    let mut unconfigured = gate(Ok(PSK));
    unconfigured.config.psk_parameter = None;
    assert_eq!(
        send(&state, &unconfigured, signed()).await,
        (403, "beam-not-configured".into())
    );
    assert_eq!(lookups(&unconfigured), 0);
    assert!(state.dps.registered.lock().unwrap().is_empty());
}
