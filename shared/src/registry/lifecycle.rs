//! What sim-lifecycle does to the device table when SORACOM reports a SIM's status: block it,
//! marking the block as SORACOM's, and lift only a block SORACOM caused. A block the operator
//! set (`provisioning-admin sims block`, which removes the mark) is never lifted by an event.

use std::collections::HashMap;

use super::item::{decode, projection, s};
use super::*;
use crate::aws::classify;

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
        let key = id.key();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .update_expression("SET #status = :blocked, blocked_by = :by")
            .condition_expression("attribute_not_exists(#status) OR #status <> :blocked")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":blocked", s(DeviceStatus::Blocked.as_str()))
            .expression_attribute_values(":by", s(&format!("{SORACOM_MARK}{status}")))
            .send()
            .await;
        conditional(result.map(|_| ()))
    }

    /// Allows `id` again if, and only if, SORACOM's event blocked it.
    pub async fn lift_soracom_block(&self, id: &DeviceId) -> Result<Change, RegistryError> {
        let key = id.key();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .update_expression("SET #status = :allowed REMOVE blocked_by")
            .condition_expression("#status = :blocked AND begins_with(blocked_by, :mark)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":blocked", s(DeviceStatus::Blocked.as_str()))
            .expression_attribute_values(":allowed", s(DeviceStatus::Allowed.as_str()))
            .expression_attribute_values(":mark", s(SORACOM_MARK))
            .send()
            .await;
        conditional(result.map(|_| ()))
    }

    /// The SIM's last DPS registration (where its IoT Hub identity lives), read with
    /// sim-lifecycle's attributes only.
    pub async fn last_registration(
        &self,
        imsi: &str,
    ) -> Result<Option<Registration>, RegistryError> {
        let id = DeviceId::Sim(imsi.to_owned());
        let key = id.key();
        let (expression, names): (String, HashMap<String, String>) =
            projection(LIFECYCLE_ATTRIBUTES);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .projection_expression(expression)
            .set_expression_attribute_names(Some(names))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| RegistryError::from_failure(classify(&e)))?;
        match out.item {
            Some(item) => Ok(decode(id, &key, &item)?.registration),
            None => Ok(None),
        }
    }
}

/// A conditional write's outcome: its condition failing means the item is already so.
fn conditional<E>(
    result: Result<
        (),
        aws_sdk_dynamodb::error::SdkError<E, aws_sdk_dynamodb::config::http::HttpResponse>,
    >,
) -> Result<Change, RegistryError>
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    match result {
        Ok(()) => Ok(Change::Done),
        Err(e) => match classify(&e) {
            Failure::Service(code) if code == "ConditionalCheckFailedException" => {
                Ok(Change::AlreadySo)
            }
            other => Err(RegistryError::from_failure(other)),
        },
    }
}
