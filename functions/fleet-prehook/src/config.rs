//! The hook's configuration, read once at cold start.

use std::time::Duration;

use regex_lite::Regex;
use shared::config::{self, ConfigError, Env};
use shared::registry::DEFAULT_SERIAL_PATTERN;

#[derive(Debug, Clone)]
pub struct Config {
    pub devices_table: String,
    /// The template parameter holding the serial (default `SerialNumber`).
    pub serial_parameter: String,
    pub serial_pattern: Regex,
    /// Only claim certificates recorded by claim-issuer may provision.
    pub require_claim_record: bool,
    /// Decide within this time; AWS IoT gives the hook 5 s and denies on timeout.
    pub budget: Duration,
    /// How long a provisioning stays pending before another certificate may replace it.
    pub pending: Duration,
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let serial_pattern = config::pattern(env, "SERIAL_PATTERN", DEFAULT_SERIAL_PATTERN)?;
        let budget = Duration::from_millis(config::parsed(
            env,
            "DECISION_BUDGET_MS",
            3_500,
            "milliseconds below 4500",
        )?);
        if budget >= Duration::from_millis(4_500) {
            return Err(ConfigError::Invalid {
                name: "DECISION_BUDGET_MS",
                expected: "milliseconds below 4500",
            });
        }
        Ok(Self {
            devices_table: config::required(env, "DEVICES_TABLE")?,
            serial_parameter: config::optional(env, "SERIAL_PARAMETER")
                .unwrap_or_else(|| "SerialNumber".to_owned()),
            serial_pattern,
            require_claim_record: config::parsed(
                env,
                "REQUIRE_CLAIM_RECORD",
                false,
                "true or false",
            )?,
            budget,
            pending: Duration::from_secs(config::parsed(
                env,
                "PENDING_SECONDS",
                600,
                "a number of seconds",
            )?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = Config::from_env(&[("DEVICES_TABLE", "devices")]).unwrap();
        assert_eq!(c.serial_parameter, "SerialNumber");
        assert!(c.serial_pattern.is_match("SN-0001"));
        assert!(!c.serial_pattern.is_match("../etc"));
        assert!(!c.serial_pattern.is_match(&"a".repeat(65)));
        // AWS IoT thing names have no '.': such a serial would pass the hook and fail in IoT.
        assert!(!c.serial_pattern.is_match("SN.0001"));
        assert_eq!(c.pending, Duration::from_secs(600));
        assert_eq!(
            Config::from_env(&[("X", "y")]).unwrap_err(),
            ConfigError::Missing("DEVICES_TABLE")
        );
        for (name, value) in [
            ("SERIAL_PATTERN", "("),
            ("DECISION_BUDGET_MS", "5000"),
            ("REQUIRE_CLAIM_RECORD", "maybe"),
            ("PENDING_SECONDS", "ten minutes"),
        ] {
            let err = Config::from_env(&[("DEVICES_TABLE", "d"), (name, value)]).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { name: n, .. } if n == name),
                "{name}"
            );
        }
    }

    #[test]
    fn patterns_are_anchored() {
        let c =
            Config::from_env(&[("DEVICES_TABLE", "d"), ("SERIAL_PATTERN", "SN-[0-9]+")]).unwrap();
        assert!(c.serial_pattern.is_match("SN-12"));
        assert!(!c.serial_pattern.is_match("xSN-12"));
        assert!(!c.serial_pattern.is_match("SN-12x"));
    }
}
