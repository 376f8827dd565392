//! Fleet provisioning: the fleet-prehook function's real handler against the device table on the
//! local AWS endpoint, fed the sample events in events/fleet-prehook/.

use crate::fleet_fixture::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_prehook::handler::{evaluate, handle};
use serde_json::Value;
use shared::clock::unix_now;
use shared::registry::{
    ClaimLog, ClaimRecord, DeviceId, DeviceRecord, DynamoRegistry, ProvisioningState,
};

#[tokio::test]
async fn allowed_serial_gets_overrides_from_the_table_and_is_recorded() {
    let (_aws, registry) = setup().await;
    let mut e = event("allowed.json");
    // A device trying to set its own overrides gets nothing from it.
    e["parameters"]["Location"] = Value::String("attacker-chosen".into());
    let response = handle(e.clone(), &config(&[]), &registry).await;
    assert!(response.allow_provisioning);
    assert_eq!(
        response
            .parameter_overrides
            .get("Location")
            .map(String::as_str),
        Some("tokyo-1")
    );

    let record = registry
        .get(&DeviceId::Serial("SN-0001".into()))
        .await
        .unwrap()
        .unwrap();
    let provisioning = record.provisioning.unwrap();
    assert_eq!(
        provisioning.certificate_id,
        e["certificateId"].as_str().unwrap()
    );
    assert_eq!(
        provisioning.claim_certificate_id.as_deref(),
        e["claimCertificateId"].as_str()
    );

    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(json["allowProvisioning"], true);
    assert_eq!(json["parameterOverrides"]["Location"], "tokyo-1");
}

#[tokio::test]
async fn unknown_blocked_and_malformed_are_denied_with_reasons() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    assert_eq!(
        denial(event("unknown-serial.json"), &c, &registry)
            .await
            .code
            .code(),
        "unknown-serial"
    );
    assert_eq!(
        denial(event("blocked-serial.json"), &c, &registry)
            .await
            .code
            .code(),
        "serial-blocked"
    );
    assert_eq!(
        denial(event("malformed.json"), &c, &registry)
            .await
            .code
            .code(),
        "malformed-request"
    );
    assert_eq!(
        denial(Value::String("x".into()), &c, &registry)
            .await
            .code
            .code(),
        "malformed-request"
    );
    let mut bad_serial = event("allowed.json");
    bad_serial["parameters"]["SerialNumber"] = Value::String("SN 0001; DROP".into());
    assert_eq!(
        denial(bad_serial, &c, &registry).await.code.code(),
        "serial-format"
    );

    let response = handle(event("malformed.json"), &c, &registry).await;
    assert!(!response.allow_provisioning && response.parameter_overrides.is_empty());
}

#[tokio::test]
async fn misnamed_serial_parameter_says_which_names_arrived() {
    let (_aws, registry) = setup().await;
    let d = denial(event("misnamed-parameter.json"), &config(&[]), &registry).await;
    assert_eq!(d.code.code(), "missing-serial-parameter");
    assert!(
        d.detail.contains("'SerialNumber'") && d.detail.contains("device_serial"),
        "{}",
        d.detail
    );
    // Configured to the template's actual name, the same request passes.
    let renamed = config(&[("SERIAL_PARAMETER", "device_serial")]);
    assert!(
        evaluate(event("misnamed-parameter.json"), &renamed, &registry)
            .await
            .0
            .is_ok()
    );
}

#[tokio::test]
async fn provisioned_serial_needs_the_same_certificate_or_reprovisioning() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    assert!(evaluate(event("allowed.json"), &c, &registry)
        .await
        .0
        .is_ok());
    // AWS IoT retrying the same certificate is fine.
    assert!(evaluate(event("allowed.json"), &c, &registry)
        .await
        .0
        .is_ok());
    let other = with_certificate(event("allowed.json"), "another-certificate");
    assert_eq!(
        denial(other.clone(), &c, &registry).await.code.code(),
        "already-provisioned"
    );

    allow_reprovisioning(&registry, "SN-0001").await;
    assert!(evaluate(other, &c, &registry).await.0.is_ok());
}

#[tokio::test]
async fn claim_binding_is_enforced() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    let claim_id = event("allowed.json")["claimCertificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    let far = 4_000_000_000;
    registry
        .record_claim(&ClaimRecord {
            certificate_id: claim_id.clone(),
            issued_to: "installer-sub".into(),
            serial: Some("SN-0002".into()),
            issued_at: 1,
            valid_until: far,
            retain_until: far,
            used: None,
        })
        .await
        .unwrap();
    assert_eq!(
        denial(event("allowed.json"), &c, &registry)
            .await
            .code
            .code(),
        "claim-bound-elsewhere"
    );

    let strict = config(&[("REQUIRE_CLAIM_RECORD", "true")]);
    let mut unrecorded = event("allowed.json");
    unrecorded["claimCertificateId"] = Value::String("not-from-claim-issuer".into());
    assert_eq!(
        denial(unrecorded, &strict, &registry).await.code.code(),
        "claim-unknown"
    );

    registry
        .record_claim(&ClaimRecord {
            certificate_id: "bound-to-sn-0001".into(),
            issued_to: "installer-sub".into(),
            serial: Some("SN-0001".into()),
            issued_at: 1,
            valid_until: far,
            retain_until: far,
            used: None,
        })
        .await
        .unwrap();
    let mut bound = event("allowed.json");
    bound["claimCertificateId"] = Value::String("bound-to-sn-0001".into());
    assert!(evaluate(bound, &strict, &registry).await.0.is_ok());
}

/// The hole: a claim requested without a serial, held by anyone for its 5 minutes, could loop
/// RegisterThing over every allowed serial. A recorded claim now provisions one device, once.
#[tokio::test]
async fn a_claim_certificate_provisions_one_device_once() {
    let (_aws, registry) = setup().await;
    registry
        .put(&DeviceRecord::allowed(DeviceId::Serial("SN-0002".into())))
        .await
        .unwrap();
    let c = config(&[("REQUIRE_CLAIM_RECORD", "true")]);
    record_claim(&registry, "unbound-claim", None, unix_now() + 300).await;
    let first = hook_event("SN-0001", "cert-1", "unbound-claim");
    assert!(evaluate(first.clone(), &c, &registry).await.0.is_ok());
    // AWS IoT retrying the same RegisterThing is not a second use.
    assert!(evaluate(first, &c, &registry).await.0.is_ok());
    let second = hook_event("SN-0002", "cert-2", "unbound-claim");
    assert_eq!(
        denial(second, &c, &registry).await.code.code(),
        "claim-already-used"
    );
    let untouched = registry
        .get(&DeviceId::Serial("SN-0002".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(untouched.provisioning, None);
    let claim = registry.claim("unbound-claim").await.unwrap().unwrap();
    let used = claim.used.unwrap();
    assert_eq!(
        (used.certificate_id.as_str(), used.serial.as_str()),
        ("cert-1", "SN-0001")
    );
}

/// TLS checks a claim's validity when the connection opens; a connection opened in its last
/// second may call RegisterThing long after. The hook checks the recorded validity itself.
#[tokio::test]
async fn a_claim_past_its_validity_is_denied_whatever_tls_let_through() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    record_claim(&registry, "expired-claim", Some("SN-0001"), unix_now() - 1).await;
    assert_eq!(
        denial(
            hook_event("SN-0001", "cert-1", "expired-claim"),
            &c,
            &registry
        )
        .await
        .code
        .code(),
        "claim-expired"
    );
}

/// The hole: `allow_reprovision` was a permanent flag, and two certificates racing both passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_reprovision_is_single_use() {
    let (_aws, registry) = setup().await;
    let c = Arc::new(config(&[]));
    assert!(evaluate(event("allowed.json"), &c, &registry)
        .await
        .0
        .is_ok());
    let original = event("allowed.json")["certificateId"]
        .as_str()
        .unwrap()
        .to_owned();
    allow_reprovisioning(&registry, "SN-0001").await;
    let registry = Arc::new(registry);
    let racers: Vec<_> = (0..4)
        .map(|i| {
            let (registry, c) = (Arc::clone(&registry), Arc::clone(&c));
            tokio::spawn(async move {
                let e = with_certificate(event("allowed.json"), &format!("replacement-{i}"));
                evaluate(e, &c, registry.as_ref()).await.0.is_ok()
            })
        })
        .collect();
    let mut passed = 0;
    for racer in racers {
        passed += usize::from(racer.await.unwrap());
    }
    assert_eq!(passed, 1, "exactly one re-provisioning passes");
    let record = registry
        .get(&DeviceId::Serial("SN-0001".into()))
        .await
        .unwrap()
        .unwrap();
    assert!(!record.allow_reprovision);
    assert_eq!(
        record.provisioning.unwrap().replaced_certificate_id,
        Some(original),
        "the replaced certificate is kept for the operator to revoke"
    );
    let later = with_certificate(event("allowed.json"), "yet-another");
    assert_eq!(
        denial(later, &c, registry.as_ref()).await.code.code(),
        "already-provisioned"
    );
}

/// The hole: the hook recorded `provisioned` before AWS IoT finished; a device whose template
/// then failed (or that lost its new key) was denied `already-provisioned` forever. Now the
/// record is pending, and the installer whose claim made it may replace it after
/// PENDING_SECONDS (another installer may not: `an_installer_cannot_take_over_...` in the
/// hook's unit tests).
#[tokio::test]
async fn a_device_that_failed_after_the_hook_said_yes_is_not_locked_out() {
    let (_aws, registry) = setup().await;
    let claim = |id: &str| ClaimRecord {
        certificate_id: id.into(),
        issued_to: "installer-sub".into(),
        serial: Some("SN-0001".into()),
        issued_at: unix_now(),
        valid_until: unix_now() + 300,
        retain_until: unix_now() + 86_400,
        used: None,
    };
    let first = event("allowed.json");
    let first_claim = first["claimCertificateId"].as_str().unwrap().to_owned();
    for id in [first_claim.as_str(), "second-claim"] {
        registry.record_claim(&claim(id)).await.unwrap();
    }
    assert!(evaluate(first, &config(&[]), &registry).await.0.is_ok());
    let mut retry = with_certificate(event("allowed.json"), "second-attempt");
    retry["claimCertificateId"] = Value::String("second-claim".into());
    // Within PENDING_SECONDS (default 600) the pending certificate stands.
    assert_eq!(
        denial(retry.clone(), &config(&[]), &registry)
            .await
            .code
            .code(),
        "already-provisioned"
    );
    // Once it is older than PENDING_SECONDS, the device's next attempt replaces it.
    let patient = config(&[("PENDING_SECONDS", "0")]);
    assert!(evaluate(retry, &patient, &registry).await.0.is_ok());
    let mut record = registry
        .get(&DeviceId::Serial("SN-0001".into()))
        .await
        .unwrap()
        .unwrap();
    let provisioning = record.provisioning.clone().unwrap();
    assert_eq!(provisioning.certificate_id, "second-attempt");
    assert_eq!(provisioning.state, ProvisioningState::Pending);

    // A confirmed provisioning is never replaced that way.
    record.provisioning = Some(shared::registry::Provisioning {
        state: ProvisioningState::Confirmed,
        ..provisioning
    });
    registry.put(&record).await.unwrap();
    let third = with_certificate(event("allowed.json"), "third-attempt");
    assert_eq!(
        denial(third, &patient, &registry).await.code.code(),
        "already-provisioned"
    );
}

#[tokio::test]
async fn concurrent_requests_for_one_serial_allow_exactly_one() {
    let (_aws, registry) = setup().await;
    let registry = Arc::new(registry);
    let c = Arc::new(config(&[]));
    let attempts: Vec<_> = (0..6)
        .map(|i| {
            let (registry, c) = (Arc::clone(&registry), Arc::clone(&c));
            tokio::spawn(async move {
                let e = with_certificate(event("allowed.json"), &format!("cert-{i}"));
                handle(e, &c, registry.as_ref()).await.allow_provisioning
            })
        })
        .collect();
    let mut allowed = 0;
    for a in attempts {
        allowed += usize::from(a.await.unwrap());
    }
    assert_eq!(allowed, 1);
}

#[tokio::test]
async fn an_allow_does_not_leak_into_the_next_decision() {
    let (_aws, registry) = setup().await;
    let c = config(&[]);
    let first = handle(event("allowed.json"), &c, &registry).await;
    assert!(first.allow_provisioning && !first.parameter_overrides.is_empty());
    let second = handle(event("unknown-serial.json"), &c, &registry).await;
    assert!(!second.allow_provisioning);
    assert!(second.parameter_overrides.is_empty());
}

#[tokio::test]
async fn table_unavailable_denies_within_the_budget() {
    let (aws, registry) = setup().await;
    drop(aws);
    let c = config(&[("DECISION_BUDGET_MS", "2000")]);
    let started = Instant::now();
    let d = denial(event("allowed.json"), &c, &registry).await;
    assert!(
        d.code.code() == "registry-unavailable" || d.code.code() == "deadline",
        "{d:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
}

/// The device table stopped, slow or throttling (through a fault proxy): the hook denies with
/// a reason that says which, within its budget, and allows the same request after recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_faults_deny_with_their_reason_and_recover() {
    use local_emulators::fault_proxy::{FaultProxy, Mode};
    use local_emulators::local_aws::local_sdk_config;

    let (aws, _) = setup().await;
    // A budget above the SDK's 3 s operation timeout: the SDK's own bound decides first. Its
    // retries back off at random, so a throttling table ends as throttled or as timed out.
    let c = config(&[("DECISION_BUDGET_MS", "4000")]);
    let modes: [(Mode, &[&str]); 3] = [
        (Mode::Stopped, &["registry-unavailable"]),
        (
            Mode::Slow(Duration::from_secs(30)),
            &["registry-unavailable"],
        ),
        (
            Mode::Throttle,
            &["registry-throttled", "registry-unavailable"],
        ),
    ];
    for (n, (mode, expected)) in modes.into_iter().enumerate() {
        let proxy = FaultProxy::start(aws.endpoint()).await.unwrap();
        let client = aws_sdk_dynamodb::Client::new(&local_sdk_config(&proxy.endpoint()).await);
        let registry = DynamoRegistry::new(client, TABLE);
        let certificate = format!("cert-fault-{n}");
        proxy.set(mode);
        let started = Instant::now();
        let e = with_certificate(event("allowed.json"), &certificate);
        let d = denial(e.clone(), &c, &registry).await;
        assert!(expected.contains(&d.code.code()), "{mode:?}: {d:?}");
        assert!(
            started.elapsed() < Duration::from_millis(4000),
            "{mode:?}: {:?}",
            started.elapsed()
        );

        proxy.set(Mode::Pass);
        // SN-0001 may be provisioned once: allow re-provisioning so each round can succeed.
        allow_reprovisioning(&registry, "SN-0001").await;
        let (decision, _) = evaluate(e, &c, &registry).await;
        assert!(decision.is_ok(), "{mode:?} after recovery: {decision:?}");
    }
}
