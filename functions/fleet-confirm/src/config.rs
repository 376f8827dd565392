//! The function's configuration, read once at cold start.

use shared::config::{self, ConfigError, Env};

#[derive(Debug, Clone)]
pub struct Config {
    pub devices_table: String,
    /// What the provisioning template puts before the serial in a thing's name (the device
    /// policy makes the client id the thing's name).
    pub thing_name_prefix: String,
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        Ok(Self {
            devices_table: config::required(env, "DEVICES_TABLE")?,
            thing_name_prefix: config::optional(env, "THING_NAME_PREFIX").unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_required_the_prefix_optional() {
        assert_eq!(
            Config::from_env(&[("X", "y")]).unwrap_err(),
            ConfigError::Missing("DEVICES_TABLE")
        );
        let c =
            Config::from_env(&[("DEVICES_TABLE", "d"), ("THING_NAME_PREFIX", "fleet-")]).unwrap();
        assert_eq!(
            (c.devices_table.as_str(), c.thing_name_prefix.as_str()),
            ("d", "fleet-")
        );
        assert_eq!(
            Config::from_env(&[("DEVICES_TABLE", "d")])
                .unwrap()
                .thing_name_prefix,
            ""
        );
    }
}
