//! The DPS client (dps-client) in a real TLS MQTT conversation with the strict DPS simulator.

use std::sync::atomic::Ordering;
use std::time::Duration;

use dps_client::{self as dps, DpsError, RegistrationRequest};
use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator, Fault};
use local_emulators::local_aws::random_key_base64;
use serde_json::json;
use shared::config::HostPort;
use shared::keys::SymmetricKey;
use tokio::time::Instant;

const SCOPE: &str = "0ne00SIM001";
const IMSI: &str = "440103123456789";

struct Fixture {
    sim: DpsSimulator,
    group_key: SymmetricKey,
    endpoint: HostPort,
}

async fn simulator(configure: impl FnOnce(&mut DpsSimConfig)) -> Fixture {
    let group_key = SymmetricKey::from_base64(&random_key_base64()).unwrap();
    let mut config = DpsSimConfig::new(SCOPE);
    config.group_keys.push(group_key.clone());
    config.hubs = vec![
        "hub-a.azure-devices.net".into(),
        "hub-b.azure-devices.net".into(),
    ];
    configure(&mut config);
    let sim = DpsSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let endpoint = HostPort {
        host: "127.0.0.1".into(),
        port: sim.addr().port(),
    };
    Fixture {
        sim,
        group_key,
        endpoint,
    }
}

impl Fixture {
    async fn register_with(
        &self,
        key: &SymmetricKey,
        payload: Option<&serde_json::Value>,
        budget: Duration,
    ) -> (Result<dps::Assignment, DpsError>, Duration) {
        let tls = dps::tls_config(Some(self.sim.ca_pem().as_bytes())).unwrap();
        let request = RegistrationRequest {
            endpoint: &self.endpoint,
            id_scope: SCOPE,
            registration_id: IMSI,
            device_key: key,
            payload,
            tls,
        };
        let started = Instant::now();
        let result = dps::register(&request, started + budget).await;
        (result, started.elapsed())
    }

    async fn register(&self, budget: Duration) -> (Result<dps::Assignment, DpsError>, Duration) {
        let key = self.group_key.derive_device_key(IMSI);
        self.register_with(&key, None, budget).await
    }
}

/// Outcomes must arrive within the budget (plus scheduling slack), never after.
fn assert_within(elapsed: Duration, budget: Duration) {
    assert!(
        elapsed <= budget + Duration::from_millis(400),
        "took {elapsed:?} for a {budget:?} budget"
    );
}

#[tokio::test]
async fn group_enrollment_is_assigned_and_payload_echoed() {
    let f = simulator(|c| c.polls_before_assign = 1).await;
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
    assert_eq!(assignment.payload, Some(payload.clone()));
    let assigned = f.sim.assigned();
    assert_eq!(assigned.len(), 1);
    assert_eq!(assigned[0].payload, Some(payload));
    assert_eq!(f.sim.stats().polls.load(Ordering::Relaxed), 2);
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
        device_key: &key,
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

/// The failures that may pass on their own, each for the first `n` times: CONNACK "server
/// unavailable", a reset during the TLS handshake, a registration failed on DPS's side, an
/// expired operation.
fn transient_faults(n: u32) -> [Fault; 4] {
    [
        Fault::ConnackUnavailable(n),
        Fault::ResetHandshake(n),
        Fault::FailServerError(n),
        Fault::ExpireOperation(n),
    ]
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

/// The official Azure IoT Python device SDK registering through the simulator: the simulator
/// must accept what real devices send (its `sr` encoding, no `skn`, TLS 1.2, persistent session).
mod official_python_sdk {
    use super::*;
    use local_emulators::local_aws::venv_bin;

    /// The Python SDK always dials port 8883.
    const SDK_PORT: u16 = 8883;

    async fn run_sdk(
        ca: &std::path::Path,
        key: &SymmetricKey,
        payload: &str,
    ) -> std::process::Output {
        let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("interop/python_dps_register.py");
        let mut command = tokio::process::Command::new(venv_bin("python"));
        command
            .arg(script)
            .args([
                "--host",
                "localhost",
                "--scope",
                SCOPE,
                "--registration-id",
                IMSI,
            ])
            .args(["--key", &key.to_base64(), "--payload", payload])
            .arg("--ca")
            .arg(ca)
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("the SDK finished within 60 s")
            .expect("python from .venv (run `make tools`)")
    }

    #[tokio::test]
    async fn python_sdk_registers_and_is_refused_with_a_wrong_key() {
        let group_key = SymmetricKey::from_base64(&random_key_base64()).unwrap();
        let mut config = DpsSimConfig::new(SCOPE);
        config.group_keys.push(group_key.clone());
        config.retry_after = 1;
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], SDK_PORT));
        let sim = DpsSimulator::start(config, listen)
            .await
            .unwrap_or_else(|e| {
                panic!("port {SDK_PORT} must be free for the Python SDK test: {e}")
            });
        let dir = local_emulators::stack::temp_dir("dps-sdk").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, sim.ca_pem()).unwrap();

        let output = run_sdk(
            &ca,
            &group_key.derive_device_key(IMSI),
            r#"{"modelId":"dtmi:demo;1"}"#,
        )
        .await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(result["status"], "assigned");
        assert_eq!(result["deviceId"], IMSI);
        assert_eq!(result["payload"], json!({"modelId": "dtmi:demo;1"}));
        assert_eq!(sim.assigned().len(), 1);

        let wrong = SymmetricKey::from_base64(&random_key_base64()).unwrap();
        let refused = run_sdk(&ca, &wrong, "{}").await;
        assert!(!refused.status.success());
        assert!(sim.stats().refused.load(Ordering::Relaxed) >= 1);
        assert_eq!(sim.assigned().len(), 1);
    }
}

/// The official Azure IoT Node.js SDK (the one the original write-up's Lambda used) through the
/// simulator: `sr` unencoded, `skn=registration`, `&ClientVersion=` in the user name, TLS 1.3.
mod official_node_sdk {
    use super::*;

    async fn run_sdk(
        sim: &DpsSimulator,
        ca: &std::path::Path,
        key: &SymmetricKey,
    ) -> std::process::Output {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop");
        let mut command = tokio::process::Command::new("node");
        command
            .current_dir(&dir)
            .arg("node_dps_register.js")
            .args(["--host", &format!("localhost:{}", sim.addr().port())])
            .args([
                "--scope",
                SCOPE,
                "--registration-id",
                IMSI,
                "--key",
                &key.to_base64(),
            ])
            .args(["--payload", r#"{"modelId":"dtmi:demo;1"}"#])
            .env("NODE_EXTRA_CA_CERTS", ca)
            .kill_on_drop(true);
        tokio::time::timeout(Duration::from_secs(60), command.output())
            .await
            .expect("the SDK finished within 60 s")
            .expect("node on PATH and tests/interop/node_modules (run `make tools`)")
    }

    #[tokio::test]
    async fn node_sdk_registers_and_is_refused_with_a_wrong_key() {
        let f = simulator(|c| c.retry_after = 1).await;
        let dir = local_emulators::stack::temp_dir("dps-node").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, f.sim.ca_pem()).unwrap();

        let output = run_sdk(&f.sim, &ca, &f.group_key.derive_device_key(IMSI)).await;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(result["status"], "assigned");
        assert_eq!(result["deviceId"], IMSI);
        assert_eq!(result["payload"], json!({"modelId": "dtmi:demo;1"}));

        let wrong = SymmetricKey::from_base64(&random_key_base64()).unwrap();
        let refused = run_sdk(&f.sim, &ca, &wrong).await;
        assert!(!refused.status.success());
        assert_eq!(f.sim.stats().refused.load(Ordering::Relaxed), 1);
        assert_eq!(f.sim.assigned().len(), 1);
    }
}

/// The azure-dps-register function's real handler, with the real SDK against the local AWS
/// endpoint and the real DPS client against the simulator.
mod function {
    use super::*;
    use aws_sdk_ssm::types::ParameterType;
    use azure_dps_register::config::Config;
    use azure_dps_register::handler::{handle, Refused, Response};
    use azure_dps_register::state::State;
    use lambda_runtime::Context;
    use local_emulators::fault_proxy::{FaultProxy, Mode};
    use local_emulators::local_aws::{local_sdk_config, LocalAws};
    use shared::registry::{DeviceId, DeviceRecord, DeviceStatus};
    use std::collections::HashMap;

    const GROUP_KEY_PARAMETER: &str = "/soracom-dps/group-key";

    struct Setup {
        dps: Fixture,
        _aws: LocalAws,
        state: State,
        config: Config,
        _ca_dir: local_emulators::stack::TempDir,
    }

    fn event_file(name: &str) -> String {
        local_emulators::fixtures::event_text("azure-dps-register", name)
    }

    /// A Context built the way the runtime builds it from the Runtime API's headers, where the
    /// real service carries the client context as raw JSON.
    fn funk_context(file: &str, deadline_in: Option<Duration>) -> Context {
        let compact = serde_json::from_str::<serde_json::Value>(&event_file(file))
            .unwrap()
            .to_string();
        let deadline =
            std::time::SystemTime::now() + deadline_in.unwrap_or(Duration::from_secs(30));
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

    async fn setup_with(
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
        let s = setup(|_| {}, None).await;
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
        let faults = super::transient_faults(100)
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
        let state =
            State::new(s.config.clone(), &local_sdk_config(&proxy.endpoint()).await).unwrap();
        proxy.set(Mode::SlowOperation(
            "DynamoDB_20120810.UpdateItem",
            Duration::from_secs(30),
        ));
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
}
