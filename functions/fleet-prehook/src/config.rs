//! The hook's configuration, read once at cold start.

use std::time::Duration;

use regex_lite::Regex;
use shared::config::{self, ConfigError, Env};

/// Serial numbers: letters, digits and `-_.:`, 1 to 64 characters, starting alphanumeric.
pub const DEFAULT_SERIAL_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$";

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
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let pattern = config::optional(env, "SERIAL_PATTERN")
            .unwrap_or_else(|| DEFAULT_SERIAL_PATTERN.to_owned());
        // Anchored, so that a pattern cannot accidentally match a substring of a longer serial.
        let anchored = format!(
            "^(?:{})$",
            pattern.trim_start_matches('^').trim_end_matches('$')
        );
        let serial_pattern = Regex::new(&anchored).map_err(|_| ConfigError::Invalid {
            name: "SERIAL_PATTERN",
            expected: "a regular expression",
        })?;
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
        assert_eq!(
            Config::from_env(&[("X", "y")]).unwrap_err(),
            ConfigError::Missing("DEVICES_TABLE")
        );
        for (name, value) in [
            ("SERIAL_PATTERN", "("),
            ("DECISION_BUDGET_MS", "5000"),
            ("REQUIRE_CLAIM_RECORD", "maybe"),
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
