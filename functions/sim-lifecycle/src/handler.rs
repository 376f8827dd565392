//! One event: parse it, change the device table, then IoT Hub. The table comes first: it is
//! what keeps a SIM from registering again, and it holds where the SIM's IoT Hub identity is.
//! An event that is not what the README's event handler sends changes nothing.

use std::time::Duration;

use serde_json::{json, Value};
use shared::registry::{Change, DeviceId, DeviceStatus, DynamoRegistry, Lift, RegistryError};
use shared::secrets::{SecretError, SecretStore};
use tracing::{info, warn};

use crate::config::Config;
use crate::event::{self, SimStatus, StatusChange};
use crate::hub::{DeviceState, HubClient, HubCredentials, HubError, HubOutcome};

/// Every outcome the function counts (metric `Answers`, dimension `Outcome`).
pub const OUTCOMES: &[&str] = &["blocked", "unblocked", "unchanged", "ignored", "failed"];

pub struct State<S> {
    pub config: Config,
    pub registry: DynamoRegistry,
    pub secrets: S,
    pub hub: HubClient,
}

/// Why an event could not be carried out; the invocation fails so that it shows (Lambda's
/// error metric, the alarm) and SORACOM's retry, if any, can finish it: every step is
/// idempotent.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("device table: {0}")]
    Table(#[from] RegistryError),
    #[error("IoT Hub credentials: {0}")]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("IoT Hub credentials under {parameter} are for {found}, not {hub}")]
    WrongHub {
        parameter: String,
        hub: String,
        found: String,
    },
    #[error("not done within {0:?}")]
    Deadline(Duration),
}

/// What to do about a status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Block,
    Unblock,
    Nothing,
}

fn action(status: SimStatus, unblock_on_active: bool) -> Action {
    match status {
        SimStatus::Suspended | SimStatus::Terminated => Action::Block,
        SimStatus::Active if unblock_on_active => Action::Unblock,
        _ => Action::Nothing,
    }
}

/// Handles one event within `budget`.
pub async fn handle<S: SecretStore>(
    event: Value,
    state: &State<S>,
    budget: Duration,
) -> Result<Value, Failure> {
    let change = match event::parse(&event) {
        Ok(change) => change,
        Err(e) => {
            warn!(reason = %e, "event ignored: nothing changed");
            lambda_support::metrics::emit("ignored", &[]);
            return Ok(json!({"outcome": "ignored", "reason": e.to_string()}));
        }
    };
    let result = tokio::time::timeout(budget, apply(&change, state))
        .await
        .unwrap_or(Err(Failure::Deadline(budget)));
    match &result {
        Ok(answer) => {
            info!(imsi = %change.imsi, status = change.new_status.as_str(), answer = %answer, "event handled");
            lambda_support::metrics::emit(answer["outcome"].as_str().unwrap_or("unknown"), &[]);
        }
        Err(e) => {
            warn!(imsi = %change.imsi, status = change.new_status.as_str(), error = %e, "event failed");
            lambda_support::metrics::emit("failed", &[]);
        }
    }
    result
}

async fn apply<S: SecretStore>(change: &StatusChange, state: &State<S>) -> Result<Value, Failure> {
    let imsi = DeviceId::Sim(change.imsi.clone());
    let card = change.sim_id.clone().map(DeviceId::SimCard);
    let status = change.new_status.as_str();
    let unchanged = |table: Option<&str>| {
        let mut answer = json!({"outcome": "unchanged", "imsi": change.imsi, "status": status});
        if let Some(table) = table {
            answer["table"] = json!(table);
        }
        answer
    };
    let (outcome, table, target) = match action(change.new_status, state.config.unblock_on_active) {
        Action::Nothing => return Ok(unchanged(None)),
        Action::Block => {
            let mut table = "already-blocked";
            for id in std::iter::once(&imsi).chain(&card) {
                if state.registry.block_for_soracom(id, status).await? == Change::Done {
                    table = "blocked";
                }
            }
            ("blocked", table, DeviceState::Disabled)
        }
        Action::Unblock => {
            // Each entry goes back to what it was before SORACOM's block; the IMSI's entry
            // decides whether anything else happens.
            let lifted = state.registry.lift_soracom_block(&imsi).await?;
            let card_now = match &card {
                Some(card) => Some(match state.registry.lift_soracom_block(card).await? {
                    Lift::Restored(now) | Lift::NotSoracoms(now) => now,
                }),
                None => None,
            };
            let Lift::Restored(restored) = lifted else {
                return Ok(unchanged(Some("not-blocked-by-soracom")));
            };
            // The hub device comes back only where nothing blocks the SIM any more.
            if restored == DeviceStatus::Blocked || card_now == Some(DeviceStatus::Blocked) {
                return Ok(json!({
                    "outcome": "unblocked",
                    "imsi": change.imsi,
                    "status": status,
                    "table": restored.as_str(),
                    "iotHub": "kept-disabled",
                }));
            }
            ("unblocked", restored.as_str(), DeviceState::Enabled)
        }
    };
    let hub = set_hub_state(&change.imsi, change, state, target).await?;
    let mut answer = json!({
        "outcome": outcome,
        "imsi": change.imsi,
        "status": status,
        "table": table,
        "iotHub": hub,
    });
    // SORACOM reports the card's status: every IMSI registered through the card has a
    // device of its own in IoT Hub, and each follows the card.
    if let Some(sim_id) = &change.sim_id {
        let mut others = serde_json::Map::new();
        for other in state.registry.card_imsis(sim_id).await? {
            if other == change.imsi {
                continue;
            }
            let hub = set_hub_state(&other, change, state, target).await?;
            others.insert(other, json!(hub));
        }
        if !others.is_empty() {
            answer["cardImsis"] = Value::Object(others);
        }
    }
    Ok(answer)
}

/// Sets `imsi`'s IoT Hub device to `target`, where its last registration put it. A device is
/// never enabled for an IMSI whose own entry is blocked.
async fn set_hub_state<S: SecretStore>(
    imsi: &str,
    change: &StatusChange,
    state: &State<S>,
    target: DeviceState,
) -> Result<&'static str, Failure> {
    let Some(entry) = state.registry.sim_entry(imsi).await? else {
        return Ok("not-registered");
    };
    if target == DeviceState::Enabled && entry.status == DeviceStatus::Blocked {
        return Ok("kept-disabled");
    }
    let Some(registration) = entry.registration else {
        return Ok("not-registered");
    };
    let parameter = format!(
        "{}{}",
        state.config.hub_credentials_prefix, registration.assigned_hub
    );
    let secret = state.secrets.get(&parameter).await?;
    let credentials = HubCredentials::from_connection_string(secret.expose())?;
    if credentials.host != registration.assigned_hub.to_ascii_lowercase() {
        return Err(Failure::WrongHub {
            parameter,
            hub: registration.assigned_hub,
            found: credentials.host,
        });
    }
    let reason = format!("SORACOM SIM {}", change.new_status.as_str());
    let outcome = state
        .hub
        .set_state(&credentials, &registration.device_id, target, &reason)
        .await?;
    Ok(match (outcome, target) {
        (HubOutcome::Changed, DeviceState::Disabled) => "disabled",
        (HubOutcome::Changed, DeviceState::Enabled) => "enabled",
        (HubOutcome::AlreadySo, DeviceState::Disabled) => "already-disabled",
        (HubOutcome::AlreadySo, DeviceState::Enabled) => "already-enabled",
        (HubOutcome::NoSuchDevice, _) => "no-such-device",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_suspension_and_termination_block_and_only_an_opt_in_unblocks() {
        use SimStatus::*;
        for status in [Suspended, Terminated] {
            assert_eq!(action(status, false), Action::Block);
            assert_eq!(action(status, true), Action::Block);
        }
        assert_eq!(action(Active, false), Action::Nothing);
        assert_eq!(action(Active, true), Action::Unblock);
        for status in [Ready, Inactive, Standby, InStock, Shipped] {
            assert_eq!(action(status, true), Action::Nothing);
        }
    }
}
