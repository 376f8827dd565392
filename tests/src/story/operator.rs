//! The operator's part of the story: `provisioning-admin`, the binary an operator runs, against
//! the same device table the functions use.

use serde_json::Value;

use super::device::{run_program, Run};
use super::{events, field, Invocation, Step};
use crate::lambda_watch::{admin_bin, workspace};
use crate::stack::{LocalStack, HUBS};
use shared::registry::DeviceId;

/// The SIM the story's first step registered (`events/azure-dps-register/client-context.json`).
const REGISTERED_IMSI: &str = "440103123456789";

async fn admin(stack: &LocalStack, args: &[&str]) -> Run {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    run_program(
        &admin_bin(),
        "provisioning-admin",
        &args,
        &workspace(),
        &stack.env(),
    )
    .await
}

fn step(title: &'static str, run: Run, check: impl Fn(&Run) -> bool) -> Step {
    let ok = run.code == Some(0) && check(&run);
    let detail = if ok {
        run.stdout.lines().last().unwrap_or_default().to_owned()
    } else {
        format!("exit {:?}: {} {}", run.code, run.stdout, run.stderr)
    };
    Step {
        title,
        command: run.command,
        ok,
        detail,
    }
}

pub async fn steps(stack: &LocalStack) -> Vec<Step> {
    // Run from the workspace, as the README shows it.
    let csv = "events/provisioning-admin/sims.csv";
    let import = admin(stack, &["sims", "import", csv, "--cards"]).await;
    let report = admin(stack, &["registrations", "report", "--format", "table"]).await;
    vec![
        step(
            "the operator imports a CSV of SIMs (checked whole, written in batches)",
            import,
            |run| run.stdout.contains("4 entries: added 4"),
        ),
        step(
            "the operator's report: which SIM registered when, to which hub",
            report,
            |run| {
                run.stdout
                    .lines()
                    .any(|l| l.contains(REGISTERED_IMSI) && HUBS.iter().any(|h| l.contains(h)))
            },
        ),
    ]
}

/// SORACOM's Event Handler reports that SIM terminated: sim-lifecycle blocks it and disables
/// its device in IoT Hub. The device is created in the hub stand-in first, as DPS created it
/// in the real hub when it assigned the SIM (the DPS simulator models no IoT Hub). Returns the
/// invocation and the device (hub, id) whose state the next step reads from the stand-in.
pub async fn sim_terminated(stack: &LocalStack) -> (Invocation, Option<(String, String)>) {
    let device = match stack
        .registry
        .get(&DeviceId::Sim(REGISTERED_IMSI.into()))
        .await
    {
        Ok(Some(record)) => record.registration.map(|r| (r.assigned_hub, r.device_id)),
        _ => None,
    };
    if let Some((hub, id)) = &device {
        stack.hubs.add_device(hub, id);
    }
    let invocation = Invocation {
        title: "SORACOM's Event Handler reports that SIM terminated: blocked, its IoT Hub device disabled",
        function: "sim-lifecycle",
        data: events().join("sim-lifecycle/terminated.json"),
        context: None,
        logged_reason: None,
        check: Box::new(|v: &Value| {
            match (field(v, "outcome"), field(v, "table"), field(v, "iotHub")) {
                ("blocked", "blocked", "disabled") => {
                    Ok("outcome=blocked table=blocked iotHub=disabled".to_owned())
                }
                _ => Err(format!("expected blocked and disabled, got {v}")),
            }
        }),
    };
    (invocation, device)
}

/// What the IoT Hub stand-in holds for that device now.
pub fn hub_shows_disabled(stack: &LocalStack, device: Option<(String, String)>) -> Step {
    let state = device
        .as_ref()
        .and_then(|(hub, id)| stack.hubs.device(hub, id).map(|d| (hub, id, d)));
    let (ok, detail) = match state {
        Some((hub, id, d)) if d.status == "disabled" => (
            true,
            format!(
                "{hub}: device {id} status={} statusReason=\"{}\"",
                d.status, d.status_reason
            ),
        ),
        Some((hub, id, d)) => (false, format!("{hub}: device {id} is {}", d.status)),
        None => (false, "the SIM has no recorded registration".to_owned()),
    };
    Step {
        title: "the IoT Hub registry (stand-in) shows the device disabled: its connection string no longer works",
        command: "GET https://<hub>/devices/440103123456789?api-version=2021-04-12".into(),
        ok,
        detail,
    }
}

/// An event whose variable SORACOM did not fill in (a misconfigured handler) changes nothing.
pub fn unfilled_event() -> Invocation {
    Invocation {
        title: "an event handler set up wrong (an unfilled ${imsi}) changes nothing",
        function: "sim-lifecycle",
        data: events().join("sim-lifecycle/unfilled-variable.json"),
        context: None,
        logged_reason: None,
        check: Box::new(|v: &Value| match field(v, "outcome") {
            "ignored" => Ok(format!("ignored: {}", field(v, "reason"))),
            _ => Err(format!("expected ignored, got {v}")),
        }),
    }
}

/// The terminated SIM boots again: its record is still there, and it is refused anyway.
pub fn blocked_sim_boots() -> Invocation {
    let dps_events = events().join("azure-dps-register");
    Invocation {
        title: "that SIM boots again: refused, though its registration is still recorded",
        function: "azure-dps-register",
        data: dps_events.join("register.json"),
        context: Some(dps_events.join("client-context.json")),
        logged_reason: None,
        check: Box::new(
            |v: &Value| match (v["statusCode"].as_u64(), field(v, "error")) {
                (Some(403), "sim-blocked") => Ok(format!("403 sim-blocked: {}", field(v, "body"))),
                _ => Err(format!("expected 403 sim-blocked, got {v}")),
            },
        ),
    }
}
