//! Shared access signature (SAS) tokens for the Azure DPS device registration API.
//!
//! `SharedAccessSignature sr={resource}&sig={signature}&se={expiry}&skn=registration` where
//! `resource = urlencode("{idScope}/registrations/{registrationId}")` and the signature is
//! `urlencode(base64(HMAC-SHA256(device key, resource + "\n" + expiry)))`. The signature covers
//! the resource exactly as it is sent, which is why [`ParsedSas`] keeps the raw form: the device
//! SDKs differ (`%2F`, `%2f` or no encoding at all) and a verifier must accept each as signed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::keys::SymmetricKey;

/// A complete token, ready to be used as the MQTT password. `Debug` is redacted: the token is a
/// bearer credential until it expires.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken(String);

impl SasToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SasToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SasToken([redacted])")
    }
}

/// The `sr` value for a registration: `{idScope}/registrations/{registrationId}`, percent-encoded
/// with upper-case hex as RFC 3986 recommends (`/` becomes `%2F`).
pub fn registration_resource(id_scope: &str, registration_id: &str) -> String {
    percent_encode(&format!("{id_scope}/registrations/{registration_id}"))
}

/// base64 of the HMAC over `resource + "\n" + expiry`, not yet URL-encoded.
pub fn signature(key: &SymmetricKey, resource_as_sent: &str, expiry: &str) -> String {
    STANDARD.encode(key.sign(string_to_sign(resource_as_sent, expiry).as_bytes()))
}

/// The token a device presents to DPS when registering `registration_id` in `id_scope`, valid
/// until `expiry` (Unix seconds).
pub fn registration_token(
    id_scope: &str,
    registration_id: &str,
    key: &SymmetricKey,
    expiry: u64,
) -> SasToken {
    let resource = registration_resource(id_scope, registration_id);
    let expiry = expiry.to_string();
    let sig = percent_encode(&signature(key, &resource, &expiry));
    SasToken(format!(
        "SharedAccessSignature sr={resource}&sig={sig}&se={expiry}&skn=registration"
    ))
}

/// The token an IoT Hub service client presents in the registry REST API's `Authorization`
/// header: `sr` is the hub's host name (lower case), `skn` the hub's shared access policy
/// (`registryReadWrite`, say) whose key signs it.
pub fn service_token(hub_host: &str, policy: &str, key: &SymmetricKey, expiry: u64) -> SasToken {
    let resource = percent_encode(&hub_host.to_ascii_lowercase());
    let expiry = expiry.to_string();
    let sig = percent_encode(&signature(key, &resource, &expiry));
    let policy = percent_encode(policy);
    SasToken(format!(
        "SharedAccessSignature sr={resource}&sig={sig}&se={expiry}&skn={policy}"
    ))
}

fn string_to_sign(resource: &str, expiry: &str) -> String {
    format!("{resource}\n{expiry}")
}

/// Why a presented token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SasError {
    #[error("token does not start with 'SharedAccessSignature '")]
    Scheme,
    #[error("token lacks the '{0}' field")]
    MissingField(&'static str),
    #[error("token field '{0}' is malformed")]
    Malformed(&'static str),
}

/// A token as received, fields read by name (their order varies between SDKs).
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedSas {
    /// `sr` exactly as sent: the signature covers this form.
    pub resource_as_sent: String,
    /// `sr` percent-decoded, for comparing scope and registration id.
    pub resource: String,
    /// `se` exactly as sent.
    pub expiry_as_sent: String,
    pub expiry: u64,
    /// `skn`, absent in tokens from the Python SDK.
    pub key_name: Option<String>,
    signature: Vec<u8>,
}

impl std::fmt::Debug for ParsedSas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedSas")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

impl ParsedSas {
    pub fn parse(token: &str) -> Result<Self, SasError> {
        let fields = token
            .strip_prefix("SharedAccessSignature ")
            .ok_or(SasError::Scheme)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in fields.split('&') {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            match name {
                "sr" => sr = Some(value),
                "sig" => sig = Some(value),
                "se" => se = Some(value),
                "skn" => skn = Some(value),
                _ => {}
            }
        }
        let sr = sr.ok_or(SasError::MissingField("sr"))?;
        let sig = sig.ok_or(SasError::MissingField("sig"))?;
        let se = se.ok_or(SasError::MissingField("se"))?;
        let resource = percent_decode(sr).ok_or(SasError::Malformed("sr"))?;
        let signature = percent_decode(sig)
            .and_then(|s| STANDARD.decode(s).ok())
            .ok_or(SasError::Malformed("sig"))?;
        let expiry = se.parse::<u64>().map_err(|_| SasError::Malformed("se"))?;
        let key_name = skn
            .map(|k| percent_decode(k).ok_or(SasError::Malformed("skn")))
            .transpose()?;
        Ok(Self {
            resource_as_sent: sr.to_owned(),
            resource,
            expiry_as_sent: se.to_owned(),
            expiry,
            key_name,
            signature,
        })
    }

    /// Whether the signature was made with `key` over the resource and expiry as sent.
    /// Constant time in the signature.
    pub fn verify(&self, key: &SymmetricKey) -> bool {
        key.verify(
            string_to_sign(&self.resource_as_sent, &self.expiry_as_sent).as_bytes(),
            &self.signature,
        )
    }

    /// Splits the decoded resource into `(idScope, registrationId)` if it has the registration
    /// form `{idScope}/registrations/{registrationId}`.
    pub fn registration(&self) -> Option<(&str, &str)> {
        let (scope, rest) = self.resource.split_once('/')?;
        let (kind, registration_id) = rest.split_once('/')?;
        (kind == "registrations" && !scope.is_empty() && !registration_id.is_empty())
            .then_some((scope, registration_id))
    }
}

/// Everything but RFC 3986 unreserved characters is escaped (`/` becomes `%2F`).
const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes with upper-case hex, as RFC 3986 recommends.
pub fn percent_encode(input: &str) -> String {
    percent_encoding::utf8_percent_encode(input, ESCAPED).to_string()
}

/// Decodes `%XX` escapes (either case). `None` on invalid UTF-8, or on a `%` that starts no
/// escape: in a token that is a broken token, not a literal.
pub fn percent_decode(input: &str) -> Option<String> {
    let well_formed = input.match_indices('%').all(|(at, _)| {
        input
            .get(at + 1..at + 3)
            .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(input)
        .decode_utf8()
        .ok()
        .map(|decoded| decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutation testing: `&&` in `registration` turned `||` (an empty scope or registration id
    /// accepted) survived; and the redacted `Debug` impls emptied.
    #[test]
    fn the_registration_form_needs_a_scope_a_kind_and_an_id() {
        let parsed = |resource: &str| {
            ParsedSas::parse(&format!(
                "SharedAccessSignature sr={}&sig=AAAA&se=1",
                percent_encode(resource)
            ))
            .unwrap()
        };
        assert_eq!(
            parsed("0ne00/registrations/dev-1").registration(),
            Some(("0ne00", "dev-1"))
        );
        for resource in [
            "/registrations/dev-1",
            "0ne00/registrations/",
            "0ne00/devices/dev-1",
            "0ne00",
        ] {
            assert_eq!(parsed(resource).registration(), None, "{resource}");
        }
    }

    #[test]
    fn tokens_show_no_signature_in_debug() {
        let k = SymmetricKey::from_base64("O+H9VTcdJP0Tqkl7bh4nVG0OJNrAataMpuWB54D0VEc=").unwrap();
        let token = registration_token("0ne00", "dev-1", &k, 1_900_000_000);
        assert_eq!(format!("{token:?}"), "SasToken([redacted])");
        let parsed = ParsedSas::parse(token.as_str()).unwrap();
        let shown = format!("{parsed:?}");
        assert!(
            shown.starts_with("ParsedSas {") && shown.contains("dev-1"),
            "{shown}"
        );
        let sig = token
            .as_str()
            .split("sig=")
            .nth(1)
            .unwrap()
            .split('&')
            .next()
            .unwrap();
        assert!(
            !shown.contains(sig) && !shown.contains("signature"),
            "{shown}"
        );
        assert_eq!(format!("{k:?}"), "SymmetricKey([redacted])");
    }

    /// The lower-case escapes some SDKs and Microsoft's documented vector use.
    fn lowercase_escapes(encoded: &str) -> String {
        encoded.replace("%2F", "%2f")
    }

    fn key(b64: &str) -> SymmetricKey {
        SymmetricKey::from_base64(b64).unwrap()
    }

    #[test]
    fn documented_vector_lowercase_escape() {
        let k = key("O+H9VTcdJP0Tqkl7bh4nVG0OJNrAataMpuWB54D0VEc=");
        let sr = lowercase_escapes(&percent_encode("0ne000EEBBD/registrations/FirstDevice"));
        assert_eq!(sr, "0ne000EEBBD%2fregistrations%2fFirstDevice");
        let sig = percent_encode(&signature(&k, &sr, "1591921306"));
        assert_eq!(sig, "hwgBlMB6G2Zg5ZcYtwmtLVKRbifiSCPfUMyscbVWa8o%3D");
    }

    #[test]
    fn vector_upper_and_lower_forms_differ() {
        let k = key("VGhpcyB0aGluZyBhbGwgdGhpbmdzIGl0IGRldm91cnM=");
        let upper = registration_resource("eight675309", "1-1-2-3-5-8-13-21");
        assert_eq!(upper, "eight675309%2Fregistrations%2F1-1-2-3-5-8-13-21");
        assert_eq!(
            signature(&k, &upper, "1596897539"),
            "oWi3PIRBfMqk0q0x6RlxP9uGTZlPAe32w8qe/D/zgfA="
        );
        let lower = lowercase_escapes(&percent_encode(
            "eight675309/registrations/1-1-2-3-5-8-13-21",
        ));
        assert_eq!(
            signature(&k, &lower, "1596897539"),
            "npj3I09+Jtl6VYHZM/H5mKMG8jn4Y3zty3dMjMkMMDs="
        );
    }

    #[test]
    fn token_has_documented_shape_and_verifies() {
        let k = key("VGhpcyB0aGluZyBhbGwgdGhpbmdzIGl0IGRldm91cnM=");
        let token = registration_token("eight675309", "1-1-2-3-5-8-13-21", &k, 1596897539);
        assert_eq!(
            token.as_str(),
            "SharedAccessSignature sr=eight675309%2Fregistrations%2F1-1-2-3-5-8-13-21\
             &sig=oWi3PIRBfMqk0q0x6RlxP9uGTZlPAe32w8qe%2FD%2FzgfA%3D&se=1596897539&skn=registration"
        );
        let parsed = ParsedSas::parse(token.as_str()).unwrap();
        assert!(parsed.verify(&k));
        assert_eq!(
            parsed.registration(),
            Some(("eight675309", "1-1-2-3-5-8-13-21"))
        );
        assert_eq!(parsed.key_name.as_deref(), Some("registration"));
        assert!(!parsed.verify(&key("O+H9VTcdJP0Tqkl7bh4nVG0OJNrAataMpuWB54D0VEc=")));
    }

    #[test]
    fn verifies_each_sdk_form_as_sent() {
        let k = key("O+H9VTcdJP0Tqkl7bh4nVG0OJNrAataMpuWB54D0VEc=");
        for sr in [
            "0ne000EEBBD%2fregistrations%2fFirstDevice",
            "0ne000EEBBD%2Fregistrations%2FFirstDevice",
            "0ne000EEBBD/registrations/FirstDevice",
        ] {
            let sig = percent_encode(&signature(&k, sr, "1591921306"));
            // Field order varies between SDKs, and the Python SDK sends no skn.
            let token = format!("SharedAccessSignature se=1591921306&sig={sig}&sr={sr}");
            let parsed = ParsedSas::parse(&token).unwrap();
            assert!(parsed.verify(&k), "{sr}");
            assert_eq!(parsed.registration(), Some(("0ne000EEBBD", "FirstDevice")));
            assert_eq!(parsed.key_name, None);
        }
    }

    #[test]
    fn tampered_expiry_fails_verification() {
        let k = key("O+H9VTcdJP0Tqkl7bh4nVG0OJNrAataMpuWB54D0VEc=");
        let token = registration_token("scope", "dev", &k, 100);
        let tampered = token.as_str().replace("se=100", "se=999");
        assert!(!ParsedSas::parse(&tampered).unwrap().verify(&k));
    }

    #[test]
    fn malformed_tokens_are_refused_by_field() {
        assert_eq!(ParsedSas::parse("Bearer x").unwrap_err(), SasError::Scheme);
        assert_eq!(
            ParsedSas::parse("SharedAccessSignature sig=AA%3D%3D&se=1").unwrap_err(),
            SasError::MissingField("sr")
        );
        assert_eq!(
            ParsedSas::parse("SharedAccessSignature sr=a&sig=%zz&se=1").unwrap_err(),
            SasError::Malformed("sig")
        );
        assert_eq!(
            ParsedSas::parse("SharedAccessSignature sr=a&sig=AA%3D%3D&se=soon").unwrap_err(),
            SasError::Malformed("se")
        );
    }

    #[test]
    fn debug_hides_the_token() {
        let k = key("O+H9VTcdJP0Tqkl7bh4nVG0OJNrAataMpuWB54D0VEc=");
        let token = registration_token("scope", "dev", &k, 100);
        assert!(!format!("{token:?}").contains("sig="));
    }

    #[test]
    fn percent_round_trip() {
        let s = "a/b:c d%";
        assert_eq!(percent_decode(&percent_encode(s)).unwrap(), s);
        assert_eq!(percent_decode("%2f%2F").unwrap(), "//");
        assert_eq!(percent_decode("%2"), None);
    }

    mod hostile {
        use super::*;
        use crate::strategies::text;
        use proptest::prelude::*;

        proptest! {
            /// Any password a device could send: refused with a reason, or parsed and then not
            /// verified by a key that did not sign it.
            #[test]
            fn any_token_is_parsed_or_refused_and_never_verifies_by_accident(
                raw in text(),
                sr in text(), sig in text(), se in "[0-9]{0,12}", skn in text(),
            ) {
                let structured = format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}&skn={skn}");
                let key = SymmetricKey::from_base64("c2VjcmV0LWtleS1mb3ItcHJvcGVydHktdGVzdHM=").unwrap();
                for token in [raw, structured] {
                    match ParsedSas::parse(&token) {
                        Ok(parsed) => prop_assert!(!parsed.verify(&key)),
                        // A refusal names the scheme or a field, never repeats the token.
                        Err(SasError::Scheme) => {
                            prop_assert!(!token.starts_with("SharedAccessSignature "))
                        }
                        Err(SasError::MissingField(f) | SasError::Malformed(f)) => {
                            prop_assert!(["sr", "sig", "se", "skn"].contains(&f))
                        }
                    }
                }
            }

            #[test]
            fn percent_decoding_never_panics(raw in text()) {
                if let Some(decoded) = percent_decode(&raw) {
                    prop_assert!(decoded.len() <= raw.len());
                }
            }
        }
    }
}
