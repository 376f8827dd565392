//! sim-lifecycle's configuration, read once at cold start.

use std::path::PathBuf;
use std::time::Duration;

use shared::config::{self, ConfigError, Env};

#[derive(Debug, Clone)]
pub struct Config {
    pub devices_table: String,
    /// SSM SecureString parameters `<prefix><hub host name>`, each holding that hub's service
    /// connection string (`HostName=…;SharedAccessKeyName=registryReadWrite;SharedAccessKey=…`).
    pub hub_credentials_prefix: String,
    /// A SIM SORACOM reports `active` again is unblocked (if SORACOM's event blocked it).
    pub unblock_on_active: bool,
    /// Where to connect for every hub instead of its host name (local runs: the stand-in).
    pub hub_endpoint: Option<String>,
    /// Extra trusted CA certificates (PEM) for the hub's TLS (local runs).
    pub hub_trusted_ca_file: Option<PathBuf>,
    /// The most an event may take; SORACOM does not wait for long.
    pub budget: Duration,
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let prefix = config::required(env, "HUB_CREDENTIALS_PREFIX")?;
        if !prefix.starts_with('/') {
            return Err(ConfigError::Invalid {
                name: "HUB_CREDENTIALS_PREFIX",
                expected: "an SSM parameter path starting with /",
            });
        }
        Ok(Self {
            devices_table: config::required(env, "DEVICES_TABLE")?,
            hub_credentials_prefix: prefix,
            unblock_on_active: config::parsed(env, "UNBLOCK_ON_ACTIVE", false, "true or false")?,
            hub_endpoint: config::optional(env, "IOT_HUB_ENDPOINT"),
            hub_trusted_ca_file: config::optional(env, "IOT_HUB_TRUSTED_CA_FILE")
                .map(PathBuf::from),
            budget: Duration::from_millis(config::parsed(
                env,
                "EVENT_BUDGET_MS",
                8_000,
                "milliseconds",
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors_name_the_variable() {
        let c = Config::from_env(&[
            ("DEVICES_TABLE", "devices"),
            ("HUB_CREDENTIALS_PREFIX", "/soracom-dps/iot-hub/"),
        ])
        .unwrap();
        assert!(!c.unblock_on_active);
        assert_eq!(c.budget, Duration::from_secs(8));
        assert_eq!(
            Config::from_env(&[("DEVICES_TABLE", "d")]).unwrap_err(),
            ConfigError::Missing("HUB_CREDENTIALS_PREFIX")
        );
        let relative = Config::from_env(&[
            ("DEVICES_TABLE", "d"),
            ("HUB_CREDENTIALS_PREFIX", "iot-hub/"),
        ]);
        assert!(relative.is_err());
    }
}
