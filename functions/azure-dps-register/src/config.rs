//! The function's configuration, read once at cold start.

use std::path::PathBuf;
use std::time::Duration;

use shared::config::{self, ConfigError, Env, HostPort};

pub const DEFAULT_DPS_ENDPOINT: &str = "global.azure-devices-provisioning.net";

/// Where device keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// Derived from the enrollment-group key in this SSM SecureString.
    Group { parameter: String },
    /// One SSM SecureString per device: `{prefix}{registration id}`.
    IndividualSsm { prefix: String },
    /// The `device_key` attribute of the SIM's item in the device table.
    IndividualDynamoDb,
}

/// How devices prove themselves to DPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attestation {
    /// A SAS token of the device key (`KEY_SOURCE`): the answer is a connection string.
    SymmetricKey(KeySource),
    /// A client certificate this function issues from a CA whose key is in KMS: the answer
    /// is the certificate and its key.
    X509(X509Settings),
}

/// The device CA of X.509 attestation, and the certificates it issues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Settings {
    /// The KMS key (id, ARN or alias) that is the CA's private key.
    pub kms_key_id: String,
    /// SSM parameter (String) with the CA's certificate, PEM, followed by any certificates
    /// above it devices must present up to the CA enrolled in DPS.
    pub ca_certificate_parameter: String,
    pub lifetime: Duration,
    /// A device asking again while its certificate has longer than this to live is refused
    /// (it should have kept it) unless it asks to rotate.
    pub renew_before: Duration,
    /// The least time between two certificates of one device, even when it asks to rotate:
    /// every certificate issued stays valid in IoT Hub until it expires, so a SIM held for an
    /// hour must not be able to mint a handful.
    pub min_rotation: Duration,
}

const DAY_SECONDS: u64 = 86_400;

/// How the registration id is made from the SIM identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationIdTemplate(String);

impl RegistrationIdTemplate {
    const PLACEHOLDERS: [&'static str; 2] = ["{imsi}", "{simId}"];

    pub fn parse(template: &str) -> Option<Self> {
        // Every `{` must open a known placeholder, and one must be present: a constant id would
        // give every SIM the same device.
        let mut rest = template;
        let mut found = false;
        while let Some(at) = rest.find('{') {
            let tail = &rest[at..];
            let known = Self::PLACEHOLDERS.iter().find(|p| tail.starts_with(**p))?;
            found = true;
            rest = &tail[known.len()..];
        }
        (found && !rest.contains('}')).then(|| Self(template.to_owned()))
    }

    /// The registration id, or `None` if the template needs a field the SIM lacks.
    pub fn render(&self, imsi: &str, sim_id: Option<&str>) -> Option<String> {
        let mut id = self.0.replace("{imsi}", imsi);
        if id.contains("{simId}") {
            id = id.replace("{simId}", sim_id?);
        }
        Some(id)
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub id_scope: String,
    pub endpoint: HostPort,
    pub trusted_ca_file: Option<PathBuf>,
    pub attestation: Attestation,
    pub devices_table: String,
    pub registration_id: RegistrationIdTemplate,
    /// Empty: any operator. Otherwise only SIMs of these SORACOM operators.
    pub allowed_operators: Vec<String>,
    /// Refuse SIMs that have no `allowed` entry in the device table.
    pub require_allowlist: bool,
    /// Refuse a request that does not name the SIM card (Funk's `simId`, Beam's
    /// `x-soracom-sim-id`): where the table lists cards, a request without one would skip the
    /// card's entry, and its block.
    pub require_sim_id: bool,
    pub secret_cache: Duration,
    /// Longest time spent on DPS, whatever the Lambda timeout (Funk waits about 10 s at most).
    pub dps_budget: Duration,
    /// A recorded registration younger than this answers in DPS's place (0: never).
    pub reregister_after: Duration,
    /// DPS registrations one SIM may cause in an hour.
    pub dps_per_sim_per_hour: u32,
    /// DPS registrations all instances together may start in a minute.
    pub dps_registrations_per_minute: u32,
    /// IoT Plug and Play model id sent in the registration payload unless the device sends one.
    pub model_id: Option<String>,
    /// SORACOM Beam as a second front door (`POST /register` through the HTTP API).
    pub beam: BeamConfig,
}

/// Where Beam's pre-shared key is, whose SIMs Beam forwards, and how old a signed request may
/// be. Without a key parameter and an operator, every Beam request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeamConfig {
    /// SSM SecureString holding the PSK SORACOM Beam signs with.
    pub psk_parameter: Option<String>,
    /// The operator whose Beam holds that key: `BEAM_OPERATOR_ID`, else the one operator in
    /// `ALLOWED_OPERATOR_IDS`.
    pub operator_id: Option<String>,
    /// A signed request older or newer than this (by its `x-soracom-timestamp`) is refused.
    pub max_skew: Duration,
}

fn is_operator_id(id: &str) -> bool {
    id.strip_prefix("OP")
        .is_some_and(|d| (8..=16).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Digital Twins model ids as DPS accepts them: `dtmi:` then segments of letters, digits and
/// `_`, separated by `:`, and a `;version`.
fn is_model_id(id: &str) -> bool {
    let Some((path, version)) = id.strip_prefix("dtmi:").and_then(|r| r.split_once(';')) else {
        return false;
    };
    id.len() <= 4096
        && !version.is_empty()
        && version.bytes().all(|b| b.is_ascii_digit())
        && path.split(':').all(|segment| {
            segment.starts_with(|c: char| c.is_ascii_alphabetic())
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

fn key_source(env: &impl Env) -> Result<KeySource, ConfigError> {
    Ok(match config::optional(env, "KEY_SOURCE").as_deref() {
        None | Some("group") => KeySource::Group {
            parameter: config::required(env, "GROUP_KEY_PARAMETER")?,
        },
        Some("individual-ssm") => KeySource::IndividualSsm {
            prefix: config::required(env, "DEVICE_KEY_PARAMETER_PREFIX")?,
        },
        Some("individual-dynamodb") => KeySource::IndividualDynamoDb,
        Some(_) => {
            return Err(ConfigError::Invalid {
                name: "KEY_SOURCE",
                expected: "group, individual-ssm or individual-dynamodb",
            })
        }
    })
}

fn x509_settings(env: &impl Env) -> Result<X509Settings, ConfigError> {
    let days = |name, default| -> Result<u64, ConfigError> {
        Ok(u64::from(config::positive(
            env,
            name,
            default,
            "a whole number of days of at least 1",
        )?))
    };
    let lifetime = days("DEVICE_CERT_DAYS", 365)?;
    let renew_before = days("RENEW_BEFORE_DAYS", 30)?;
    // A renewal window as long as the certificate would refuse nobody: every device could
    // ask for a new certificate every time.
    if renew_before >= lifetime {
        return Err(ConfigError::Invalid {
            name: "RENEW_BEFORE_DAYS",
            expected: "fewer days than DEVICE_CERT_DAYS",
        });
    }
    // By default a thirtieth of the renewal window (a day for the default 30 days): a device
    // that renews on time is never held back, one that rotates in a loop gets one a day.
    let default_rotation = u32::try_from((renew_before * 24 / 30).max(1)).unwrap_or(u32::MAX);
    let min_rotation_hours = config::positive(
        env,
        "MIN_ROTATION_HOURS",
        default_rotation,
        "a whole number of hours of at least 1",
    )?;
    Ok(X509Settings {
        kms_key_id: config::required(env, "CA_KMS_KEY_ID")?,
        ca_certificate_parameter: config::required(env, "CA_CERTIFICATE_PARAMETER")?,
        lifetime: Duration::from_secs(lifetime * DAY_SECONDS),
        renew_before: Duration::from_secs(renew_before * DAY_SECONDS),
        min_rotation: Duration::from_secs(u64::from(min_rotation_hours) * 3600),
    })
}

impl Config {
    pub fn from_env(env: &impl Env) -> Result<Self, ConfigError> {
        let attestation = match config::optional(env, "ATTESTATION").as_deref() {
            None | Some("symmetric-key") => Attestation::SymmetricKey(key_source(env)?),
            Some("x509") => Attestation::X509(x509_settings(env)?),
            Some(_) => {
                return Err(ConfigError::Invalid {
                    name: "ATTESTATION",
                    expected: "symmetric-key or x509",
                })
            }
        };
        let template = config::optional(env, "REGISTRATION_ID_TEMPLATE")
            .unwrap_or_else(|| "{imsi}".to_owned());
        let registration_id =
            RegistrationIdTemplate::parse(&template).ok_or(ConfigError::Invalid {
                name: "REGISTRATION_ID_TEMPLATE",
                expected: "text with {imsi} or {simId}, e.g. 'soracom-{imsi}'",
            })?;
        let allowed_operators = config::list(env, "ALLOWED_OPERATOR_IDS");
        let beam_operator = match config::optional(env, "BEAM_OPERATOR_ID") {
            Some(id) if !is_operator_id(&id) => {
                return Err(ConfigError::Invalid {
                    name: "BEAM_OPERATOR_ID",
                    expected: "a SORACOM operator id (OP and digits)",
                })
            }
            Some(id) => Some(id),
            None if allowed_operators.len() == 1 => allowed_operators.first().cloned(),
            None => None,
        };
        let beam = BeamConfig {
            psk_parameter: config::optional(env, "BEAM_PSK_PARAMETER"),
            operator_id: beam_operator,
            max_skew: Duration::from_secs(
                config::positive(
                    env,
                    "BEAM_MAX_SKEW_SECONDS",
                    300,
                    "a whole number of seconds of at least 1",
                )?
                .into(),
            ),
        };
        Ok(Self {
            beam,
            id_scope: config::required(env, "DPS_ID_SCOPE")?,
            endpoint: config::host_port(env, "DPS_ENDPOINT", DEFAULT_DPS_ENDPOINT, 8883)?,
            trusted_ca_file: config::optional(env, "DPS_TRUSTED_CA_FILE").map(PathBuf::from),
            attestation,
            devices_table: config::required(env, "DEVICES_TABLE")?,
            registration_id,
            allowed_operators,
            require_allowlist: config::parsed(
                env,
                "REQUIRE_SIM_ALLOWLIST",
                false,
                "true or false",
            )?,
            require_sim_id: config::parsed(env, "REQUIRE_SIM_ID", false, "true or false")?,
            secret_cache: Duration::from_secs(config::parsed(
                env,
                "SECRET_CACHE_SECONDS",
                300,
                "a number of seconds",
            )?),
            dps_budget: Duration::from_millis(config::parsed(
                env,
                "DPS_BUDGET_MS",
                8_000,
                "a number of milliseconds",
            )?),
            reregister_after: Duration::from_secs(config::parsed(
                env,
                "REREGISTER_AFTER_SECONDS",
                30 * 24 * 3600,
                "a number of seconds (0: always register with DPS)",
            )?),
            dps_per_sim_per_hour: config::positive(
                env,
                "DPS_PER_SIM_PER_HOUR",
                6,
                "a whole number of at least 1",
            )?,
            dps_registrations_per_minute: config::positive(
                env,
                "DPS_REGISTRATIONS_PER_MINUTE",
                900,
                "a whole number of at least 1",
            )?,
            model_id: match config::optional(env, "MODEL_ID") {
                Some(id) if !is_model_id(&id) => {
                    return Err(ConfigError::Invalid {
                        name: "MODEL_ID",
                        expected: "a DTMI such as dtmi:com:example:Thermostat;1",
                    })
                }
                id => id,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: [(&str, &str); 3] = [
        ("DPS_ID_SCOPE", "0ne00000001"),
        ("GROUP_KEY_PARAMETER", "/dps/group-key"),
        ("DEVICES_TABLE", "devices"),
    ];

    fn env(extra: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        BASE.iter()
            .chain(extra)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults() {
        let c = Config::from_env(&env(&[])).unwrap();
        assert_eq!(
            c.endpoint.to_string(),
            "global.azure-devices-provisioning.net:8883"
        );
        assert_eq!(
            c.attestation,
            Attestation::SymmetricKey(KeySource::Group {
                parameter: "/dps/group-key".into()
            })
        );
        assert_eq!(
            c.registration_id.render("440103123456789", None).unwrap(),
            "440103123456789"
        );
        assert!(!c.require_allowlist);
        assert_eq!(c.reregister_after, Duration::from_secs(2_592_000));
        assert_eq!(
            (c.dps_per_sim_per_hour, c.dps_registrations_per_minute),
            (6, 900)
        );
        assert_eq!(c.model_id, None);
        let c = Config::from_env(&env(&[
            ("MODEL_ID", "dtmi:com:example:Thermostat;1"),
            ("REREGISTER_AFTER_SECONDS", "0"),
        ]))
        .unwrap();
        assert_eq!(c.model_id.as_deref(), Some("dtmi:com:example:Thermostat;1"));
        assert_eq!(c.reregister_after, Duration::ZERO);
    }

    #[test]
    fn each_missing_variable_is_named() {
        for name in ["DPS_ID_SCOPE", "GROUP_KEY_PARAMETER", "DEVICES_TABLE"] {
            let mut e = env(&[]);
            e.remove(name);
            assert_eq!(
                Config::from_env(&e).unwrap_err().to_string(),
                format!("missing environment variable {name}")
            );
        }
        let e = env(&[("KEY_SOURCE", "individual-ssm")]);
        assert_eq!(
            Config::from_env(&e).unwrap_err(),
            ConfigError::Missing("DEVICE_KEY_PARAMETER_PREFIX")
        );
    }

    #[test]
    fn malformed_values_are_refused() {
        for (name, value) in [
            ("KEY_SOURCE", "vault"),
            ("REGISTRATION_ID_TEMPLATE", "fixed-id"),
            ("REGISTRATION_ID_TEMPLATE", "{iccid}"),
            ("REQUIRE_SIM_ALLOWLIST", "yes please"),
            ("DPS_ENDPOINT", "host:port"),
            ("DPS_PER_SIM_PER_HOUR", "0"),
            ("DPS_REGISTRATIONS_PER_MINUTE", "-1"),
            ("REREGISTER_AFTER_SECONDS", "a month"),
            ("MODEL_ID", "dtmi:com:example:Thermostat"),
            ("MODEL_ID", "com:example:Thermostat;1"),
            ("MODEL_ID", "dtmi:com:1example;1"),
        ] {
            let err = Config::from_env(&env(&[(name, value)])).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { name: n, .. } if n == name),
                "{name}"
            );
        }
    }

    #[test]
    fn x509_needs_its_ca_and_not_a_group_key() {
        let mut e = env(&[
            ("ATTESTATION", "x509"),
            ("CA_KMS_KEY_ID", "alias/device-ca"),
            ("CA_CERTIFICATE_PARAMETER", "/dps/device-ca"),
        ]);
        e.remove("GROUP_KEY_PARAMETER");
        let c = Config::from_env(&e).unwrap();
        assert_eq!(
            c.attestation,
            Attestation::X509(X509Settings {
                kms_key_id: "alias/device-ca".into(),
                ca_certificate_parameter: "/dps/device-ca".into(),
                lifetime: Duration::from_secs(365 * 86_400),
                renew_before: Duration::from_secs(30 * 86_400),
                min_rotation: Duration::from_secs(24 * 3600),
            })
        );
        for name in ["CA_KMS_KEY_ID", "CA_CERTIFICATE_PARAMETER"] {
            let mut missing = e.clone();
            missing.remove(name);
            assert_eq!(
                Config::from_env(&missing).unwrap_err(),
                ConfigError::Missing(name)
            );
        }
        for (name, value) in [
            ("RENEW_BEFORE_DAYS", "365"),
            ("DEVICE_CERT_DAYS", "0"),
            ("ATTESTATION", "tpm"),
        ] {
            let mut bad = e.clone();
            bad.insert(name.into(), value.into());
            let err = Config::from_env(&bad).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { name: n, .. } if n == name),
                "{name}={value}: {err:?}"
            );
        }
    }

    #[test]
    fn templates_render() {
        let t = RegistrationIdTemplate::parse("soracom-{imsi}").unwrap();
        assert_eq!(t.render("4401", None).unwrap(), "soracom-4401");
        let t = RegistrationIdTemplate::parse("{simId}").unwrap();
        assert_eq!(t.render("4401", None), None);
        assert_eq!(t.render("4401", Some("8981")).unwrap(), "8981");
    }
}
