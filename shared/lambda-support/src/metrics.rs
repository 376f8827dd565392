//! CloudWatch metrics in Embedded Metric Format: one JSON line on stdout per outcome, which
//! CloudWatch Logs turns into metrics as it ingests the log. No API call, no IAM permission,
//! nothing that can slow or fail an invocation.
//!
//! Every function counts its answers: metric `Answers` in namespace [`NAMESPACE`] with the
//! dimensions `Function` (the deployed function's name) and `Outcome` (what it answered: a
//! refusal's code, or what success means for that function). Measured durations (such as DPS's
//! latency) ride along as further metrics with the same dimensions. The template's alarms are
//! on these.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

pub const NAMESPACE: &str = "SoracomProvisioning";

/// The function's name as Lambda (or `cargo lambda watch`) gives it; `None` outside a Lambda
/// runtime, where no log pipeline would make metrics of the lines.
pub fn function_name() -> Option<String> {
    std::env::var("AWS_LAMBDA_FUNCTION_NAME")
        .ok()
        .filter(|n| !n.is_empty())
}

/// The EMF document for one outcome at `timestamp_ms`: `Answers` = 1, plus each of
/// `milliseconds` (name, value) as a duration.
pub fn document(
    function: &str,
    outcome: &str,
    milliseconds: &[(&str, f64)],
    timestamp_ms: u64,
) -> Value {
    let mut metrics = vec![json!({"Name": "Answers", "Unit": "Count"})];
    let mut doc = Map::new();
    // `Answers` first (also when maps keep insertion order): a line starts `{"Answers"`.
    doc.insert("Answers".into(), json!(1));
    doc.insert("Function".into(), json!(function));
    doc.insert("Outcome".into(), json!(outcome));
    for (name, value) in milliseconds {
        metrics.push(json!({"Name": name, "Unit": "Milliseconds"}));
        doc.insert((*name).to_owned(), json!(value));
    }
    doc.insert(
        "_aws".into(),
        json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["Function", "Outcome"]],
                "Metrics": metrics,
            }],
        }),
    );
    Value::Object(doc)
}

/// Writes one outcome's document as a line on stdout (where Lambda's log capture reads it), in
/// a Lambda runtime only: in-process tests and tools stay quiet.
pub fn emit(outcome: &str, milliseconds: &[(&str, f64)]) {
    static NAME: OnceLock<Option<String>> = OnceLock::new();
    let Some(function) = NAME.get_or_init(function_name) else {
        return;
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let line = document(function, outcome, milliseconds, now).to_string();
    // A metric must never fail an invocation: a closed stdout loses the line, nothing else.
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_is_what_cloudwatch_extracts_metrics_from() {
        let doc = document(
            "stack-azure-dps-register",
            "dps-throttled",
            &[("DpsLatency", 812.5)],
            1_700_000_000_000,
        );
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(doc["_aws"]["Timestamp"], 1_700_000_000_000u64);
        assert_eq!(directive["Namespace"], NAMESPACE);
        assert_eq!(directive["Dimensions"], json!([["Function", "Outcome"]]));
        // Every dimension and metric the directive names is a member with its value.
        for dimension in ["Function", "Outcome"] {
            assert!(doc[dimension].is_string(), "{dimension}");
        }
        let names: Vec<&str> = directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["Answers", "DpsLatency"]);
        assert_eq!(doc["Answers"], 1);
        assert_eq!(doc["DpsLatency"], 812.5);
        assert_eq!(doc["Outcome"], "dps-throttled");
        assert!(doc.to_string().starts_with("{\"Answers\""));
    }
}
