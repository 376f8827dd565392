//! Fleet provisioning: the fleet-prehook function's real handler against the device table on the
//! local AWS endpoint, fed the sample events in events/fleet-prehook/.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_prehook::config::Config;
use fleet_prehook::handler::{evaluate, handle, Denial};
use local_emulators::fixtures;
use local_emulators::local_aws::LocalAws;
use serde_json::Value;
use shared::clock::unix_now;
use shared::registry::{
    ClaimLog, ClaimRecord, DeviceId, DeviceRecord, DeviceStatus, DynamoRegistry, ProvisioningState,
};

const TABLE: &str = "devices";

fn event(name: &str) -> Value {
    fixtures::event("fleet-prehook", name)
}

fn with_certificate(mut e: Value, certificate_id: &str) -> Value {
    e["certificateId"] = Value::String(certificate_id.to_owned());
    e
}

fn config(extra: &[(&str, &str)]) -> Config {
    Config::from_env(&fixtures::env(&[("DEVICES_TABLE", TABLE)], extra)).unwrap()
}

/// The local endpoint with SN-0001 allowed (with overrides) and SN-0666 blocked.
async fn setup() -> (LocalAws, DynamoRegistry) {
    let aws = LocalAws::start().await.unwrap();
    aws.create_devices_table(TABLE).await.unwrap();
    let registry = DynamoRegistry::new(aws.dynamodb().await, TABLE);
    let mut allowed = DeviceRecord::allowed(DeviceId::Serial("SN-0001".into()));
    allowed.overrides = BTreeMap::from([("Location".to_owned(), "tokyo-1".to_owned())]);
    registry.put(&allowed).await.unwrap();
    let mut blocked = DeviceRecord::allowed(DeviceId::Serial("SN-0666".into()));
    blocked.status = DeviceStatus::Blocked;
    registry.put(&blocked).await.unwrap();
    (aws, registry)
}

async fn allow_reprovisioning(registry: &DynamoRegistry, serial: &str) {
    let mut record = registry
        .get(&DeviceId::Serial(serial.into()))
        .await
        .unwrap()
        .unwrap();
    record.allow_reprovision = true;
    registry.put(&record).await.unwrap();
}

async fn denial(e: Value, config: &Config, registry: &DynamoRegistry) -> Denial {
    match evaluate(e, config, registry).await.0 {
        Err(d) => d,
        Ok(overrides) => panic!("allowed with {overrides:?}"),
    }
}

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

/// A recorded claim issued to `installer`, bound to `serial` (or to none), valid until `until`.
async fn record_claim(registry: &DynamoRegistry, id: &str, serial: Option<&str>, until: u64) {
    registry
        .record_claim(&ClaimRecord {
            certificate_id: id.into(),
            issued_to: "installer-sub".into(),
            serial: serial.map(str::to_owned),
            issued_at: until.saturating_sub(300),
            valid_until: until,
            retain_until: until + 86_400,
            used: None,
        })
        .await
        .unwrap();
}

fn hook_event(serial: &str, certificate: &str, claim: &str) -> Value {
    let mut e = with_certificate(event("allowed.json"), certificate);
    e["parameters"]["SerialNumber"] = Value::String(serial.into());
    e["claimCertificateId"] = Value::String(claim.into());
    e
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
/// record is pending, and another certificate may replace it after PENDING_SECONDS.
#[tokio::test]
async fn a_device_that_failed_after_the_hook_said_yes_is_not_locked_out() {
    let (_aws, registry) = setup().await;
    assert!(evaluate(event("allowed.json"), &config(&[]), &registry)
        .await
        .0
        .is_ok());
    let retry = with_certificate(event("allowed.json"), "second-attempt");
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

/// claim-issuer's real handler, with the real aws-sdk-iot client against the IoT control-plane
/// double and the real DynamoDB client against the local AWS endpoint.
mod issuer {
    use super::*;
    use ::claim_issuer::config::Config as IssuerConfig;
    use ::claim_issuer::handler::{handle as issue, HttpResponse, Refused, State};
    use local_emulators::iot_control::{IotControlPlane, IotFault};
    use local_emulators::local_aws::local_sdk_config;

    const TEMPLATE: &str = "fleet-template";
    const NOW: u64 = 1_800_000_000;

    fn claim_event(name: &str) -> Value {
        fixtures::event("claim-issuer", name)
    }

    struct Setup {
        _aws: LocalAws,
        iot: IotControlPlane,
        state: State,
    }

    async fn setup(extra: &[(&str, &str)]) -> Setup {
        let aws = LocalAws::start().await.unwrap();
        aws.create_devices_table(TABLE).await.unwrap();
        let iot = IotControlPlane::start(&[TEMPLATE, "other-template"])
            .await
            .unwrap();
        let env = fixtures::env(
            &[
                ("DEVICES_TABLE", TABLE),
                ("PROVISIONING_TEMPLATE", TEMPLATE),
                ("IOT_DATA_ENDPOINT", "example-ats.iot.local"),
            ],
            extra,
        );
        let state = state(&aws, &iot, IssuerConfig::from_env(&env).unwrap()).await;
        Setup {
            _aws: aws,
            iot,
            state,
        }
    }

    /// claim-issuer's state as its cold start builds it, with the IoT client on the double.
    pub(crate) async fn state(
        aws: &LocalAws,
        iot: &IotControlPlane,
        config: IssuerConfig,
    ) -> State {
        let iot = aws_sdk_iot::Client::new(&local_sdk_config(&iot.endpoint()).await);
        State::from_clients(config, iot, aws.dynamodb().await)
    }

    fn body(r: &HttpResponse) -> Value {
        serde_json::from_str(&r.body).unwrap()
    }

    /// Captures what the handler logs while `f` runs on this thread.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn installer_gets_a_five_minute_claim_bound_to_the_serial() {
        let s = setup(&[]).await;
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        let response = issue(claim_event("issue.json"), NOW, &s.state).await;
        drop(guard);

        assert_eq!(response.status_code, 200, "{}", response.body);
        assert_eq!(response.header("cache-control"), Some("no-store"));
        let b = body(&response);
        assert_eq!(b["templateName"], TEMPLATE);
        assert_eq!(b["serial"], "SN-0001");
        assert_eq!(b["iotEndpoint"], "example-ats.iot.local");
        let certificate_id = b["certificateId"].as_str().unwrap();
        assert_eq!(s.iot.issued()[0].certificate_id, certificate_id);

        // A real certificate, from the double's CA, valid for five minutes.
        let pem = b["certificatePem"].as_str().unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = parsed.parse_x509().unwrap();
        let validity = cert.validity();
        let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert!((299..=301).contains(&lifetime), "{lifetime}");
        assert_eq!(
            b["expiration"].as_u64().unwrap() as i64,
            validity.not_after.timestamp()
        );
        let key = b["privateKey"].as_str().unwrap();
        assert!(key.contains("PRIVATE KEY"));

        // The audit record fleet-prehook reads.
        let claim = s
            .state
            .registry
            .claim(certificate_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claim.issued_to, "7d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6");
        assert_eq!(claim.serial.as_deref(), Some("SN-0001"));
        assert!(claim.retain_until > claim.valid_until);

        // Logged, without the key.
        let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(
            logged.contains("claim certificate issued") && logged.contains(certificate_id),
            "{logged}"
        );
        let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(!logged.contains(&key_body[..40]));
    }

    #[tokio::test]
    async fn identity_group_and_body_are_checked_first() {
        let s = setup(&[]).await;
        for (event, status, code) in [
            ("no-claims.json", 401, "unauthenticated"),
            ("not-in-group.json", 403, "not-an-installer"),
            ("bad-body.json", 400, "bad-request"),
            ("template-not-allowed.json", 400, "template-not-allowed"),
        ] {
            let r = issue(claim_event(event), NOW, &s.state).await;
            assert_eq!(
                (r.status_code, body(&r)["error"].as_str()),
                (status, Some(code)),
                "{event}"
            );
        }
        let mut bad_serial = claim_event("issue.json");
        bad_serial["body"] = Value::String(r#"{"serial":"../../etc"}"#.into());
        assert_eq!(issue(bad_serial, NOW, &s.state).await.status_code, 400);
        // Nothing reached AWS IoT.
        assert_eq!(s.iot.requests(), 0);
    }

    #[tokio::test]
    async fn template_missing_in_iot_and_upstream_failures() {
        let s = setup(&[("ALLOWED_TEMPLATES", "retired-template")]).await;
        let mut retired = claim_event("issue.json");
        retired["body"] =
            Value::String(r#"{"serial":"SN-0001","templateName":"retired-template"}"#.into());
        let r = issue(retired, NOW, &s.state).await;
        assert_eq!(
            (r.status_code, body(&r)["error"].as_str()),
            (502, Some("upstream"))
        );
        // The caller gets the fixed sentence; which template AWS IoT lacked is for the log.
        assert_eq!(body(&r)["message"], Refused::Upstream.message());

        s.iot.set_faults(&[IotFault::ServerError]);
        let r = issue(claim_event("issue.json"), NOW, &s.state).await;
        assert_eq!(r.status_code, 502);

        s.iot.set_faults(&[IotFault::Throttle]);
        let r = issue(claim_event("issue.json"), NOW, &s.state).await;
        assert_eq!((r.status_code, r.header("retry-after")), (503, Some("2")));

        s.iot.set_faults(&[]);
        assert_eq!(
            issue(claim_event("issue.json"), NOW, &s.state)
                .await
                .status_code,
            200
        );
        assert_eq!(
            s.iot.unauthenticated(),
            0,
            "every SDK request was SigV4-signed"
        );
    }

    fn issue_at(s: &Setup, now: u64) -> impl std::future::Future<Output = HttpResponse> + '_ {
        issue(claim_event("issue.json"), now, &s.state)
    }

    #[tokio::test]
    async fn rate_limit_is_per_user_and_recovers_after_the_window() {
        let s = setup(&[("CLAIMS_PER_WINDOW", "2"), ("CLAIM_WINDOW_SECONDS", "600")]).await;
        for _ in 0..2 {
            assert_eq!(issue_at(&s, NOW + 10).await.status_code, 200);
        }
        let limited = issue_at(&s, NOW + 100).await;
        assert_eq!(
            (limited.status_code, limited.header("retry-after")),
            (429, Some("510"))
        );

        // Another installer is not affected.
        let mut other = claim_event("issue.json");
        other["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] =
            Value::String("another-installer".into());
        assert_eq!(issue(other, NOW + 100, &s.state).await.status_code, 200);

        // Once the first claims are a window old, there is room again.
        assert_eq!(issue_at(&s, NOW + 609).await.status_code, 429);
        assert_eq!(issue_at(&s, NOW + 610).await.status_code, 200);
        assert_eq!(s.iot.issued().len(), 4);
    }

    /// The hole: a fixed window let an installer take the whole quota just before a window
    /// boundary and again just after it.
    #[tokio::test]
    async fn the_claim_quota_cannot_be_doubled_across_a_window_boundary() {
        let s = setup(&[("CLAIMS_PER_WINDOW", "2"), ("CLAIM_WINDOW_SECONDS", "600")]).await;
        let boundary = NOW - NOW % 600 + 600;
        for t in [boundary - 2, boundary - 1] {
            assert_eq!(issue_at(&s, t).await.status_code, 200);
        }
        for t in [boundary, boundary + 1, boundary + 300] {
            assert_eq!(
                issue_at(&s, t).await.status_code,
                429,
                "at boundary + {}",
                t - boundary
            );
        }
        assert_eq!(s.iot.issued().len(), 2);
    }

    /// The hole: a claim without a serial was bound to nothing. Now it needs a serial, unless
    /// the operator opts in to unbound claims.
    #[tokio::test]
    async fn a_claim_without_a_serial_is_refused_unless_unbound_claims_are_allowed() {
        let mut no_serial = claim_event("issue.json");
        no_serial["body"] = Value::String("{}".into());
        let s = setup(&[]).await;
        let r = issue(no_serial.clone(), NOW, &s.state).await;
        assert_eq!(
            (r.status_code, body(&r)["error"].as_str()),
            (400, Some("serial-required"))
        );
        assert_eq!(s.iot.requests(), 0);

        let opted_in = setup(&[("ALLOW_UNBOUND_CLAIMS", "true")]).await;
        let r = issue(no_serial, NOW, &opted_in.state).await;
        assert_eq!(r.status_code, 200);
        let id = body(&r)["certificateId"].as_str().unwrap().to_owned();
        let claim = opted_in.state.registry.claim(&id).await.unwrap().unwrap();
        assert_eq!(claim.serial, None);
    }

    #[tokio::test]
    async fn the_double_refuses_unsigned_requests() {
        let iot = IotControlPlane::start(&[TEMPLATE]).await.unwrap();
        let url = format!(
            "{}/provisioning-templates/{TEMPLATE}/provisioning-claim",
            iot.endpoint()
        );
        let mut stream =
            tokio::net::TcpStream::connect(iot.endpoint().trim_start_matches("http://"))
                .await
                .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let request = format!("POST {url} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        assert!(answer
            .to_ascii_lowercase()
            .contains("x-amzn-errortype: missingauthenticationtokenexception"));
        assert!(iot.issued().is_empty());
        assert_eq!(iot.unauthenticated(), 1);
    }
}

#[path = "fleet/device_flow.rs"]
mod device_flow;
