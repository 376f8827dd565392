//! `provisioning-admin` against the device table in moto: each command as an operator types
//! it (parsed by the CLI's own parser), through the real AWS SDK.

use std::io::Write;
use std::time::Instant;

use clap::Parser;
use local_emulators::fault_proxy::{FaultProxy, Mode};
use local_emulators::local_aws::{local_sdk_config_with, LocalAws};
use provisioning_admin::cli::Cli;
use provisioning_admin::{call_limits, run, AdminError, Progress};
use serde_json::Value;
use shared::registry::{
    ClaimLog, ClaimRecord, DeviceId, DeviceRecord, DeviceStatus, DynamoRegistry, Provisioning,
    ProvisioningState, Registration, RegistryError, SerialRegistry, SimRegistry,
};

const TABLE: &str = "devices";

async fn table() -> (LocalAws, DynamoRegistry) {
    let aws = LocalAws::start().await.expect("local AWS endpoint");
    aws.create_devices_table(TABLE).await.unwrap();
    let registry = admin_registry(aws.endpoint()).await;
    (aws, registry)
}

/// The registry as the CLI's binary builds it (its call bounds), on a local endpoint.
async fn admin_registry(endpoint: &str) -> DynamoRegistry {
    let config = local_sdk_config_with(endpoint, &call_limits()).await;
    DynamoRegistry::new(aws_sdk_dynamodb::Client::new(&config), TABLE)
}

/// Runs one command line; its standard output, or its error.
async fn admin(registry: &DynamoRegistry, args: &[&str]) -> Result<String, AdminError> {
    let cli = Cli::try_parse_from(
        ["provisioning-admin", "--table", TABLE]
            .iter()
            .chain(args)
            .copied(),
    )
    .unwrap_or_else(|e| panic!("{args:?} does not parse: {e}"));
    let mut out = Vec::new();
    run(&cli.command, registry, &mut out, &mut Progress::new(None)).await?;
    Ok(String::from_utf8(out).unwrap())
}

async fn json(registry: &DynamoRegistry, args: &[&str]) -> Value {
    let out = admin(registry, args).await.unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn registration(at: u64) -> Registration {
    Registration {
        registration_id: "440103000000001".into(),
        assigned_hub: "hub-a.azure-devices.net".into(),
        device_id: "440103000000001".into(),
        registered_at: at,
        key_fingerprint: Some("fp".into()),
        return_data: None,
        certificate: None,
    }
}

#[tokio::test]
async fn allow_and_block_keep_what_the_functions_recorded() {
    let (_aws, registry) = table().await;
    let imsi = "440103000000001";
    admin(&registry, &["sims", "allow", imsi]).await.unwrap();
    registry
        .record_registration(imsi, None, &registration(1_800_000_000))
        .await
        .unwrap();

    let out = admin(&registry, &["sims", "block", imsi]).await.unwrap();
    assert_eq!(out, format!("{imsi}: blocked\n"));
    let entries = registry.sim(imsi, None).await.unwrap();
    let record = entries.by_imsi.unwrap();
    assert_eq!(record.status, DeviceStatus::Blocked);
    assert_eq!(record.registration, Some(registration(1_800_000_000)));

    admin(
        &registry,
        &["sims", "allow", imsi, "--valid-until", "2099-01-01"],
    )
    .await
    .unwrap();
    let shown = json(&registry, &["sims", "show", imsi, "--format", "json"]).await;
    assert_eq!(shown["status"], "allowed");
    assert_eq!(shown["valid_until"], "2099-01-01T00:00:00Z");
    assert_eq!(shown["assigned_hub"], "hub-a.azure-devices.net");
    assert_eq!(shown["registered_at"], "2027-01-15T08:00:00Z");

    // A SIM card entry, and a serial whose certificate a re-provisioning may replace once.
    admin(
        &registry,
        &["sims", "block", "--card", "8942310000000000001"],
    )
    .await
    .unwrap();
    let card = registry
        .sim("440103000000002", Some("8942310000000000001"))
        .await
        .unwrap();
    assert_eq!(card.by_card.unwrap().status, DeviceStatus::Blocked);
    let mut serial = DeviceRecord::allowed(DeviceId::Serial("SN-1".into()));
    serial.provisioning = Some(Provisioning {
        certificate_id: "cert-1".into(),
        claim_certificate_id: None,
        provisioned_at: 1_800_000_000,
        state: ProvisioningState::Confirmed,
        replaced_certificate_id: None,
        issued_to: None,
        confirmed_at: Some(1_800_000_060),
    });
    registry.put(&serial).await.unwrap();
    admin(&registry, &["serials", "allow", "SN-1", "--reprovision"])
        .await
        .unwrap();
    let record = registry.serial("SN-1").await.unwrap().unwrap();
    assert!(record.allow_reprovision);
    assert_eq!(record.provisioning, serial.provisioning);

    // What the operator sees of it, one and all; a blocked serial lists as blocked.
    let shown = json(&registry, &["serials", "show", "SN-1", "--format", "json"]).await;
    assert_eq!(shown["certificate_id"], "cert-1");
    assert_eq!(shown["allow_reprovision"], true);
    assert_eq!(shown["provisioning_state"], "confirmed");
    admin(&registry, &["serials", "block", "SN-2"])
        .await
        .unwrap();
    let blocked = json(
        &registry,
        &["serials", "list", "--status", "blocked", "--format", "json"],
    )
    .await;
    let serials: Vec<&str> = blocked
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["serial"].as_str())
        .collect();
    assert_eq!(serials, ["SN-2"]);
    let table = admin(&registry, &["serials", "list"]).await.unwrap();
    assert_eq!(
        table.lines().count(),
        3,
        "a header and two serials:\n{table}"
    );
}

#[tokio::test]
async fn refusals_have_their_exit_codes_and_write_nothing() {
    let (_aws, registry) = table().await;
    let code = |r: Result<String, AdminError>| r.map_err(|e| e.exit_code());
    assert_eq!(
        code(admin(&registry, &["sims", "show", "440103000000009"]).await),
        Err(3)
    );
    // One bad identifier among good ones: none is written.
    assert_eq!(
        code(
            admin(
                &registry,
                &["sims", "allow", "440103000000001", "44010300000000x"]
            )
            .await
        ),
        Err(2)
    );
    assert_eq!(
        code(admin(&registry, &["serials", "block", "SN 1"]).await),
        Err(2)
    );
    assert_eq!(
        code(
            admin(
                &registry,
                &[
                    "sims",
                    "allow",
                    "440103000000001",
                    "--valid-until",
                    "2001-01-01"
                ]
            )
            .await
        ),
        Err(2)
    );
    let list = json(&registry, &["sims", "list", "--format", "json"]).await;
    assert_eq!(list, Value::Array(Vec::new()));
}

#[tokio::test]
async fn a_malformed_import_names_each_bad_line_and_writes_nothing() {
    let (_aws, registry) = table().await;
    let csv = file(
        "imsi,simId,valid_until\n440103000000001,,2099-01-01\n44010300000000x\n\
         440103000000003,8942310000000000003,31/12/2099\n440103000000004\n",
    );
    let path = csv.path().to_str().unwrap();
    let err = admin(&registry, &["sims", "import", path])
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 4);
    let report = err.report();
    assert!(
        report.contains("2 row(s) cannot be imported; nothing was written"),
        "{report}"
    );
    assert!(
        report.contains(": line 3: \"44010300000000x\" is not an IMSI"),
        "{report}"
    );
    assert!(
        report.contains(": line 4: \"31/12/2099\" is not a date"),
        "{report}"
    );
    let list = json(&registry, &["sims", "list", "--format", "json"]).await;
    assert_eq!(list, Value::Array(Vec::new()));
}

#[tokio::test]
async fn an_import_of_thousands_of_sims_is_batched_and_a_second_run_changes_nothing() {
    let (_aws, registry) = table().await;
    // Past the read batches (100) and the writes in flight (32) many times over; moto takes
    // about 130 conditional puts a second.
    let rows: String = (0..2_000)
        .map(|i| format!("{},,2099-01-01\n", 440_103_000_000_000u64 + i))
        .collect();
    let csv = file(&format!("# 2,000 SIMs\n{rows}"));
    let path = csv.path().to_str().unwrap();

    let dry = admin(&registry, &["sims", "import", path, "--dry-run"])
        .await
        .unwrap();
    assert!(
        dry.contains("2000 entries: would add 2000, would change 0, 0 already so; dry run"),
        "{dry}"
    );
    assert!(registry
        .get(&DeviceId::Sim("440103000000000".into()))
        .await
        .unwrap()
        .is_none());

    let started = Instant::now();
    let out = admin(&registry, &["sims", "import", path]).await.unwrap();
    println!(
        "2,000 SIMs imported in {:.1} s: {out}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        out.contains("2000 entries: added 2000, changed 0, 0 already so"),
        "{out}"
    );
    let listed = json(&registry, &["sims", "list", "--format", "json"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 2_000);
    assert_eq!(listed[1_999]["imsi"], "440103000001999");
    assert_eq!(listed[1_999]["valid_until"], "2099-01-01T00:00:00Z");

    let again = admin(&registry, &["sims", "import", path]).await.unwrap();
    assert!(
        again.contains("added 0, changed 0, 2000 already so"),
        "{again}"
    );
}

#[tokio::test]
async fn a_soracom_export_blocks_terminated_sims_and_keeps_their_registrations() {
    let (_aws, registry) = table().await;
    admin(&registry, &["sims", "allow", "440103000000001"])
        .await
        .unwrap();
    registry
        .record_registration("440103000000001", None, &registration(1_800_000_000))
        .await
        .unwrap();
    let export = file(
        r#"[
  {"imsi": "440103000000001", "simId": "8942310000000000001", "status": "terminated", "operatorId": "OP0012345678"},
  {"imsi": "440103000000002", "simId": "8942310000000000002", "status": "active", "operatorId": "OP0012345678"},
  {"imsi": "440103000000003", "simId": "8942310000000000002", "status": "active", "operatorId": "OP0012345678"}
]"#,
    );
    let out = admin(
        &registry,
        &["sims", "import", export.path().to_str().unwrap(), "--cards"],
    )
    .await
    .unwrap();
    // Three IMSIs and two cards (the multi-IMSI SIM's card once): one changed, four new.
    assert!(
        out.contains("5 entries: added 4, changed 1, 0 already so"),
        "{out}"
    );
    let terminated = registry
        .sim("440103000000001", None)
        .await
        .unwrap()
        .by_imsi
        .unwrap();
    assert_eq!(terminated.status, DeviceStatus::Blocked);
    assert_eq!(terminated.registration, Some(registration(1_800_000_000)));
    let blocked = json(
        &registry,
        &["sims", "list", "--status", "blocked", "--format", "json"],
    )
    .await;
    let blocked: Vec<&Value> = blocked.as_array().unwrap().iter().collect();
    assert_eq!(blocked.len(), 2, "{blocked:?}");
}

#[tokio::test]
async fn an_import_the_table_throttles_says_how_far_it_got_and_a_rerun_finishes_it() {
    let (aws, _) = table().await;
    let proxy = FaultProxy::start(aws.endpoint()).await.unwrap();
    let registry = admin_registry(&proxy.endpoint()).await;
    let rows: String = (0..1_000).map(|i| format!("SN-{i:04}\n")).collect();
    let csv = file(&rows);
    let path = csv.path().to_str().unwrap();
    // The plan's 10 batched reads and 4 rounds of 32 puts pass; then the table throttles.
    proxy.set(Mode::ThrottleAfter(10 + 4 * 32));
    let err = admin(&registry, &["serials", "import", path])
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    match &err {
        AdminError::Partial {
            written,
            total,
            cause,
        } => {
            assert_eq!((*written, *total), (128, 1_000));
            assert_eq!(*cause, RegistryError::Throttled);
        }
        other => panic!("{other}"),
    }
    assert!(
        err.to_string().contains("128 of 1000 entries were written"),
        "{err}"
    );

    proxy.set(Mode::Pass);
    let out = admin(&registry, &["serials", "import", path])
        .await
        .unwrap();
    assert!(
        out.contains("1000 entries: added 872, changed 0, 128 already so"),
        "{out}"
    );
}

#[tokio::test]
async fn claims_and_registrations_are_reported_for_operators() {
    let (_aws, registry) = table().await;
    for (id, installer, at) in [
        ("c-1", "alice", 1_800_000_000),
        ("c-2", "bob", 1_800_000_100),
    ] {
        registry
            .record_claim(&ClaimRecord {
                certificate_id: id.into(),
                issued_to: installer.into(),
                serial: Some("SN-1".into()),
                issued_at: at,
                valid_until: at + 300,
                retain_until: at + 86_400,
                used: None,
            })
            .await
            .unwrap();
    }
    let alice = json(
        &registry,
        &["claims", "list", "--installer", "alice", "--format", "json"],
    )
    .await;
    assert_eq!(alice.as_array().unwrap().len(), 1);
    assert_eq!(alice[0]["certificate_id"], "c-1");
    assert_eq!(alice[0]["used_at"], Value::Null);

    for (imsi, at) in [
        ("440103000000001", 1_800_000_000),
        ("440103000000002", 1_700_000_000),
    ] {
        admin(&registry, &["sims", "allow", imsi]).await.unwrap();
        let mut r = registration(at);
        r.registration_id = imsi.into();
        r.device_id = imsi.into();
        registry.record_registration(imsi, None, &r).await.unwrap();
    }
    admin(&registry, &["sims", "allow", "440103000000003"])
        .await
        .unwrap();
    let report = admin(&registry, &["registrations", "report"])
        .await
        .unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines[0],
        "registered_at,imsi,status,registration_id,device_id,assigned_hub,cert_serial,cert_expires_at"
    );
    // Oldest first; a SIM that never registered is not a registration.
    assert_eq!(lines.len(), 3, "{report}");
    assert!(lines[1].contains("440103000000002"), "{report}");
    let since = admin(
        &registry,
        &["registrations", "report", "--since", "2027-01-01"],
    )
    .await
    .unwrap();
    assert_eq!(since.lines().count(), 2, "{since}");
}

/// Issue: an import's writes were unconditional after its read (a block written between them
/// was overwritten to `allowed`), and a stale export silently turned a block into `allowed`.
#[tokio::test]
async fn an_import_never_lifts_a_block_it_did_not_see_or_was_not_told_to() {
    use provisioning_admin::{import, rows};
    let (_aws, registry) = table().await;
    const NEW: &str = "440103000000001";
    const LISTED: &str = "440103000000002";
    admin(&registry, &["sims", "allow", LISTED]).await.unwrap();
    let entries = rows::parse(
        &format!("{NEW}\n{LISTED},,2099-01-01\n"),
        &rows::Subject::Sims { cards: false },
        rows::Defaults {
            status: DeviceStatus::Allowed,
            now: 1_800_000_000,
        },
    )
    .unwrap();
    let plan = import::plan(&registry, entries, false).await.unwrap();
    assert!(
        plan.summary(true).contains("would add 1, would change 1"),
        "{}",
        plan.summary(true)
    );
    // SORACOM's event blocks both SIMs after the plan read the table.
    for imsi in [NEW, LISTED] {
        registry
            .block_for_soracom(&DeviceId::Sim(imsi.into()), "suspended")
            .await
            .unwrap();
    }
    let err = import::apply(&registry, &plan, &mut Progress::new(None))
        .await
        .unwrap_err();
    assert_eq!(err.exit_code(), 5, "{err}");
    match &err {
        AdminError::ChangedMeanwhile {
            written,
            total,
            keys,
        } => {
            assert_eq!((*written, *total), (0, 2));
            assert_eq!(keys, &[format!("sim#{NEW}"), format!("sim#{LISTED}")]);
        }
        other => panic!("{other}"),
    }
    let status = |imsi: &'static str| {
        let registry = &registry;
        async move {
            registry
                .sim(imsi, None)
                .await
                .unwrap()
                .by_imsi
                .unwrap()
                .status
        }
    };
    assert_eq!(status(NEW).await, DeviceStatus::Blocked);
    assert_eq!(status(LISTED).await, DeviceStatus::Blocked);

    // A new import of the same (stale) file keeps the blocks unless told otherwise.
    let csv = file(&format!("{NEW}\n{LISTED},,2099-01-01\n"));
    let path = csv.path().to_str().unwrap();
    let kept = admin(&registry, &["sims", "import", path]).await.unwrap();
    assert!(kept.contains("2 kept blocked"), "{kept}");
    assert_eq!(status(NEW).await, DeviceStatus::Blocked);
    let lifted = admin(&registry, &["sims", "import", path, "--unblock"])
        .await
        .unwrap();
    assert!(lifted.contains("changed 2"), "{lifted}");
    assert_eq!(status(LISTED).await, DeviceStatus::Allowed);
}
