//! What sim-lifecycle does to the device table when SORACOM reports a SIM's status: block it,
//! marking the block as SORACOM's, and lift only a block SORACOM caused. A block the operator
//! set (`provisioning-admin sims block`, which removes the mark) is never lifted by an event.

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
    "registration_id",
    "assigned_hub",
    "device_id",
    "registered_at",
];

/// The mark on a block SORACOM's event caused: `soracom:<status>`.
const SORACOM_MARK: &str = "soracom:";

/// What a lifecycle write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Done,
    /// Already so (blocked by anyone; or, for a lift, not blocked by SORACOM).
    AlreadySo,
}

impl DynamoRegistry {
    /// Blocks `id` because SORACOM reports `status`, creating its item if there is none (a
    /// terminated SIM nobody listed stays refused). An item blocked already keeps its block
    /// and whoever set it.
    pub async fn block_for_soracom(
        &self,
        id: &DeviceId,
        status: &str,
    ) -> Result<Change, RegistryError> {
        self.set_status_if(
            id,
            "SET #status = :blocked, blocked_by = :by",
            "attribute_not_exists(#status) OR #status <> :blocked",
            (":by", s(&format!("{SORACOM_MARK}{status}"))),
        )
        .await
    }

    /// Allows `id` again if, and only if, SORACOM's event blocked it.
    pub async fn lift_soracom_block(&self, id: &DeviceId) -> Result<Change, RegistryError> {
        self.set_status_if(
            id,
            "SET #status = :allowed REMOVE blocked_by",
            "#status = :blocked AND begins_with(blocked_by, :mark)",
            (":mark", s(SORACOM_MARK)),
        )
        .await
    }

    /// `update` on `id`'s item if `condition` holds (both may name `#status`, `:blocked`,
    /// `:allowed` and the one `extra` value).
    async fn set_status_if(
        &self,
        id: &DeviceId,
        update: &str,
        condition: &str,
        extra: (&str, AttributeValue),
    ) -> Result<Change, RegistryError> {
        let mut values = HashMap::from([
            (":blocked".to_owned(), s(DeviceStatus::Blocked.as_str())),
            (":allowed".to_owned(), s(DeviceStatus::Allowed.as_str())),
        ]);
        values.insert(extra.0.to_owned(), extra.1);
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

    /// The SIM's last DPS registration (where its IoT Hub identity lives), read with
    /// sim-lifecycle's attributes only.
    pub async fn last_registration(
        &self,
        imsi: &str,
    ) -> Result<Option<Registration>, RegistryError> {
        let id = DeviceId::Sim(imsi.to_owned());
        let key = id.key();
        match self.read(&key, LIFECYCLE_ATTRIBUTES).await? {
            Some(item) => Ok(decode(id, &key, &item)?.registration),
            None => Ok(None),
        }
    }
}
