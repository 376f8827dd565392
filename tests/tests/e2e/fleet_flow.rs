//! Trusted-user fleet provisioning end to end: installer → claim-issuer (real handler, real
//! aws-sdk-iot against the control-plane double) → claim certificate → fleet-device (the CLI's
//! library) → AWS IoT MQTT simulator over TLS with client certificates → fleet-prehook (real
//! handler, real DynamoDB client on the local AWS endpoint) → thing; the thing's first
//! connection → connect lifecycle event → fleet-confirm (real handler, real aws-sdk-iot against
//! the control-plane double serving the simulator's things and certificates).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ::claim_issuer::config::Config as IssuerConfig;
use ::claim_issuer::handler::{handle as issue, State as IssuerState};
use fleet_device::session::Session;
use fleet_device::{files, provision, tls, DeviceError, Format, Options};
use fleet_prehook::handler::handle;
use local_emulators::fixtures::{self, temp_dir, TempDir};
use local_emulators::iot_control::IotControlPlane;
use local_emulators::iot_mqtt::{
    CertificateStatus, Hook, IotMqttConfig, IotMqttSimulator, Lifecycle, Template,
};
use local_emulators::local_aws::{local_sdk_config, LocalAws};
use serde_json::{json, Value};
use shared::clock::unix_now;
use shared::registry::{ClaimLog, ClaimRecord, DeviceId, DeviceRecord, DynamoRegistry};

use crate::fleet_fixture::*;

pub(crate) const TEMPLATE: &str = "fleet-template";
pub(crate) const PREFIX: &str = "fleet-";

/// The real fleet-prehook handler, as the hook AWS IoT calls.
fn prehook(registry: &DynamoRegistry, extra: &[(&str, &str)]) -> Hook {
    let registry = registry.clone();
    let config = config(extra);
    Hook::handler(move |event| {
        let (registry, config) = (registry.clone(), config.clone());
        async move {
            serde_json::to_value(handle(event, &config, &registry).await).map_err(|e| e.to_string())
        }
    })
}

/// The real fleet-confirm handler, as the stack's topic rule invokes it, with AWS IoT's control
/// plane at `iot`.
async fn confirm_rule(registry: &DynamoRegistry, iot: &IotControlPlane) -> Lifecycle {
    let registry = registry.clone();
    let client = aws_sdk_iot::Client::new(&local_sdk_config(&iot.endpoint()).await);
    let config = fleet_confirm::config::Config::from_env(&fixtures::env(
        &[("DEVICES_TABLE", TABLE), ("THING_NAME_PREFIX", PREFIX)],
        &[],
    ))
    .unwrap();
    Lifecycle {
        client_prefix: PREFIX.into(),
        function: Hook::handler(move |event| {
            let (registry, client, config) = (registry.clone(), client.clone(), config.clone());
            async move {
                fleet_confirm::handler::handle(event, &config, &registry, &client)
                    .await
                    .map(|r| json!({"outcome": r.outcome.code(), "retired": r.retired}))
                    .map_err(|e| e.to_string())
            }
        }),
    }
}

pub(crate) struct Flow {
    _aws: LocalAws,
    pub(crate) registry: DynamoRegistry,
    pub(crate) iot: IotControlPlane,
    issuer: IssuerState,
    pub(crate) sim: IotMqttSimulator,
    pub(crate) dir: TempDir,
}

/// The local AWS endpoint seeded like the other fleet tests (SN-0001 allowed with a Location
/// override, SN-0666 blocked, plus SN-0002 allowed), the control-plane double, claim-issuer's
/// state, and the MQTT simulator with `hook` (the real hook requiring a claim record if `None`).
pub(crate) async fn flow(hook: Option<Hook>) -> Flow {
    flow_with(hook, |_| {}).await
}

/// [`flow`] with the simulator's configuration adjusted (its hook timeout, say).
pub(crate) async fn flow_with(
    hook: Option<Hook>,
    configure: impl FnOnce(&mut IotMqttConfig),
) -> Flow {
    flow_inner(hook, &[], configure).await
}

/// [`flow`] with the real hook configured by `hook_env` besides `REQUIRE_CLAIM_RECORD=true`.
pub(crate) async fn flow_with_hook_env(hook_env: &[(&str, &str)]) -> Flow {
    flow_inner(None, hook_env, |_| {}).await
}

async fn flow_inner(
    hook: Option<Hook>,
    hook_env: &[(&str, &str)],
    configure: impl FnOnce(&mut IotMqttConfig),
) -> Flow {
    let (aws, registry) = setup().await;
    registry
        .put(&DeviceRecord::allowed(DeviceId::Serial("SN-0002".into())))
        .await
        .unwrap();
    let iot = IotControlPlane::start(&[TEMPLATE]).await.unwrap();
    let env = fixtures::env(
        &[
            ("DEVICES_TABLE", TABLE),
            ("PROVISIONING_TEMPLATE", TEMPLATE),
            ("IOT_DATA_ENDPOINT", "localhost"),
        ],
        &[],
    );
    let issuer =
        crate::claim_issuer::state(&aws, &iot, IssuerConfig::from_env(&env).unwrap()).await;
    let mut env = vec![("REQUIRE_CLAIM_RECORD", "true")];
    env.extend_from_slice(hook_env);
    let hook = hook.unwrap_or_else(|| prehook(&registry, &env));
    let mut config = IotMqttConfig::new(iot.ca_pem(), vec![Template::new(TEMPLATE, PREFIX, hook)]);
    config.lifecycle = Some(confirm_rule(&registry, &iot).await);
    configure(&mut config);
    let sim = IotMqttSimulator::start(config, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    iot.serve_fleet(sim.fleet());
    let dir = temp_dir("device-flow").unwrap();
    std::fs::write(dir.path().join("server-ca.pem"), sim.ca_pem()).unwrap();
    Flow {
        _aws: aws,
        registry,
        iot,
        issuer,
        sim,
        dir,
    }
}

impl Flow {
    /// An installer asks claim-issuer for a claim bound to `serial`; its certificate and key go
    /// to `claim.pem.crt` / `claim.pem.key`, as an installer app would hand them to the device.
    pub(crate) async fn claim(&self, serial: &str) -> (PathBuf, PathBuf) {
        self.claim_as(serial, None).await
    }

    /// [`Flow::claim`] by the installer `sub` (`None`: the sample event's).
    pub(crate) async fn claim_as(&self, serial: &str, sub: Option<&str>) -> (PathBuf, PathBuf) {
        let mut event = fixtures::event("claim-issuer", "issue.json");
        event["body"] = Value::String(json!({ "serial": serial }).to_string());
        if let Some(sub) = sub {
            event["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] = json!(sub);
        }
        let response = issue(event, unix_now(), &self.issuer).await;
        assert_eq!(response.status_code, 200, "{}", response.body);
        let body: Value = serde_json::from_str(&response.body).unwrap();
        self.write_claim(
            serial,
            body["certificatePem"].as_str().unwrap(),
            body["privateKey"].as_str().unwrap(),
        )
    }

    fn write_claim(&self, label: &str, cert: &str, key: &str) -> (PathBuf, PathBuf) {
        let cert_file = self.dir.path().join(format!("claim-{label}.pem.crt"));
        let key_file = self.dir.path().join(format!("claim-{label}.pem.key"));
        std::fs::write(&cert_file, cert).unwrap();
        std::fs::write(&key_file, key).unwrap();
        (cert_file, key_file)
    }

    fn options(&self, serial: &str, claim: &(PathBuf, PathBuf), csr: bool) -> Options {
        Options {
            host: "localhost".into(),
            port: self.sim.addr().port(),
            ca_file: Some(self.dir.path().join("server-ca.pem")),
            claim_certificate: claim.0.clone(),
            claim_key: claim.1.clone(),
            template: TEMPLATE.into(),
            parameters: BTreeMap::from([("SerialNumber".to_owned(), serial.to_owned())]),
            csr,
            client_id: format!("claim.{serial}"),
            out_dir: self.dir.path().join(format!("identity-{serial}")),
            force: false,
            timeout: Duration::from_secs(20),
            verify: true,
            format: Format::Json,
        }
    }
}

impl Flow {
    /// A claim connection with `claim` as `client_id`, as a device opens it.
    async fn claim_session(
        &self,
        claim: &(PathBuf, PathBuf),
        client_id: &str,
    ) -> Result<Session, DeviceError> {
        let port = self.sim.addr().port();
        let ca = self.dir.path().join("server-ca.pem");
        let config = tls::client_config(
            Some(&ca),
            tls::read_certificates(&claim.0).unwrap(),
            tls::read_private_key(&claim.1).unwrap(),
            port,
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        Session::connect("localhost", port, client_id, config, deadline).await
    }
}

/// CreateKeysAndCertificate over `session`: the new certificate, key and ownership token.
async fn create_keys(session: &mut Session) -> Value {
    session
        .request(
            "CreateKeysAndCertificate",
            "$aws/certificates/create",
            Format::Json,
            &json!({}),
        )
        .await
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn rejection(result: Result<fleet_device::Provisioned, DeviceError>) -> (u64, String, String) {
    match result {
        Err(DeviceError::Rejected {
            status,
            code,
            message,
            ..
        }) => (status, code, message),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn no_files_left(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_serial_goes_from_installer_to_thing() {
    let f = flow(None).await;
    let claim = f.claim("SN-0001").await;
    let options = f.options("SN-0001", &claim, false);
    let mut lines = Vec::new();
    let done = provision(&options, |l| lines.push(l.to_owned()))
        .await
        .unwrap();

    assert_eq!(done.thing_name, "fleet-SN-0001");
    assert!(
        done.verified,
        "the new certificate must connect as the thing"
    );
    let things = f.sim.things();
    assert_eq!(things.len(), 1);
    let thing = &things[0];
    assert_eq!(thing.certificate_id, done.certificate_id);
    assert_eq!(thing.claim_certificate_id, f.iot.issued()[0].certificate_id);
    // The hook's override (from the device table) is applied by the template.
    assert_eq!(thing.parameters["Location"], "tokyo-1");
    assert_eq!(
        f.sim.certificate_status(&done.certificate_id),
        Some(CertificateStatus::Active)
    );
    // The hook recorded the provisioning against the claim that claim-issuer bound.
    let record = f
        .registry
        .get(&DeviceId::Serial("SN-0001".into()))
        .await
        .unwrap()
        .unwrap();
    let provisioning = record.provisioning.unwrap();
    assert_eq!(provisioning.certificate_id, done.certificate_id);
    assert_eq!(
        provisioning.claim_certificate_id.as_deref(),
        Some(thing.claim_certificate_id.as_str())
    );

    // The identity on disk: owner-only key and directory, a certificate the key belongs to.
    assert_eq!(mode(&options.out_dir), 0o700);
    assert_eq!(mode(&done.private_key_file), 0o600);
    let key = tls::read_private_key(&done.private_key_file).unwrap();
    let certs = tls::read_certificates(&done.certificate_file).unwrap();
    assert!(tls::client_config(options.ca_file.as_deref(), certs, key, 1).is_ok());
    let thing_file: Value = serde_json::from_str(
        &std::fs::read_to_string(options.out_dir.join(files::THING_FILE)).unwrap(),
    )
    .unwrap();
    assert_eq!(thing_file["thingName"], "fleet-SN-0001");
    assert!(!lines.iter().any(|l| l.contains("PRIVATE KEY")));

    // A second run does not overwrite the device's identity.
    let again = provision(&options, |_| {}).await;
    assert!(
        matches!(&again, Err(DeviceError::Setup(m)) if m.contains("already exists")),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_device_speaks_the_cbor_topics_too() {
    let f = flow(None).await;
    let claim = f.claim("SN-0002").await;
    let mut options = f.options("SN-0002", &claim, true);
    options.format = Format::Cbor;
    let done = provision(&options, |_| {}).await.unwrap();
    assert_eq!(done.thing_name, "fleet-SN-0002");
    assert!(done.verified);
    // CreateCertificateFromCsr and RegisterThing, both on the CBOR topics.
    assert_eq!(f.sim.stats().cbor_requests.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_keeps_the_key_on_the_device() {
    let f = flow(None).await;
    let claim = f.claim("SN-0002").await;
    let done = provision(&f.options("SN-0002", &claim, true), |_| {})
        .await
        .unwrap();
    assert_eq!(done.thing_name, "fleet-SN-0002");
    assert!(done.verified);
    assert_eq!(mode(&done.private_key_file), 0o600);
    assert_eq!(
        f.sim.stats().certificates_created.load(Ordering::Relaxed),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_serial_and_claim_bound_elsewhere_are_rejected_and_leave_nothing() {
    let f = flow(None).await;
    // SN-0404 is not in the device table; the claim is bound to it, so only the table refuses.
    let claim = f.claim("SN-0404").await;
    let options = f.options("SN-0404", &claim, false);
    let (status, code, _) = rejection(provision(&options, |_| {}).await);
    assert_eq!((status, code.as_str()), (403, "AccessDenied"));
    no_files_left(&options.out_dir);

    // A claim bound to SN-0001 cannot provision SN-0002.
    let bound = f.claim("SN-0001").await;
    let (status, _, _) = rejection(provision(&f.options("SN-0002", &bound, false), |_| {}).await);
    assert_eq!(status, 403);
    assert!(f.sim.things().is_empty());
    assert_eq!(f.sim.stats().hook_calls.load(Ordering::Relaxed), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_claim_certificate_is_refused_at_the_handshake() {
    let f = flow(None).await;
    let now = unix_now();
    let expired = f
        .iot
        .issue_with_validity(TEMPLATE, now - 600, now - 300)
        .unwrap();
    let claim = f.write_claim(
        "expired",
        expired["certificatePem"].as_str().unwrap(),
        expired["keyPair"]["PrivateKey"].as_str().unwrap(),
    );
    let result = provision(&f.options("SN-0001", &claim, false), |_| {}).await;
    assert!(
        matches!(result, Err(DeviceError::CertificateExpired)),
        "{result:?}"
    );
    assert_eq!(result.unwrap_err().exit_code(), 3);
    // The device saw the alert; the simulator records why it sent it right after.
    let refusal = f
        .sim
        .refusal_containing("certificate expired", Duration::from_secs(5))
        .await;
    assert!(refusal.is_some(), "{:?}", f.sim.refusals());
    assert_eq!(
        f.sim.stats().certificates_created.load(Ordering::Relaxed),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ownership_token_is_single_use_and_a_pending_certificate_cannot_connect() {
    let f = flow(None).await;
    let claim = f.claim("SN-0001").await;
    let options = f.options("SN-0001", &claim, false);
    let tls_config = |cert: Vec<_>, key| {
        tls::client_config(options.ca_file.as_deref(), cert, key, options.port).unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut session = f.claim_session(&claim, "claim.SN-0001").await.unwrap();
    let created = create_keys(&mut session).await;
    let pem = created["certificatePem"].as_str().unwrap();
    let key = created["privateKey"].as_str().unwrap();

    // Not yet registered: the new certificate is PENDING_ACTIVATION and may not connect.
    let pending = Session::connect(
        "localhost",
        options.port,
        "fleet-SN-0001",
        tls_config(
            tls::certificates_from_pem(pem.as_bytes(), "new").unwrap(),
            tls::private_key_from_pem(key.as_bytes(), "new").unwrap(),
        ),
        deadline,
    )
    .await;
    assert!(
        matches!(pending, Err(DeviceError::NotAuthorized(_))),
        "{:?}",
        pending.err()
    );

    let register = json!({
        "certificateOwnershipToken": created["certificateOwnershipToken"],
        "parameters": {"SerialNumber": "SN-0001"},
    });
    let topic = format!("$aws/provisioning-templates/{TEMPLATE}/provision");
    let accepted = session
        .request("RegisterThing", &topic, Format::Json, &register)
        .await
        .unwrap();
    assert_eq!(accepted["thingName"], "fleet-SN-0001");
    let reused = session
        .request("RegisterThing", &topic, Format::Json, &register)
        .await;
    match reused {
        Err(DeviceError::Rejected {
            status,
            code,
            message,
            ..
        }) => {
            assert_eq!(
                (status, code.as_str()),
                (400, "InvalidCertificateOwnershipToken")
            );
            assert!(message.contains("already been used"), "{message}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let forged =
        json!({"certificateOwnershipToken": "forged", "parameters": {"SerialNumber": "SN-0001"}});
    assert!(matches!(
        session
            .request("RegisterThing", &topic, Format::Json, &forged)
            .await,
        Err(DeviceError::Rejected { status: 400, .. })
    ));
    session.close().await;
    assert_eq!(f.sim.things().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_slow_hook_denies() {
    let failing = flow(Some(Hook::handler(|_| async {
        Err::<Value, _>("Unhandled: function crashed".to_owned())
    })))
    .await;
    // A hook that outlives the simulator's hook timeout (AWS IoT's is 5 s; here 300 ms, so
    // that the test need not wait 5 s) is denied at the timeout, whatever it says later.
    let hook_timeout = Duration::from_millis(300);
    let slow = flow_with(
        Some(Hook::handler(|_| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(json!({"allowProvisioning": true}))
        })),
        |c| c.hook_timeout = hook_timeout,
    )
    .await;
    let no_answer = flow(Some(Hook::handler(|_| async { Ok(json!({})) }))).await;

    let run = |f: &Flow| {
        let (cert, key) = (f.dir.path().join("c"), f.dir.path().join("k"));
        let issued = f
            .iot
            .issue_with_validity(TEMPLATE, unix_now() - 1, unix_now() + 300)
            .unwrap();
        std::fs::write(&cert, issued["certificatePem"].as_str().unwrap()).unwrap();
        std::fs::write(&key, issued["keyPair"]["PrivateKey"].as_str().unwrap()).unwrap();
        f.options("SN-0001", &(cert, key), false)
    };
    let (a, b, c) = (run(&failing), run(&slow), run(&no_answer));
    let started = Instant::now();
    let (failed, slowed, unanswered) = tokio::join!(
        provision(&a, |_| {}),
        provision(&b, |_| {}),
        provision(&c, |_| {})
    );
    let elapsed = started.elapsed();

    let (status, code, message) = rejection(failed);
    assert_eq!((status, code.as_str()), (403, "AccessDenied"));
    assert!(message.contains("failed"), "{message}");
    let (status, _, message) = rejection(slowed);
    assert_eq!(status, 403);
    assert!(message.contains("within 300 ms"), "{message}");
    assert!(elapsed >= hook_timeout, "{elapsed:?}");
    let (status, _, message) = rejection(unanswered);
    assert_eq!(status, 403);
    assert!(message.contains("denied"), "{message}");
    for f in [&failing, &slow, &no_answer] {
        assert!(f.sim.things().is_empty());
    }
    no_files_left(&a.out_dir);
}

/// The hole, over MQTT: with a claim bound to no serial, one connection looped
/// CreateKeysAndCertificate + RegisterThing over every allowed serial. The claim's first
/// RegisterThing spends it; the second, for another serial, is denied by the hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_claim_cannot_provision_two_devices_over_one_connection() {
    let f = flow(None).await;
    // What claim-issuer issues with ALLOW_UNBOUND_CLAIMS=true: recorded, bound to no serial.
    let now = unix_now();
    let issued = f
        .iot
        .issue_with_validity(TEMPLATE, now - 1, now + 300)
        .unwrap();
    let claim_id = issued["certificateId"].as_str().unwrap().to_owned();
    f.registry
        .record_claim(&ClaimRecord {
            certificate_id: claim_id,
            issued_to: "installer-sub".into(),
            serial: None,
            issued_at: now,
            valid_until: now + 300,
            retain_until: now + 86_400,
            used: None,
        })
        .await
        .unwrap();
    let claim = f.write_claim(
        "unbound",
        issued["certificatePem"].as_str().unwrap(),
        issued["keyPair"]["PrivateKey"].as_str().unwrap(),
    );
    let mut session = f.claim_session(&claim, "claim.loop").await.unwrap();
    let topic = format!("$aws/provisioning-templates/{TEMPLATE}/provision");
    let mut outcomes = Vec::new();
    for serial in ["SN-0001", "SN-0002"] {
        let created = create_keys(&mut session).await;
        let register = json!({
            "certificateOwnershipToken": created["certificateOwnershipToken"],
            "parameters": {"SerialNumber": serial},
        });
        outcomes.push(
            session
                .request("RegisterThing", &topic, Format::Json, &register)
                .await,
        );
    }
    session.close().await;
    assert_eq!(outcomes[0].as_ref().unwrap()["thingName"], "fleet-SN-0001");
    assert!(
        matches!(&outcomes[1], Err(DeviceError::Rejected { status: 403, .. })),
        "{:?}",
        outcomes[1]
    );
    let things: Vec<String> = f.sim.things().into_iter().map(|t| t.thing_name).collect();
    assert_eq!(things, ["fleet-SN-0001"]);
}

/// The hole: the claim policy admitted any client id, so a claim could connect as a
/// provisioned device's thing name, and AWS IoT disconnects the other connection of that id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_connection_cannot_take_a_devices_client_id() {
    let f = flow(None).await;
    let claim = f.claim("SN-0001").await;
    let connect = |client_id: &'static str| f.claim_session(&claim, client_id);
    let refused = connect("fleet-SN-0001").await;
    assert!(
        matches!(refused, Err(DeviceError::NotAuthorized(_))),
        "{:?}",
        refused.err()
    );
    connect("claim.SN-0001").await.unwrap().close().await;
}

/// The default serial pattern admits exactly what AWS IoT takes in a thing name: serials at
/// its edges (1 character; 64 with ':', '_' and '-') go from installer to thing; one with a
/// '.' (which AWS IoT would refuse after the hook said yes) is refused by claim-issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serials_at_the_default_patterns_edges_become_things() {
    let f = flow(None).await;
    let longest = format!("Z{}", "9:_-".repeat(16))
        .chars()
        .take(64)
        .collect::<String>();
    assert_eq!(longest.len(), 64);
    for serial in ["A", longest.as_str()] {
        f.registry
            .put(&DeviceRecord::allowed(DeviceId::Serial(serial.into())))
            .await
            .unwrap();
        let claim = f.claim(serial).await;
        let mut options = f.options(serial, &claim, false);
        options.out_dir = f.dir.path().join(format!("identity-{}", serial.len()));
        let done = provision(&options, |_| {}).await.unwrap();
        assert_eq!(done.thing_name, format!("{PREFIX}{serial}"));
        assert!(done.verified);
    }
    let mut event = fixtures::event("claim-issuer", "issue.json");
    event["body"] = Value::String(json!({ "serial": "SN.0001" }).to_string());
    assert_eq!(issue(event, unix_now(), &f.issuer).await.status_code, 400);
}

impl Flow {
    /// Provisions `serial` with a claim of installer `sub` into its own directory `label`;
    /// with `connect`, the new certificate then connects as the thing (as fleet-device's
    /// verification does), which AWS IoT reports as the thing's first connection.
    async fn provision_as(
        &self,
        serial: &str,
        sub: &str,
        label: &str,
        connect: bool,
    ) -> Result<fleet_device::Provisioned, DeviceError> {
        let claim = self.claim_as(serial, Some(sub)).await;
        let mut options = self.options(serial, &claim, true);
        options.out_dir = self.dir.path().join(format!("identity-{label}"));
        options.verify = connect;
        provision(&options, |_| {}).await
    }

    /// A connection as `thing` with a provisioned identity; `Err` if AWS IoT refuses it.
    async fn connect_as(
        &self,
        thing: &str,
        done: &fleet_device::Provisioned,
    ) -> Result<Session, DeviceError> {
        let port = self.sim.addr().port();
        let config = tls::client_config(
            Some(&self.dir.path().join("server-ca.pem")),
            tls::read_certificates(&done.certificate_file).unwrap(),
            tls::read_private_key(&done.private_key_file).unwrap(),
            port,
        )
        .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        Session::connect("localhost", port, thing, config, deadline).await
    }

    async fn provisioning(&self, serial: &str) -> shared::registry::Provisioning {
        self.registry
            .get(&DeviceId::Serial(serial.into()))
            .await
            .unwrap()
            .unwrap()
            .provisioning
            .unwrap()
    }
}

/// The hole (issue: "device takeover after ten minutes"): nothing ever confirmed a
/// provisioning, so once it was PENDING_SECONDS old any installer could get a claim for the
/// live serial and have AWS IoT attach a certificate of their own to the device's thing. Now
/// the device's first connection confirms it (fleet-confirm, from AWS IoT's lifecycle event),
/// a confirmed serial takes no other certificate, and an unconfirmed one only through the same
/// installer — whose new certificate, once it connects, retires the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_installer_cannot_take_over_a_device_after_pending_seconds() {
    use shared::registry::ProvisioningState;
    let f = flow_with_hook_env(&[("PENDING_SECONDS", "0")]).await;
    let limit = Duration::from_secs(20);

    // SN-0001: installer A provisions it, the device connects: confirmed.
    let device = f
        .provision_as("SN-0001", "installer-a", "a-1", true)
        .await
        .unwrap();
    let delivered = f.sim.delivered(1, limit).await.expect("a lifecycle event");
    assert_eq!(delivered[0].event["clientId"], "fleet-SN-0001");
    assert_eq!(
        delivered[0].event["principalIdentifier"],
        device.certificate_id.as_str()
    );
    assert_eq!(
        delivered[0].answer.as_ref().unwrap()["outcome"],
        "confirmed"
    );
    let p = f.provisioning("SN-0001").await;
    assert_eq!(
        (p.state, p.issued_to.as_deref()),
        (ProvisioningState::Confirmed, Some("installer-a"))
    );
    // Past PENDING_SECONDS, neither installer B nor A gets another certificate onto it.
    for (installer, label) in [("installer-b", "b-1"), ("installer-a", "a-2")] {
        let (status, _, _) = rejection(f.provision_as("SN-0001", installer, label, false).await);
        assert_eq!(status, 403, "{installer}");
    }
    assert_eq!(
        f.provisioning("SN-0001").await.certificate_id,
        device.certificate_id
    );
    assert_eq!(f.sim.things().len(), 1);

    // SN-0002: provisioned by A but never connected (the device lost power, say).
    let lost = f
        .provision_as("SN-0002", "installer-a", "lost", false)
        .await
        .unwrap();
    assert_eq!(
        f.provisioning("SN-0002").await.state,
        ProvisioningState::Pending
    );
    let (status, _, _) = rejection(f.provision_as("SN-0002", "installer-b", "b-2", false).await);
    assert_eq!(status, 403, "another installer replaced a pending device");
    // The same installer may; the new certificate's first connection retires the old one.
    let replacement = f
        .provision_as("SN-0002", "installer-a", "a-3", true)
        .await
        .unwrap();
    let delivered = f
        .sim
        .delivered(2, limit)
        .await
        .expect("a second lifecycle event");
    let answer = delivered[1].answer.as_ref().unwrap();
    assert_eq!(answer["outcome"], "confirmed");
    assert_eq!(answer["retired"], json!([lost.certificate_id]));
    let p = f.provisioning("SN-0002").await;
    assert_eq!(
        (
            p.certificate_id.as_str(),
            p.state,
            p.replaced_certificate_id
        ),
        (
            replacement.certificate_id.as_str(),
            ProvisioningState::Confirmed,
            None
        )
    );
    assert_eq!(
        f.sim.certificate_status(&lost.certificate_id),
        Some(CertificateStatus::Inactive)
    );
    let refused = f.connect_as("fleet-SN-0002", &lost).await;
    assert!(refused.is_err(), "the retired certificate still connects");
    assert!(f
        .sim
        .refusal_containing("certificate is INACTIVE", limit)
        .await
        .is_some());
    // The replacement connects again; an old event's duplicate changes nothing.
    f.connect_as("fleet-SN-0002", &replacement).await.unwrap();
    let again = f.sim.delivered(3, limit).await.unwrap();
    assert_eq!(
        again[2].answer.as_ref().unwrap()["outcome"],
        "already-confirmed"
    );
}
