//! SORACOM Beam's front door in the story: the sample HTTP API event
//! (`events/azure-dps-register/beam-register.json`), stamped now and signed with the stack's
//! PSK as Beam signs, invoked through `cargo lambda invoke` like Funk's events.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use shared::soracom::{beam_signature, BeamHeaders};

use super::{events, masked, Invocation};
use crate::stack::LocalStack;

/// The SIM the Beam event names: one the operator's CSV import listed.
pub const BEAM_IMSI: &str = "440103123450001";

/// The sample event, signed now; written into the stack's directory.
pub fn signed_request(stack: &LocalStack) -> Invocation {
    let template = std::fs::read_to_string(events().join("azure-dps-register/beam-register.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .unwrap_or(Value::Null);
    let mut event = template;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let header = |event: &Value, name: &str| event["headers"][name].as_str().map(str::to_owned);
    let mut beam = BeamHeaders {
        imei: header(&event, "x-soracom-imei"),
        imsi: header(&event, "x-soracom-imsi"),
        msisdn: header(&event, "x-soracom-msisdn"),
        sim_id: header(&event, "x-soracom-sim-id"),
        timestamp: Some(now_ms.to_string()),
        signature: None,
        signature_version: Some("20151001".into()),
    };
    let signature = beam_signature(stack.beam_psk.as_bytes(), &beam);
    beam.signature = Some(signature.clone());
    event["headers"]["x-soracom-timestamp"] = Value::from(now_ms.to_string());
    event["headers"]["x-soracom-signature"] = Value::from(signature);
    let file = stack.dir().join("beam-register.json");
    let _ = std::fs::write(&file, event.to_string());
    let expected_key = stack.group_key.derive_device_key(BEAM_IMSI).to_base64();
    Invocation {
        title: "a device behind SORACOM Beam posts to /register: signature verified, same registration as Funk's",
        function: "azure-dps-register",
        data: file,
        context: None,
        logged_reason: None,
        check: Box::new(move |v: &Value| {
            let answer: Value = v["body"]
                .as_str()
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or(Value::Null);
            let body = answer["body"].as_str().unwrap_or("");
            match (v["statusCode"].as_u64(), body.rsplit_once("SharedAccessKey=")) {
                (Some(200), Some((_, key))) if key == expected_key => Ok(format!(
                    "HTTP 200, {} source={} key={}",
                    answer["assignedHub"].as_str().unwrap_or(""),
                    answer["source"].as_str().unwrap_or(""),
                    masked(key)
                )),
                _ => Err(format!(
                    "expected HTTP 200 with the SIM's key, got {} {}",
                    v["statusCode"],
                    answer["error"].as_str().unwrap_or("")
                )),
            }
        }),
    }
}

/// The same signed request again, as someone who captured it would send it: refused.
pub fn replayed_request(stack: &LocalStack) -> Invocation {
    Invocation {
        title: "the same signed request sent again (captured, replayed): 403, nothing else happens",
        function: "azure-dps-register",
        data: stack.dir().join("beam-register.json"),
        context: None,
        logged_reason: None,
        check: Box::new(|v: &Value| {
            let answer: Value = v["body"]
                .as_str()
                .and_then(|b| serde_json::from_str(b).ok())
                .unwrap_or(Value::Null);
            match (v["statusCode"].as_u64(), answer["error"].as_str()) {
                (Some(403), Some("beam-replayed")) => Ok("HTTP 403 beam-replayed".to_owned()),
                _ => Err(format!("expected HTTP 403 beam-replayed, got {v}")),
            }
        }),
    }
}
