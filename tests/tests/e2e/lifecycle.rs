//! sim-lifecycle's handler against moto (device table, SSM) and the IoT Hub registry stand-in
//! over HTTPS: what SORACOM's Event Handler sends when a SIM's status changes.

use std::time::Duration;

use aws_sdk_ssm::types::ParameterType;
use local_emulators::iot_hub::IotHubRegistry;
use local_emulators::local_aws::LocalAws;
use serde_json::{json, Value};
use shared::registry::{
    DeviceId, DeviceStatus, DynamoRegistry, Kind, Listing, Registration, SimRegistry,
};
use shared::secrets::SsmSecretStore;
use sim_lifecycle::config::Config;
use sim_lifecycle::handler::{handle, Failure, State};
use sim_lifecycle::hub::{HubClient, HubError};

const TABLE: &str = "devices";
const HUB: &str = "lifecycle-hub.azure-devices.net";
const PREFIX: &str = "/soracom-dps/iot-hub/";
const IMSI: &str = "440103123456789";
/// The card the events name.
const SIM_ID: &str = "8942310000000000001";
const BUDGET: Duration = Duration::from_secs(8);

struct Fixture {
    aws: LocalAws,
    hub: IotHubRegistry,
    state: State<SsmSecretStore>,
}

async fn fixture(unblock_on_active: bool) -> Fixture {
    let aws = LocalAws::start().await.expect("local AWS endpoint");
    aws.create_devices_table(TABLE).await.unwrap();
    let hub = IotHubRegistry::start(&[HUB]).await.unwrap();
    aws.put_parameter(
        &format!("{PREFIX}{HUB}"),
        &hub.connection_string(HUB).unwrap(),
        ParameterType::SecureString,
    )
    .await
    .unwrap();
    let config = Config::from_env(&[
        ("DEVICES_TABLE", TABLE),
        ("HUB_CREDENTIALS_PREFIX", PREFIX),
        (
            "UNBLOCK_ON_ACTIVE",
            if unblock_on_active { "true" } else { "false" },
        ),
    ])
    .unwrap();
    let tls = dps_client::tls_config(Some(hub.ca_pem().as_bytes())).unwrap();
    let state = State {
        registry: DynamoRegistry::new(aws.dynamodb().await, TABLE),
        secrets: SsmSecretStore::new(aws.ssm().await),
        hub: HubClient::new(tls, Some(hub.endpoint())),
        config,
    };
    Fixture { aws, hub, state }
}

/// A SIM that registered through DPS: allowed, recorded, and a device in the hub.
async fn registered(f: &Fixture) {
    registered_as(f, IMSI, None).await;
}

/// The IMSI `imsi` (of the card `sim_id`, when Funk named it) listed as allowed, registered,
/// and a device named after it in the hub.
async fn registered_as(f: &Fixture, imsi: &str, sim_id: Option<&str>) {
    list(f, &DeviceId::Sim(imsi.into()), DeviceStatus::Allowed).await;
    let registration = Registration {
        registration_id: imsi.into(),
        device_id: imsi.into(),
        ..registration()
    };
    f.state
        .registry
        .record_registration(imsi, sim_id, &registration)
        .await
        .unwrap();
    f.hub.add_device(HUB, imsi);
}

/// The operator's listing of `id` (provisioning-admin).
async fn list(f: &Fixture, id: &DeviceId, status: DeviceStatus) {
    let listing = Listing {
        status,
        valid_until: None,
        allow_reprovision: false,
    };
    f.state.registry.list_device(id, &listing).await.unwrap();
}

fn registration() -> Registration {
    Registration {
        registration_id: IMSI.into(),
        assigned_hub: HUB.into(),
        device_id: IMSI.into(),
        registered_at: 1_800_000_000,
        key_fingerprint: Some("fp".into()),
        return_data: None,
        certificate: None,
    }
}

fn event(status: &str) -> Value {
    event_for(IMSI, status)
}

fn event_for(imsi: &str, status: &str) -> Value {
    json!({
        "parameter1": imsi,
        "parameter2": status,
        "parameter3": "active",
        "parameter4": SIM_ID,
        "parameter5": ""
    })
}

async fn sim_status(f: &Fixture) -> DeviceStatus {
    let entries = f.state.registry.sim(IMSI, None).await.unwrap();
    entries.by_imsi.unwrap().status
}

/// The IMSI's and the card's status (`None`: no item).
async fn statuses(f: &Fixture) -> (Option<DeviceStatus>, Option<DeviceStatus>) {
    let entries = f.state.registry.sim(IMSI, Some(SIM_ID)).await.unwrap();
    (
        entries.by_imsi.map(|e| e.status),
        entries.by_card.map(|e| e.status),
    )
}

#[tokio::test]
async fn a_terminated_sim_is_blocked_and_its_iot_hub_device_disabled_once() {
    let f = fixture(false).await;
    registered(&f).await;

    let answer = handle(event("terminated"), &f.state, BUDGET).await.unwrap();
    assert_eq!(answer["outcome"], "blocked", "{answer}");
    assert_eq!(answer["table"], "blocked");
    assert_eq!(answer["iotHub"], "disabled");
    assert_eq!(sim_status(&f).await, DeviceStatus::Blocked);
    // The record stays: it says where the SIM's identity is, and the operator's report needs it.
    let entries = f
        .state
        .registry
        .sim(IMSI, Some("8942310000000000001"))
        .await
        .unwrap();
    assert_eq!(entries.by_imsi.unwrap().registration, Some(registration()));
    assert_eq!(entries.by_card.unwrap().status, DeviceStatus::Blocked);
    let device = f.hub.device(HUB, IMSI).unwrap();
    assert_eq!(device.status, "disabled");
    assert_eq!(device.status_reason, "SORACOM SIM terminated");
    // The read and the conditional write share one connection (one TLS handshake).
    assert_eq!(f.hub.connections(), 1);

    // SORACOM may deliver it again: nothing more changes.
    let again = handle(event("terminated"), &f.state, BUDGET).await.unwrap();
    assert_eq!(again["table"], "already-blocked", "{again}");
    assert_eq!(again["iotHub"], "already-disabled");
    assert_eq!(f.hub.updates(), 1);
    assert_eq!(f.hub.connections(), 2);
    assert!(f.hub.refused().is_empty(), "{:?}", f.hub.refused());
}

#[tokio::test]
async fn only_an_opted_in_operator_gets_a_sim_back_and_never_one_they_blocked() {
    let f = fixture(true).await;
    registered(&f).await;
    handle(event("suspended"), &f.state, BUDGET).await.unwrap();
    let back = handle(event("active"), &f.state, BUDGET).await.unwrap();
    assert_eq!(back["outcome"], "unblocked", "{back}");
    assert_eq!(back["iotHub"], "enabled");
    assert_eq!(sim_status(&f).await, DeviceStatus::Allowed);
    assert_eq!(f.hub.device(HUB, IMSI).unwrap().status, "enabled");

    // The operator blocks it (a stolen device): SORACOM's "active" does not undo that.
    let blocked = Listing {
        status: DeviceStatus::Blocked,
        valid_until: None,
        allow_reprovision: false,
    };
    f.state
        .registry
        .list_device(&DeviceId::Sim(IMSI.into()), &blocked)
        .await
        .unwrap();
    let kept = handle(event("active"), &f.state, BUDGET).await.unwrap();
    assert_eq!(kept["outcome"], "unchanged", "{kept}");
    assert_eq!(sim_status(&f).await, DeviceStatus::Blocked);

    // Without the opt-in, "active" changes nothing at all.
    let f = fixture(false).await;
    registered(&f).await;
    handle(event("suspended"), &f.state, BUDGET).await.unwrap();
    let ignored = handle(event("active"), &f.state, BUDGET).await.unwrap();
    assert_eq!(ignored["outcome"], "unchanged");
    assert_eq!(sim_status(&f).await, DeviceStatus::Blocked);
}

#[tokio::test]
async fn a_malformed_or_unknown_event_changes_nothing() {
    let f = fixture(true).await;
    registered(&f).await;
    for bad in [
        json!({"parameter1": "${imsi}", "parameter2": "terminated"}),
        json!({"parameter1": IMSI, "parameter2": "exploded"}),
        json!({"imsi": IMSI, "status": "terminated"}),
        json!("terminated"),
    ] {
        let answer = handle(bad.clone(), &f.state, BUDGET).await.unwrap();
        assert_eq!(answer["outcome"], "ignored", "{bad}: {answer}");
    }
    let ready = handle(event("ready"), &f.state, BUDGET).await.unwrap();
    assert_eq!(ready["outcome"], "unchanged");
    assert_eq!(sim_status(&f).await, DeviceStatus::Allowed);
    assert_eq!(f.state.registry.devices(Kind::Sims).await.unwrap().len(), 1);
    assert_eq!(f.hub.updates(), 0);
}

#[tokio::test]
async fn the_block_holds_even_when_iot_hub_refuses_the_credentials() {
    let f = fixture(false).await;
    registered(&f).await;
    // The stored connection string's key is not the hub's.
    let wrong = f
        .hub
        .connection_string(HUB)
        .unwrap()
        .replace("SharedAccessKey=", "SharedAccessKey=AAAA");
    f.aws
        .put_parameter(
            &format!("{PREFIX}{HUB}"),
            &wrong,
            ParameterType::SecureString,
        )
        .await
        .unwrap();
    let err = handle(event("terminated"), &f.state, BUDGET)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Failure::Hub(HubError::Unauthorized(401))),
        "{err}"
    );
    assert_eq!(sim_status(&f).await, DeviceStatus::Blocked);
    assert_eq!(f.hub.device(HUB, IMSI).unwrap().status, "enabled");
    assert!(
        f.hub.refused()[0].contains("signature does not verify"),
        "{:?}",
        f.hub.refused()
    );
    assert!(!err.to_string().contains("SharedAccessKey"));
}

#[tokio::test]
async fn a_sim_never_registered_or_gone_from_the_hub_is_still_blocked() {
    let f = fixture(false).await;
    let never = handle(event("terminated"), &f.state, BUDGET).await.unwrap();
    assert_eq!(never["iotHub"], "not-registered", "{never}");
    // Nobody listed it, yet it stays refused from now on.
    assert_eq!(sim_status(&f).await, DeviceStatus::Blocked);

    let f = fixture(false).await;
    registered(&f).await;
    let gone_device = "someone-deleted-it";
    let mut elsewhere = registration();
    elsewhere.device_id = gone_device.into();
    f.state
        .registry
        .record_registration(IMSI, None, &elsewhere)
        .await
        .unwrap();
    let gone = handle(event("terminated"), &f.state, BUDGET).await.unwrap();
    assert_eq!(gone["iotHub"], "no-such-device", "{gone}");
}

/// Issue: an `active` event listed SIMs nobody listed (a lift set `allowed`, and a card
/// allowed that way admits every IMSI of the card). A lift restores exactly what was there.
#[tokio::test]
async fn an_active_event_restores_exactly_what_soracoms_block_replaced() {
    let f = fixture(true).await;
    // Nobody listed the IMSI or the card.
    handle(event("suspended"), &f.state, BUDGET).await.unwrap();
    assert_eq!(
        statuses(&f).await,
        (Some(DeviceStatus::Blocked), Some(DeviceStatus::Blocked))
    );
    let back = handle(event("active"), &f.state, BUDGET).await.unwrap();
    assert_eq!(back["outcome"], "unblocked", "{back}");
    assert_eq!(back["table"], "unlisted", "{back}");
    assert_eq!(
        statuses(&f).await,
        (Some(DeviceStatus::Unlisted), Some(DeviceStatus::Unlisted)),
        "neither the IMSI nor the card became allowed"
    );
    let raw = f
        .aws
        .dynamodb()
        .await
        .get_item()
        .table_name(TABLE)
        .key(
            "pk",
            aws_sdk_dynamodb::types::AttributeValue::S(format!("simid#{SIM_ID}")),
        )
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert!(
        !raw.contains_key("status") && !raw.contains_key("soracom_prior"),
        "absent stays absent: {raw:?}"
    );

    // The operator blocked the IMSI (and never listed the card): its card stays unallowed.
    let f = fixture(true).await;
    list(&f, &DeviceId::Sim(IMSI.into()), DeviceStatus::Blocked).await;
    handle(event("suspended"), &f.state, BUDGET).await.unwrap();
    let kept = handle(event("active"), &f.state, BUDGET).await.unwrap();
    assert_eq!(kept["outcome"], "unchanged", "{kept}");
    assert_eq!(
        statuses(&f).await,
        (Some(DeviceStatus::Blocked), Some(DeviceStatus::Unlisted))
    );

    // A card the operator allowed is allowed again; an IMSI the operator blocked meanwhile
    // (its word replaces SORACOM's mark) is not lifted.
    let f = fixture(true).await;
    list(&f, &DeviceId::SimCard(SIM_ID.into()), DeviceStatus::Allowed).await;
    handle(event("terminated"), &f.state, BUDGET).await.unwrap();
    list(&f, &DeviceId::Sim(IMSI.into()), DeviceStatus::Blocked).await;
    let kept = handle(event("active"), &f.state, BUDGET).await.unwrap();
    assert_eq!(kept["outcome"], "unchanged", "{kept}");
    assert_eq!(
        statuses(&f).await,
        (Some(DeviceStatus::Blocked), Some(DeviceStatus::Allowed))
    );
}

/// Issue: the termination of a multi-IMSI SIM disabled only the event IMSI's hub device; the
/// card's other IMSI kept a working connection string.
#[tokio::test]
async fn a_terminated_card_disables_the_hub_device_of_every_imsi_it_registered() {
    let f = fixture(true).await;
    const OTHER: &str = "295050123456789";
    registered_as(&f, IMSI, Some(SIM_ID)).await;
    registered_as(&f, OTHER, Some(SIM_ID)).await;
    assert_eq!(
        f.state.registry.card_imsis(SIM_ID).await.unwrap(),
        vec![OTHER.to_owned(), IMSI.to_owned()]
    );
    let answer = handle(event("terminated"), &f.state, BUDGET).await.unwrap();
    assert_eq!(answer["iotHub"], "disabled", "{answer}");
    assert_eq!(answer["cardImsis"][OTHER], "disabled", "{answer}");
    for imsi in [IMSI, OTHER] {
        assert_eq!(
            f.hub.device(HUB, imsi).unwrap().status,
            "disabled",
            "{imsi}"
        );
    }

    // Back to active: both come back, except an IMSI the operator blocked on its own.
    list(&f, &DeviceId::Sim(OTHER.into()), DeviceStatus::Blocked).await;
    let back = handle(event("active"), &f.state, BUDGET).await.unwrap();
    assert_eq!(back["iotHub"], "enabled", "{back}");
    assert_eq!(back["cardImsis"][OTHER], "kept-disabled", "{back}");
    assert_eq!(f.hub.device(HUB, IMSI).unwrap().status, "enabled");
    assert_eq!(f.hub.device(HUB, OTHER).unwrap().status, "disabled");
    // The event may name the card's other IMSI: the same card, the same devices.
    let again = handle(event_for(OTHER, "suspended"), &f.state, BUDGET)
        .await
        .unwrap();
    assert_eq!(again["cardImsis"][IMSI], "disabled", "{again}");
}
