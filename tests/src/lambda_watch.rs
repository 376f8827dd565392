//! The documented local replay path, driven for real: `cargo lambda watch` (the Runtime API
//! emulator, with the `local-replay` feature) and `cargo lambda invoke` against it.
//!
//! `cargo lambda` comes from the project's `.venv` (pinned in tests/requirements.txt). The
//! emulator binds loopback only; it and the function processes it starts run in their own
//! process group, ended when this is dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::process::{Child, Command};

use crate::local_aws::venv_bin;

pub const FUNCTIONS: [&str; 5] = [
    "azure-dps-register",
    "claim-issuer",
    "fleet-confirm",
    "fleet-prehook",
    "sim-lifecycle",
];

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cargo-lambda is not installed in .venv: run `make tools`")]
    NotInstalled,
    #[error("building {0} for local replay failed:\n{1}")]
    Build(String, String),
    #[error("cargo lambda watch: {0}")]
    Watch(String),
    #[error("cargo lambda invoke {0}: {1}")]
    Invoke(String, String),
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The device CLI as [`prebuild`] builds it.
pub fn fleet_device_bin() -> PathBuf {
    debug_bin("fleet-device")
}

/// The operators' CLI, as `prebuild` builds it.
pub fn admin_bin() -> PathBuf {
    debug_bin("provisioning-admin")
}

fn debug_bin(name: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
        .join("debug")
        .join(name)
}

/// `cargo` with the project's `.venv/bin` first on PATH, so that `cargo lambda` resolves.
fn cargo() -> Result<Command, WatchError> {
    if !venv_bin("cargo-lambda").exists() {
        return Err(WatchError::NotInstalled);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![venv_bin("")];
    dirs.extend(std::env::split_paths(&path));
    let mut command = Command::new("cargo");
    command
        .current_dir(workspace())
        .env("PATH", std::env::join_paths(dirs).unwrap_or(path));
    Ok(command)
}

/// Builds each function the way `cargo lambda watch` will run it (`--bin NAME --features
/// local-replay`), so the first invocation does not wait for a compiler, the device CLI and the operators' CLI.
pub async fn prebuild() -> Result<(), WatchError> {
    let mut builds: Vec<(&str, Vec<&str>)> = FUNCTIONS
        .iter()
        .map(|f| (*f, vec!["--bin", f, "--features", "local-replay"]))
        .collect();
    builds.push(("fleet-device", vec!["--package", "fleet-device"]));
    builds.push((
        "provisioning-admin",
        vec!["--package", "provisioning-admin"],
    ));
    for (name, args) in builds {
        let out = cargo()?
            .args(["build", "--quiet"])
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| WatchError::Build(name.into(), e.to_string()))?;
        if !out.status.success() {
            return Err(WatchError::Build(
                name.into(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
    }
    Ok(())
}

pub struct LambdaWatch {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl LambdaWatch {
    /// Starts the emulator on a free loopback port with the functions' environment from
    /// `env_file`, its output going to `log`, and waits until it accepts connections.
    pub async fn start(env_file: &Path, log: &Path) -> Result<Self, WatchError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .map_err(|e| WatchError::Watch(e.to_string()))?;
        let log_file = std::fs::File::create(log).map_err(|e| WatchError::Watch(e.to_string()))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| WatchError::Watch(e.to_string()))?;
        let mut command = cargo()?;
        command
            .args(["lambda", "watch", "--invoke-address", "127.0.0.1"])
            .args([
                "--invoke-port",
                &port.to_string(),
                "--features",
                "local-replay",
            ])
            .arg("--env-file")
            .arg(env_file)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true);
        // SAFETY: setpgid and prctl are async-signal-safe; nothing else runs before exec.
        unsafe {
            command.pre_exec(|| {
                libc::setpgid(0, 0);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| WatchError::Watch(e.to_string()))?;
        let watch = Self {
            child,
            port,
            log: log.to_owned(),
        };
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if ready.is_err() {
            return Err(WatchError::Watch(format!(
                "not listening on 127.0.0.1:{port} after 60 s; see {}",
                watch.log.display()
            )));
        }
        Ok(watch)
    }

    /// `cargo lambda invoke FUNCTION --data-file DATA [--client-context-file CONTEXT]`, the
    /// command the README documents; returns the function's JSON answer.
    pub async fn invoke(
        &self,
        function: &str,
        data_file: &Path,
        client_context_file: Option<&Path>,
    ) -> Result<Value, WatchError> {
        let fail = |m: String| WatchError::Invoke(function.to_owned(), m);
        let mut command = cargo()?;
        command
            .args([
                "lambda",
                "invoke",
                function,
                "--invoke-address",
                "127.0.0.1",
            ])
            .args([
                "--invoke-port",
                &self.port.to_string(),
                "--output-format",
                "json",
            ])
            .arg("--data-file")
            .arg(data_file)
            .kill_on_drop(true);
        if let Some(context) = client_context_file {
            command.arg("--client-context-file").arg(context);
        }
        let out = tokio::time::timeout(Duration::from_secs(120), command.output())
            .await
            .map_err(|_| fail("no answer within 120 s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(fail(format!(
                "{}{}\n(emulator log: {})",
                stdout,
                String::from_utf8_lossy(&out.stderr),
                self.log.display()
            )));
        }
        serde_json::from_str(stdout.trim())
            .map_err(|e| fail(format!("answer is not JSON ({e}): {stdout}")))
    }

    /// The Lambda Invoke API base URL of the emulator (what AWS IoT would call the hook on).
    pub fn invoke_base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for LambdaWatch {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            // The emulator and every function process it started share its process group.
            // SAFETY: plain syscall on a process group we created.
            unsafe {
                libc::kill(-(pid as i32), libc::SIGTERM);
            }
        }
    }
}
