//! claim-issuer's configuration, read once at cold start.

use regex_lite::Regex;
use shared::config::{self, ConfigError, Env};
use shared::registry::DEFAULT_SERIAL_PATTERN;

#[derive(Debug, Clone)]
pub struct Config {
    pub devices_table: String,
    /// Used when the request names no template.
    pub default_template: String,
    /// Templates an installer may ask for (always includes the default).
    pub allowed_templates: Vec<String>,
    /// Cognito group whose members may get claims.
    pub installer_group: String,
    pub claims_per_window: u32,
    pub window_seconds: u64,
    /// Returned to the installer so the device knows where to connect.
    pub iot_data_endpoint: Option<String>,
    pub audit_retention_seconds: u64,
    pub serial_pattern: Regex,
    /// Claims without a serial: whoever holds one provisions the first allowed serial they name.
    pub allow_unbound_claims: bool,
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let default_template = config::required(env, "PROVISIONING_TEMPLATE")?;
        let mut allowed_templates = config::list(env, "ALLOWED_TEMPLATES");
        if !allowed_templates.contains(&default_template) {
            allowed_templates.push(default_template.clone());
        }
        let claims_per_window =
            config::parsed(env, "CLAIMS_PER_WINDOW", 20u32, "a positive number")?;
        let window_seconds = config::parsed(
            env,
            "CLAIM_WINDOW_SECONDS",
            3600u64,
            "a positive number of seconds",
        )?;
        if claims_per_window == 0 {
            return Err(ConfigError::Invalid {
                name: "CLAIMS_PER_WINDOW",
                expected: "a positive number",
            });
        }
        if window_seconds == 0 {
            return Err(ConfigError::Invalid {
                name: "CLAIM_WINDOW_SECONDS",
                expected: "a positive number of seconds",
            });
        }
        let retention_days: u64 =
            config::parsed(env, "AUDIT_RETENTION_DAYS", 90, "a number of days")?;
        Ok(Self {
            devices_table: config::required(env, "DEVICES_TABLE")?,
            default_template,
            allowed_templates,
            installer_group: config::optional(env, "INSTALLER_GROUP")
                .unwrap_or_else(|| "installers".into()),
            claims_per_window,
            window_seconds,
            iot_data_endpoint: config::optional(env, "IOT_DATA_ENDPOINT"),
            audit_retention_seconds: retention_days * 86_400,
            serial_pattern: config::pattern(env, "SERIAL_PATTERN", DEFAULT_SERIAL_PATTERN)?,
            allow_unbound_claims: config::parsed(
                env,
                "ALLOW_UNBOUND_CLAIMS",
                false,
                "true or false",
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::from_env(&[("PROVISIONING_TEMPLATE", "fleet"), ("DEVICES_TABLE", "d")])
            .unwrap();
        assert_eq!(c.allowed_templates, vec!["fleet"]);
        assert!(!c.allow_unbound_claims);
        assert_eq!(
            (
                c.installer_group.as_str(),
                c.claims_per_window,
                c.window_seconds
            ),
            ("installers", 20, 3600)
        );
        assert_eq!(
            Config::from_env(&[("DEVICES_TABLE", "d")]).unwrap_err(),
            ConfigError::Missing("PROVISIONING_TEMPLATE")
        );
        let zero = Config::from_env(&[
            ("PROVISIONING_TEMPLATE", "f"),
            ("DEVICES_TABLE", "d"),
            ("CLAIMS_PER_WINDOW", "0"),
        ]);
        assert!(matches!(
            zero,
            Err(ConfigError::Invalid {
                name: "CLAIMS_PER_WINDOW",
                ..
            })
        ));
    }
}
