//! What the function builds once, at cold start, and reuses while warm: configuration, SDK
//! clients, the key cache and the TLS configuration. Nothing here is per-device.

use std::sync::Arc;

use dps_client::DpsError;
use rustls::ClientConfig;
use shared::registry::DynamoRegistry;
use shared::secrets::{
    CachedSecretStore, DynamoSecretStore, Secret, SecretError, SecretStore, SsmSecretStore,
};

use crate::config::{Config, KeySource};

/// The configured key store.
pub enum KeyStore {
    Ssm(SsmSecretStore),
    Dynamo(DynamoSecretStore),
}

impl SecretStore for KeyStore {
    async fn get(&self, name: &str) -> Result<Secret, SecretError> {
        match self {
            Self::Ssm(s) => s.get(name).await,
            Self::Dynamo(s) => s.get(name).await,
        }
    }
}

pub struct State {
    pub config: Config,
    pub keys: CachedSecretStore<KeyStore>,
    pub registry: DynamoRegistry,
    pub tls: DpsTls,
}

type Building = tokio::task::JoinHandle<Result<Arc<ClientConfig>, DpsError>>;

/// The TLS configuration for DPS, built on a blocking thread from cold start on: reading and
/// parsing the system's root certificates took 14 ms of a 46 ms cold start in `make bench`, and
/// this way it overlaps the first invocation's device-table and key lookups instead of
/// preceding them.
pub struct DpsTls {
    ready: tokio::sync::OnceCell<Arc<ClientConfig>>,
    building: std::sync::Mutex<Option<Building>>,
}

impl DpsTls {
    /// Starts building; needs a Tokio runtime.
    pub fn start(extra_root: Option<Vec<u8>>) -> Self {
        let building =
            tokio::task::spawn_blocking(move || dps_client::tls_config(extra_root.as_deref()));
        Self {
            ready: tokio::sync::OnceCell::new(),
            building: std::sync::Mutex::new(Some(building)),
        }
    }

    /// The configuration, once built. A failed build fails this call and every later one.
    pub async fn get(&self) -> Result<Arc<ClientConfig>, DpsError> {
        self.ready
            .get_or_try_init(|| async {
                let building = self
                    .building
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                match building {
                    Some(handle) => handle
                        .await
                        .map_err(|e| DpsError::Tls(format!("TLS setup stopped: {e}")))?,
                    None => Err(DpsError::Tls(
                        "TLS setup failed at cold start (see the first error)".into(),
                    )),
                }
            })
            .await
            .cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot read DPS_TRUSTED_CA_FILE {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] DpsError),
}

impl State {
    pub fn new(config: Config, sdk: &aws_config::SdkConfig) -> Result<Self, StartupError> {
        let extra_root = match &config.trusted_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| StartupError::CaFile {
                path: path.display().to_string(),
                source,
            })?),
            None => None,
        };
        // A bad CA file is a configuration error: refuse to start rather than fail later.
        if let Some(pem) = &extra_root {
            dps_client::tls_config_roots_check(pem)?;
        }
        let tls = DpsTls::start(extra_root);
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        let store = match &config.key_source {
            KeySource::Group { .. } | KeySource::IndividualSsm { .. } => {
                KeyStore::Ssm(SsmSecretStore::new(aws_sdk_ssm::Client::new(sdk)))
            }
            KeySource::IndividualDynamoDb => KeyStore::Dynamo(DynamoSecretStore::new(
                dynamodb.clone(),
                &config.devices_table,
                shared::registry::DEVICE_KEY_ATTRIBUTE,
            )),
        };
        Ok(Self {
            keys: CachedSecretStore::new(store, config.secret_cache),
            registry: DynamoRegistry::new(dynamodb, &config.devices_table),
            tls,
            config,
        })
    }
}
