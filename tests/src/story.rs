//! The sample story, replayed through `cargo lambda invoke` against the local stack: what
//! `make demo` shows and what the replay test checks. Every step states its expected outcome and
//! fails if the function answers anything else.

use std::path::PathBuf;

use serde_json::Value;
use std::sync::atomic::Ordering;

use crate::lambda_watch::{LambdaWatch, WatchError};

mod beam;
mod device;
mod installer;
mod operator;
mod x509;
use crate::stack::{LocalStack, HUBS};

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    pub title: &'static str,
    pub command: String,
    pub ok: bool,
    pub detail: String,
}

fn events() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../events")
}

/// Shows the start of a secret and its length: enough to compare, not enough to use.
pub fn masked(value: &str) -> String {
    let shown: String = value.chars().take(6).collect();
    format!("{shown}… ({} chars)", value.chars().count())
}

type Check = Box<dyn Fn(&Value) -> Result<String, String>>;

struct Invocation {
    title: &'static str,
    function: &'static str,
    data: PathBuf,
    context: Option<PathBuf>,
    check: Check,
    /// The reason code the function must log for this request.
    logged_reason: Option<&'static str>,
}

fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v.get(name).and_then(Value::as_str).unwrap_or("")
}

/// What the story leaves behind: every step, and the installers' page it served (still up
/// while this is kept: `make demo` keeps it for a person to sign in).
pub struct Story {
    pub steps: Vec<Step>,
    pub installers: Option<crate::installer_site::LocalInstallers>,
}

/// Runs the story, calling `report` after each step.
pub async fn run(stack: &LocalStack, watch: &LambdaWatch, mut report: impl FnMut(&Step)) -> Story {
    let mut steps = Vec::new();
    let mut record = |step: Step| {
        report(&step);
        steps.push(step);
    };
    for invocation in sim_invocations(stack) {
        record(invoke(watch, invocation).await);
    }
    for step in x509::steps(stack).await {
        record(step);
    }
    for invocation in installer_invocations(stack) {
        record(invoke(watch, invocation).await);
    }
    for step in device_steps(stack, watch).await {
        record(step);
    }
    for invocation in hook_invocations(stack) {
        record(invoke(watch, invocation).await);
    }
    for step in operator::steps(stack).await {
        record(step);
    }
    let (installer_steps, installers) = installer::steps(stack, watch).await;
    for step in installer_steps {
        record(step);
    }
    record(invoke(watch, beam::signed_request(stack)).await);
    record(invoke(watch, beam::replayed_request(stack)).await);
    let (terminated, device) = operator::sim_terminated(stack).await;
    record(invoke(watch, terminated).await);
    record(operator::hub_shows_disabled(stack, device));
    record(invoke(watch, operator::unfilled_event()).await);
    record(invoke(watch, operator::blocked_sim_boots()).await);
    record(dps_statistics(stack));
    Story { steps, installers }
}

/// The SIM through azure-dps-register.
fn sim_invocations(stack: &LocalStack) -> Vec<Invocation> {
    let dps_events = events().join("azure-dps-register");
    let expected_key = stack
        .group_key
        .derive_device_key("440103123456789")
        .to_base64();
    vec![
        Invocation {
            title: "a SIM calls through SORACOM Funk and gets its IoT Hub connection string",
            function: "azure-dps-register",
            data: dps_events.join("register.json"),
            context: Some(dps_events.join("client-context.json")),
            logged_reason: None,
            check: Box::new(move |v| {
                let body = field(v, "body");
                let parts: std::collections::HashMap<&str, &str> = body
                    .split(';')
                    .filter_map(|kv| kv.split_once('='))
                    .collect();
                let (hub, key) = (
                    parts.get("HostName").copied().unwrap_or(""),
                    parts.get("SharedAccessKey").copied().unwrap_or(""),
                );
                if v["statusCode"] != 200 || !HUBS.contains(&hub) || key != expected_key {
                    return Err(format!(
                        "unexpected answer: statusCode {} body {}",
                        v["statusCode"],
                        field(v, "error")
                    ));
                }
                Ok(format!(
                    "200 HostName={hub};DeviceId={};SharedAccessKey={} (= HMAC of the group key)",
                    parts.get("DeviceId").copied().unwrap_or(""),
                    masked(key)
                ))
            }),
        },
        Invocation {
            title: "the same SIM boots again: answered from its record, no DPS round trip",
            function: "azure-dps-register",
            data: dps_events.join("register.json"),
            context: Some(dps_events.join("client-context.json")),
            logged_reason: None,
            check: Box::new(|v| {
                match (v["statusCode"].as_u64(), field(v, "source")) {
                (Some(200), "record") => Ok(format!(
                    "200 source=record, hub {} (the record holds the key's fingerprint, not the key)",
                    field(v, "assignedHub")
                )),
                _ => Err(format!(
                    "expected 200 from the record, got statusCode {} source {}",
                    v["statusCode"],
                    field(v, "source")
                )),
            }
            }),
        },
        Invocation {
            title: "a blocked SIM is refused before anything reaches DPS",
            function: "azure-dps-register",
            data: dps_events.join("register.json"),
            context: Some(dps_events.join("client-context-blocked.json")),
            logged_reason: None,
            check: Box::new(|v| match (v["statusCode"].as_u64(), field(v, "error")) {
                (Some(403), "sim-blocked") => {
                    Ok(format!("403 {}: {}", field(v, "error"), field(v, "body")))
                }
                _ => Err(format!("expected 403 sim-blocked, got {v}")),
            }),
        },
    ]
}

/// The installer through claim-issuer.
fn installer_invocations(stack: &LocalStack) -> Vec<Invocation> {
    let claim_dir = stack.dir().to_owned();
    vec![
        claim_invocation(
            "a signed-in installer gets a 5-minute claim certificate bound to SN-0001",
            "issue.json",
            claim_dir.join(device::CLAIM_CERT),
            claim_dir.join(device::CLAIM_KEY),
        ),
        claim_invocation(
            "another claim, bound to SN-0002, for a device running the official AWS IoT Device SDK",
            "issue-sn-0002.json",
            claim_dir.join(device::SDK_CLAIM_CERT),
            claim_dir.join(device::SDK_CLAIM_KEY),
        ),
        Invocation {
            title: "a user outside the installers group is refused",
            function: "claim-issuer",
            data: events().join("claim-issuer/not-in-group.json"),
            context: None,
            logged_reason: None,
            check: Box::new(|v| match v["statusCode"].as_u64() {
                Some(403) => Ok(format!("403 {}", field(v, "body"))),
                _ => Err(format!("expected 403, got {}", v["statusCode"])),
            }),
        },
    ]
}

/// The device uses that claim against the AWS IoT simulator, whose pre-provisioning hook is
/// the fleet-prehook function running in the same cargo lambda watch.
async fn device_steps(stack: &LocalStack, watch: &LambdaWatch) -> Vec<Step> {
    match device::Device::start(stack, watch).await {
        Ok(device) => vec![
            device.provisions_sn_0001(watch).await,
            device.sn_0001_is_confirmed(stack).await,
            device.official_sdk_provisions_sn_0002(watch).await,
            device.unknown_serial_is_rejected(watch).await,
        ],
        Err(e) => vec![Step {
            title: "the AWS IoT simulator starts",
            command: "iot-simulator".into(),
            ok: false,
            detail: e,
        }],
    }
}

/// The hook invoked directly, with the claim certificate just issued (bound to SN-0001).
fn hook_invocations(stack: &LocalStack) -> Vec<Invocation> {
    let claim_id = stack
        .iot
        .issued()
        .first()
        .map(|c| c.certificate_id.clone())
        .unwrap_or_default();
    let hook_events = events().join("fleet-prehook");
    let mut allowed: Value = std::fs::read_to_string(hook_events.join("allowed.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    allowed["claimCertificateId"] = Value::String(claim_id);
    let allowed_file = stack.dir().join("prehook-allowed.json");
    let _ = std::fs::write(&allowed_file, allowed.to_string());
    let denied = |v: &Value| match v["allowProvisioning"].as_bool() {
        Some(false) => Ok("allowProvisioning: false".to_owned()),
        _ => Err(format!("expected a denial, got {v}")),
    };
    vec![
        Invocation {
            title: "replaying SN-0001's hook event with another certificate is denied",
            function: "fleet-prehook",
            data: allowed_file,
            context: None,
            logged_reason: Some("already-provisioned"),
            check: Box::new(denied),
        },
        Invocation {
            title: "an unknown serial is denied",
            function: "fleet-prehook",
            data: hook_events.join("unknown-serial.json"),
            context: None,
            logged_reason: Some("unknown-serial"),
            check: Box::new(denied),
        },
        Invocation {
            title: "a template that names the serial 'device_serial' is denied, not crashed",
            function: "fleet-prehook",
            data: hook_events.join("misnamed-parameter.json"),
            context: None,
            logged_reason: Some("missing-serial-parameter"),
            check: Box::new(denied),
        },
    ]
}

fn dps_statistics(stack: &LocalStack) -> Step {
    let dps_connections = stack.dps.stats().connections.load(Ordering::Relaxed);
    Step {
        title: "DPS saw three devices connect, the Funk SIM's first boot, the X.509 SIM's and the Beam SIM's (the reboot was answered from the record, the blocked SIM never got there)",
        command: "dps-simulator statistics".into(),
        ok: dps_connections == 3,
        detail: format!(
            "{dps_connections} connection(s), {} assigned",
            stack.dps.assigned().len()
        ),
    }
}

/// The reason code and detail of the hook's last logged decision (its JSON log line).
fn last_decision(watch: &LambdaWatch) -> Option<(String, String)> {
    let log = std::fs::read_to_string(watch.log()).ok()?;
    log.lines().rev().find_map(|line| {
        let v: Value = serde_json::from_str(line.get(line.find('{')?..)?).ok()?;
        let message = v.get("message")?.as_str()?;
        message.starts_with("provisioning ").then(|| {
            let detail = v
                .get("detail")
                .and_then(Value::as_str)
                .map(|d| format!("({d})"))
                .unwrap_or_default();
            (field(&v, "reason").to_owned(), detail)
        })
    })
}

/// Whether the hook's last logged decision has the `expected` reason code; the step's outcome.
fn logged_reason_is(watch: &LambdaWatch, detail: String, expected: &str) -> (bool, String) {
    match last_decision(watch) {
        Some((reason, why)) if reason == expected => {
            (true, format!("{detail}; logged reason={reason} {why}"))
        }
        Some((reason, _)) => (
            false,
            format!("{detail}; logged reason {reason}, expected {expected}"),
        ),
        None => (false, format!("{detail}; no decision logged")),
    }
}

/// claim-issuer for the installer with `event`; the claim is handed to the device as the
/// files `cert` and `key` (as the installer app would).
fn claim_invocation(title: &'static str, event: &str, cert: PathBuf, key: PathBuf) -> Invocation {
    Invocation {
        title,
        function: "claim-issuer",
        data: events().join("claim-issuer").join(event),
        context: None,
        logged_reason: None,
        check: Box::new(move |v| {
            let body: Value = serde_json::from_str(field(v, "body")).unwrap_or(Value::Null);
            if v["statusCode"] == 200
                && body["certificateId"].is_string()
                && field(&body, "privateKey").contains("PRIVATE KEY")
            {
                save_claim(&cert, &key, &body)?;
                Ok(format!(
                    "200 certificateId {}… serial {} privateKey [not shown]",
                    field(&body, "certificateId")
                        .chars()
                        .take(12)
                        .collect::<String>(),
                    field(&body, "serial")
                ))
            } else {
                Err(format!(
                    "expected 200 with a certificate, got {}",
                    v["statusCode"]
                ))
            }
        }),
    }
}

/// Keeps the claim certificate and key where the device reads them; the key owner-only.
fn save_claim(cert: &std::path::Path, key: &std::path::Path, body: &Value) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::write(cert, field(body, "certificatePem")).map_err(|e| e.to_string())?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(key)
        .and_then(|mut f| f.write_all(field(body, "privateKey").as_bytes()))
        .map_err(|e| e.to_string())
}

async fn invoke(watch: &LambdaWatch, invocation: Invocation) -> Step {
    let relative = |p: &PathBuf| {
        p.strip_prefix(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
            .map(|r| r.display().to_string())
            .unwrap_or_else(|_| p.display().to_string())
    };
    let mut command = format!(
        "cargo lambda invoke {} --data-file {}",
        invocation.function,
        relative(&invocation.data)
    );
    if let Some(context) = &invocation.context {
        command.push_str(&format!(" --client-context-file {}", relative(context)));
    }
    let (ok, detail) = match watch
        .invoke(
            invocation.function,
            &invocation.data,
            invocation.context.as_deref(),
        )
        .await
    {
        Ok(answer) => match ((invocation.check)(&answer), invocation.logged_reason) {
            (Ok(detail), None) => (true, detail),
            (Ok(detail), Some(expected)) => logged_reason_is(watch, detail, expected),
            (Err(detail), _) => (false, detail),
        },
        Err(WatchError::Invoke(_, message)) => (false, message),
        Err(e) => (false, e.to_string()),
    };
    Step {
        title: invocation.title,
        command,
        ok,
        detail,
    }
}

/// Every secret the story handled, by name: the group key, the SIM's device key and the SAS
/// signatures DPS accepted, the claim's private key and the device's permanent private key.
/// None of them may appear in any log or step output.
pub fn secrets(stack: &LocalStack) -> Vec<(String, String)> {
    let mut secrets = vec![
        ("group key".to_owned(), stack.group_key.to_base64()),
        (
            "device key".to_owned(),
            stack
                .group_key
                .derive_device_key("440103123456789")
                .to_base64(),
        ),
    ];
    secrets.push(("Beam PSK".to_owned(), stack.beam_psk.clone()));
    secrets.push((
        "Beam SIM's device key".to_owned(),
        stack
            .group_key
            .derive_device_key(beam::BEAM_IMSI)
            .to_base64(),
    ));
    for sig in stack.dps.accepted_signatures() {
        if let Some(decoded) = shared::sas::percent_decode(&sig) {
            secrets.push(("SAS signature".to_owned(), decoded));
        }
        secrets.push(("SAS signature (encoded)".to_owned(), sig));
    }
    // PEM keys: every full base64 line of the body, so a re-wrapped leak is caught too.
    for (name, file) in [
        ("claim private key", stack.dir().join(device::CLAIM_KEY)),
        (
            "second claim private key",
            stack.dir().join(device::SDK_CLAIM_KEY),
        ),
        (
            "device private key",
            stack.dir().join("device-SN-0001/private.pem.key"),
        ),
        (
            "X.509 device private key",
            stack.dir().join(x509::DEVICE_KEY),
        ),
    ] {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 40)
        {
            secrets.push((name.to_owned(), line.to_owned()));
        }
    }
    secrets
}
