//! AWS IoT's connect lifecycle event, as published on `$aws/events/presence/connected/<clientId>`
//! and passed on unchanged by the topic rule (`SELECT * FROM ...`):
//!
//! ```json
//! {"clientId": "fleet-SN-0001", "timestamp": 1573002230757, "eventType": "connected",
//!  "sessionIdentifier": "a4666d2a7d844ae4ac5d7b38c9cb7967",
//!  "principalIdentifier": "<the certificate id>", "ipAddress": "192.0.2.0", "versionNumber": 0}
//! ```
//!
//! For a connection authenticated by a TLS client certificate, `principalIdentifier` is the
//! certificate's id. AWS IoT may deliver an event twice or out of order.

use serde::Deserialize;
use serde_json::Value;

/// The parts of a connect event the function uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub client_id: String,
    /// The certificate id the client authenticated with.
    pub certificate_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    client_id: Option<String>,
    event_type: Option<String>,
    principal_identifier: Option<String>,
}

/// Why an event is not a certificate's connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotAConnection {
    #[error("not a lifecycle event: {0}")]
    Malformed(String),
    #[error("event type {0:?} is not 'connected'")]
    OtherEvent(String),
    #[error("the principal is not a certificate id")]
    NotACertificate,
}

/// AWS IoT certificate ids are 64 lower-case hex digits.
fn is_certificate_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Connected {
    pub fn parse(event: Value) -> Result<Self, NotAConnection> {
        let raw: Raw =
            serde_json::from_value(event).map_err(|e| NotAConnection::Malformed(e.to_string()))?;
        match raw.event_type.as_deref() {
            Some("connected") => {}
            other => return Err(NotAConnection::OtherEvent(other.unwrap_or("").to_owned())),
        }
        let client_id = raw
            .client_id
            .filter(|c| !c.is_empty())
            .ok_or_else(|| NotAConnection::Malformed("clientId missing".into()))?;
        // IAM credentials (a console or SDK user) are no certificate: nothing to confirm.
        let certificate_id = raw
            .principal_identifier
            .filter(|p| is_certificate_id(p))
            .ok_or(NotAConnection::NotACertificate)?;
        Ok(Self {
            client_id,
            certificate_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CERT: &str = "4f8d0e2b1c6a7f93e5d40b8a2c1f6e7d9a3b5c0e8f1d2a4b6c7e9f0a1b3c5d7e";

    #[test]
    fn the_sample_event_is_a_connection() {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../events/fleet-confirm/connected.json");
        let event: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let c = Connected::parse(event).unwrap();
        assert_eq!(c.client_id, "SN-0001");
        assert!(is_certificate_id(&c.certificate_id));
    }

    #[test]
    fn other_events_and_principals_are_not_connections() {
        let event = |kind: &str, principal: &str| {
            json!({"clientId": "SN-1", "eventType": kind, "principalIdentifier": principal,
                   "timestamp": 1, "sessionIdentifier": "s", "versionNumber": 0})
        };
        assert!(Connected::parse(event("connected", CERT)).is_ok());
        assert_eq!(
            Connected::parse(event("disconnected", CERT)),
            Err(NotAConnection::OtherEvent("disconnected".into()))
        );
        for principal in [
            "",
            "000000000000/ABCDEFGHIJKLMNOPQRSTU:some-user",
            &CERT.to_uppercase(),
            &CERT[1..],
        ] {
            assert_eq!(
                Connected::parse(event("connected", principal)),
                Err(NotAConnection::NotACertificate),
                "{principal}"
            );
        }
        assert!(matches!(
            Connected::parse(json!("x")),
            Err(NotAConnection::Malformed(_))
        ));
        assert!(matches!(
            Connected::parse(json!({"eventType": "connected", "principalIdentifier": CERT})),
            Err(NotAConnection::Malformed(_))
        ));
    }
}
