//! azure-dps-register at fleet scale, against moto and the DPS simulator: answers from the
//! record, key rotation, a device's own request for DPS, the per-SIM limit, and the fleet's
//! budget shared by two instances.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use aws_sdk_ssm::types::ParameterType;
use azure_dps_register::handler::{handle, Response, Source};
use azure_dps_register::state::{fleet_windows, State};
use lambda_runtime::Context;
use local_emulators::local_aws::random_key_base64;
use serde_json::{json, Value};
use shared::keys::SymmetricKey;
use shared::registry::{DeviceId, DeviceRecord, DeviceStatus};

use crate::azure_dps_register::{context, setup_with, Setup, GROUP_KEY_PARAMETER};
use crate::dps_fixture::IMSI;

/// A Funk context for `imsi`, with a 20 s deadline.
fn funk(imsi: &str) -> Context {
    let custom = json!({"custom": {
        "imsi": imsi, "operatorId": "OP0012345678",
        "srn": format!("srn:soracom:OP0012345678:jp:Subscriber:{imsi}"),
    }});
    context(&custom, Duration::from_secs(20))
}

async fn call(state: &State, imsi: &str, body: Value) -> Response {
    handle(body, &funk(imsi), state).await
}

fn assigned(s: &Setup) -> usize {
    s.dps.sim.assigned().len()
}

#[tokio::test]
async fn a_registered_sim_is_answered_from_its_record_and_a_new_key_goes_to_dps() {
    // The enrollment group has two keys during a rotation: the old and the new.
    let new_key = SymmetricKey::from_base64(&random_key_base64()).unwrap();
    let secondary = new_key.clone();
    let s = setup_with(
        move |c| c.group_keys.push(secondary),
        None,
        &[("SECRET_CACHE_SECONDS", "0")],
    )
    .await;
    let first = call(&s.state, IMSI, json!({})).await;
    assert_eq!(first.source, Some(Source::Dps), "{}", first.outline());
    let again = call(&s.state, IMSI, json!({})).await;
    assert_eq!(again.source, Some(Source::Record), "{}", again.outline());
    assert!(again.body == first.body);
    assert_eq!(assigned(&s), 1, "no second DPS registration");

    // The operator stores the new group key (a new SSM parameter version).
    s._aws
        .put_parameter(
            GROUP_KEY_PARAMETER,
            &new_key.to_base64(),
            ParameterType::SecureString,
        )
        .await
        .unwrap();
    let rotated = call(&s.state, IMSI, json!({})).await;
    assert_eq!(rotated.source, Some(Source::Dps), "{}", rotated.outline());
    let expected = new_key.derive_device_key(IMSI).to_base64();
    assert!(rotated
        .body
        .ends_with(&format!("SharedAccessKey={expected}")));
    assert_eq!(assigned(&s), 2);
    assert_eq!(
        call(&s.state, IMSI, json!({})).await.source,
        Some(Source::Record)
    );
}

#[tokio::test]
async fn a_device_may_ask_for_dps_within_its_hourly_limit() {
    let s = setup_with(|_| {}, None, &[("DPS_PER_SIM_PER_HOUR", "2")]).await;
    let ask = json!({"reprovision": true});
    for n in 1..=2 {
        let r = call(&s.state, IMSI, ask.clone()).await;
        assert_eq!(r.source, Some(Source::Dps), "{n}: {}", r.outline());
    }
    // A second instance (another cold start) counts against the same limit.
    let other = State::new(s.config.clone(), &s._aws.sdk_config().await).unwrap();
    let r = call(&other, IMSI, ask).await;
    assert_eq!((r.status_code, r.source), (200, Some(Source::Record)));
    assert_eq!(assigned(&s), 2);
    // `reprovision` never reaches DPS.
    assert!(s.dps.sim.assigned().iter().all(|a| a.payload.is_none()));
}

#[tokio::test]
async fn a_sim_without_a_record_is_told_when_its_hour_has_room() {
    let s = setup_with(
        |c| c.faults = vec![local_emulators::dps_sim::Fault::RegisterStatus(401)],
        None,
        &[("DPS_PER_SIM_PER_HOUR", "1")],
    )
    .await;
    let refused = call(&s.state, IMSI, json!({})).await;
    assert_eq!(refused.error, Some("enrollment-refused"));
    let limited = call(&s.state, IMSI, json!({})).await;
    assert_eq!(
        (limited.status_code, limited.error),
        (429, Some("sim-rate-limited"))
    );
    assert!(limited.retry_after.is_some_and(|r| r > 3500));
    // The limited call may have opened a connection alongside the limits, but sent nothing
    // over it: DPS saw one CONNECT.
    assert_eq!(s.dps.sim.stats().connects.load(Relaxed), 1);
}

/// Two instances (two cold starts of the function) against one device table: together they
/// start no more DPS registrations in a minute than the budget, and every device they refuse
/// is told when to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_fleet_budget_without_overshoot() {
    // 60 a minute: counted as 5 per 5-second window (see `fleet_windows`).
    let s = setup_with(|_| {}, None, &[("DPS_REGISTRATIONS_PER_MINUTE", "60")]).await;
    let (limit, seconds) = fleet_windows(60);
    assert_eq!((limit, seconds), (5, 5));
    let other = State::new(s.config.clone(), &s._aws.sdk_config().await).unwrap();
    let window = shared::clock::unix_now() / seconds;
    let calls = (0..12).map(|n| {
        let state = if n % 2 == 0 { &s.state } else { &other };
        async move { call(state, &format!("4401030000100{n:02}"), json!({})).await }
    });
    let answers = futures::future::join_all(calls).await;
    let granted = answers.iter().filter(|r| r.status_code == 200).count();
    let waiting: Vec<&Response> = answers
        .iter()
        .filter(|r| r.error == Some("dps-budget"))
        .collect();
    assert_eq!(granted + waiting.len(), 12, "only 200 or dps-budget");
    assert!(waiting
        .iter()
        .all(|r| r.status_code == 503 && r.retry_after.is_some()));
    assert_eq!(assigned(&s), granted);
    if shared::clock::unix_now() / seconds == window {
        assert_eq!(granted, 5, "the window's budget, exactly");
    } else {
        assert!(granted <= 10, "two windows' budgets at most");
    }
}

/// With `REREGISTER_AFTER_SECONDS=0` the record can never answer, so the connection to DPS is
/// opened while the table is read: the allowed SIM registers over it (one TCP connection, one
/// CONNECT), the blocked SIM's is dropped before anything about it is sent.
#[tokio::test]
async fn the_connection_opened_during_the_checks_carries_only_a_cleared_sim() {
    let s = setup_with(|_| {}, None, &[("REREGISTER_AFTER_SECONDS", "0")]).await;
    const BLOCKED: &str = "440103999999999";
    let mut blocked = DeviceRecord::allowed(DeviceId::Sim(BLOCKED.into()));
    blocked.status = DeviceStatus::Blocked;
    s.state.registry.put(&blocked).await.unwrap();
    let refused = call(&s.state, BLOCKED, json!({})).await;
    assert_eq!(refused.error, Some("sim-blocked"), "{}", refused.outline());

    let r = call(&s.state, IMSI, json!({})).await;
    assert_eq!(r.source, Some(Source::Dps), "{}", r.outline());
    let stats = s.dps.sim.stats();
    // Only the cleared SIM's CONNECT ever reached DPS, on one of at most two TCP connections
    // (the blocked SIM's may have been accepted before it was dropped).
    assert_eq!(stats.connects.load(Relaxed), 1);
    assert!((1..=2).contains(&stats.accepted.load(Relaxed)));
    assert_eq!(assigned(&s), 1);
}

/// DPS's allocation data (a custom allocation's `returnData`) reaches the device, and reaches
/// it again when its record answers (kept in the device table as DPS sent it).
#[tokio::test]
async fn allocation_data_reaches_the_device_from_dps_and_from_the_record() {
    let s = setup_with(
        |c| c.return_data = Some(json!({"tier": "gold", "hubs": [1, 2]})),
        None,
        &[],
    )
    .await;
    let first = call(&s.state, IMSI, json!({})).await;
    assert_eq!(first.source, Some(Source::Dps), "{}", first.outline());
    assert_eq!(
        first.return_data,
        Some(json!({"tier": "gold", "hubs": [1, 2]}))
    );
    let again = call(&s.state, IMSI, json!({})).await;
    assert_eq!(again.source, Some(Source::Record), "{}", again.outline());
    assert_eq!(again.return_data, first.return_data);
    assert_eq!(assigned(&s), 1);
}
