//! The official AWS IoT Device SDK v2 for Python (`awsiotsdk`, pinned in tests/requirements.txt)
//! provisioning by claim through the AWS IoT MQTT simulator and the real fleet-prehook handler,
//! as its fleet provisioning sample does: what a developer testing firmware locally meets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use local_emulators::local_aws::venv_bin;
use serde_json::Value;

use local_emulators::provisioning_template::TemplateBody;

use crate::fleet_flow::{flow, flow_with, Flow, PREFIX, TEMPLATE};

/// The SDK's provisioning with a claim for `serial` and the script's `flags` (`--csr`:
/// CreateCertificateFromCsr instead of new keys; `--reuse-token`: RegisterThing twice); the
/// script's JSON answer.
async fn sdk_provision(
    f: &Flow,
    claim: &(PathBuf, PathBuf),
    serial: &str,
    flags: &[&str],
) -> Value {
    run_device_script(f, "aws_fleet_provisioning.py", claim, serial, flags).await
}

/// One of the device scripts in tests/interop, connected with `claim` as `claim.<serial>`; its
/// JSON answer (a rejection is an answer; a failed conversation fails the test).
async fn run_device_script(
    f: &Flow,
    script: &str,
    claim: &(PathBuf, PathBuf),
    serial: &str,
    flags: &[&str],
) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(script);
    let mut command = tokio::process::Command::new(venv_bin("python"));
    command
        .arg(script)
        .args(["--host", "localhost", "--port"])
        .arg(f.sim.addr().port().to_string())
        .arg("--ca")
        .arg(f.dir.path().join("server-ca.pem"))
        .arg("--cert")
        .arg(&claim.0)
        .arg("--key")
        .arg(&claim.1)
        .args(["--client-id", &format!("claim.{serial}")])
        .args(["--template", TEMPLATE, "--serial", serial])
        .args(flags)
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the device script finished within 60 s")
        .expect("python from .venv (run `make tools`)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_provisions_an_allowed_serial_and_is_refused_an_unknown_one() {
    let f = flow(None).await;
    let claim = f.claim("SN-0001").await;
    let done = sdk_provision(&f, &claim, "SN-0001", &[]).await;
    assert_eq!(done["thingName"], "fleet-SN-0001", "{done}");
    let things = f.sim.things();
    assert_eq!(things.len(), 1);
    assert_eq!(
        things[0].certificate_id,
        done["certificateId"].as_str().unwrap()
    );
    assert_eq!(things[0].parameters["Location"], "tokyo-1");

    // SN-0404 is not in the device table: the hook's denial, in AWS's rejected shape.
    let claim = f.claim("SN-0404").await;
    let refused = sdk_provision(&f, &claim, "SN-0404", &[]).await;
    let rejected = &refused["rejected"];
    assert_eq!(rejected["step"], "register-thing", "{refused}");
    assert_eq!(rejected["statusCode"], 403);
    assert_eq!(rejected["errorCode"], "AccessDenied");
    assert_eq!(f.sim.things().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_provisions_from_a_csr_and_cannot_spend_a_token_twice() {
    let f = flow(None).await;
    let claim = f.claim("SN-0002").await;
    let done = sdk_provision(&f, &claim, "SN-0002", &["--csr", "--reuse-token"]).await;
    assert_eq!(done["thingName"], "fleet-SN-0002", "{done}");
    let again = &done["again"]["rejected"];
    assert_eq!(again["step"], "register-thing", "{done}");
    assert_eq!(again["statusCode"], 400);
    assert_eq!(again["errorCode"], "InvalidCertificateOwnershipToken");
    assert_eq!(f.sim.things().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_over_mqtt5_provisions_and_is_refused_as_over_mqtt3() {
    let f = flow(None).await;
    let claim = f.claim("SN-0001").await;
    let done = sdk_provision(&f, &claim, "SN-0001", &["--api", "mqtt5", "--reuse-token"]).await;
    assert_eq!(done["thingName"], "fleet-SN-0001", "{done}");
    assert_eq!(
        done["again"]["rejected"]["errorCode"],
        "InvalidCertificateOwnershipToken"
    );

    let claim = f.claim("SN-0002").await;
    let done = sdk_provision(&f, &claim, "SN-0002", &["--api", "mqtt5", "--csr"]).await;
    assert_eq!(done["thingName"], "fleet-SN-0002", "{done}");

    let claim = f.claim("SN-0404").await;
    let refused = sdk_provision(&f, &claim, "SN-0404", &["--api", "mqtt5"]).await;
    assert_eq!(refused["rejected"]["step"], "register-thing", "{refused}");
    assert_eq!(refused["rejected"]["statusCode"], 403);
    assert_eq!(refused["rejected"]["errorCode"], "AccessDenied");
    assert_eq!(f.sim.things().len(), 2);
}

/// A claim connection with `clean_session=false` (as the SDK's sample connects) and its
/// events: CONNACK's session-present flag, then what arrives.
async fn persistent_claim_session(
    f: &Flow,
    claim: &(PathBuf, PathBuf),
) -> (rumqttc::AsyncClient, rumqttc::EventLoop, bool) {
    use fleet_device::tls;
    use rumqttc::{Event, Incoming, MqttOptions, TlsConfiguration, Transport};
    let port = f.sim.addr().port();
    let config = tls::client_config(
        Some(&f.dir.path().join("server-ca.pem")),
        tls::read_certificates(&claim.0).unwrap(),
        tls::read_private_key(&claim.1).unwrap(),
        port,
    )
    .unwrap();
    let mut options = MqttOptions::new("claim.SN-0001", "localhost", port);
    options
        .set_clean_session(false)
        .set_transport(Transport::Tls(TlsConfiguration::Rustls(config)));
    let (client, mut events) = rumqttc::AsyncClient::new(options, 10);
    let present = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Incoming(Incoming::ConnAck(ack)) = events.poll().await.unwrap() {
                return ack.session_present;
            }
        }
    })
    .await
    .unwrap();
    (client, events, present)
}

/// What AWS IoT keeps of a persistent session: the second connection has its subscription
/// (CONNACK says so) and gets the reply to a request it did not subscribe for again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_keeps_its_subscriptions_across_connections() {
    use rumqttc::{Event, Incoming, QoS};
    let f = flow(None).await;
    let claim = f.claim("SN-0001").await;
    let (client, mut events, present) = persistent_claim_session(&f, &claim).await;
    assert!(!present, "a new client has no session");
    client
        .subscribe("$aws/certificates/create/json/accepted", QoS::AtLeastOnce)
        .await
        .unwrap();
    client.disconnect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        while events.poll().await.is_ok() {}
    })
    .await
    .unwrap();

    let (client, mut events, present) = persistent_claim_session(&f, &claim).await;
    assert!(present, "the session was kept");
    // CreateKeysAndCertificate with an empty payload, which AWS IoT takes like `{}`.
    client
        .publish("$aws/certificates/create/json", QoS::AtLeastOnce, false, "")
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Event::Incoming(Incoming::Publish(p)) = events.poll().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(reply.topic, "$aws/certificates/create/json/accepted");
    // Delivered at the QoS the subscription was granted.
    assert_eq!(reply.qos, QoS::AtLeastOnce);
}

/// The CBOR topics driven by paho-mqtt and cbor2 (not the simulator's encoder), as constrained
/// firmware uses them: an allowed serial becomes a thing, an unknown one gets the hook's denial
/// as a CBOR map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cbor_topics_provision_with_another_cbor_encoder() {
    let f = flow(None).await;
    let run = |claim: (PathBuf, PathBuf), serial: &'static str| {
        let f = &f;
        async move { run_device_script(f, "aws_cbor_provisioning.py", &claim, serial, &[]).await }
    };
    let done = run(f.claim("SN-0001").await, "SN-0001").await;
    assert_eq!(done["thingName"], "fleet-SN-0001", "{done}");
    let refused = run(f.claim("SN-0404").await, "SN-0404").await;
    assert_eq!(refused["rejected"]["statusCode"], 403, "{refused}");
    assert_eq!(refused["rejected"]["errorCode"], "AccessDenied");
    assert_eq!(f.sim.things().len(), 1);
}

/// The TemplateBody infra/template.yaml deploys, with its `${...}` filled as CloudFormation
/// would: the stack parameters' defaults, the thing-name prefix this module's flow uses, and
/// the device policy's name.
fn deployed_template_body() -> TemplateBody {
    let template = crate::infra::template();
    let sub = &template["Resources"]["FleetProvisioningTemplate"]["Properties"]["TemplateBody"];
    let serde_yaml::Value::Tagged(sub) = sub else {
        panic!("TemplateBody is a !Sub");
    };
    let mut body = sub.value[0].as_str().expect("the !Sub's text").to_owned();
    let mut values: Vec<(String, String)> = template["Parameters"]
        .as_mapping()
        .unwrap()
        .iter()
        .filter_map(|(name, p)| {
            let default = p.get("Default")?;
            let default = default
                .as_str()
                .map(str::to_owned)
                .or_else(|| default.as_u64().map(|n| n.to_string()))?;
            Some((name.as_str()?.to_owned(), default))
        })
        .collect();
    values.push(("ThingNamePrefix".into(), PREFIX.into()));
    values.push(("DevicePolicyName".into(), "device-policy".into()));
    // The prefix pushed last wins over the stack default.
    for (name, value) in values.iter().rev() {
        body = body.replace(&format!("${{{name}}}"), value);
    }
    assert!(!body.contains("${"), "unfilled: {body}");
    TemplateBody::parse(&body).unwrap()
}

/// The deployed template applied by the simulator, through the official SDK over MQTT 5: the
/// thing gets its attributes (the hook's `Location` override over the default), thing type and
/// group, and the device its DeviceConfiguration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deployed_template_gives_attributes_type_group_and_device_configuration() {
    let body = deployed_template_body();
    let f = flow_with(None, |config| config.templates[0].body = body).await;
    let claim = f.claim("SN-0001").await;
    let done = sdk_provision(&f, &claim, "SN-0001", &["--api", "mqtt5"]).await;
    assert_eq!(done["thingName"], "fleet-SN-0001", "{done}");
    assert_eq!(done["deviceConfiguration"]["location"], "tokyo-1");
    assert_eq!(done["deviceConfiguration"]["thingGroup"], "soracom-fleet");
    let thing = &f.sim.things()[0];
    assert_eq!(thing.attributes["serial"], "SN-0001");
    assert_eq!(thing.attributes["location"], "tokyo-1");
    assert_eq!(thing.thing_type.as_deref(), Some("soracom-fleet-device"));
    assert_eq!(thing.thing_groups, ["soracom-fleet"]);

    // SN-0002 has no override: the template's default stands.
    let claim = f.claim("SN-0002").await;
    let done = sdk_provision(&f, &claim, "SN-0002", &[]).await;
    assert_eq!(
        done["deviceConfiguration"]["location"], "unassigned",
        "{done}"
    );
    assert_eq!(f.sim.things()[1].attributes["location"], "unassigned");
}

/// Past the account's RegisterThing quota the device is refused as AWS IoT refuses it (429
/// ThrottlingException), the hook is not asked, and nothing is provisioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_thing_beyond_the_quota_is_throttled() {
    // One call per hour: the second is over the quota whenever the test runs.
    let f = flow_with(None, |config| {
        config.register_thing_limit = Some((1, Duration::from_secs(3600)))
    })
    .await;
    let claim = f.claim("SN-0001").await;
    let done = sdk_provision(&f, &claim, "SN-0001", &[]).await;
    assert_eq!(done["thingName"], "fleet-SN-0001", "{done}");
    let claim = f.claim("SN-0002").await;
    let refused = sdk_provision(&f, &claim, "SN-0002", &["--api", "mqtt5"]).await;
    assert_eq!(refused["rejected"]["statusCode"], 429, "{refused}");
    assert_eq!(refused["rejected"]["errorCode"], "ThrottlingException");
    assert_eq!(f.sim.things().len(), 1);
    assert_eq!(
        f.sim
            .stats()
            .hook_calls
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}
