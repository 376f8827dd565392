//! Every answer in the function's table, from the handler with the device table, the key store
//! and DPS in memory: no server. (`tests/` proves the same wiring against moto and the DPS
//! simulator.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use dps_client::{Assignment, DpsError};
use lambda_runtime::Context;
use serde_json::{json, Value};
use shared::ca::{CaError, DeviceCertificate};
use shared::keys::SymmetricKey;
use shared::memory::{MemoryBudget, MemoryQuota, MemoryTable};
use shared::registry::{DeviceId, DeviceRecord, DeviceStatus, RegistryError};
use tokio::time::Instant;

use crate::answer::Response;
use crate::config::Config;
use crate::handler::handle;
use crate::ports::{Credentials, DeviceCa, DeviceKeys, Dps, Enrollment, KeyFailure, Proof};
use crate::state::{Limits, State, SIM_WINDOW_SECS};

/// The unit tests' fleet budget counts whole minutes (the deployed one counts ~5 s windows:
/// `fleet_windows`); the tests that need its shape set their own.
const FLEET_WINDOW_SECS: u64 = 60;

pub(crate) const IMSI: &str = "440103123456789";
pub(crate) const SIM_ID: &str = "8981100012345678901";
pub(crate) const GROUP_KEY: &str = "VGhpcyB0aGluZyBhbGwgdGhpbmdzIGl0IGRldm91cnM=";

/// Keys derived from the group key (`GROUP_KEY` until rotated), or failing as told.
#[derive(Default)]
pub(crate) struct Keys {
    pub(crate) failure: Mutex<Option<KeyFailure>>,
    /// A rotated group key, base64.
    pub(crate) rotated: Mutex<Option<String>>,
}

impl Keys {
    pub(crate) fn group_key(&self) -> SymmetricKey {
        let rotated = self.rotated.lock().unwrap().clone();
        SymmetricKey::from_base64(rotated.as_deref().unwrap_or(GROUP_KEY)).unwrap()
    }
}

impl DeviceKeys for Keys {
    async fn device_key(
        &self,
        _imsi: &str,
        registration_id: &str,
    ) -> Result<SymmetricKey, KeyFailure> {
        if let Some(failure) = self.failure.lock().unwrap().clone() {
            return Err(failure);
        }
        Ok(self.group_key().derive_device_key(registration_id))
    }
}

/// DPS: assigns every device to one hub (returning `return_data` as a custom allocation
/// policy would), or answers as told; counts connections opened ahead, and registrations
/// (with whether they were made on such a connection).
#[derive(Default)]
pub(crate) struct FakeDps {
    pub(crate) answer: Mutex<Option<DpsError>>,
    pub(crate) registered: Mutex<Vec<(String, Option<Value>)>>,
    pub(crate) return_data: Mutex<Option<Value>>,
    pub(crate) opened: AtomicUsize,
    pub(crate) on_opened: AtomicUsize,
    /// The certificates presented (X.509 attestation), and whether on a connection opened
    /// before them (which could not have carried them).
    pub(crate) certificates: Mutex<Vec<(String, bool)>>,
}

impl Dps for FakeDps {
    type Line = ();

    async fn open(&self) -> Result<(), DpsError> {
        self.opened.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn register(
        &self,
        e: &Enrollment<'_>,
        opened: Option<Result<(), DpsError>>,
        _deadline: Instant,
    ) -> Result<Assignment, DpsError> {
        let on_opened = matches!(opened, Some(Ok(())));
        if on_opened {
            self.on_opened.fetch_add(1, Ordering::Relaxed);
        }
        if let Proof::Certificate(c) = e.proof {
            self.certificates
                .lock()
                .unwrap()
                .push((c.certificate.certificate_pem.clone(), on_opened));
        }
        self.registered
            .lock()
            .unwrap()
            .push((e.registration_id.to_owned(), e.payload.cloned()));
        if let Some(error) = self.answer.lock().unwrap().clone() {
            return Err(error);
        }
        Ok(Assignment {
            registration_id: e.registration_id.to_owned(),
            assigned_hub: "hub-1.azure-devices.net".into(),
            device_id: e.registration_id.to_owned(),
            status: "assigned".into(),
            substatus: None,
            payload: self.return_data.lock().unwrap().clone(),
        })
    }
}

/// The device CA: issues numbered placeholder certificates (the handler never looks inside
/// them; `tests/` issues real ones through KMS), or fails as told.
#[derive(Default)]
pub(crate) struct FakeCa {
    pub(crate) failure: Mutex<Option<CaError>>,
    pub(crate) issued: AtomicUsize,
}

impl DeviceCa for FakeCa {
    async fn issue(
        &self,
        registration_id: &str,
        lifetime: Duration,
    ) -> Result<Credentials, CaError> {
        if let Some(failure) = self.failure.lock().unwrap().clone() {
            return Err(failure);
        }
        let n = self.issued.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Credentials {
            certificate: DeviceCertificate {
                certificate_pem: format!("certificate {n} of {registration_id}\n"),
                private_key_pem: format!("key {n}\n").into(),
                serial: format!("{n:032x}"),
                fingerprint: format!("{:064x}", n * 7),
                not_after: SystemTime::now() + lifetime,
            },
            chain_pem: "device CA\n".into(),
        })
    }
}

pub(crate) type TestState =
    State<MemoryTable, Keys, FakeDps, Limits<MemoryQuota, MemoryBudget>, FakeCa>;

pub(crate) fn state(extra: &[(&str, &str)]) -> TestState {
    let env: HashMap<String, String> = [
        ("DPS_ID_SCOPE", "0ne00000001"),
        ("GROUP_KEY_PARAMETER", "/dps/group-key"),
        ("DEVICES_TABLE", "devices"),
        ("ALLOWED_OPERATOR_IDS", "OP0012345678"),
    ]
    .iter()
    .chain(extra)
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let config = Config::from_env(&env).unwrap();
    State {
        limits: Limits::new(
            MemoryQuota::new(config.dps_per_sim_per_hour, SIM_WINDOW_SECS),
            MemoryBudget::new(config.dps_registrations_per_minute, FLEET_WINDOW_SECS),
            FLEET_WINDOW_SECS,
        ),
        config,
        registry: MemoryTable::new(),
        keys: Keys::default(),
        dps: FakeDps::default(),
        ca: FakeCa::default(),
    }
}

/// A Funk invocation's context, built as the runtime builds it from raw-JSON headers.
pub(crate) fn funk(custom: Value, deadline_in: Option<Duration>) -> Context {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "lambda-runtime-client-context",
        json!({ "custom": custom }).to_string().parse().unwrap(),
    );
    let deadline = deadline_in.map_or(0, |d| {
        (SystemTime::now() + d)
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    });
    headers.insert(
        "lambda-runtime-deadline-ms",
        deadline.to_string().parse().unwrap(),
    );
    Context::new("test", Default::default(), &headers).unwrap()
}

pub(crate) fn sim(imsi: &str) -> Value {
    json!({
        "imsi": imsi, "operatorId": "OP0012345678", "simId": SIM_ID,
        "srn": format!("srn:soracom:OP0012345678:jp:Subscriber:{imsi}"),
    })
}

pub(crate) fn entry(id: DeviceId, status: DeviceStatus, valid_until: Option<u64>) -> DeviceRecord {
    let mut record = DeviceRecord::allowed(id);
    record.status = status;
    record.valid_until = valid_until;
    record
}

async fn answer(state: &TestState, body: Value, context: &Context) -> (u16, &'static str) {
    let r: Response = handle(body, context, state).await;
    (r.status_code, r.error.unwrap_or("-"))
}

#[tokio::test]
async fn a_listed_sim_gets_its_connection_string_and_is_recorded() {
    let s = state(&[]);
    let r = handle(json!({"modelId": "dtmi:x;1"}), &funk(sim(IMSI), None), &s).await;
    assert_eq!(r.status_code, 200, "{}", r.outline());
    let key = SymmetricKey::from_base64(GROUP_KEY)
        .unwrap()
        .derive_device_key(IMSI);
    assert_eq!(
        r.body,
        format!(
            "HostName=hub-1.azure-devices.net;DeviceId={IMSI};SharedAccessKey={}",
            key.to_base64()
        )
    );
    let registered = s.dps.registered.lock().unwrap().clone();
    assert_eq!(
        registered,
        vec![(IMSI.to_owned(), Some(json!({"modelId": "dtmi:x;1"})))]
    );
    let record = s.registry.get(&DeviceId::Sim(IMSI.into())).unwrap();
    assert_eq!(
        record.registration.unwrap().assigned_hub,
        "hub-1.azure-devices.net"
    );
    assert_eq!(
        record.status,
        DeviceStatus::Unlisted,
        "recording does not list it"
    );
}

#[tokio::test]
async fn identity_operator_and_body_are_checked_before_anything_else() {
    let s = state(&[]);
    let other_operator = json!({
        "imsi": IMSI, "operatorId": "OP0099999999",
        "srn": format!("srn:soracom:OP0099999999:jp:Subscriber:{IMSI}"),
    });
    let cases = [
        (json!({}), Context::default(), (403, "no-identity")),
        (
            json!({}),
            funk(json!({"imsi": "12"}), None),
            (403, "bad-identity"),
        ),
        (
            json!({}),
            funk(other_operator, None),
            (403, "operator-not-allowed"),
        ),
        (json!([1]), funk(sim(IMSI), None), (400, "bad-request")),
        (
            json!({"blob": "x".repeat(5000)}),
            funk(sim(IMSI), None),
            (400, "bad-request"),
        ),
    ];
    for (body, context, expected) in cases {
        assert_eq!(answer(&s, body, &context).await, expected);
    }
    assert_eq!(s.registry.calls(), 0);
    assert!(s.dps.registered.lock().unwrap().is_empty());
}

#[tokio::test]
async fn the_device_table_decides_before_dps_is_asked() {
    let s = state(&[("REQUIRE_SIM_ALLOWLIST", "true")]);
    let blocked = "440103000000001";
    let expired = "440103000000002";
    s.registry.put(entry(
        DeviceId::Sim(blocked.into()),
        DeviceStatus::Blocked,
        None,
    ));
    s.registry.put(entry(
        DeviceId::Sim(expired.into()),
        DeviceStatus::Allowed,
        Some(1),
    ));
    for (imsi, expected) in [
        (blocked, (403, "sim-blocked")),
        (expired, (403, "sim-expired")),
        (IMSI, (403, "sim-unknown")),
    ] {
        assert_eq!(
            answer(&s, json!({}), &funk(sim(imsi), None)).await,
            expected,
            "{imsi}"
        );
    }
    assert!(s.dps.registered.lock().unwrap().is_empty());
    // The SIM card's entry speaks for all its IMSIs.
    s.registry.put(entry(
        DeviceId::SimCard(SIM_ID.into()),
        DeviceStatus::Allowed,
        None,
    ));
    assert_eq!(
        answer(&s, json!({}), &funk(sim(IMSI), None)).await,
        (200, "-")
    );
}

/// Issue: a request without the SIM ID skipped the card's entry, so a blocked card's IMSI got
/// in through Beam without `x-soracom-sim-id`. Where the table lists cards, the SIM ID is
/// required.
#[tokio::test]
async fn without_the_sim_id_a_blocked_card_cannot_be_skipped() {
    let anonymous = |imsi: &str| {
        let mut identity = sim(imsi);
        identity.as_object_mut().unwrap().remove("simId");
        identity
    };
    for require in [false, true] {
        let s = state(&[
            ("REQUIRE_SIM_ALLOWLIST", "true"),
            ("REQUIRE_SIM_ID", if require { "true" } else { "false" }),
        ]);
        s.registry.put(entry(
            DeviceId::Sim(IMSI.into()),
            DeviceStatus::Allowed,
            None,
        ));
        s.registry.put(entry(
            DeviceId::SimCard(SIM_ID.into()),
            DeviceStatus::Blocked,
            None,
        ));
        assert_eq!(
            answer(&s, json!({}), &funk(sim(IMSI), None)).await,
            (403, "sim-blocked")
        );
        let without = answer(&s, json!({}), &funk(anonymous(IMSI), None)).await;
        let expected = if require {
            (403, "bad-identity")
        } else {
            (200, "-")
        };
        assert_eq!(without, expected, "REQUIRE_SIM_ID={require}");
    }
}

#[tokio::test]
async fn key_store_failures_answer_by_cause() {
    let s = state(&[]);
    for (failure, expected) in [
        (KeyFailure::NoEnrollment, (403, "no-enrollment")),
        (
            KeyFailure::Unavailable("throttled".into()),
            (503, "key-store-unavailable"),
        ),
        (
            KeyFailure::Misconfigured("not base64".into()),
            (500, "misconfigured"),
        ),
    ] {
        *s.keys.failure.lock().unwrap() = Some(failure);
        assert_eq!(
            answer(&s, json!({}), &funk(sim(IMSI), None)).await,
            expected
        );
    }
    assert!(s.dps.registered.lock().unwrap().is_empty());
}

#[tokio::test]
async fn table_failures_answer_503_with_retry_after() {
    let s = state(&[]);
    s.registry
        .fail_with(Some(RegistryError::Unavailable("timed out".into())));
    let r = handle(json!({}), &funk(sim(IMSI), None), &s).await;
    assert_eq!(
        (r.status_code, r.error),
        (503, Some("registry-unavailable"))
    );
    assert!(r.retry_after.is_some());
    s.registry.fail_with(Some(RegistryError::Malformed {
        key: "sim#x".into(),
        field: "status",
    }));
    assert_eq!(
        answer(&s, json!({}), &funk(sim(IMSI), None)).await,
        (500, "misconfigured")
    );
}

#[tokio::test]
async fn dps_outcomes_map_to_final_or_retryable_answers() {
    // One SIM, one DPS attempt per outcome: more than the per-SIM limit's default allows.
    let s = state(&[("DPS_PER_SIM_PER_HOUR", "100")]);
    let secs = Duration::from_secs;
    for (error, expected, retryable) in [
        (
            DpsError::Unauthorized("NotAuthorized".into()),
            (403, "enrollment-refused"),
            false,
        ),
        (
            DpsError::Rejected {
                status: 401,
                error_code: 401002,
            },
            (403, "enrollment-refused"),
            false,
        ),
        (
            DpsError::NotAssigned {
                status: "disabled".into(),
                error_code: 401010,
            },
            (403, "enrollment-not-assigned"),
            false,
        ),
        (
            DpsError::Throttled {
                retry_after: secs(5),
            },
            (503, "dps-throttled"),
            true,
        ),
        (
            DpsError::Deadline {
                retry_after: secs(2),
            },
            (503, "dps-timeout"),
            true,
        ),
        (
            DpsError::Upstream { status: 500 },
            (502, "dps-failed"),
            true,
        ),
        (
            DpsError::Connection("reset".into()),
            (502, "dps-failed"),
            true,
        ),
        (
            DpsError::Tls("invalid peer certificate".into()),
            (502, "dps-failed"),
            false,
        ),
    ] {
        *s.dps.answer.lock().unwrap() = Some(error.clone());
        let r = handle(json!({}), &funk(sim(IMSI), None), &s).await;
        assert_eq!(
            (r.status_code, r.error.unwrap_or("-")),
            expected,
            "{error:?}"
        );
        assert_eq!(r.retry_after.is_some(), retryable, "{error:?}");
        assert!(
            !r.body.contains("reset") && !r.body.contains("certificate"),
            "{}",
            r.body
        );
    }
}

#[tokio::test]
async fn a_misconfigured_registration_id_is_refused_as_such() {
    // A template that yields an id DPS cannot take (longer than 128 characters).
    let long = format!("{}-{{imsi}}", "x".repeat(120));
    let s = state(&[("REGISTRATION_ID_TEMPLATE", long.as_str())]);
    assert_eq!(
        answer(&s, json!({}), &funk(sim(IMSI), None)).await,
        (500, "misconfigured")
    );
    let needs_sim_id = state(&[("REGISTRATION_ID_TEMPLATE", "{simId}")]);
    let no_sim_id = json!({
        "imsi": IMSI, "operatorId": "OP0012345678",
        "srn": format!("srn:soracom:OP0012345678:jp:Subscriber:{IMSI}"),
    });
    assert_eq!(
        answer(&needs_sim_id, json!({}), &funk(no_sim_id, None)).await,
        (403, "bad-identity")
    );
}

#[tokio::test]
async fn a_passed_deadline_attempts_nothing() {
    let s = state(&[]);
    let mut context = funk(sim(IMSI), None);
    let two_seconds_ago = SystemTime::now() - Duration::from_secs(2);
    context.deadline = two_seconds_ago
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert_eq!(answer(&s, json!({}), &context).await, (503, "dps-timeout"));
    assert_eq!(s.registry.calls(), 0);
    assert!(s.dps.registered.lock().unwrap().is_empty());
}

/// On tokio's paused clock: the table hangs, and the answer comes before the Lambda deadline.
#[tokio::test(start_paused = true)]
async fn a_hanging_table_is_answered_before_the_deadline() {
    let s = state(&[]);
    s.registry.delay(Some(Duration::from_secs(3600)));
    let started = Instant::now();
    let r = handle(
        json!({}),
        &funk(sim(IMSI), Some(Duration::from_secs(5))),
        &s,
    )
    .await;
    assert_eq!(
        (r.status_code, r.error),
        (503, Some("registry-unavailable"))
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The samples in `events/azure-dps-register/` answer as the function's README says: each
/// body and client-context file, against a table holding the SIMs the local stack seeds.
#[tokio::test]
async fn every_sample_event_gets_the_answer_its_table_row_promises() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../events/azure-dps-register");
    let read = |name: &str| -> Value {
        let text =
            std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        serde_json::from_str(&text).unwrap()
    };
    let context = |name: &str| funk(read(name)["custom"].clone(), None);
    let s = state(&[("REQUIRE_SIM_ALLOWLIST", "true")]);
    s.registry.put(entry(
        DeviceId::Sim(IMSI.into()),
        DeviceStatus::Allowed,
        None,
    ));
    s.registry.put(entry(
        DeviceId::Sim("440103999999999".into()),
        DeviceStatus::Blocked,
        None,
    ));
    s.registry.put(entry(
        DeviceId::Sim("440103888888888".into()),
        DeviceStatus::Allowed,
        Some(1),
    ));
    let cases = [
        ("register.json", Some("client-context.json"), (200, "-")),
        ("reprovision.json", Some("client-context.json"), (200, "-")),
        (
            "bad-body.json",
            Some("client-context.json"),
            (400, "bad-request"),
        ),
        ("register.json", None, (403, "no-identity")),
        (
            "register.json",
            Some("client-context-bad-identity.json"),
            (403, "bad-identity"),
        ),
        (
            "register.json",
            Some("client-context-other-operator.json"),
            (403, "operator-not-allowed"),
        ),
        (
            "register.json",
            Some("client-context-blocked.json"),
            (403, "sim-blocked"),
        ),
        (
            "register.json",
            Some("client-context-expired.json"),
            (403, "sim-expired"),
        ),
        (
            "register.json",
            Some("client-context-unknown.json"),
            (403, "sim-unknown"),
        ),
    ];
    for (body, ctx, expected) in cases {
        let context = ctx.map_or_else(Context::default, context);
        assert_eq!(
            answer(&s, read(body), &context).await,
            expected,
            "{body} {ctx:?}"
        );
    }
}
