//! The DPS client (dps-client) in a real TLS MQTT conversation with the strict DPS simulator.

use crate::dps_fixture::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

use dps_client::{self as dps, DpsError, RegistrationRequest};
use local_emulators::dps_sim::{DpsLimits, DpsSimConfig, DpsSimulator, Fault};
use local_emulators::local_aws::random_key_base64;
use serde_json::json;
use shared::keys::SymmetricKey;
use tokio::time::Instant;

#[tokio::test]
async fn group_enrollment_is_assigned_with_its_allocation_data() {
    let f = simulator(|c| {
        c.polls_before_assign = 1;
        c.return_data = Some(json!({"tier": "gold"}));
    })
    .await;
    let payload = json!({"modelId": "dtmi:demo:sensor;1"});
    let key = f.group_key.derive_device_key(IMSI);
    let (result, _) = f
        .register_with(&key, Some(&payload), Duration::from_secs(5))
        .await;
    let assignment = result.unwrap();
    assert_eq!(assignment.device_id, IMSI);
    assert_eq!(assignment.status, "assigned");
    assert!(
        assignment.assigned_hub.starts_with("hub-"),
        "{}",
        assignment.assigned_hub
    );
    // DPS returns what the custom allocation policy returns, not what the device sent.
    assert_eq!(assignment.payload, Some(json!({"tier": "gold"})));
    let assigned = f.sim.assigned();
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0].payload, Some(payload));
    assert_eq!(f.sim.stats().polls.load(Ordering::Relaxed), 2);
    // SUBSCRIBE and register went in one flight; the subscription was in place for the answer.
    assert_eq!(f.sim.stats().undelivered.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn individual_enrollment_uses_its_own_key() {
    let device_key = SymmetricKey::from_base64(&random_key_base64()).unwrap();
    let k = device_key.clone();
    let f = simulator(move |c| {
        c.device_keys.insert(IMSI.into(), k);
    })
    .await;
    let (ok, _) = f
        .register_with(&device_key, None, Duration::from_secs(5))
        .await;
    assert_eq!(ok.unwrap().device_id, IMSI);
    // With an individual enrollment the group-derived key no longer opens the door.
    let (refused, _) = f.register(Duration::from_secs(5)).await;
    assert!(
        matches!(refused, Err(DpsError::Unauthorized(_))),
        "{refused:?}"
    );
}

#[tokio::test]
async fn wrong_key_is_refused_once_without_retries() {
    let f = simulator(|_| {}).await;
    let wrong = SymmetricKey::from_base64(&random_key_base64())
        .unwrap()
        .derive_device_key(IMSI);
    let (result, elapsed) = f.register_with(&wrong, None, Duration::from_secs(5)).await;
    assert!(
        matches!(result, Err(DpsError::Unauthorized(_))),
        "{result:?}"
    );
    assert_eq!(f.sim.stats().connections.load(Ordering::Relaxed), 1);
    assert_eq!(f.sim.stats().refused.load(Ordering::Relaxed), 1);
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn throttling_is_ridden_out_when_time_allows() {
    let f = simulator(|c| {
        c.faults = vec![Fault::ThrottleRegister(3), Fault::ThrottlePoll(2)];
    })
    .await;
    let (result, _) = f.register(Duration::from_secs(8)).await;
    assert_eq!(result.unwrap().device_id, IMSI);
    let stats = f.sim.stats();
    assert_eq!(stats.throttled.load(Ordering::Relaxed), 5);
    assert_eq!(stats.registers.load(Ordering::Relaxed), 4);
    assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn throttling_beyond_the_deadline_says_when_to_retry() {
    let f = simulator(|c| {
        c.faults = vec![Fault::ThrottleRegister(100)];
        c.retry_after = 5;
    })
    .await;
    let budget = Duration::from_secs(3);
    let (result, elapsed) = f.register(budget).await;
    match result {
        Err(DpsError::Throttled { retry_after }) => assert!(retry_after >= Duration::from_secs(5)),
        other => panic!("{other:?}"),
    }
    // It does not sit out a wait it cannot afford (the budget is 3 s).
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn final_errors_are_not_retried() {
    for status in [401u16, 403, 404] {
        let f = simulator(|c| c.faults = vec![Fault::RegisterStatus(status)]).await;
        let (result, _) = f.register(Duration::from_secs(5)).await;
        match result {
            Err(DpsError::Rejected {
                status: s,
                error_code,
            }) => {
                assert_eq!(s, status);
                assert_eq!(error_code, i64::from(status) * 1000 + 1);
            }
            other => panic!("{status}: {other:?}"),
        }
        assert_eq!(
            f.sim.stats().registers.load(Ordering::Relaxed),
            1,
            "{status}"
        );
    }
}

#[tokio::test]
async fn server_errors_are_retried_then_reported() {
    let f = simulator(|c| {
        c.faults = vec![Fault::RegisterStatus(500)];
        c.retry_after = 1;
    })
    .await;
    let budget = Duration::from_millis(2500);
    let (result, elapsed) = f.register(budget).await;
    assert!(
        matches!(result, Err(DpsError::Upstream { status: 500 })),
        "{result:?}"
    );
    assert!(f.sim.stats().registers.load(Ordering::Relaxed) >= 2);
    assert_within(elapsed, budget);
}

#[tokio::test]
async fn disabled_enrollment_is_not_assigned() {
    let f = simulator(|c| c.faults = vec![Fault::Disabled]).await;
    let (result, _) = f.register(Duration::from_secs(5)).await;
    assert_eq!(
        result.unwrap_err(),
        DpsError::NotAssigned {
            status: "disabled".into(),
            error_code: 401010
        }
    );
}

#[tokio::test]
async fn dropped_connections_end_within_the_deadline() {
    let f = simulator(|c| c.faults = vec![Fault::DropAfterConnack]).await;
    let budget = Duration::from_secs(4);
    let (result, elapsed) = f.register(budget).await;
    assert!(matches!(result, Err(DpsError::Connection(_))), "{result:?}");
    assert_eq!(f.sim.stats().connections.load(Ordering::Relaxed), 3);
    assert_within(elapsed, budget);
}

#[tokio::test]
async fn slow_and_never_assigning_dps_hit_the_deadline() {
    let slow = simulator(|c| c.faults = vec![Fault::Slow(Duration::from_secs(5))]).await;
    let budget = Duration::from_millis(1200);
    let (result, elapsed) = slow.register(budget).await;
    assert!(
        matches!(result, Err(DpsError::Deadline { .. })),
        "{result:?}"
    );
    assert_within(elapsed, budget);

    let never = simulator(|c| {
        c.faults = vec![Fault::NeverAssign];
        c.retry_after = 1;
    })
    .await;
    let budget = Duration::from_millis(2500);
    let (result, elapsed) = never.register(budget).await;
    assert!(
        matches!(result, Err(DpsError::Deadline { .. })),
        "{result:?}"
    );
    assert_within(elapsed, budget);
    let polls = never.sim.stats().polls.load(Ordering::Relaxed);
    assert!(
        (1..=3).contains(&polls),
        "polled {polls} times with retry-after 1 s"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_is_refused() {
    let f = simulator(|_| {}).await;
    let other_ca = DpsSimulator::start(DpsSimConfig::new(SCOPE), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let tls = dps::tls_config(Some(other_ca.ca_pem().as_bytes())).unwrap();
    let key = f.group_key.derive_device_key(IMSI);
    let request = RegistrationRequest {
        endpoint: &f.endpoint,
        id_scope: SCOPE,
        registration_id: IMSI,
        attestation: dps_client::Attestation::SymmetricKey(&key),
        payload: None,
        tls,
    };
    let result = dps::register(&request, Instant::now() + Duration::from_secs(5)).await;
    assert!(matches!(result, Err(DpsError::Tls(_))), "{result:?}");
    assert!(f.sim.assigned().is_empty());
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_without_retries() {
    // DPS presents a certificate for another host (DNS hijack, wrong DPS_ENDPOINT): refused at
    // the handshake, reported as a TLS error, and not retried.
    let f = simulator(|c| c.tls_names = vec!["dps.other.example".into()]).await;
    let budget = Duration::from_secs(5);
    let (result, elapsed) = f.register(budget).await;
    match &result {
        Err(DpsError::Tls(m)) => assert!(m.contains("not valid for name"), "{m}"),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
    assert_within(elapsed, budget);
    assert_eq!(f.sim.stats().accepted.load(Ordering::Relaxed), 1);
    assert_eq!(f.sim.stats().connections.load(Ordering::Relaxed), 0);
    assert!(f.sim.assigned().is_empty());
}

#[tokio::test]
async fn sas_expiry_tolerates_clock_skew_within_the_token_lifetime() {
    // Tokens live 5 minutes. A DPS clock 4 minutes ahead still accepts them; 6 minutes ahead,
    // they are already expired there: refused once, not retried, within the budget.
    let ahead_4 = simulator(|c| c.clock_offset_secs = 240).await;
    let (result, _) = ahead_4.register(Duration::from_secs(5)).await;
    assert!(result.is_ok(), "{result:?}");

    let ahead_6 = simulator(|c| c.clock_offset_secs = 360).await;
    let budget = Duration::from_secs(5);
    let (result, elapsed) = ahead_6.register(budget).await;
    assert!(
        matches!(result, Err(DpsError::Unauthorized(_))),
        "{result:?}"
    );
    assert_within(elapsed, budget);
    assert_eq!(ahead_6.sim.stats().connections.load(Ordering::Relaxed), 1);
    assert_eq!(ahead_6.sim.stats().refused.load(Ordering::Relaxed), 1);
}

/// Each transient failure the client used to report as final (a CONNACK "server unavailable"
/// read as a refused device, a reset during the TLS handshake, a registration failed on DPS's
/// side, an expired operation): ridden out on the next try when it passes.
#[tokio::test]
async fn transient_dps_failures_are_ridden_out_within_the_deadline() {
    for fault in transient_faults(1) {
        let f = simulator(|c| c.faults = vec![fault.clone()]).await;
        let (result, _) = f.register(Duration::from_secs(8)).await;
        assert_eq!(
            result.map(|a| a.device_id),
            Ok(IMSI.to_owned()),
            "{fault:?}"
        );
        assert_eq!(f.sim.assigned().len(), 1, "{fault:?}");
    }
}

/// The same failures, lasting: reported as retryable, never as a refused device, and within the
/// deadline.
#[tokio::test]
async fn lasting_transient_failures_are_reported_as_retryable() {
    for fault in transient_faults(100) {
        let f = simulator(|c| {
            c.faults = vec![fault.clone()];
            c.retry_after = 1;
        })
        .await;
        let budget = Duration::from_millis(3500);
        let (result, elapsed) = f.register(budget).await;
        let error = result.expect_err("a lasting fault cannot succeed");
        assert!(
            matches!(
                error,
                DpsError::Connection(_) | DpsError::Upstream { .. } | DpsError::Deadline { .. }
            ),
            "{fault:?}: {error:?}"
        );
        assert!(error.retry_after().is_some(), "{fault:?}: {error:?}");
        assert_within(elapsed, budget);
    }
}

/// DPS's quota on registrations per minute: past it, 429 with the wait until the minute has
/// room, which the client reports as retryable when it exceeds the deadline.
#[tokio::test]
async fn the_registrations_quota_is_enforced_as_dps_does() {
    let f = simulator(|c| {
        c.limits = DpsLimits {
            registrations_per_minute: Some(2),
            polls_per_device_per_10s: None,
        };
    })
    .await;
    for _ in 0..2 {
        let (result, _) = f.register(Duration::from_secs(5)).await;
        assert!(result.is_ok(), "{result:?}");
    }
    let budget = Duration::from_secs(2);
    let (result, elapsed) = f.register(budget).await;
    let error = result.unwrap_err();
    assert!(matches!(error, DpsError::Throttled { .. }), "{error:?}");
    assert!(
        error
            .retry_after()
            .is_some_and(|r| r >= Duration::from_secs(50)),
        "{error:?}"
    );
    assert_within(elapsed, budget);
    assert_eq!(f.sim.stats().over_quota.load(Ordering::Relaxed), 1);
    assert_eq!(f.sim.assigned().len(), 2);
}

/// DPS's quota on polls per device (5 in 10 s): a client that polls faster is answered 429.
#[tokio::test]
async fn the_polling_quota_is_enforced_per_device() {
    let f = simulator(|c| {
        c.faults = vec![Fault::NeverAssign];
        c.retry_after = 0;
        c.limits = DpsLimits {
            registrations_per_minute: None,
            polls_per_device_per_10s: Some(5),
        };
    })
    .await;
    let (result, _) = f.register(Duration::from_secs(2)).await;
    assert!(result.is_err());
    assert!(f.sim.stats().over_quota.load(Ordering::Relaxed) >= 1);
    assert!(f.sim.stats().polls.load(Ordering::Relaxed) > 5);
}

/// DPS takes a while to assign: polls before then answer `assigning`; a client with less
/// time than that gets a retryable deadline, one with enough gets its hub.
#[tokio::test]
async fn assignment_takes_the_configured_delay() {
    let f = simulator(|c| {
        c.assignment_delay = Duration::from_millis(1500);
        c.retry_after = 1;
    })
    .await;
    let (result, elapsed) = f.register(Duration::from_secs(1)).await;
    assert!(
        matches!(result, Err(DpsError::Deadline { .. })),
        "{result:?}"
    );
    assert_within(elapsed, Duration::from_secs(1));
    let (result, elapsed) = f.register(Duration::from_secs(6)).await;
    assert!(result.is_ok(), "{result:?}");
    assert!(elapsed >= Duration::from_millis(1500), "{elapsed:?}");
}
