//! The event SORACOM's Event Handler sends. Its `InvokeAWSLambdaAction` passes the operator's
//! `parameter1` … `parameter5` (variables such as `${imsi}` filled in) as the Lambda event:
//!
//! ```json
//! {"parameter1": "440103123456789", "parameter2": "terminated", "parameter3": "active", "parameter4": "8942310000000000001"}
//! ```
//!
//! This function reads them by position, as the README's event handler sets them:
//! `parameter1` = `${imsi}`, `parameter2` = `${newStatus}`, `parameter3` = `${oldStatus}`,
//! `parameter4` = `${simId}` (the last two may be empty). Anything else is refused, named, and
//! changes nothing.

use serde_json::Value;

/// SORACOM's SIM statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimStatus {
    Ready,
    Active,
    Inactive,
    Standby,
    Suspended,
    Terminated,
    InStock,
    Shipped,
}

impl SimStatus {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "ready" => Self::Ready,
            "active" => Self::Active,
            "inactive" => Self::Inactive,
            "standby" => Self::Standby,
            "suspended" => Self::Suspended,
            "terminated" => Self::Terminated,
            "instock" => Self::InStock,
            "shipped" => Self::Shipped,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Active => "active",
            Self::Inactive => "inactive",
            Self::Standby => "standby",
            Self::Suspended => "suspended",
            Self::Terminated => "terminated",
            Self::InStock => "instock",
            Self::Shipped => "shipped",
        }
    }
}

/// One SIM's status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    pub imsi: String,
    pub sim_id: Option<String>,
    pub new_status: SimStatus,
    pub old_status: Option<SimStatus>,
}

/// Why an event was not acted on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("event is not a JSON object of parameter1…parameter5")]
    NotParameters,
    #[error("parameter1 (${{imsi}}) is not an IMSI")]
    Imsi,
    #[error("parameter2 (${{newStatus}}) is not a SORACOM SIM status")]
    NewStatus,
    #[error("parameter3 (${{oldStatus}}) is not a SORACOM SIM status")]
    OldStatus,
    #[error("parameter4 (${{simId}}) is not a SIM ID")]
    SimId,
}

fn parameter(event: &Value, n: u8) -> Result<Option<&str>, EventError> {
    match event.get(format!("parameter{n}")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.trim())),
        Some(_) => Err(EventError::NotParameters),
    }
}

pub fn parse(event: &Value) -> Result<StatusChange, EventError> {
    let object = event.as_object().ok_or(EventError::NotParameters)?;
    if object.keys().any(|k| {
        !matches!(
            k.as_str(),
            "parameter1" | "parameter2" | "parameter3" | "parameter4" | "parameter5"
        )
    }) {
        return Err(EventError::NotParameters);
    }
    let imsi = parameter(event, 1)?
        .filter(|v| (5..=15).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(EventError::Imsi)?;
    let new_status = parameter(event, 2)?
        .and_then(SimStatus::parse)
        .ok_or(EventError::NewStatus)?;
    let old_status = parameter(event, 3)?
        .map(|v| SimStatus::parse(v).ok_or(EventError::OldStatus))
        .transpose()?;
    let sim_id = parameter(event, 4)?
        .map(|v| {
            ((1..=32).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric()))
                .then(|| v.to_owned())
                .ok_or(EventError::SimId)
        })
        .transpose()?;
    Ok(StatusChange {
        imsi: imsi.to_owned(),
        sim_id,
        new_status,
        old_status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_documented_parameters_make_a_status_change() {
        let change = parse(&json!({
            "parameter1": "440103123456789",
            "parameter2": "terminated",
            "parameter3": "active",
            "parameter4": "8942310000000000001",
            "parameter5": ""
        }))
        .unwrap();
        assert_eq!(change.imsi, "440103123456789");
        assert_eq!(change.new_status, SimStatus::Terminated);
        assert_eq!(change.old_status, Some(SimStatus::Active));
        assert_eq!(change.sim_id.as_deref(), Some("8942310000000000001"));
        let minimal = parse(&json!({"parameter1": "440103123456789", "parameter2": "suspended"}));
        assert_eq!(minimal.unwrap().sim_id, None);
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        for (event, error) in [
            (json!([]), EventError::NotParameters),
            (
                json!({"imsi": "440103123456789"}),
                EventError::NotParameters,
            ),
            (
                json!({"parameter1": 440103123456789u64}),
                EventError::NotParameters,
            ),
            // An unfilled variable: the handler was set up wrong.
            (
                json!({"parameter1": "${imsi}", "parameter2": "terminated"}),
                EventError::Imsi,
            ),
            (
                json!({"parameter1": "440103123456789", "parameter2": "gone"}),
                EventError::NewStatus,
            ),
            (
                json!({"parameter1": "440103123456789", "parameter2": "active", "parameter3": "x"}),
                EventError::OldStatus,
            ),
            (
                json!({"parameter1": "440103123456789", "parameter2": "active", "parameter4": "../x"}),
                EventError::SimId,
            ),
        ] {
            assert_eq!(parse(&event), Err(error), "{event}");
        }
    }
}
