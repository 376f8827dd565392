//! A moto server on loopback, started per test (about half a second) and killed when dropped.
//!
//! moto is installed pinned into the project's `.venv` by `make tools` and served by
//! `tests/local_aws_server.py`, one request at a time (see there: moto's threaded server breaks
//! DynamoDB's per-item atomicity). The server binds port 0 and reports the port it got, so
//! parallel tests never collide. Its output is drained continuously: a full pipe would stall it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use aws_config::{Region, SdkConfig};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    TimeToLiveSpecification,
};
use aws_sdk_ssm::types::ParameterType;
use shared::aws::CallLimits;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How long moto may take to print its address.
const STARTUP_LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("the project's Python environment is missing ({0}): run `make tools`")]
    NotInstalled(String),
    #[error("moto server failed to start: {0}")]
    Start(String),
    #[error("local AWS call failed: {0}")]
    Call(String),
}

/// A running moto server.
pub struct LocalAws {
    endpoint: String,
    _child: Child,
}

/// A program that `make tools` installs into the project's virtual environment.
pub fn venv_bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../.venv/bin")
        .join(name)
}

/// The launcher of the local AWS endpoint.
fn server_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("local_aws_server.py")
}

impl LocalAws {
    pub async fn start() -> Result<Self, HarnessError> {
        let python = venv_bin("python");
        if !python.exists() {
            return Err(HarnessError::NotInstalled(python.display().to_string()));
        }
        let mut command = Command::new(&python);
        command
            .arg(server_script())
            .args(["--host", "127.0.0.1", "--port", "0"])
            // moto checks authenticator (TOTP) codes only when told to: it then refuses a
            // wrong code as Cognito does.
            .env("MOTO_COGNITO_IDP_USER_POOL_ENABLE_TOTP", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // If this process dies without dropping us (SIGKILL, abort), the kernel ends moto too.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(|e| HarnessError::Start(e.to_string()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| HarnessError::Start("no stderr pipe".into()))?;
        let mut lines = BufReader::new(stderr).lines();

        let endpoint = tokio::time::timeout(STARTUP_LIMIT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(at) = line.find("Running on http://") {
                    return Some(line[at + "Running on ".len()..].trim().to_owned());
                }
            }
            None
        })
        .await
        .map_err(|_| HarnessError::Start(format!("no address within {STARTUP_LIMIT:?}")))?
        .ok_or_else(|| HarnessError::Start("exited before listening".into()))?;

        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            endpoint,
            _child: child,
        })
    }

    /// `http://127.0.0.1:PORT`, the value a local run puts in `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The production SDK configuration (shared::aws), pointed at this server with dummy
    /// credentials, as `AWS_ENDPOINT_URL` plus the usual variables would configure it.
    pub async fn sdk_config(&self) -> SdkConfig {
        local_sdk_config(&self.endpoint).await
    }

    pub async fn ssm(&self) -> aws_sdk_ssm::Client {
        aws_sdk_ssm::Client::new(&self.sdk_config().await)
    }

    pub async fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk_config().await)
    }

    /// Creates the device table as `infra/` defines it: string key `pk`, on-demand, TTL on
    /// `expires_at`.
    pub async fn create_devices_table(&self, name: &str) -> Result<(), HarnessError> {
        let db = self.dynamodb().await;
        let call = |e: &dyn std::fmt::Display| HarnessError::Call(e.to_string());
        db.create_table()
            .table_name(name)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(shared::registry::KEY_ATTRIBUTE)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| call(&e))?,
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(shared::registry::KEY_ATTRIBUTE)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| call(&e))?,
            )
            .send()
            .await
            .map_err(|e| call(&aws_sdk_dynamodb::error::DisplayErrorContext(e)))?;
        db.update_time_to_live()
            .table_name(name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name("expires_at")
                    .enabled(true)
                    .build()
                    .map_err(|e| call(&e))?,
            )
            .send()
            .await
            .map_err(|e| call(&aws_sdk_dynamodb::error::DisplayErrorContext(e)))?;
        Ok(())
    }

    /// Stores a parameter (SecureString unless `kind` says otherwise).
    pub async fn put_parameter(
        &self,
        name: &str,
        value: &str,
        kind: ParameterType,
    ) -> Result<(), HarnessError> {
        self.ssm()
            .await
            .put_parameter()
            .name(name)
            .value(value)
            .r#type(kind)
            .overwrite(true)
            .send()
            .await
            .map_err(|e| {
                HarnessError::Call(aws_sdk_ssm::error::DisplayErrorContext(e).to_string())
            })?;
        Ok(())
    }
}

/// The production SDK configuration (shared::aws) pointed at a local endpoint, with dummy
/// credentials so that requests are SigV4-signed as in production.
pub async fn local_sdk_config(endpoint: &str) -> SdkConfig {
    local_sdk_config_with(endpoint, &CallLimits::default()).await
}

/// [`local_sdk_config`] with other bounds on each call (an operator's tool's, say).
pub async fn local_sdk_config_with(endpoint: &str, limits: &CallLimits) -> SdkConfig {
    shared::aws::loader(limits)
        .endpoint_url(endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(aws_sdk_ssm::config::Credentials::new(
            "testing", "testing", None, None, "local",
        ))
        .load()
        .await
}

/// A fresh random 64-byte key in base64, the size Azure generates for enrollment groups.
/// Keys are made at run time, never committed.
pub fn random_key_base64() -> String {
    use base64::Engine;
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 64];
    // The system RNG failing is not something a test can work around.
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("system random number generator");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
