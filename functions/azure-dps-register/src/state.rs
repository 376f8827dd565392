//! What the function builds once, at cold start, and reuses while warm: configuration, SDK
//! clients, the key cache and the TLS configuration. Nothing here is per-device.

use std::sync::Arc;

use rustls::ClientConfig;
use shared::dps::{self, DpsError};
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
    pub tls: Arc<ClientConfig>,
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
        let tls = dps::tls_config(extra_root.as_deref())?;
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        let store = match &config.key_source {
            KeySource::Group { .. } | KeySource::IndividualSsm { .. } => {
                KeyStore::Ssm(SsmSecretStore::new(aws_sdk_ssm::Client::new(sdk)))
            }
            KeySource::IndividualDynamoDb => KeyStore::Dynamo(DynamoSecretStore::new(
                dynamodb.clone(),
                &config.devices_table,
                "device_key",
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
