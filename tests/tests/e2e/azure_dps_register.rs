//! The azure-dps-register function's real handler, with the real SDK against the local AWS
//! endpoint and the real DPS client against the simulator.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use aws_sdk_ssm::types::ParameterType;
use azure_dps_register::config::Config;
use azure_dps_register::handler::{handle, Refused, Response};
use azure_dps_register::state::State;
use lambda_runtime::Context;
use local_emulators::dps_sim::{DpsSimConfig, Fault};
use local_emulators::fault_proxy::{FaultProxy, Mode};
use local_emulators::local_aws::random_key_base64;
use local_emulators::local_aws::{local_sdk_config, LocalAws};
use serde_json::json;
use shared::keys::SymmetricKey;
use shared::registry::{DeviceId, DeviceRecord, DeviceStatus};
use tokio::time::Instant;

use crate::dps_fixture::*;
pub(crate) const GROUP_KEY_PARAMETER: &str = "/soracom-dps/group-key";

pub(crate) struct Setup {
    pub(crate) dps: Fixture,
    pub(crate) _aws: LocalAws,
    pub(crate) state: State,
    pub(crate) config: Config,
    _ca_dir: local_emulators::stack::TempDir,
}

fn event_file(name: &str) -> String {
    local_emulators::fixtures::event_text("azure-dps-register", name)
}

/// A Context built the way the runtime builds it from the Runtime API's headers, where the
/// real service carries the client context as raw JSON.
fn funk_context(file: &str, deadline_in: Option<Duration>) -> Context {
    let client_context = serde_json::from_str::<serde_json::Value>(&event_file(file)).unwrap();
    context(
        &client_context,
        deadline_in.unwrap_or(Duration::from_secs(30)),
    )
}

/// A Context with this client context (`{"custom": {...}}`) and a deadline `deadline_in` away.
pub(crate) fn context(client_context: &serde_json::Value, deadline_in: Duration) -> Context {
    let compact = client_context.to_string();
    let deadline = std::time::SystemTime::now() + deadline_in;
    let deadline_ms = deadline
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "lambda-runtime-deadline-ms",
        deadline_ms.to_string().parse().unwrap(),
    );
    headers.insert("lambda-runtime-client-context", compact.parse().unwrap());
    Context::new("test-request", Default::default(), &headers).unwrap()
}

async fn setup(configure: impl FnOnce(&mut DpsSimConfig), stored_key: Option<String>) -> Setup {
    setup_with(configure, stored_key, &[]).await
}

pub(crate) async fn setup_with(
    configure: impl FnOnce(&mut DpsSimConfig),
    stored_key: Option<String>,
    extra_env: &[(&str, &str)],
) -> Setup {
    let dps = simulator(configure).await;
    let aws = LocalAws::start().await.unwrap();
    aws.create_devices_table("devices").await.unwrap();
    let key = stored_key.unwrap_or_else(|| dps.group_key.to_base64());
    aws.put_parameter(GROUP_KEY_PARAMETER, &key, ParameterType::SecureString)
        .await
        .unwrap();

    let dir = local_emulators::stack::temp_dir("dps-e2e").unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, dps.sim.ca_pem()).unwrap();

    let env: HashMap<String, String> = [
        ("DPS_ID_SCOPE", SCOPE.to_owned()),
        ("DPS_ENDPOINT", dps.endpoint.to_string()),
        ("DPS_TRUSTED_CA_FILE", ca_file.display().to_string()),
        ("GROUP_KEY_PARAMETER", GROUP_KEY_PARAMETER.to_owned()),
        ("DEVICES_TABLE", "devices".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .chain(
        extra_env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
    .collect();
    let config = Config::from_env(&env).unwrap();
    let state = State::new(config.clone(), &aws.sdk_config().await).unwrap();
    Setup {
        dps,
        _aws: aws,
        state,
        config,
        _ca_dir: dir,
    }
}

/// The function's state for this setup with REQUIRE_SIM_ALLOWLIST=true.
async fn strict_state(s: &Setup) -> State {
    let config = Config {
        require_allowlist: true,
        ..s.config.clone()
    };
    State::new(config, &s._aws.sdk_config().await).unwrap()
}

async fn invoke(setup: &Setup, body: serde_json::Value, context: &Context) -> Response {
    handle(body, context, &setup.state).await
}

#[tokio::test]
async fn funk_invocation_returns_a_connection_string_and_is_recorded() {
    let s = setup(|_| {}, None).await;
    let body: serde_json::Value = serde_json::from_str(&event_file("register.json")).unwrap();
    let response = invoke(
        &s,
        body,
        &funk_context("client-context.json", Some(Duration::from_secs(10))),
    )
    .await;
    assert_eq!(response.status_code, 200, "{}", response.outline());

    let fields: HashMap<&str, &str> = response
        .body
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let expected_key = s.dps.group_key.derive_device_key(IMSI).to_base64();
    assert_eq!(fields.get("DeviceId"), Some(&IMSI));
    assert_eq!(
        fields.get("SharedAccessKey").copied(),
        Some(expected_key.as_str())
    );
    let hub = fields["HostName"];
    assert_eq!(s.dps.sim.assigned()[0].assigned_hub, hub);

    let record = s
        .state
        .registry
        .get(&DeviceId::Sim(IMSI.into()))
        .await
        .unwrap()
        .unwrap();
    let registration = record.registration.unwrap();
    assert_eq!(
        (
            registration.assigned_hub.as_str(),
            registration.device_id.as_str()
        ),
        (hub, IMSI)
    );

    // The JSON Funk returns keeps the shape the firmware parses.
    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json["statusCode"], 200);
    assert!(json["body"].as_str().unwrap().starts_with("HostName="));
}

/// SSM and DynamoDB stopped, slow or throttling (through a fault proxy): each gives a 503
/// with `retryAfter` within the invocation's deadline, DPS is never contacted, and the same
/// request succeeds once the endpoint recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_endpoint_faults_answer_503_in_time_and_recover() {
    // Every recovered request goes to DPS, none is answered from the previous one's record.
    let s = setup_with(|_| {}, None, &[("REREGISTER_AFTER_SECONDS", "0")]).await;
    let body: serde_json::Value = serde_json::from_str(&event_file("register.json")).unwrap();
    let deadline = Duration::from_secs(12);
    for mode in [
        Mode::Stopped,
        Mode::Slow(Duration::from_secs(60)),
        Mode::Throttle,
    ] {
        let proxy = FaultProxy::start(s._aws.endpoint()).await.unwrap();
        // A fresh state per fault: nothing cached from an earlier success.
        let state =
            State::new(s.config.clone(), &local_sdk_config(&proxy.endpoint()).await).unwrap();
        proxy.set(mode);
        let started = std::time::Instant::now();
        let context = funk_context("client-context.json", Some(deadline));
        let response = handle(body.clone(), &context, &state).await;
        let elapsed = started.elapsed();
        assert_eq!(
            response.status_code,
            503,
            "{mode:?}: {}",
            response.outline()
        );
        assert_eq!(response.error, Some("registry-unavailable"), "{mode:?}");
        assert!(response.retry_after.is_some(), "{mode:?}");
        assert!(elapsed < deadline, "{mode:?} took {elapsed:?}");

        proxy.set(Mode::Pass);
        let context = funk_context("client-context.json", Some(deadline));
        let response = handle(body.clone(), &context, &state).await;
        assert_eq!(
            response.status_code,
            200,
            "{mode:?} after recovery: {}",
            response.outline()
        );
    }
    // Only the three recovered requests reached DPS.
    assert_eq!(s.dps.sim.assigned().len(), 3);
}

/// A SIM nobody listed (allowed while REQUIRE_SIM_ALLOWLIST is off) registers again on its
/// next boot: its recorded registration must not read as a block. With the allowlist on,
/// that record does not make it listed.
#[tokio::test]
async fn an_unlisted_sim_registers_on_every_boot_but_is_not_listed_by_it() {
    let s = setup(|_| {}, None).await;
    let body: serde_json::Value = serde_json::from_str(&event_file("register.json")).unwrap();
    for boot in 1..=2 {
        let context = funk_context("client-context.json", Some(Duration::from_secs(10)));
        let response = invoke(&s, body.clone(), &context).await;
        assert_eq!(
            response.status_code,
            200,
            "boot {boot}: {}",
            response.outline()
        );
    }
    let strict = strict_state(&s).await;
    let context = funk_context("client-context.json", Some(Duration::from_secs(10)));
    let response = handle(body, &context, &strict).await;
    assert_eq!(
        response.error,
        Some("sim-unknown"),
        "{}",
        response.outline()
    );
}

#[tokio::test]
async fn blocked_sim_is_refused_without_contacting_dps() {
    let s = setup(|_| {}, None).await;
    let mut blocked = DeviceRecord::allowed(DeviceId::Sim("440103999999999".into()));
    blocked.status = DeviceStatus::Blocked;
    s.state.registry.put(&blocked).await.unwrap();
    let response = invoke(
        &s,
        json!({}),
        &funk_context("client-context-blocked.json", None),
    )
    .await;
    assert_eq!(
        (response.status_code, response.error),
        (403, Some("sim-blocked"))
    );
    assert_eq!(s.dps.sim.stats().connections.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn identity_and_body_are_checked_before_anything_else() {
    let s = setup(|_| {}, None).await;
    // Identity fields in the body are the device's own claims: without a Funk client
    // context they count for nothing.
    let claimed = json!({"imsi": IMSI, "operatorId": "OP0012345678", "srn": "srn:soracom:OP0012345678:jp:Subscriber:440103123456789"});
    let no_identity = invoke(&s, claimed, &Context::default()).await;
    assert_eq!(
        (no_identity.status_code, no_identity.error),
        (403, Some("no-identity"))
    );
    let bad_body = invoke(
        &s,
        json!([1, 2]),
        &funk_context("client-context.json", None),
    )
    .await;
    assert_eq!(
        (bad_body.status_code, bad_body.error),
        (400, Some("bad-request"))
    );
    assert_eq!(s.dps.sim.stats().connections.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn wrong_group_key_is_refused_once() {
    let s = setup(|_| {}, Some(random_key_base64())).await;
    let response = invoke(&s, json!({}), &funk_context("client-context.json", None)).await;
    assert_eq!(
        (response.status_code, response.error),
        (403, Some("enrollment-refused"))
    );
    assert_eq!(s.dps.sim.stats().connections.load(Ordering::Relaxed), 1);
    assert!(!response.body.contains("SharedAccessKey"));
}

#[tokio::test]
async fn slow_dps_gives_503_with_retry_within_the_lambda_deadline() {
    let s = setup(
        |c| c.faults = vec![Fault::Slow(Duration::from_secs(10))],
        None,
    )
    .await;
    let started = Instant::now();
    let lambda_timeout = Duration::from_secs(3);
    let response = invoke(
        &s,
        json!({}),
        &funk_context("client-context.json", Some(lambda_timeout)),
    )
    .await;
    assert_eq!(
        (response.status_code, response.error),
        (503, Some("dps-timeout"))
    );
    assert!(response.retry_after.is_some_and(|s| s >= 1));
    assert!(
        started.elapsed() < lambda_timeout,
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn dps_outage_gives_502() {
    let s = setup(|c| c.faults = vec![Fault::DropAfterConnack], None).await;
    let response = invoke(
        &s,
        json!({}),
        &funk_context("client-context.json", Some(Duration::from_secs(8))),
    )
    .await;
    assert_eq!(
        (response.status_code, response.error),
        (502, Some("dps-failed"))
    );
    assert!(response.retry_after.is_some());
}

#[tokio::test]
async fn individual_keys_from_the_device_table() {
    let device_key = random_key_base64();
    let k = SymmetricKey::from_base64(&device_key).unwrap();
    let s = setup_with(
        move |c| {
            c.device_keys.insert(IMSI.into(), k);
        },
        None,
        &[("KEY_SOURCE", "individual-dynamodb")],
    )
    .await;
    s._aws
        .dynamodb()
        .await
        .put_item()
        .table_name("devices")
        .item(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("sim#{IMSI}")),
        )
        .item(
            "status",
            aws_sdk_dynamodb::types::AttributeValue::S("allowed".into()),
        )
        .item(
            "device_key",
            aws_sdk_dynamodb::types::AttributeValue::S(device_key.clone()),
        )
        .send()
        .await
        .unwrap();
    let ok = invoke(&s, json!({}), &funk_context("client-context.json", None)).await;
    assert_eq!(ok.status_code, 200, "{}", ok.outline());
    assert!(ok.body.ends_with(&format!(";SharedAccessKey={device_key}")));

    // A SIM without an individual key has no enrollment.
    let none = invoke(
        &s,
        json!({}),
        &funk_context("client-context-blocked.json", None),
    )
    .await;
    assert_eq!((none.status_code, none.error), (403, Some("no-enrollment")));
}

#[tokio::test]
async fn operators_outside_the_allowlist_are_refused() {
    let s = setup_with(|_| {}, None, &[("ALLOWED_OPERATOR_IDS", "OP9999999999")]).await;
    let response = invoke(&s, json!({}), &funk_context("client-context.json", None)).await;
    assert_eq!(
        (response.status_code, response.error),
        (403, Some("operator-not-allowed"))
    );
    assert_eq!(s.dps.sim.stats().connections.load(Ordering::Relaxed), 0);
}

/// What the device hears when DPS fails in a way that may pass: 502/503 with retryAfter,
/// never 403, and the fixed sentence of its code, never the client's error text.
#[tokio::test]
async fn transient_dps_failures_answer_retryable_with_a_fixed_sentence() {
    let faults = transient_faults(100)
        .into_iter()
        .chain([Fault::RegisterStatus(503)]);
    for fault in faults {
        let s = setup(
            |c| {
                c.faults = vec![fault.clone()];
                c.retry_after = 1;
            },
            None,
        )
        .await;
        let context = funk_context("client-context.json", Some(Duration::from_secs(5)));
        let response = invoke(&s, json!({}), &context).await;
        assert!(
            [502, 503].contains(&response.status_code) && response.retry_after.is_some(),
            "{fault:?}: {}",
            response.outline()
        );
        let refused = Refused::ALL
            .into_iter()
            .find(|r| Some(r.code()) == response.error)
            .unwrap();
        assert_eq!(response.body, refused.sentence(), "{fault:?}");
    }
}

/// Lambda's deadline already passed (a cold start that took it all): nothing is tried,
/// not the device table, not DPS.
#[tokio::test]
async fn a_passed_deadline_attempts_nothing() {
    let s = setup(|_| {}, None).await;
    let mut context = funk_context("client-context.json", None);
    let two_seconds_ago = std::time::SystemTime::now() - Duration::from_secs(2);
    context.deadline = two_seconds_ago
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Through a proxy that counts what reaches the local AWS endpoint.
    let counting = FaultProxy::start(s._aws.endpoint()).await.unwrap();
    let state = State::new(
        s.config.clone(),
        &local_sdk_config(&counting.endpoint()).await,
    )
    .unwrap();
    let started = Instant::now();
    let response = handle(json!({}), &context, &state).await;
    assert_eq!(
        response.error,
        Some("dps-timeout"),
        "{}",
        response.outline()
    );
    assert!(response.retry_after.is_some());
    assert_eq!(
        counting.requests(),
        0,
        "the device table or SSM was contacted"
    );
    assert_eq!(s.dps.sim.stats().accepted.load(Ordering::Relaxed), 0);
    assert!(started.elapsed() < Duration::from_millis(200));
}

/// DPS registered the device; the device table is slow to take the record. The answer
/// still leaves before the Lambda deadline (it waited out the SDK's 3 s before).
#[tokio::test]
async fn a_slow_record_cannot_push_the_answer_past_the_deadline() {
    let s = setup(|_| {}, None).await;
    let proxy = FaultProxy::start(s._aws.endpoint()).await.unwrap();
    let state = State::new(s.config.clone(), &local_sdk_config(&proxy.endpoint()).await).unwrap();
    // The record's write only, not the budget's (both are UpdateItem).
    proxy.set(Mode::SlowOperation {
        target: "DynamoDB_20120810.UpdateItem",
        containing: "registration_id",
        delay: Duration::from_secs(30),
    });
    let deadline = Duration::from_millis(2500);
    let started = Instant::now();
    let context = funk_context("client-context.json", Some(deadline));
    let response = handle(json!({}), &context, &state).await;
    assert_eq!(response.status_code, 200, "{}", response.outline());
    assert!(started.elapsed() < deadline, "{:?}", started.elapsed());
}

/// A multi-IMSI SIM switched to its other subscription: blocked by its SIM ID, it stays
/// blocked although this IMSI has no entry of its own.
#[tokio::test]
async fn a_blocked_sim_card_stays_blocked_on_its_other_imsi() {
    let s = setup(|_| {}, None).await;
    // The SIM ID that events/azure-dps-register/client-context.json carries.
    let mut card = DeviceRecord::allowed(DeviceId::SimCard("8981100012345678901".into()));
    card.status = DeviceStatus::Blocked;
    s.state.registry.put(&card).await.unwrap();
    let context = funk_context("client-context.json", None);
    let response = invoke(&s, json!({}), &context).await;
    assert_eq!(
        (response.status_code, response.error),
        (403, Some("sim-blocked"))
    );
    assert_eq!(s.dps.sim.stats().accepted.load(Ordering::Relaxed), 0);

    // With the allowlist required, an allowed SIM card admits each of its IMSIs.
    let strict = strict_state(&s).await;
    card.status = DeviceStatus::Allowed;
    s.state.registry.put(&card).await.unwrap();
    let response = handle(json!({}), &context, &strict).await;
    assert_eq!(response.status_code, 200, "{}", response.outline());
}

/// Individual keys are fetched per SIM: a refused SIM's key must not stay in the warm
/// function's memory, and the cache holds only what it must (the group key).
#[tokio::test]
async fn a_refused_sims_key_is_not_kept_in_memory() {
    let s = setup_with(|_| {}, None, &[("KEY_SOURCE", "individual-dynamodb")]).await;
    let db = s._aws.dynamodb().await;
    use aws_sdk_dynamodb::types::AttributeValue as A;
    db.put_item()
        .table_name("devices")
        .item("pk", A::S("sim#440103999999999".into()))
        .item("status", A::S("blocked".into()))
        .item("device_key", A::S(random_key_base64()))
        .send()
        .await
        .unwrap();
    let response = invoke(
        &s,
        json!({}),
        &funk_context("client-context-blocked.json", None),
    )
    .await;
    assert_eq!(response.error, Some("sim-blocked"));
    assert_eq!(s.state.keys.cached(), 0, "a per-device key was cached");

    let group = setup(|_| {}, None).await;
    let response = invoke(
        &group,
        json!({}),
        &funk_context("client-context.json", None),
    )
    .await;
    assert_eq!(response.status_code, 200, "{}", response.outline());
    assert_eq!(group.state.keys.cached(), 1, "the group key is cached");
}

#[tokio::test]
async fn throttled_dps_is_ridden_out_by_the_function() {
    let s = setup(
        |c| c.faults = vec![Fault::ThrottleRegister(3), Fault::ThrottlePoll(2)],
        None,
    )
    .await;
    let response = invoke(
        &s,
        json!({}),
        &funk_context("client-context.json", Some(Duration::from_secs(9))),
    )
    .await;
    assert_eq!(response.status_code, 200, "{}", response.outline());
    assert_eq!(s.dps.sim.stats().throttled.load(Ordering::Relaxed), 5);
}
