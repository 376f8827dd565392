//! The fleet-scale rules in memory: answering from the record, key rotation, a device's own
//! request for a new registration, the per-SIM limit and the fleet's budget per minute.

use serde_json::{json, Value};
use shared::clock::unix_now;
use shared::memory::MemoryBudget;
use shared::registry::{DeviceId, DeviceStatus, Registration};

use crate::answer::{Response, Source};
use crate::handler::handle;
use crate::handler_tests::{funk, sim, state, TestState, IMSI};

async fn call(s: &TestState, body: Value) -> Response {
    handle(body, &funk(sim(IMSI), None), s).await
}

async fn call_as(s: &TestState, imsi: &str, body: Value) -> Response {
    handle(body, &funk(sim(imsi), None), s).await
}

fn dps_calls(s: &TestState) -> usize {
    s.dps.registered.lock().unwrap().len()
}

fn recorded(s: &TestState) -> Registration {
    s.registry
        .get(&DeviceId::Sim(IMSI.into()))
        .and_then(|r| r.registration)
        .expect("a recorded registration")
}

#[tokio::test]
async fn a_registered_sim_is_answered_from_its_record_without_dps() {
    let s = state(&[]);
    let first = call(&s, json!({})).await;
    assert_eq!(
        (first.status_code, first.source),
        (200, Some(Source::Dps)),
        "{}",
        first.outline()
    );
    let fingerprint = s.keys.group_key().derive_device_key(IMSI).fingerprint();
    assert_eq!(recorded(&s).key_fingerprint, Some(fingerprint));

    let again = call(&s, json!({})).await;
    assert_eq!(
        (again.status_code, again.source),
        (200, Some(Source::Record))
    );
    assert!(again.body == first.body, "the same connection string");
    assert_eq!(again.assigned_hub, first.assigned_hub);
    assert_eq!(dps_calls(&s), 1, "no second DPS registration");
    let json = serde_json::to_value(&again).unwrap();
    assert_eq!(json["source"], "record");
}

#[tokio::test]
async fn a_rotated_group_key_sends_every_device_to_dps_again() {
    let s = state(&[]);
    let before = call(&s, json!({})).await;
    *s.keys.rotated.lock().unwrap() = Some("bmV3IGdyb3VwIGtleSwgbmV3IGRldmljZSBrZXlzIQ==".into());
    let after = call(&s, json!({})).await;
    assert_eq!((after.status_code, after.source), (200, Some(Source::Dps)));
    assert!(after.body != before.body, "the new derived key");
    assert_eq!(dps_calls(&s), 2);
    let settled = call(&s, json!({})).await;
    assert_eq!(settled.source, Some(Source::Record));
    assert!(settled.body == after.body);
}

#[tokio::test]
async fn a_record_without_a_fingerprint_or_for_another_id_does_not_answer() {
    let s = state(&[]);
    let mut entry = shared::registry::DeviceRecord::allowed(DeviceId::Sim(IMSI.into()));
    entry.status = DeviceStatus::Unlisted;
    entry.registration = Some(Registration {
        registration_id: IMSI.into(),
        assigned_hub: "hub-old.azure-devices.net".into(),
        device_id: IMSI.into(),
        registered_at: unix_now(),
        key_fingerprint: None,
        return_data: None,
        certificate: None,
    });
    s.registry.put(entry.clone());
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Dps));

    // Same key, but REGISTRATION_ID_TEMPLATE changed since: another DPS identity.
    let s = state(&[("REGISTRATION_ID_TEMPLATE", "soracom-{imsi}")]);
    let fingerprint = s.keys.group_key().derive_device_key(IMSI).fingerprint();
    if let Some(r) = entry.registration.as_mut() {
        r.key_fingerprint = Some(fingerprint);
    }
    s.registry.put(entry);
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Dps));
}

#[tokio::test]
async fn a_device_may_ask_for_a_new_registration() {
    let s = state(&[]);
    call(&s, json!({"note": 1})).await;
    let r = call(&s, json!({"reprovision": true, "note": 2})).await;
    assert_eq!((r.status_code, r.source), (200, Some(Source::Dps)));
    // `reprovision` is the function's, not custom allocation data.
    let sent = s.dps.registered.lock().unwrap().clone();
    assert_eq!(sent[1].1, Some(json!({"note": 2})));
    let r = call(&s, json!({"reprovision": false})).await;
    assert_eq!(r.source, Some(Source::Record));
    let r = call(&s, json!({"reprovision": "yes"})).await;
    assert_eq!((r.status_code, r.error), (400, Some("bad-request")));
    assert_eq!(dps_calls(&s), 2);
}

#[tokio::test]
async fn an_old_record_goes_to_dps_and_zero_means_always() {
    let s = state(&[("REREGISTER_AFTER_SECONDS", "3600")]);
    call(&s, json!({})).await;
    let mut entry = s.registry.get(&DeviceId::Sim(IMSI.into())).unwrap();
    if let Some(r) = entry.registration.as_mut() {
        r.registered_at = unix_now() - 3600;
    }
    s.registry.put(entry);
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Dps));
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Record));

    let always = state(&[("REREGISTER_AFTER_SECONDS", "0")]);
    for _ in 0..3 {
        assert_eq!(call(&always, json!({})).await.source, Some(Source::Dps));
    }
    assert_eq!(dps_calls(&always), 3);
}

#[tokio::test]
async fn a_sim_blocked_after_its_registration_gets_nothing_from_the_record() {
    let s = state(&[]);
    assert_eq!(call(&s, json!({})).await.status_code, 200);
    let mut entry = s.registry.get(&DeviceId::Sim(IMSI.into())).unwrap();
    entry.status = DeviceStatus::Blocked;
    s.registry.put(entry);
    let r = call(&s, json!({})).await;
    assert_eq!((r.status_code, r.error), (403, Some("sim-blocked")));
    assert_eq!(r.source, None);
    assert_eq!(dps_calls(&s), 1);
}

#[tokio::test]
async fn one_sim_cannot_cause_more_than_its_hourly_dps_registrations() {
    let s = state(&[("DPS_PER_SIM_PER_HOUR", "2")]);
    let ask = json!({"reprovision": true});
    for _ in 0..2 {
        assert_eq!(call(&s, ask.clone()).await.source, Some(Source::Dps));
    }
    // Past the limit, the record answers, even though the device asked for DPS.
    let r = call(&s, ask.clone()).await;
    assert_eq!((r.status_code, r.source), (200, Some(Source::Record)));
    assert_eq!(dps_calls(&s), 2);

    // Without a record: 429 and when to come back (the hour's first use leaves the window).
    *s.dps.answer.lock().unwrap() = Some(dps_client::DpsError::Throttled {
        retry_after: std::time::Duration::from_secs(3),
    });
    let other = "440103000000002";
    for _ in 0..2 {
        let r = call_as(&s, other, json!({})).await;
        assert_eq!(r.error, Some("dps-throttled"));
    }
    let r = call_as(&s, other, json!({})).await;
    assert_eq!((r.status_code, r.error), (429, Some("sim-rate-limited")));
    let retry_after = r.retry_after.expect("retryAfter");
    assert!((3590..=3600).contains(&retry_after), "{retry_after}");
    assert_eq!(dps_calls(&s), 4, "the third call never reached DPS");
}

#[tokio::test]
async fn the_fleet_budget_refuses_at_once_and_spreads_the_retries() {
    let mut s = state(&[]);
    // A budget of 3 per window, in a window no clock tick during the test can leave (window
    // start 0), divisible by 3: the refused are due exactly a third of a window apart.
    const WINDOW: u64 = 3 << 38;
    s.limits.fleet = MemoryBudget::new(3, WINDOW);
    let mut retries = Vec::new();
    for n in 0..9 {
        let r = call_as(&s, &format!("4401030000001{n:02}"), json!({})).await;
        match r.status_code {
            200 => assert_eq!(r.source, Some(Source::Dps)),
            503 => {
                assert_eq!(r.error, Some("dps-budget"));
                retries.push(r.retry_after.expect("retryAfter"));
            }
            _ => panic!("{}", r.outline()),
        }
    }
    assert_eq!(dps_calls(&s), 3, "the budget, exactly");
    assert_eq!(retries.len(), 6);
    // In the order refused: the next window's start, then a third and two thirds into it, then
    // the same in the window after: never more than the budget per window, never all at once.
    // (Each call reads the clock anew, so a second may pass between two of them.)
    let first_due = retries[0] as i128 + unix_now() as i128;
    assert!((first_due - WINDOW as i128).abs() <= 2, "{retries:?}");
    for pair in retries.windows(2) {
        let gap = pair[1] as i128 - pair[0] as i128;
        assert!((gap - (WINDOW / 3) as i128).abs() <= 2, "{retries:?}");
    }
}

#[tokio::test]
async fn over_budget_a_usable_record_answers_unless_the_device_asked_for_dps() {
    let mut s = state(&[("REREGISTER_AFTER_SECONDS", "0")]);
    // A budget of one in a window no clock tick during the test can leave: the second DPS
    // registration is over budget whenever the test runs.
    s.limits.fleet = MemoryBudget::new(1, 1 << 40);
    let first = call(&s, json!({})).await;
    assert_eq!(first.source, Some(Source::Dps));
    let r = call(&s, json!({})).await;
    assert_eq!((r.status_code, r.source), (200, Some(Source::Record)));
    assert!(r.body == first.body);
    let r = call(&s, json!({"reprovision": true})).await;
    assert_eq!((r.status_code, r.error), (503, Some("dps-budget")));
    assert!(r.retry_after.is_some());
}

#[tokio::test]
async fn limits_that_cannot_answer_start_nothing() {
    let s = state(&[]);
    s.limits
        .fleet
        .fail_with(Some(shared::quota::QuotaError::Throttled));
    let r = call(&s, json!({})).await;
    assert_eq!(
        (r.status_code, r.error),
        (503, Some("registry-unavailable"))
    );
    assert!(r.retry_after.is_some());
    assert_eq!(dps_calls(&s), 0);
}

#[tokio::test]
async fn dps_return_data_reaches_the_device_and_model_id_reaches_dps() {
    let s = state(&[("MODEL_ID", "dtmi:com:example:Thermostat;1")]);
    *s.dps.return_data.lock().unwrap() = Some(json!({"tier": "gold"}));
    let r = call(&s, json!({})).await;
    assert_eq!(r.return_data, Some(json!({"tier": "gold"})));
    assert_eq!(
        serde_json::to_value(&r).unwrap()["returnData"]["tier"],
        "gold"
    );
    // Answered from the record, the device gets the same data again.
    let again = call(&s, json!({})).await;
    assert_eq!(again.source, Some(Source::Record));
    assert_eq!(again.return_data, Some(json!({"tier": "gold"})));
    let r = call_as(
        &s,
        "440103000000003",
        json!({"modelId": "dtmi:com:example:Own;2", "a": 1}),
    )
    .await;
    assert_eq!(r.status_code, 200);
    let sent = s.dps.registered.lock().unwrap().clone();
    assert_eq!(
        sent[0].1,
        Some(json!({"modelId": "dtmi:com:example:Thermostat;1"}))
    );
    assert_eq!(
        sent[1].1,
        Some(json!({"modelId": "dtmi:com:example:Own;2", "a": 1}))
    );
}

fn opened(s: &TestState) -> (usize, usize) {
    use std::sync::atomic::Ordering::Relaxed;
    (s.dps.opened.load(Relaxed), s.dps.on_opened.load(Relaxed))
}

#[tokio::test]
async fn a_dps_registration_goes_over_the_connection_opened_during_the_checks() {
    let s = state(&[]);
    let r = call(&s, json!({})).await;
    assert_eq!(r.source, Some(Source::Dps), "{}", r.outline());
    assert_eq!(opened(&s), (1, 1), "opened once, and registered on it");
    // Answered from the record: no connection is opened at all.
    let r = call(&s, json!({})).await;
    assert_eq!(r.source, Some(Source::Record));
    assert_eq!(opened(&s), (1, 1));
    // Asked for DPS: opened while the table is read, and used.
    let r = call(&s, json!({"reprovision": true})).await;
    assert_eq!(r.source, Some(Source::Dps));
    assert_eq!(opened(&s), (2, 2));
}

#[tokio::test]
async fn a_refused_sim_sends_nothing_over_the_connection_opened_for_it() {
    let s = state(&[("REREGISTER_AFTER_SECONDS", "0")]);
    s.registry.put(crate::handler_tests::entry(
        DeviceId::Sim(IMSI.into()),
        DeviceStatus::Blocked,
        None,
    ));
    let r = call(&s, json!({})).await;
    assert_eq!((r.status_code, r.error), (403, Some("sim-blocked")));
    // Opened alongside the table read (the record could not have answered), then dropped.
    assert_eq!(opened(&s), (1, 0));
    assert_eq!(dps_calls(&s), 0);
}

#[tokio::test]
async fn over_budget_no_connection_is_opened_for_the_rest_of_the_minute() {
    let mut s = state(&[]);
    s.limits.fleet = MemoryBudget::new(1, 1 << 40);
    let r = call_as(&s, "440103000000101", json!({})).await;
    assert_eq!(r.status_code, 200, "{}", r.outline());
    // This instance does not know yet that the budget is spent: it opens, then drops.
    let r = call_as(&s, "440103000000102", json!({})).await;
    assert_eq!(r.error, Some("dps-budget"));
    assert_eq!(opened(&s), (2, 1));
    // Now it knows: a storm over budget costs DPS no handshakes.
    let r = call_as(&s, "440103000000103", json!({})).await;
    assert_eq!(r.error, Some("dps-budget"));
    assert_eq!(opened(&s), (2, 1));
}

/// In a storm a device may be refused by the fleet's budget many times: none of those calls
/// spends its SIM's hour, so it is not locked out for an hour once the budget has room.
#[tokio::test]
async fn budget_refusals_spend_nothing_of_the_sims_hour() {
    let mut s = state(&[("DPS_PER_SIM_PER_HOUR", "2")]);
    s.limits.fleet = MemoryBudget::new(1, 1 << 40);
    let first = call_as(&s, "440103000000201", json!({})).await;
    assert_eq!(first.status_code, 200, "{}", first.outline());
    for _ in 0..5 {
        let r = call(&s, json!({})).await;
        assert_eq!(r.error, Some("dps-budget"), "{}", r.outline());
    }
    // The budget has room again (a new window): the SIM's share is untouched.
    s.limits.fleet = MemoryBudget::new(1, 1 << 40);
    let r = call(&s, json!({})).await;
    assert_eq!(
        (r.status_code, r.source),
        (200, Some(Source::Dps)),
        "{}",
        r.outline()
    );
}

/// A SIM past its hourly share gives its unit of the fleet's budget back: a looping device
/// cannot spend the fleet's registrations.
#[tokio::test]
async fn a_sim_past_its_share_takes_nothing_from_the_fleet_budget() {
    let mut s = state(&[("DPS_PER_SIM_PER_HOUR", "1")]);
    s.limits.fleet = MemoryBudget::new(2, 1 << 40);
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Dps));
    // Past its share, its record answers (limits only ever hold back DPS).
    for _ in 0..3 {
        let looping = call(&s, json!({"reprovision": true})).await;
        assert_eq!(
            looping.source,
            Some(Source::Record),
            "{}",
            looping.outline()
        );
    }
    let other = call_as(&s, "440103000000202", json!({})).await;
    assert_eq!(other.source, Some(Source::Dps), "{}", other.outline());
    let third = call_as(&s, "440103000000203", json!({})).await;
    assert_eq!(third.error, Some("dps-budget"), "{}", third.outline());
}

/// A record write the table fails is tried again while the invocation has time: the next boot
/// is answered from the record; only when every attempt fails does the next boot go to DPS.
#[tokio::test]
async fn a_record_write_that_fails_is_tried_again() {
    let s = state(&[]);
    s.registry.fail_next_records(2);
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Dps));
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Record));

    let s = state(&[]);
    s.registry.fail_next_records(3);
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Dps));
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Dps));
    assert_eq!(dps_calls(&s), 2);
}

/// Issue: one SIM over its share held fleet-budget units with concurrent calls (taken, then
/// given back), pushing other SIMs' `retryAfter` later. A SIM known past its share never
/// touches the fleet's budget.
#[tokio::test]
async fn a_sim_past_its_share_holds_no_fleet_unit_even_concurrently() {
    let mut s = state(&[("DPS_PER_SIM_PER_HOUR", "1")]);
    s.limits.fleet = MemoryBudget::new(40, 1 << 40);
    assert_eq!(call(&s, json!({})).await.source, Some(Source::Dps));
    let taken = s.limits.fleet.taken();
    let looping = (0..40).map(|_| call(&s, json!({"reprovision": true})));
    for r in futures::future::join_all(looping).await {
        assert_eq!(r.source, Some(Source::Record), "{}", r.outline());
    }
    assert_eq!(
        s.limits.fleet.taken(),
        taken,
        "no unit taken, not even for a moment"
    );
    let other = call_as(&s, "440103000000204", json!({})).await;
    assert_eq!(
        (other.status_code, other.source),
        (200, Some(Source::Dps)),
        "{}",
        other.outline()
    );
}

/// Issue: a SIM blocked while its registration was in flight still got its key or certificate
/// (the record's conditional write failed, was logged, and the answer went out).
#[tokio::test]
async fn a_sim_blocked_while_dps_registers_it_gets_no_key_or_certificate() {
    for s in [state(&[]), crate::x509_tests::x509(&[])] {
        s.registry.block_before_next_record();
        let r = call(&s, json!({})).await;
        assert_eq!(
            (r.status_code, r.error),
            (403, Some("sim-blocked")),
            "{}",
            r.outline()
        );
        assert_eq!(
            dps_calls(&s),
            1,
            "DPS registered it before the block landed"
        );
        assert!(!r.body.contains("SharedAccessKey"), "{}", r.body);
        assert_eq!((r.certificate_pem, r.private_key_pem), (None, None));
        // Recorded for the card (its termination must find the device), not for the IMSI.
        assert_eq!(
            s.registry.card_imsis(crate::handler_tests::SIM_ID),
            vec![IMSI.to_owned()]
        );
        assert_eq!(recorded_or_none(&s), None);
    }
}

fn recorded_or_none(s: &TestState) -> Option<Registration> {
    s.registry
        .get(&DeviceId::Sim(IMSI.into()))
        .and_then(|r| r.registration)
}
