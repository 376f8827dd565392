//! The device's part of the story: the `fleet-device` program, and the official AWS IoT Device
//! SDK for Python (its fleet provisioning over MQTT 5), run as a user runs them, against the AWS
//! IoT simulator whose pre-provisioning hook is fleet-prehook in `cargo lambda watch`, and whose
//! connect lifecycle events go to fleet-confirm there, as the stack's topic rule sends them.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use tokio::process::Command;

use super::{logged_reason_is, Step};
use crate::iot_mqtt::{Hook, IotMqttConfig, IotMqttSimulator, Lifecycle, Template, Thing};
use crate::lambda_watch::{fleet_device_bin, workspace, LambdaWatch};
use crate::local_aws::venv_bin;
use crate::stack::{LocalStack, TEMPLATE};

pub const CLAIM_CERT: &str = "claim.pem.crt";
pub const CLAIM_KEY: &str = "claim.pem.key";
pub const SDK_CLAIM_CERT: &str = "sdk-claim.pem.crt";
pub const SDK_CLAIM_KEY: &str = "sdk-claim.pem.key";
const SERVER_CA: &str = "iot-ca.pem";
pub const THING_PREFIX: &str = "fleet-";

pub struct Device {
    sim: IotMqttSimulator,
    dir: PathBuf,
}

/// What a program the story ran did.
pub(super) struct Run {
    pub command: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `program` (shown as `name` and its arguments, paths relative to the workspace) in
/// `dir` with `env` added, for at most 60 s.
pub(super) async fn run_program(
    program: &std::path::Path,
    name: &str,
    args: &[String],
    dir: &std::path::Path,
    env: &[(String, String)],
) -> Run {
    let shown: Vec<String> = args
        .iter()
        .map(|a| {
            a.strip_prefix(&format!("{}/", workspace().display()))
                .unwrap_or(a)
                .to_owned()
        })
        .collect();
    let command = format!("{name} {}", shown.join(" "));
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(60), output).await {
        Ok(Ok(out)) => Run {
            command,
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        },
        Ok(Err(e)) => Run {
            command,
            code: None,
            stdout: String::new(),
            stderr: format!("cannot run {}: {e}", program.display()),
        },
        Err(_) => Run {
            command,
            code: None,
            stdout: String::new(),
            stderr: "no exit within 60 s".into(),
        },
    }
}

impl Device {
    pub async fn start(stack: &LocalStack, watch: &LambdaWatch) -> Result<Self, String> {
        let hook = Hook::lambda(&watch.invoke_base(), "fleet-prehook");
        let mut config = IotMqttConfig::new(
            stack.iot.ca_pem(),
            vec![Template::new(TEMPLATE, THING_PREFIX, hook)],
        );
        config.lifecycle = Some(Lifecycle {
            client_prefix: THING_PREFIX.into(),
            function: Hook::lambda(&watch.invoke_base(), "fleet-confirm"),
        });
        let sim = IotMqttSimulator::start(config, ([127, 0, 0, 1], 0).into())
            .await
            .map_err(|e| e.to_string())?;
        stack.iot.serve_fleet(sim.fleet());
        let dir = stack.dir().to_owned();
        std::fs::write(dir.join(SERVER_CA), sim.ca_pem()).map_err(|e| e.to_string())?;
        Ok(Self { sim, dir })
    }

    /// `fleet-device` for `serial` with the installer's claim, in the stack's directory.
    async fn run(&self, serial: &str) -> Run {
        let args = [
            "--endpoint".to_owned(),
            format!("localhost:{}", self.sim.addr().port()),
            "--ca".into(),
            SERVER_CA.into(),
            "--claim-cert".into(),
            CLAIM_CERT.into(),
            "--claim-key".into(),
            CLAIM_KEY.into(),
            "--template".into(),
            TEMPLATE.into(),
            "--param".into(),
            format!("SerialNumber={serial}"),
            "--csr".into(),
            "--verify".into(),
            "--out".into(),
            format!("device-{serial}"),
        ];
        self.run_program(&fleet_device_bin(), "fleet-device", &args)
            .await
    }

    /// The official SDK's fleet provisioning (tests/interop/aws_fleet_provisioning.py, MQTT 5
    /// and `IotIdentityClientV2`) for `serial` with the second claim.
    async fn run_sdk(&self, serial: &str) -> Run {
        let script = workspace().join("tests/interop/aws_fleet_provisioning.py");
        let args = [
            script.display().to_string(),
            "--api".into(),
            "mqtt5".into(),
            "--host".into(),
            "localhost".into(),
            "--port".into(),
            self.sim.addr().port().to_string(),
            "--ca".into(),
            SERVER_CA.into(),
            "--cert".into(),
            SDK_CLAIM_CERT.into(),
            "--key".into(),
            SDK_CLAIM_KEY.into(),
            "--client-id".into(),
            format!("claim.{serial}"),
            "--template".into(),
            TEMPLATE.into(),
            "--serial".into(),
            serial.into(),
        ];
        self.run_program(&venv_bin("python"), "python", &args).await
    }

    async fn run_program(&self, program: &std::path::Path, name: &str, args: &[String]) -> Run {
        run_program(program, name, args, &self.dir, &[]).await
    }

    pub async fn provisions_sn_0001(&self, watch: &LambdaWatch) -> Step {
        let title = "the device provisions itself with that claim: AWS IoT (simulated) -> fleet-prehook -> thing";
        let run = self.run("SN-0001").await;
        let key_mode = std::fs::metadata(self.dir.join("device-SN-0001/private.pem.key"))
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        self.provisioned(watch, title, run, "fleet-SN-0001", |run, thing| {
            (run.stdout == thing.thing_name && key_mode == 0o600).then(|| {
                format!(
                    "thing {} (Location={} from the hook), certificate {}… active, private.pem.key mode {key_mode:o}; the new certificate connects",
                    thing.thing_name,
                    thing.parameters.get("Location").map(String::as_str).unwrap_or("-"),
                    short(&thing.certificate_id),
                )
            })
        })
    }

    /// The device's connection with its new certificate (fleet-device `--verify`) reached
    /// fleet-confirm as AWS IoT's lifecycle event: SN-0001's provisioning is confirmed, so no
    /// later claim can put another certificate on its thing.
    pub async fn sn_0001_is_confirmed(&self, stack: &LocalStack) -> Step {
        use shared::registry::{ProvisioningState, SerialRegistry};
        let title = "its first connection confirms it: AWS IoT's lifecycle event (simulated) -> fleet-confirm -> SN-0001 confirmed";
        let delivered = self.sim.delivered(1, Duration::from_secs(20)).await;
        let record = stack.registry.serial("SN-0001").await;
        let provisioning = record.ok().flatten().and_then(|r| r.provisioning);
        let (ok, detail) = match (delivered.as_deref(), provisioning) {
            (Some([first, ..]), Some(p))
                if first
                    .answer
                    .as_ref()
                    .is_ok_and(|a| a["outcome"] == "confirmed")
                    && p.state == ProvisioningState::Confirmed
                    && first.event["principalIdentifier"] == p.certificate_id.as_str() =>
            {
                (
                    true,
                    format!(
                        "{} connected with certificate {}…: provisioning_state confirmed",
                        first.event["clientId"].as_str().unwrap_or(""),
                        short(&p.certificate_id)
                    ),
                )
            }
            (delivered, p) => (
                false,
                format!(
                    "lifecycle events: {:?}; provisioning: {p:?}",
                    delivered.map(|d| d.iter().map(|e| e.answer.clone()).collect::<Vec<_>>())
                ),
            ),
        };
        Step {
            title,
            command:
                "(AWS IoT topic rule) $aws/events/presence/connected/fleet-SN-0001 -> fleet-confirm"
                    .into(),
            ok,
            detail,
        }
    }

    pub async fn official_sdk_provisions_sn_0002(&self, watch: &LambdaWatch) -> Step {
        let title = "a device running the official AWS IoT Device SDK (Python, MQTT 5) provisions itself the same way";
        let run = self.run_sdk("SN-0002").await;
        self.provisioned(watch, title, run, "fleet-SN-0002", |run, thing| {
            let answer: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_default();
            (answer["thingName"] == thing.thing_name.as_str()).then(|| {
                format!(
                    "IotIdentityClientV2: thing {}, certificate {}… active",
                    thing.thing_name,
                    short(&thing.certificate_id),
                )
            })
        })
    }

    /// The step of a run that should have provisioned `thing_name`: the thing exists, `check`
    /// accepts the run and says what to show, and the hook logged `allowed`.
    fn provisioned(
        &self,
        watch: &LambdaWatch,
        title: &'static str,
        run: Run,
        thing_name: &str,
        check: impl Fn(&Run, &Thing) -> Option<String>,
    ) -> Step {
        let thing = self
            .sim
            .things()
            .into_iter()
            .find(|t| t.thing_name == thing_name);
        let checked = match (&run.code, &thing) {
            (Some(0), Some(thing)) => check(&run, thing),
            _ => None,
        };
        let (ok, detail) = match checked {
            Some(detail) => logged_reason_is(watch, detail, "allowed"),
            None => (
                false,
                format!(
                    "exit {:?}, stdout '{}', thing {}: {}",
                    run.code,
                    run.stdout,
                    if thing.is_some() {
                        "recorded"
                    } else {
                        "missing"
                    },
                    run.stderr
                ),
            ),
        };
        Step {
            title,
            command: run.command,
            ok,
            detail,
        }
    }

    pub async fn unknown_serial_is_rejected(&self, watch: &LambdaWatch) -> Step {
        let title =
            "a device with an unknown serial is rejected by RegisterThing and keeps nothing";
        let run = self.run("SN-0404").await;
        let reason = run.stderr.lines().last().unwrap_or("").to_owned();
        let left = self
            .dir
            .join("device-SN-0404/private.pem.key.pending")
            .exists()
            || self.dir.join("device-SN-0404/private.pem.key").exists();
        let (ok, detail) = match run.code {
            Some(3) if reason.contains("403 AccessDenied") && !left => {
                logged_reason_is(watch, format!("exit 3: {reason}"), "unknown-serial")
            }
            _ => (
                false,
                format!(
                    "expected exit 3 with a 403 rejection, got {:?}: {}",
                    run.code, run.stderr
                ),
            ),
        };
        Step {
            title,
            command: run.command,
            ok,
            detail,
        }
    }
}

/// The first characters of an id, enough to recognise it.
fn short(id: &str) -> String {
    id.chars().take(12).collect()
}
