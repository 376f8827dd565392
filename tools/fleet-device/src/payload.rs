//! The two encodings of AWS IoT's fleet provisioning API: JSON on the `.../json` topics and
//! CBOR on the `.../cbor` topics (what constrained firmware, such as the FreeRTOS and embedded C
//! demos, uses). Both carry the same fields; the topic says which one a payload is.

use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Json,
    Cbor,
}

impl Format {
    /// The request topic for an operation's base topic (`$aws/certificates/create`).
    pub fn topic(self, base: &str) -> String {
        match self {
            Format::Json => format!("{base}/json"),
            Format::Cbor => format!("{base}/cbor"),
        }
    }

    pub fn encode(self, body: &Value) -> Vec<u8> {
        match self {
            Format::Json => body.to_string().into_bytes(),
            Format::Cbor => {
                let mut out = Vec::new();
                // Writing a `Value` into a Vec cannot fail: no I/O, every JSON value has a
                // CBOR form.
                let _ = ciborium::into_writer(body, &mut out);
                out
            }
        }
    }

    /// The body, if the payload is one in this encoding.
    pub fn decode(self, payload: &[u8]) -> Option<Value> {
        match self {
            Format::Json => serde_json::from_slice(payload).ok(),
            Format::Cbor => ciborium::from_reader(payload).ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_encodings_carry_the_same_body() {
        let body = json!({"certificateOwnershipToken": "t", "parameters": {"SerialNumber": "SN-1"}, "statusCode": 403});
        for format in [Format::Json, Format::Cbor] {
            assert_eq!(format.decode(&format.encode(&body)), Some(body.clone()));
        }
        assert_eq!(
            Format::Cbor.topic("$aws/certificates/create"),
            "$aws/certificates/create/cbor"
        );
        // CBOR's map header for 3 entries, then the first key as a text string.
        assert_eq!(Format::Cbor.encode(&body)[0], 0xa3);
        assert_eq!(Format::Cbor.decode(b"{}"), None);
    }
}
