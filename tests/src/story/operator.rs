//! The operator's part of the story: `provisioning-admin`, the binary an operator runs, against
//! the same device table the functions use.

use serde_json::Value;

use super::device::{run_program, Run};
use super::{events, field, Invocation, Step};
use crate::lambda_watch::{admin_bin, workspace};
use crate::stack::{LocalStack, HUBS};

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
    let csv = workspace().join("events/provisioning-admin/sims.csv");
    let import = admin(
        stack,
        &["sims", "import", &csv.display().to_string(), "--cards"],
    )
    .await;
    let report = admin(stack, &["registrations", "report", "--format", "table"]).await;
    let block = admin(stack, &["sims", "block", REGISTERED_IMSI]).await;
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
        step(
            "the operator blocks the SIM that registered first",
            block,
            |run| run.stdout == format!("{REGISTERED_IMSI}: blocked"),
        ),
    ]
}

/// The blocked SIM boots again: its record is still there, and it is refused anyway.
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
