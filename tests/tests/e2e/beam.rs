//! SORACOM Beam's front door of azure-dps-register: API Gateway HTTP API events signed as Beam
//! signs them, through the real gate (PSK from SSM, used signatures in the device table, both
//! on moto) into the real handler and the DPS simulator.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_ssm::types::ParameterType;
use azure_dps_register::beam::{self, Gate};
use serde_json::{json, Value};
use shared::registry::{DeviceId, DeviceRecord, DeviceStatus, DynamoRegistry};
use shared::secrets::SsmSecretStore;
use shared::soracom::{beam_signature, BeamHeaders};

use crate::azure_dps_register::{context, setup_with, Setup};
use local_emulators::local_aws::random_key_base64;

const PSK_PARAMETER: &str = "/soracom-dps/beam-psk";
const IMSI: &str = "440103123456789";

/// The function's state and its Beam gate, and the PSK (made for this test) if it is stored.
async fn beam_setup(store_psk: bool) -> (Setup, Gate<SsmSecretStore, DynamoRegistry>, String) {
    let psk = random_key_base64();
    let s = setup_with(
        |_| {},
        None,
        &[
            ("BEAM_PSK_PARAMETER", PSK_PARAMETER),
            ("ALLOWED_OPERATOR_IDS", "OP0012345678"),
        ],
    )
    .await;
    if store_psk {
        s._aws
            .put_parameter(PSK_PARAMETER, &psk, ParameterType::SecureString)
            .await
            .unwrap();
    }
    let sdk = s._aws.sdk_config().await;
    let gate = Gate {
        config: s.config.beam.clone(),
        psk: SsmSecretStore::new(aws_sdk_ssm::Client::new(&sdk)),
        used: DynamoRegistry::new(aws_sdk_dynamodb::Client::new(&sdk), "devices"),
    };
    (s, gate, psk)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The headers Beam adds, signed with `psk`, stamped `age` ago.
fn signed(psk: &str, imsi: &str, age: Duration) -> Value {
    let mut headers = BeamHeaders {
        imei: Some("867600012345678".into()),
        imsi: Some(imsi.into()),
        msisdn: None,
        sim_id: Some("8981100012345678901".into()),
        timestamp: Some((now_ms() - age.as_millis() as u64).to_string()),
        signature: None,
        signature_version: Some("20151001".into()),
    };
    headers.signature = Some(beam_signature(psk.as_bytes(), &headers));
    json!({
        "x-soracom-imei": headers.imei,
        "x-soracom-imsi": headers.imsi,
        "x-soracom-sim-id": headers.sim_id,
        "x-soracom-timestamp": headers.timestamp,
        "x-soracom-signature": headers.signature,
        "x-soracom-signature-version": headers.signature_version,
        "content-type": "application/json",
    })
}

fn request(headers: Value, body: &str) -> Value {
    json!({
        "version": "2.0",
        "routeKey": "POST /register",
        "rawPath": "/register",
        "rawQueryString": "",
        "headers": headers,
        "requestContext": {
            "http": {"method": "POST", "path": "/register", "protocol": "HTTP/1.1", "sourceIp": "100.64.0.1"},
            "routeKey": "POST /register",
            "stage": "$default"
        },
        "body": body,
        "isBase64Encoded": false
    })
}

async fn send(
    s: &Setup,
    gate: &Gate<SsmSecretStore, DynamoRegistry>,
    event: Value,
) -> (u64, Value) {
    // API Gateway invokes without a client context: only the signed headers identify the SIM.
    let ctx = context(&json!({}), Duration::from_secs(10));
    let answer = beam::handle(event, &ctx, &s.state, gate).await;
    let body = serde_json::from_str(answer["body"].as_str().unwrap()).unwrap();
    (answer["statusCode"].as_u64().unwrap(), body)
}

fn connections(s: &Setup) -> u64 {
    s.dps.sim.stats().connections.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_beam_signed_request_registers_the_sim_once() {
    let (s, gate, psk) = beam_setup(true).await;
    let event = request(signed(&psk, IMSI, Duration::ZERO), "{}");
    let (status, answer) = send(&s, &gate, event.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let expected = s.dps.group_key.derive_device_key(IMSI).to_base64();
    assert!(
        answer["body"]
            .as_str()
            .unwrap()
            .ends_with(&format!("SharedAccessKey={expected}")),
        "the same answer as through Funk"
    );
    assert_eq!(answer["source"], "dps");
    assert_eq!(connections(&s), 1);

    // The same request again (captured and replayed within the window): refused, nothing else.
    let (status, replayed) = send(&s, &gate, event).await;
    assert_eq!(
        (status, replayed["error"].as_str()),
        (403, Some("beam-replayed"))
    );
    assert_eq!(connections(&s), 1);

    // A fresh signed request for the same SIM: answered from its record, as through Funk.
    let (status, again) = send(&s, &gate, request(signed(&psk, IMSI, Duration::ZERO), "")).await;
    assert_eq!((status, again["source"].as_str()), (200, Some("record")));
}

#[tokio::test]
async fn unsigned_badly_signed_and_stale_requests_get_403_and_nothing_else() {
    let (s, gate, psk) = beam_setup(true).await;
    let mut unsigned = signed(&psk, IMSI, Duration::ZERO);
    unsigned
        .as_object_mut()
        .unwrap()
        .remove("x-soracom-signature");
    let mut forged_imsi = signed(&psk, IMSI, Duration::ZERO);
    forged_imsi["x-soracom-imsi"] = json!("440103999999998");
    let cases = [
        (unsigned, "beam-signature"),
        (
            signed(&random_key_base64(), IMSI, Duration::ZERO),
            "beam-signature",
        ),
        (forged_imsi, "beam-signature"),
        (signed(&psk, IMSI, Duration::from_secs(600)), "beam-stale"),
    ];
    for (headers, code) in cases {
        let (status, answer) = send(&s, &gate, request(headers, "{}")).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (403, Some(code)),
            "{answer}"
        );
    }
    assert_eq!(connections(&s), 0);
    assert!(s
        .state
        .registry
        .get(&DeviceId::Sim(IMSI.into()))
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn through_beam_a_blocked_sim_is_refused_as_through_funk() {
    let (s, gate, psk) = beam_setup(true).await;
    let mut blocked = DeviceRecord::allowed(DeviceId::Sim(IMSI.into()));
    blocked.status = DeviceStatus::Blocked;
    s.state.registry.put(&blocked).await.unwrap();
    let (status, answer) = send(&s, &gate, request(signed(&psk, IMSI, Duration::ZERO), "{}")).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("sim-blocked")),
        "{answer}"
    );
    assert_eq!(connections(&s), 0);
}

#[tokio::test]
async fn without_its_key_the_front_door_stays_shut() {
    let (s, gate, psk) = beam_setup(false).await;
    let (status, answer) = send(&s, &gate, request(signed(&psk, IMSI, Duration::ZERO), "{}")).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (403, Some("beam-not-configured")),
        "{answer}"
    );
    assert_eq!(connections(&s), 0);
}
