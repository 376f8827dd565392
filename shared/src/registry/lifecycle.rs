//! What sim-lifecycle does to the device table when SORACOM reports a SIM's status: block it,
//! marking the block as SORACOM's, and lift only a block SORACOM caused. A block the operator
//! set (`provisioning-admin sims block`, which removes the mark) is never lifted by an event.
//!
//! Lifting restores exactly what SORACOM's block replaced (`soracom_prior`): an allowed SIM is
//! allowed again, and a SIM or card nobody listed goes back to having no status at all. Were a
//! lift to set `allowed`, a suspend-then-activate cycle would list an IMSI nobody listed, and a
//! card entry (`simid#`) allowed that way would admit every IMSI of the card.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::item::{decode, s};
use super::*;
use crate::aws::conditional;

/// The attributes sim-lifecycle reads and writes on a SIM's items (its IAM policy lists
/// exactly these).
pub const LIFECYCLE_ATTRIBUTES: &[&str] = &[
    KEY_ATTRIBUTE,
    "status",
    "blocked_by",
    PRIOR_ATTRIBUTE,
    CARD_IMSIS_ATTRIBUTE,
    "registration_id",
    "assigned_hub",
    "device_id",
    "registered_at",
];

/// The mark on a block SORACOM's event caused: `soracom:<status>`.
const SORACOM_MARK: &str = "soracom:";
/// What a SORACOM block replaced: the item's `status` then, or [`NO_STATUS`].
pub(super) const PRIOR_ATTRIBUTE: &str = "soracom_prior";
/// The prior of an item that had no `status` (nobody listed it). A block written before
/// priors were recorded has no prior and is lifted to this too: deny by default.
const NO_STATUS: &str = "-";

/// On a card's item: the IMSIs that registered through it (a string set).
pub const CARD_IMSIS_ATTRIBUTE: &str = "imsis";

/// What a block found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Done,
    /// Already blocked, by anyone.
    AlreadySo,
}

/// What a lift found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lift {
    /// SORACOM's block is gone; the entry is what it was before it (`Unlisted`: no status).
    Restored(DeviceStatus),
    /// Not blocked by SORACOM (or changed since): left as it is, which is this.
    NotSoracoms(DeviceStatus),
}

impl DynamoRegistry {
    /// Blocks `id` because SORACOM reports `status`, creating its item if there is none (a
    /// terminated SIM nobody listed stays refused), and remembers the status it replaces. An
    /// item blocked already keeps its block, whoever set it, and its prior.
    pub async fn block_for_soracom(
        &self,
        id: &DeviceId,
        status: &str,
    ) -> Result<Change, RegistryError> {
        // The prior is read from the item as it was before this update: DynamoDB evaluates
        // every operand of an update expression against the old item.
        self.set_status_if(
            id,
            &format!(
                "SET {PRIOR_ATTRIBUTE} = if_not_exists(#status, :none), #status = :blocked, \
                 blocked_by = :by"
            ),
            "attribute_not_exists(#status) OR #status <> :blocked",
            &[
                (":by", s(&format!("{SORACOM_MARK}{status}"))),
                (":none", s(NO_STATUS)),
            ],
        )
        .await
    }

    /// Restores `id` to what it was before SORACOM's block if, and only if, SORACOM's event
    /// blocked it and nobody changed it since.
    pub async fn lift_soracom_block(&self, id: &DeviceId) -> Result<Lift, RegistryError> {
        let key = id.key();
        let Some(item) = self.read(&key, LIFECYCLE_ATTRIBUTES).await? else {
            return Ok(Lift::NotSoracoms(DeviceStatus::Unlisted));
        };
        let current = decode(id.clone(), &key, &item)?.status;
        let prior = match item.get(PRIOR_ATTRIBUTE) {
            Some(AttributeValue::S(prior)) => Some(prior.as_str()),
            _ => None,
        };
        // Conditional on the prior read, so a block that changed hands since is not undone.
        let (prior_condition, mut values) = match prior {
            Some(prior) => (
                format!("{PRIOR_ATTRIBUTE} = :prior"),
                vec![(":prior", s(prior))],
            ),
            None => (format!("attribute_not_exists({PRIOR_ATTRIBUTE})"), vec![]),
        };
        let (update, restored) = match prior {
            Some(prior) if prior != NO_STATUS => {
                values.push((":restored", s(prior)));
                (
                    format!("SET #status = :restored REMOVE blocked_by, {PRIOR_ATTRIBUTE}"),
                    DeviceStatus::parse(prior),
                )
            }
            _ => (
                format!("REMOVE #status, blocked_by, {PRIOR_ATTRIBUTE}"),
                DeviceStatus::Unlisted,
            ),
        };
        values.push((":mark", s(SORACOM_MARK)));
        let change = self
            .set_status_if(
                id,
                &update,
                &format!(
                    "#status = :blocked AND begins_with(blocked_by, :mark) AND {prior_condition}"
                ),
                &values,
            )
            .await?;
        Ok(match change {
            Change::Done => Lift::Restored(restored),
            Change::AlreadySo => Lift::NotSoracoms(current),
        })
    }

    /// `update` on `id`'s item if `condition` holds (both may name `#status`, `:blocked` and
    /// the `extra` values).
    async fn set_status_if(
        &self,
        id: &DeviceId,
        update: &str,
        condition: &str,
        extra: &[(&str, AttributeValue)],
    ) -> Result<Change, RegistryError> {
        let mut values =
            HashMap::from([(":blocked".to_owned(), s(DeviceStatus::Blocked.as_str()))]);
        values.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        // Only the placeholders the expressions use: DynamoDB refuses unused ones.
        values
            .retain(|name, _| update.contains(name.as_str()) || condition.contains(name.as_str()));
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&id.key()))
            .update_expression(update)
            .condition_expression(condition)
            .expression_attribute_names("#status", "status")
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        match conditional(result).map_err(RegistryError::from_failure)? {
            true => Ok(Change::Done),
            false => Ok(Change::AlreadySo),
        }
    }

    /// The SIM's entry (its status and last DPS registration, where its IoT Hub identity
    /// lives), read with sim-lifecycle's attributes only.
    pub async fn sim_entry(&self, imsi: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        let id = DeviceId::Sim(imsi.to_owned());
        let key = id.key();
        self.read(&key, LIFECYCLE_ATTRIBUTES)
            .await?
            .map(|item| decode(id, &key, &item))
            .transpose()
    }

    /// The IMSIs that registered through the SIM card `sim_id` (azure-dps-register lists each
    /// on the card's item before it records the registration), in order.
    pub async fn card_imsis(&self, sim_id: &str) -> Result<Vec<String>, RegistryError> {
        let key = DeviceId::SimCard(sim_id.to_owned()).key();
        let Some(item) = self.read(&key, LIFECYCLE_ATTRIBUTES).await? else {
            return Ok(Vec::new());
        };
        let mut imsis = match item.get(CARD_IMSIS_ATTRIBUTE) {
            None | Some(AttributeValue::Null(_)) => Vec::new(),
            Some(AttributeValue::Ss(imsis)) => imsis.clone(),
            Some(_) => {
                return Err(RegistryError::Malformed {
                    key,
                    field: CARD_IMSIS_ATTRIBUTE,
                })
            }
        };
        imsis.sort();
        Ok(imsis)
    }
}
