//! Configuration from the environment, read once at cold start.
//!
//! Each function builds its own `Config` from these helpers. Errors name the variable and say
//! what was expected, never the value: a misplaced key in the wrong variable must not end up in
//! a log line.

use std::collections::HashMap;
use std::str::FromStr;

/// Where variables come from: the process environment in Lambda, a map in tests.
pub trait Env {
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        HashMap::get(self, name).cloned()
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn get(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| (*v).to_owned())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("missing environment variable {0}")]
    Missing(&'static str),
    #[error("environment variable {name} is invalid: expected {expected}")]
    Invalid {
        name: &'static str,
        expected: &'static str,
    },
}

/// A variable that must be set and not blank.
pub fn required(env: &impl Env, name: &'static str) -> Result<String, ConfigError> {
    optional(env, name).ok_or(ConfigError::Missing(name))
}

/// A variable that may be absent; blank counts as absent.
pub fn optional(env: &impl Env, name: &str) -> Option<String> {
    env.get(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

/// A variable parsed as `T`, or `default` when absent.
pub fn parsed<T: FromStr>(
    env: &impl Env,
    name: &'static str,
    default: T,
    expected: &'static str,
) -> Result<T, ConfigError> {
    match optional(env, name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ConfigError::Invalid { name, expected }),
    }
}

/// A whole number of at least 1 (a limit of 0 would refuse everything).
pub fn positive(
    env: &impl Env,
    name: &'static str,
    default: u32,
    expected: &'static str,
) -> Result<u32, ConfigError> {
    match parsed(env, name, default, expected)? {
        0 => Err(ConfigError::Invalid { name, expected }),
        n => Ok(n),
    }
}

/// A comma-separated list; absent or blank gives an empty list.
pub fn list(env: &impl Env, name: &str) -> Vec<String> {
    optional(env, name)
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// A regular expression that must match a whole value (anchored, so a pattern cannot match a
/// substring of something longer), or `default` when absent.
pub fn pattern(
    env: &impl Env,
    name: &'static str,
    default: &str,
) -> Result<regex_lite::Regex, ConfigError> {
    let pattern = optional(env, name).unwrap_or_else(|| default.to_owned());
    let anchored = format!(
        "^(?:{})$",
        pattern.trim_start_matches('^').trim_end_matches('$')
    );
    regex_lite::Regex::new(&anchored).map_err(|_| ConfigError::Invalid {
        name,
        expected: "a regular expression",
    })
}

/// A `host[:port]` endpoint such as `DPS_ENDPOINT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn parse(value: &str, default_port: u16) -> Option<Self> {
        let (host, port) = match value.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok().filter(|p| *p != 0)?),
            None => (value, default_port),
        };
        let valid_host = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'));
        valid_host.then(|| Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// `name` as a `host[:port]`, or `default` when absent.
pub fn host_port(
    env: &impl Env,
    name: &'static str,
    default: &str,
    default_port: u16,
) -> Result<HostPort, ConfigError> {
    let value = optional(env, name).unwrap_or_else(|| default.to_owned());
    HostPort::parse(&value, default_port).ok_or(ConfigError::Invalid {
        name,
        expected: "host[:port]",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn required_names_the_missing_variable() {
        let env = [("DEVICES_TABLE", "  ")];
        let err = required(&env, "DEVICES_TABLE").unwrap_err();
        assert_eq!(
            err.to_string(),
            "missing environment variable DEVICES_TABLE"
        );
        assert_eq!(required(&[("A", " x ")], "A").unwrap(), "x");
    }

    #[test]
    fn parsed_reports_expectation_not_value() {
        let env = [("TTL_SECONDS", "s3cr3t")];
        let err = parsed(&env, "TTL_SECONDS", 300u64, "a number of seconds").unwrap_err();
        assert_eq!(
            err.to_string(),
            "environment variable TTL_SECONDS is invalid: expected a number of seconds"
        );
        assert!(!err.to_string().contains("s3cr3t"));
        assert_eq!(
            parsed(&[("X", "7")], "TTL_SECONDS", 300u64, "n").unwrap(),
            300
        );
        assert_eq!(
            parsed(&[("TTL_SECONDS", "7")], "TTL_SECONDS", 300u64, "n").unwrap(),
            7
        );
    }

    #[test]
    fn lists_split_on_commas() {
        let env = [("OPS", " OP1, ,OP2 ")];
        assert_eq!(list(&env, "OPS"), vec!["OP1", "OP2"]);
        assert!(list(&env, "NONE").is_empty());
    }

    #[test]
    fn host_port_parsing() {
        let d = "global.azure-devices-provisioning.net";
        assert_eq!(
            host_port(&[("X", "")], "DPS_ENDPOINT", d, 8883)
                .unwrap()
                .to_string(),
            "global.azure-devices-provisioning.net:8883"
        );
        let local = host_port(
            &[("DPS_ENDPOINT", "127.0.0.1:4443")],
            "DPS_ENDPOINT",
            d,
            8883,
        );
        assert_eq!(
            local.unwrap(),
            HostPort {
                host: "127.0.0.1".into(),
                port: 4443
            }
        );
        for bad in ["host:0", "host:port", ":1", "ho st", "host:99999"] {
            assert!(
                host_port(&[("DPS_ENDPOINT", bad)], "DPS_ENDPOINT", d, 8883).is_err(),
                "{bad}"
            );
        }
    }
}
