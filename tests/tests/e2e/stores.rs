//! The SSM and DynamoDB adapters of `shared`, through the real AWS SDK, against a real local
//! endpoint (moto server).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_ssm::types::ParameterType;
use local_emulators::local_aws::{random_key_base64, LocalAws};
use shared::budget::{Budget, DynamoBudget, Grant};
use shared::keys::{KeyError, SymmetricKey};
use shared::registry::{
    ClaimLog, ClaimRecord, ClaimUse, ClaimUsed, Confirmation, Confirmations, DeviceId,
    DeviceRecord, DeviceStatus, DynamoRegistry, IssuedCertificate, Provisioning, ProvisioningState,
    ProvisioningWrite, Registration, RegistryError, Replaces, SerialRegistry, SimRegistry,
};
use shared::secrets::{
    load_key, CachedSecretStore, DynamoSecretStore, KeyLookupError, SecretError, SecretStore,
    SsmSecretStore,
};

const TABLE: &str = "devices";

async fn aws() -> LocalAws {
    LocalAws::start().await.expect("local AWS endpoint")
}

async fn with_table() -> (LocalAws, DynamoRegistry) {
    let aws = aws().await;
    aws.create_devices_table(TABLE).await.unwrap();
    let registry = DynamoRegistry::new(aws.dynamodb().await, TABLE);
    (aws, registry)
}

#[tokio::test]
async fn ssm_secure_string_is_read_decrypted_and_decoded() {
    let aws = aws().await;
    let group_key = random_key_base64();
    aws.put_parameter("/dps/group-key", &group_key, ParameterType::SecureString)
        .await
        .unwrap();
    let store = SsmSecretStore::new(aws.ssm().await);

    let key = load_key(&store, "/dps/group-key").await.unwrap();
    assert_eq!(key.to_base64(), group_key);
    let expected = SymmetricKey::from_base64(&group_key)
        .unwrap()
        .derive_device_key("440103123456789");
    assert_eq!(key.derive_device_key("440103123456789"), expected);
}

#[tokio::test]
async fn ssm_refusals_name_the_parameter_and_never_the_value() {
    let aws = aws().await;
    aws.put_parameter("/dps/plain", "c2VjcmV0", ParameterType::String)
        .await
        .unwrap();
    aws.put_parameter(
        "/dps/garbage",
        "not*a*key-TOPSECRET",
        ParameterType::SecureString,
    )
    .await
    .unwrap();
    let store = SsmSecretStore::new(aws.ssm().await);

    let missing = load_key(&store, "/dps/missing").await.unwrap_err();
    assert_eq!(
        missing,
        KeyLookupError::Secret(SecretError::NotFound("/dps/missing".into()))
    );
    assert_eq!(missing.to_string(), "secret /dps/missing not found");

    let plain = store.get("/dps/plain").await.unwrap_err();
    assert_eq!(plain, SecretError::NotEncrypted("/dps/plain".into()));

    let garbage = load_key(&store, "/dps/garbage").await.unwrap_err();
    assert_eq!(
        garbage,
        KeyLookupError::Key {
            name: "/dps/garbage".into(),
            source: KeyError::NotBase64
        }
    );
    let shown = format!("{garbage} {garbage:?}");
    assert!(
        shown.contains("/dps/garbage") && !shown.contains("TOPSECRET"),
        "{shown}"
    );
}

#[tokio::test]
async fn cached_store_serves_warm_lookups_without_ssm() {
    let aws = aws().await;
    let ssm = aws.ssm().await;
    aws.put_parameter("/k", "a2V5", ParameterType::SecureString)
        .await
        .unwrap();
    let cached = CachedSecretStore::new(SsmSecretStore::new(ssm.clone()), Duration::from_secs(300));
    assert_eq!(cached.get("/k").await.unwrap().expose(), "a2V5");

    // Gone from SSM, still served from the cache: the second lookup never reached SSM.
    ssm.delete_parameter().name("/k").send().await.unwrap();
    assert_eq!(cached.get("/k").await.unwrap().expose(), "a2V5");

    let uncached = CachedSecretStore::new(SsmSecretStore::new(ssm), Duration::ZERO);
    assert_eq!(
        uncached.get("/k").await.unwrap_err(),
        SecretError::NotFound("/k".into())
    );
}

#[tokio::test]
async fn individual_keys_come_from_the_device_table() {
    let (aws, registry) = with_table().await;
    let db = aws.dynamodb().await;
    let device_key = random_key_base64();
    db.put_item()
        .table_name(TABLE)
        .item("pk", AttributeValue::S("sim#440103123456789".into()))
        .item("status", AttributeValue::S("allowed".into()))
        .item("device_key", AttributeValue::S(device_key.clone()))
        .send()
        .await
        .unwrap();
    let store = DynamoSecretStore::new(db, TABLE, "device_key");
    let key = load_key(&store, "sim#440103123456789").await.unwrap();
    assert_eq!(key.to_base64(), device_key);
    assert_eq!(
        store.get("sim#295000000000000").await.unwrap_err(),
        SecretError::NotFound("sim#295000000000000".into())
    );

    // The record read by the registry never carries the key.
    let record = registry
        .get(&DeviceId::Sim("440103123456789".into()))
        .await
        .unwrap()
        .unwrap();
    assert!(!format!("{record:?}").contains(&device_key));
}

#[tokio::test]
async fn registry_round_trips_records() {
    let (_aws, registry) = with_table().await;
    let id = DeviceId::Serial("SN-0001".into());
    assert_eq!(registry.get(&id).await.unwrap(), None);

    let mut record = DeviceRecord::allowed(id.clone());
    record.valid_until = Some(4_000_000_000);
    record.overrides = BTreeMap::from([("Location".to_owned(), "tokyo-1".to_owned())]);
    registry.put(&record).await.unwrap();
    assert_eq!(registry.get(&id).await.unwrap(), Some(record));
}

#[tokio::test]
async fn registration_is_recorded_unless_the_sim_is_blocked() {
    let (_aws, registry) = with_table().await;
    let registration = Registration {
        registration_id: "440103123456789".into(),
        assigned_hub: "hub-a.azure-devices.net".into(),
        device_id: "440103123456789".into(),
        registered_at: 1_700_000_000,
        key_fingerprint: Some("00112233445566778899aabbccddeeff".into()),
        return_data: Some(r#"{"tier":"gold"}"#.into()),
        certificate: Some(IssuedCertificate {
            serial: "5a0b".into(),
            fingerprint: "ab".repeat(32),
            expires_at: 1_731_536_000,
        }),
    };
    // An unknown SIM (group enrollment without an allowlist entry) gets a record.
    registry
        .record_registration("440103123456789", None, &registration)
        .await
        .unwrap();
    let record = registry
        .get(&DeviceId::Sim("440103123456789".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.registration, Some(registration.clone()));
    // A later registration without a fingerprint or certificate leaves none behind: the record
    // would otherwise vouch for a key or certificate it was not made with.
    let unknown_key = Registration {
        key_fingerprint: None,
        return_data: None,
        certificate: None,
        registered_at: 1_700_000_100,
        ..registration.clone()
    };
    registry
        .record_registration("440103123456789", None, &unknown_key)
        .await
        .unwrap();
    let record = registry
        .get(&DeviceId::Sim("440103123456789".into()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(record.registration, Some(unknown_key));

    let mut blocked = DeviceRecord::allowed(DeviceId::Sim("440103999999999".into()));
    blocked.status = DeviceStatus::Blocked;
    registry.put(&blocked).await.unwrap();
    assert_eq!(
        registry
            .record_registration("440103999999999", None, &registration)
            .await
            .unwrap_err(),
        RegistryError::Conflict("sim#440103999999999".into())
    );
}

const AT: u64 = 1_700_000_000;

fn write(serial: &str, cert: &str, replaces: Replaces) -> ProvisioningWrite {
    ProvisioningWrite {
        serial: serial.into(),
        certificate_id: cert.into(),
        claim_certificate_id: Some("claim-1".into()),
        spend_claim: None,
        issued_to: Some("installer-a".into()),
        at: AT,
        replaces,
    }
}

async fn provisioned(registry: &DynamoRegistry, serial: &str) -> DeviceRecord {
    registry
        .get(&DeviceId::Serial(serial.into()))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn provisioning_is_conditional() {
    let (_aws, registry) = with_table().await;
    let conflict = |serial: &str| RegistryError::Conflict(format!("serial#{serial}"));

    // Unknown serial: nothing to provision.
    assert_eq!(
        registry
            .record_provisioning(&write("SN-X", "c1", Replaces::Nothing))
            .await,
        Err(conflict("SN-X"))
    );

    registry
        .put(&DeviceRecord::allowed(DeviceId::Serial("SN-1".into())))
        .await
        .unwrap();
    registry
        .record_provisioning(&write("SN-1", "c1", Replaces::Nothing))
        .await
        .unwrap();
    // The same certificate again (AWS IoT retrying) is fine; another one as if first is not.
    registry
        .record_provisioning(&write("SN-1", "c1", Replaces::Itself))
        .await
        .unwrap();
    assert_eq!(
        registry
            .record_provisioning(&write("SN-1", "c2", Replaces::Nothing))
            .await,
        Err(conflict("SN-1"))
    );
    let stored = provisioned(&registry, "SN-1").await.provisioning.unwrap();
    assert_eq!(
        (stored.certificate_id.as_str(), stored.state),
        ("c1", ProvisioningState::Pending)
    );
    assert_eq!(stored.claim_certificate_id.as_deref(), Some("claim-1"));

    let mut blocked = DeviceRecord::allowed(DeviceId::Serial("SN-3".into()));
    blocked.status = DeviceStatus::Blocked;
    registry.put(&blocked).await.unwrap();
    assert_eq!(
        registry
            .record_provisioning(&write("SN-3", "c1", Replaces::Nothing))
            .await,
        Err(conflict("SN-3"))
    );
}

/// `allow_reprovision` lets exactly one new certificate in, once, and the replaced one is kept
/// for the operator to revoke.
#[tokio::test]
async fn allow_reprovision_is_consumed_by_the_write_that_uses_it() {
    let (_aws, registry) = with_table().await;
    let mut record = DeviceRecord::allowed(DeviceId::Serial("SN-2".into()));
    record.allow_reprovision = true;
    record.provisioning = Some(Provisioning {
        certificate_id: "c1".into(),
        claim_certificate_id: None,
        provisioned_at: AT - 10,
        state: ProvisioningState::Confirmed,
        replaced_certificate_id: None,
        issued_to: None,
        confirmed_at: Some(AT - 5),
    });
    registry.put(&record).await.unwrap();
    let registry = Arc::new(registry);
    let racers: Vec<_> = (2..6)
        .map(|i| {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                let old = Replaces::Reprovisioning { old: "c1".into() };
                registry
                    .record_provisioning(&write("SN-2", &format!("c{i}"), old))
                    .await
            })
        })
        .collect();
    let mut passed = 0;
    for racer in racers {
        passed += usize::from(racer.await.unwrap().is_ok());
    }
    assert_eq!(passed, 1);
    let stored = provisioned(&registry, "SN-2").await;
    assert!(!stored.allow_reprovision, "the flag is spent");
    let provisioning = stored.provisioning.unwrap();
    assert_eq!(provisioning.replaced_certificate_id.as_deref(), Some("c1"));
    assert_eq!(provisioning.state, ProvisioningState::Pending);
}

#[tokio::test]
async fn a_stale_pending_certificate_may_be_replaced_a_recent_one_not() {
    let (_aws, registry) = with_table().await;
    registry
        .put(&DeviceRecord::allowed(DeviceId::Serial("SN-P".into())))
        .await
        .unwrap();
    registry
        .record_provisioning(&write("SN-P", "c1", Replaces::Nothing))
        .await
        .unwrap();
    let stale = |before, installer: &str| Replaces::StalePending {
        old: "c1".into(),
        pending_since_before: before,
        issued_to: installer.into(),
    };
    // Provisioned at AT: not pending since before AT - 1.
    assert!(registry
        .record_provisioning(&write("SN-P", "c2", stale(AT - 1, "installer-a")))
        .await
        .is_err());
    // Not through another installer's claim, however stale.
    assert_eq!(
        registry
            .record_provisioning(&write("SN-P", "c2", stale(AT, "installer-b")))
            .await,
        Err(RegistryError::Conflict("serial#SN-P".into()))
    );
    registry
        .record_provisioning(&write("SN-P", "c2", stale(AT, "installer-a")))
        .await
        .unwrap();
    let provisioning = provisioned(&registry, "SN-P").await.provisioning.unwrap();
    assert_eq!(provisioning.certificate_id, "c2");
    assert_eq!(provisioning.replaced_certificate_id.as_deref(), Some("c1"));
}

/// fleet-confirm's writes: only the recorded certificate confirms, once; a replaced one is
/// forgotten only while the serial still holds the certificate that replaced it.
#[tokio::test]
async fn a_provisioning_is_confirmed_only_by_its_own_certificate() {
    let (_aws, registry) = with_table().await;
    registry
        .put(&DeviceRecord::allowed(DeviceId::Serial("SN-C".into())))
        .await
        .unwrap();
    registry
        .record_provisioning(&write("SN-C", "c1", Replaces::Nothing))
        .await
        .unwrap();
    registry
        .record_provisioning(&write(
            "SN-C",
            "c2",
            Replaces::StalePending {
                old: "c1".into(),
                pending_since_before: AT,
                issued_to: "installer-a".into(),
            },
        ))
        .await
        .unwrap();
    for (serial, cert) in [("SN-C", "c1"), ("SN-C", "c9"), ("SN-404", "c2")] {
        assert_eq!(
            registry.confirm(serial, cert, AT + 5).await,
            Ok(Confirmation::NotRecorded),
            "{serial} {cert}"
        );
    }
    let pending = provisioned(&registry, "SN-C").await.provisioning.unwrap();
    assert_eq!(pending.state, ProvisioningState::Pending);
    assert_eq!(pending.issued_to.as_deref(), Some("installer-a"));
    assert_eq!(
        registry.confirm("SN-C", "c2", AT + 5).await,
        Ok(Confirmation::Recorded {
            newly: true,
            replaced: Some("c1".into())
        })
    );
    assert_eq!(
        registry.confirm("SN-C", "c2", AT + 9).await,
        Ok(Confirmation::Recorded {
            newly: false,
            replaced: Some("c1".into())
        })
    );
    // Not by another certificate's name; then by the holder's.
    registry.retired("SN-C", "c9", "c1").await.unwrap();
    assert!(provisioned(&registry, "SN-C")
        .await
        .provisioning
        .unwrap()
        .replaced_certificate_id
        .is_some());
    registry.retired("SN-C", "c2", "c1").await.unwrap();
    let confirmed = provisioned(&registry, "SN-C").await.provisioning.unwrap();
    assert_eq!(
        (
            confirmed.state,
            confirmed.confirmed_at,
            confirmed.replaced_certificate_id
        ),
        (ProvisioningState::Confirmed, Some(AT + 5), None)
    );
}

#[tokio::test]
async fn a_claim_is_spent_with_the_provisioning_in_one_transaction() {
    let (_aws, registry) = with_table().await;
    for serial in ["SN-A", "SN-B"] {
        registry
            .put(&DeviceRecord::allowed(DeviceId::Serial(serial.into())))
            .await
            .unwrap();
    }
    registry
        .record_claim(&ClaimRecord {
            certificate_id: "claim-1".into(),
            issued_to: "installer".into(),
            serial: None,
            issued_at: AT - 60,
            valid_until: AT + 240,
            retain_until: AT + 86_400,
            used: None,
        })
        .await
        .unwrap();
    let spending = |serial: &str, cert: &str, replaces| ProvisioningWrite {
        spend_claim: Some(ClaimUse {
            claim_certificate_id: "claim-1".into(),
            at: AT,
        }),
        ..write(serial, cert, replaces)
    };
    registry
        .record_provisioning(&spending("SN-A", "c1", Replaces::Nothing))
        .await
        .unwrap();
    let claim = registry.claim("claim-1").await.unwrap().unwrap();
    assert_eq!(
        claim.used,
        Some(ClaimUsed {
            certificate_id: "c1".into(),
            serial: "SN-A".into(),
            at: AT
        })
    );
    // AWS IoT retrying with the same certificate spends nothing new.
    registry
        .record_provisioning(&spending("SN-A", "c1", Replaces::Itself))
        .await
        .unwrap();
    // The same claim for another serial: refused, and SN-B stays unprovisioned.
    assert_eq!(
        registry
            .record_provisioning(&spending("SN-B", "c2", Replaces::Nothing))
            .await,
        Err(RegistryError::ClaimSpent("claim-1".into()))
    );
    assert_eq!(provisioned(&registry, "SN-B").await.provisioning, None);
}

#[tokio::test]
async fn concurrent_provisioning_lets_exactly_one_certificate_in() {
    let (_aws, registry) = with_table().await;
    registry
        .put(&DeviceRecord::allowed(DeviceId::Serial("SN-RACE".into())))
        .await
        .unwrap();
    let registry = Arc::new(registry);
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let registry = Arc::clone(&registry);
            tokio::spawn(async move {
                registry
                    .record_provisioning(&write("SN-RACE", &format!("cert-{i}"), Replaces::Nothing))
                    .await
            })
        })
        .collect();
    let mut allowed = 0;
    for attempt in attempts {
        match attempt.await.unwrap() {
            Ok(()) => allowed += 1,
            Err(e) => assert_eq!(e, RegistryError::Conflict("serial#SN-RACE".into())),
        }
    }
    assert_eq!(allowed, 1);
}

#[tokio::test]
async fn an_unreachable_endpoint_fails_fast_and_says_so() {
    let aws = aws().await;
    let ssm = aws.ssm().await;
    let endpoint = aws.endpoint().to_owned();
    drop(aws); // the server is gone; its port refuses connections

    let store = SsmSecretStore::new(ssm);
    let started = Instant::now();
    let err = store.get("/dps/group-key").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(
        matches!(&err, SecretError::Unavailable { name, .. } if name == "/dps/group-key"),
        "{err:?}"
    );
    // Bounded by the SDK operation timeout (3 s) plus scheduling slack.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{endpoint}: {:?}",
        started.elapsed()
    );
}

/// Twenty concurrent takes from a budget of seven in one window: exactly seven granted, as
/// `ADD` is atomic; the refused are told to come back at moments spread over later windows;
/// the next window has its own budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_budget_is_exact_under_concurrency_and_renews_each_window() {
    let aws = aws().await;
    aws.create_devices_table(TABLE).await.unwrap();
    let budget = DynamoBudget::new(aws.dynamodb().await, TABLE, "dps", 7, 60);
    let now = 1_800_000_010;
    let takes = (0..20).map(|_| budget.take(now));
    let grants = futures::future::join_all(takes).await;
    let granted = grants
        .iter()
        .filter(|g| matches!(g, Ok(Grant::Granted)))
        .count();
    assert_eq!(granted, 7, "{grants:?}");
    let mut returns: Vec<u64> = grants
        .iter()
        .filter_map(|g| match g {
            Ok(Grant::Spent { retry_after }) => Some(now + retry_after),
            _ => None,
        })
        .collect();
    returns.sort_unstable();
    returns.dedup();
    assert_eq!(returns.len(), 13, "each refused caller has its own moment");
    // The window is [1_800_000_000, 1_800_000_060): nobody refused comes back within it.
    assert!(returns.iter().all(|t| *t >= 1_800_000_060), "{returns:?}");
    assert_eq!(budget.take(now + 60).await, Ok(Grant::Granted));
}

/// A unit given back is granted again in the same window; a window nobody took from cannot be
/// given to (its item would be recreated without its TTL).
#[tokio::test]
async fn a_unit_given_back_to_the_fleet_budget_is_granted_again() {
    let aws = aws().await;
    aws.create_devices_table(TABLE).await.unwrap();
    let budget = DynamoBudget::new(aws.dynamodb().await, TABLE, "dps", 1, 60);
    let now = 1_800_000_010;
    assert_eq!(budget.take(now).await, Ok(Grant::Granted));
    assert!(matches!(budget.take(now).await, Ok(Grant::Spent { .. })));
    budget.give_back(now).await.unwrap();
    budget.give_back(now).await.unwrap();
    assert_eq!(budget.take(now).await, Ok(Grant::Granted));
    assert!(matches!(budget.take(now).await, Ok(Grant::Spent { .. })));
    assert!(budget.give_back(now + 3600).await.is_err());
}
