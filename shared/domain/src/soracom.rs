//! Who is calling: the SIM identity that SORACOM vouches for.
//!
//! SORACOM Funk puts the SIM's identity in the Lambda client context
//! (`{"custom": {"imsi", "operatorId", "srn", ...}}`); SORACOM Beam puts it in signed HTTP
//! headers. Identity is taken only from these, never from the request body, which the device
//! writes itself.

use std::collections::HashMap;

use ring::digest;

use crate::keys::ct_eq;

/// Longest value kept from an optional field, so an odd context cannot flood the logs.
const MAX_OPTIONAL_LEN: usize = 64;

/// Why a client context was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("no client context: the function must be invoked through SORACOM Funk")]
    MissingContext,
    #[error("client context is not JSON of the form {{\"custom\": {{...}}}} with string values")]
    NotJson,
    #[error("client context lacks custom.{0}")]
    MissingField(&'static str),
    #[error("client context field custom.{field} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
    },
}

/// A SIM as identified by SORACOM Funk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimIdentity {
    pub imsi: String,
    pub operator_id: String,
    pub srn: String,
    pub resource_type: Option<String>,
    pub resource_id: Option<String>,
    pub source_protocol: Option<String>,
    pub imei: Option<String>,
    pub sim_id: Option<String>,
    pub coverage: Option<String>,
}

impl SimIdentity {
    /// Reads and validates the `custom` map of a Funk client context.
    pub fn from_custom(custom: &HashMap<String, String>) -> Result<Self, IdentityError> {
        let required = |name: &'static str| {
            custom
                .get(name)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
                .ok_or(IdentityError::MissingField(name))
        };
        let optional = |name: &str| {
            custom
                .get(name)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty() && v.len() <= MAX_OPTIONAL_LEN)
                .map(str::to_owned)
        };

        let imsi = required("imsi")?;
        if !is_imsi(imsi) {
            return Err(IdentityError::Invalid {
                field: "imsi",
                reason: "expected 14 or 15 digits",
            });
        }
        let operator_id = required("operatorId")?;
        if !is_operator_id(operator_id) {
            return Err(IdentityError::Invalid {
                field: "operatorId",
                reason: "expected 'OP' followed by digits",
            });
        }
        let srn = required("srn")?;
        let owned_by_operator = srn
            .strip_prefix("srn:soracom:")
            .and_then(|rest| rest.strip_prefix(operator_id))
            .is_some_and(|rest| rest.starts_with(':'));
        if !owned_by_operator {
            return Err(IdentityError::Invalid {
                field: "srn",
                reason: "expected 'srn:soracom:<operatorId>:...' naming the same operator",
            });
        }

        Ok(Self {
            imsi: imsi.to_owned(),
            operator_id: operator_id.to_owned(),
            srn: srn.to_owned(),
            resource_type: optional("resourceType"),
            resource_id: optional("resourceId"),
            source_protocol: optional("sourceProtocol"),
            imei: optional("imei"),
            sim_id: optional("simId"),
            coverage: optional("coverage"),
        })
    }

    /// Parses a whole client context document, as `cargo lambda invoke --client-context-file`
    /// and the Invoke API's `ClientContext` carry it.
    pub fn from_client_context_json(json: &str) -> Result<Self, IdentityError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            custom: Option<HashMap<String, String>>,
        }
        let doc: Doc = serde_json::from_str(json).map_err(|_| IdentityError::NotJson)?;
        Self::from_custom(&doc.custom.ok_or(IdentityError::MissingContext)?)
    }
}

fn is_imsi(s: &str) -> bool {
    (14..=15).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_operator_id(s: &str) -> bool {
    s.strip_prefix("OP")
        .is_some_and(|d| (8..=16).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

/// The SORACOM Beam identity headers (`x-soracom-*`), as received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BeamHeaders {
    pub imei: Option<String>,
    pub imsi: Option<String>,
    pub msisdn: Option<String>,
    pub sim_id: Option<String>,
    pub timestamp: Option<String>,
    pub signature: Option<String>,
    pub signature_version: Option<String>,
}

impl BeamHeaders {
    /// Collects the headers through `get`, which looks a header up by its lower-case name.
    pub fn from_lookup<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        let take = |name: &str| get(name).map(str::to_owned);
        Self {
            imei: take("x-soracom-imei"),
            imsi: take("x-soracom-imsi"),
            msisdn: take("x-soracom-msisdn"),
            sim_id: take("x-soracom-sim-id"),
            timestamp: take("x-soracom-timestamp"),
            signature: take("x-soracom-signature"),
            signature_version: take("x-soracom-signature-version"),
        }
    }
}

/// Why Beam headers were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BeamError {
    #[error("x-soracom-signature is missing")]
    MissingSignature,
    #[error("x-soracom-signature-version is not 20151001")]
    UnsupportedVersion,
    #[error("x-soracom-timestamp is missing or not milliseconds")]
    BadTimestamp,
    #[error("x-soracom-timestamp is outside the accepted window")]
    Stale,
    #[error("x-soracom-signature does not match")]
    BadSignature,
}

/// The hex SHA-256 that Beam sends in `x-soracom-signature`: the pre-shared key followed by
/// `name=value` for each present header, always in this order.
pub fn beam_signature(psk: &[u8], headers: &BeamHeaders) -> String {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(psk);
    for (name, value) in [
        ("x-soracom-imei", &headers.imei),
        ("x-soracom-imsi", &headers.imsi),
        ("x-soracom-msisdn", &headers.msisdn),
        ("x-soracom-sim-id", &headers.sim_id),
        ("x-soracom-timestamp", &headers.timestamp),
    ] {
        if let Some(value) = value {
            ctx.update(name.as_bytes());
            ctx.update(b"=");
            ctx.update(value.as_bytes());
        }
    }
    hex::encode(ctx.finish().as_ref())
}

/// Verifies Beam headers: version, signature (constant time) and that the timestamp lies within
/// `max_skew_ms` of `now_ms`, so a captured request cannot be replayed indefinitely.
pub fn verify_beam(
    psk: &[u8],
    headers: &BeamHeaders,
    now_ms: u64,
    max_skew_ms: u64,
) -> Result<(), BeamError> {
    let presented = headers
        .signature
        .as_deref()
        .ok_or(BeamError::MissingSignature)?;
    if headers.signature_version.as_deref() != Some("20151001") {
        return Err(BeamError::UnsupportedVersion);
    }
    let expected = beam_signature(psk, headers);
    if !ct_eq(
        expected.as_bytes(),
        presented.to_ascii_lowercase().as_bytes(),
    ) {
        return Err(BeamError::BadSignature);
    }
    let ts: u64 = headers
        .timestamp
        .as_deref()
        .and_then(|t| t.parse().ok())
        .ok_or(BeamError::BadTimestamp)?;
    if ts.abs_diff(now_ms) > max_skew_ms {
        return Err(BeamError::Stale);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation testing: `&&` in `is_operator_id` turned `||` survived.
    #[test]
    fn an_operator_id_is_op_and_8_to_16_digits() {
        for good in ["OP12345678", "OP0012345678", "OP1234567890123456"] {
            assert!(is_operator_id(good), "{good}");
        }
        for bad in [
            "OP1234567",
            "OP12345678901234567",
            "OP1234567a",
            "OP12345678 ",
            "op12345678",
            "XX12345678",
            "OP",
        ] {
            assert!(!is_operator_id(bad), "{bad}");
        }
    }

    fn context() -> HashMap<String, String> {
        [
            ("operatorId", "OP0012345678"),
            ("coverage", "jp"),
            ("resourceType", "Subscriber"),
            ("resourceId", "440103123456789"),
            ("sourceProtocol", "http"),
            (
                "srn",
                "srn:soracom:OP0012345678:jp:Subscriber:440103123456789",
            ),
            ("imsi", "440103123456789"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    #[test]
    fn reads_a_funk_context() {
        let id = SimIdentity::from_custom(&context()).unwrap();
        assert_eq!(id.imsi, "440103123456789");
        assert_eq!(id.operator_id, "OP0012345678");
        assert_eq!(id.coverage.as_deref(), Some("jp"));
        assert_eq!(id.imei, None);
        assert_eq!(id.sim_id, None);
    }

    #[test]
    fn reads_a_whole_document() {
        let json = r#"{"custom":{"imsi":"295000012345678","operatorId":"OP0000000001",
            "srn":"srn:soracom:OP0000000001:global:Subscriber:295000012345678",
            "simId":"8942310000000000000","imei":"867600000000000"}}"#;
        let id = SimIdentity::from_client_context_json(json).unwrap();
        assert_eq!(id.imsi, "295000012345678");
        assert_eq!(id.sim_id.as_deref(), Some("8942310000000000000"));
        assert_eq!(
            SimIdentity::from_client_context_json("{}").unwrap_err(),
            IdentityError::MissingContext
        );
        assert_eq!(
            SimIdentity::from_client_context_json("e30=").unwrap_err(),
            IdentityError::NotJson
        );
    }

    #[test]
    fn refuses_missing_and_malformed_fields() {
        for (field, value, expected) in [
            ("imsi", None, IdentityError::MissingField("imsi")),
            (
                "operatorId",
                Some(" "),
                IdentityError::MissingField("operatorId"),
            ),
            ("srn", None, IdentityError::MissingField("srn")),
        ] {
            let mut c = context();
            match value {
                Some(v) => c.insert(field.to_owned(), v.to_owned()),
                None => c.remove(field),
            };
            assert_eq!(SimIdentity::from_custom(&c).unwrap_err(), expected);
        }
        for (field, value) in [
            ("imsi", "44010312345"),
            ("imsi", "4401031234567890"),
            ("imsi", "44010312345678x"),
            ("operatorId", "0012345678"),
            ("operatorId", "OPabc"),
            (
                "srn",
                "srn:soracom:OP9999999999:jp:Subscriber:440103123456789",
            ),
            ("srn", "arn:aws:iam::123:role/x"),
        ] {
            let mut c = context();
            c.insert(field.to_owned(), value.to_owned());
            let err = SimIdentity::from_custom(&c).unwrap_err();
            assert!(
                matches!(err, IdentityError::Invalid { field: f, .. } if f == field),
                "{field}={value}: {err:?}"
            );
        }
    }

    #[test]
    fn drops_oversized_optional_fields() {
        let mut c = context();
        c.insert("imei".to_owned(), "9".repeat(500));
        assert_eq!(SimIdentity::from_custom(&c).unwrap().imei, None);
    }

    fn beam_vector() -> BeamHeaders {
        BeamHeaders {
            imei: Some("860000012345678".into()),
            imsi: Some("295000012345678".into()),
            timestamp: Some("1445587157992".into()),
            signature_version: Some("20151001".into()),
            ..Default::default()
        }
    }

    #[test]
    fn beam_signature_matches_documented_vector() {
        assert_eq!(
            beam_signature(b"mysecretkey", &beam_vector()),
            "95c8e34d68e2bd76502c1e403108dc1bd7008964c31081d0415adb9f21a721a5"
        );
    }

    #[test]
    fn beam_verification() {
        let mut h = beam_vector();
        let now = 1445587157992 + 1_000;
        assert_eq!(
            verify_beam(b"k", &h, now, 60_000),
            Err(BeamError::MissingSignature)
        );
        h.signature = Some(beam_signature(b"mysecretkey", &h));
        assert_eq!(verify_beam(b"mysecretkey", &h, now, 60_000), Ok(()));
        assert_eq!(
            verify_beam(b"otherkey", &h, now, 60_000),
            Err(BeamError::BadSignature)
        );
        assert_eq!(
            verify_beam(b"mysecretkey", &h, now + 3_600_000, 60_000),
            Err(BeamError::Stale)
        );
        let mut forged = h.clone();
        forged.imsi = Some("295000099999999".into());
        assert_eq!(
            verify_beam(b"mysecretkey", &forged, now, 60_000),
            Err(BeamError::BadSignature)
        );
        let mut old_version = h.clone();
        old_version.signature_version = Some("1".into());
        assert_eq!(
            verify_beam(b"mysecretkey", &old_version, now, 60_000),
            Err(BeamError::UnsupportedVersion)
        );
    }

    /// The window is inclusive: exactly `max_skew_ms` away either way verifies, one
    /// millisecond more does not.
    #[test]
    fn beam_window_edges() {
        let mut h = beam_vector();
        h.signature = Some(beam_signature(b"mysecretkey", &h));
        let ts = 1445587157992;
        for (now, expected) in [
            (ts + 60_000, Ok(())),
            (ts - 60_000, Ok(())),
            (ts + 60_001, Err(BeamError::Stale)),
            (ts - 60_001, Err(BeamError::Stale)),
        ] {
            assert_eq!(
                verify_beam(b"mysecretkey", &h, now, 60_000),
                expected,
                "{now}"
            );
        }
    }

    #[test]
    fn beam_headers_from_lookup() {
        let map: HashMap<&str, &str> = [("x-soracom-imsi", "295000012345678")].into();
        let h = BeamHeaders::from_lookup(|n| map.get(n).copied());
        assert_eq!(h.imsi.as_deref(), Some("295000012345678"));
        assert_eq!(h.imei, None);
    }

    mod hostile {
        use super::*;
        use crate::strategies::{json_with_keys, text};
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "custom",
            "imsi",
            "operatorId",
            "srn",
            "imei",
            "simId",
            "resourceType",
            "resourceId",
            "sourceProtocol",
            "coverage",
        ];

        /// Whether `json` is a client context that must yield an identity.
        fn complete_identity(json: &str) -> bool {
            let Ok(serde_json::Value::Object(doc)) = serde_json::from_str(json) else {
                return false;
            };
            let Some(serde_json::Value::Object(custom)) = doc.get("custom") else {
                return false;
            };
            if !custom.values().all(serde_json::Value::is_string) {
                return false;
            }
            let field = |n: &str| custom.get(n).and_then(|v| v.as_str()).map(str::trim);
            match (field("imsi"), field("operatorId"), field("srn")) {
                (Some(imsi), Some(op), Some(srn)) => {
                    is_imsi(imsi)
                        && is_operator_id(op)
                        && srn.starts_with(&format!("srn:soracom:{op}:"))
                }
                _ => false,
            }
        }

        proptest! {
            /// Any client context, JSON or not: a valid identity or a refusal that says why.
            #[test]
            fn any_client_context_is_read_or_refused_with_a_reason(
                doc in json_with_keys(KEYS), raw in text(),
                imsi in "[0-9]{14,15}", op in "OP[0-9]{8,16}", extra in text(),
            ) {
                let valid = serde_json::json!({"custom": {
                    "imsi": imsi, "operatorId": op, "srn": format!("srn:soracom:{op}:jp:Subscriber:{imsi}"),
                    "coverage": extra,
                }});
                for input in [doc.to_string(), raw, valid.to_string()] {
                    match SimIdentity::from_client_context_json(&input) {
                        Ok(id) => prop_assert!(is_imsi(&id.imsi) && is_operator_id(&id.operator_id)),
                        // A refusal is never a false one: a context with a valid IMSI, operator
                        // and an srn of that operator (all strings) is always accepted.
                        Err(e) => prop_assert!(!complete_identity(&input), "{e}: {input}"),
                    }
                }
            }

            /// Beam headers as a stranger could send them never verify without the key.
            #[test]
            fn forged_beam_headers_never_verify(
                imsi in proptest::option::of(text()),
                timestamp in proptest::option::of("[0-9]{0,14}"),
                signature in proptest::option::of(prop_oneof![text(), "[0-9a-f]{64}"]),
                version in proptest::option::of(prop_oneof![text(), Just("20151001".to_owned())]),
            ) {
                let headers = BeamHeaders {
                    imsi,
                    timestamp: timestamp.clone(),
                    signature,
                    signature_version: version,
                    ..Default::default()
                };
                let now = timestamp.and_then(|t| t.parse().ok()).unwrap_or(0);
                prop_assert!(verify_beam(b"the operator's pre-shared key", &headers, now, 60_000).is_err());
            }
        }
    }
}
