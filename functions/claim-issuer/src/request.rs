//! The API Gateway HTTP API (payload format 2.0) request, reduced to what the function reads:
//! the JWT authorizer's verified claims and the body. Identity comes only from the claims.

use std::collections::HashMap;

use base64::Engine;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpApiRequest {
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub is_base64_encoded: bool,
    #[serde(default)]
    pub request_context: Option<RequestContext>,
}

#[derive(Debug, Deserialize, Default)]
pub struct RequestContext {
    #[serde(default)]
    pub authorizer: Option<Authorizer>,
}

#[derive(Debug, Deserialize, Default)]
pub struct Authorizer {
    #[serde(default)]
    pub jwt: Option<Jwt>,
}

#[derive(Debug, Deserialize, Default)]
pub struct Jwt {
    #[serde(default)]
    pub claims: HashMap<String, Value>,
}

/// The signed-in installer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installer {
    pub sub: String,
    pub groups: Vec<String>,
}

impl HttpApiRequest {
    /// The installer from the verified JWT claims, if the authorizer supplied them.
    pub fn installer(&self) -> Option<Installer> {
        let claims = &self
            .request_context
            .as_ref()?
            .authorizer
            .as_ref()?
            .jwt
            .as_ref()?
            .claims;
        let sub = claims.get("sub")?.as_str()?.trim();
        if sub.is_empty() {
            return None;
        }
        let groups = claims.get("cognito:groups").map(groups).unwrap_or_default();
        Some(Installer {
            sub: sub.to_owned(),
            groups,
        })
    }

    /// The body as text, decoding base64 when API Gateway encoded it.
    pub fn body_text(&self) -> Result<String, &'static str> {
        let raw = self.body.clone().unwrap_or_default();
        if !self.is_base64_encoded {
            return Ok(raw);
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(raw.trim())
            .map_err(|_| "body is marked base64 but is not")?;
        String::from_utf8(bytes).map_err(|_| "body is not UTF-8")
    }
}

/// `cognito:groups` arrives as `"[installers admins]"` through an HTTP API JWT authorizer, and
/// as a JSON array elsewhere; accept both.
fn groups(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str())
            .map(str::to_owned)
            .collect(),
        Value::String(s) => s
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// What the installer may ask for.
#[derive(Debug, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClaimRequest {
    /// Bind the claim certificate to this device serial.
    pub serial: Option<String>,
    pub template_name: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn request(claims: Value) -> HttpApiRequest {
        serde_json::from_value(
            json!({"requestContext": {"authorizer": {"jwt": {"claims": claims}}}}),
        )
        .unwrap()
    }

    #[test]
    fn installer_from_claims() {
        let r = request(json!({"sub": "u-1", "cognito:groups": "[installers admins]"}));
        assert_eq!(
            r.installer().unwrap(),
            Installer {
                sub: "u-1".into(),
                groups: vec!["installers".into(), "admins".into()]
            }
        );
        let r = request(json!({"sub": "u-1", "cognito:groups": ["installers"]}));
        assert_eq!(r.installer().unwrap().groups, vec!["installers"]);
        assert_eq!(
            request(json!({"sub": "u-1"})).installer().unwrap().groups,
            Vec::<String>::new()
        );
        assert_eq!(request(json!({"email": "a@b"})).installer(), None);
        assert_eq!(request(json!({"sub": " "})).installer(), None);
        assert_eq!(HttpApiRequest::default().installer(), None);
    }

    #[test]
    fn bodies() {
        let r: HttpApiRequest =
            serde_json::from_value(json!({"body": "eyJhIjoxfQ==", "isBase64Encoded": true}))
                .unwrap();
        assert_eq!(r.body_text().unwrap(), r#"{"a":1}"#);
        let bad: HttpApiRequest =
            serde_json::from_value(json!({"body": "!!", "isBase64Encoded": true})).unwrap();
        assert!(bad.body_text().is_err());
        assert!(serde_json::from_str::<ClaimRequest>(r#"{"serial":"SN-1","extra":1}"#).is_err());
    }

    const KEYS: &[&str] = &[
        "requestContext",
        "authorizer",
        "jwt",
        "claims",
        "sub",
        "cognito:groups",
        "email",
        "body",
        "isBase64Encoded",
        "headers",
        "serial",
        "templateName",
    ];

    proptest::proptest! {
        /// Any event the HTTP API could deliver (or a caller could forge): parsed or refused,
        /// and whatever body it carries is parsed or refused, never a panic.
        #[test]
        fn any_event_and_body_is_parsed_or_refused(event in shared::strategies::json_with_keys(KEYS)) {
            let claims = event["requestContext"]["authorizer"]["jwt"]["claims"].clone();
            if let Ok(request) = serde_json::from_value::<HttpApiRequest>(event) {
                // The identity is the claims' own `sub`, and nothing else.
                if let Some(installer) = request.installer() {
                    proptest::prop_assert_eq!(Some(installer.sub.as_str()), claims["sub"].as_str().map(str::trim));
                }
                // A body is accepted only as an object of the two known fields.
                if let Ok(text) = request.body_text() {
                    if serde_json::from_str::<ClaimRequest>(&text).is_ok() {
                        let value: Value = serde_json::from_str(&text).unwrap_or_default();
                        let object = value.as_object();
                        proptest::prop_assert!(object.is_some_and(|o| o
                            .keys()
                            .all(|k| k == "serial" || k == "templateName")));
                    }
                }
            }
        }
    }
}
