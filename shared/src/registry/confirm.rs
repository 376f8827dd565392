//! Confirming a fleet provisioning when the device first connects with its new certificate.
//!
//! The threat: a provisioning nobody confirms stays `pending`, and a pending serial can be
//! given another certificate once it is `PENDING_SECONDS` old; had nothing ever confirmed, any
//! installer could take over any device that way. AWS IoT publishes a lifecycle event when a
//! client connects, naming the certificate it authenticated with (`principalIdentifier`);
//! fleet-confirm marks the serial confirmed only when that certificate is the one the hook
//! recorded, and only then retires the certificates it replaced. One trait, one
//! implementation, and the attributes its IAM policy lists, side by side.

use super::item::{decode_provisioning, n, s};
use super::*;
use crate::aws::conditional;

/// The attributes of a serial's item fleet-confirm reads and writes (its IAM policy lists
/// exactly these).
pub const CONFIRM_ATTRIBUTES: &[&str] = &[
    KEY_ATTRIBUTE,
    "certificate_id",
    "provisioned_at",
    "provisioning_state",
    "replaced_certificate_id",
    "confirmed_at",
];

/// What a confirmation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirmation {
    /// The certificate is the serial's: confirmed now (`newly`) or before. `replaced` is what
    /// the provisioning replaced and nobody retired yet.
    Recorded {
        newly: bool,
        replaced: Option<String>,
    },
    /// The serial has no provisioning, or one with another certificate: nothing changes.
    NotRecorded,
}

/// What fleet-confirm needs of the device table.
pub trait Confirmations: Send + Sync {
    /// Confirms `serial`'s provisioning if its certificate is `certificate_id`, at `at`.
    /// Idempotent: AWS IoT may deliver an event twice or out of order.
    fn confirm(
        &self,
        serial: &str,
        certificate_id: &str,
        at: u64,
    ) -> impl Future<Output = Result<Confirmation, RegistryError>> + Send;

    /// Forgets `replaced` once it was retired, if the serial still holds `certificate_id`.
    fn retired(
        &self,
        serial: &str,
        certificate_id: &str,
        replaced: &str,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
}

/// The serial's provisioning as it concerns one certificate.
enum Found {
    /// None, or another certificate's.
    Other,
    Pending {
        replaced: Option<String>,
    },
    Confirmed {
        replaced: Option<String>,
    },
}

impl DynamoRegistry {
    async fn recorded(&self, key: &str, certificate_id: &str) -> Result<Found, RegistryError> {
        let Some(item) = self.read(key, CONFIRM_ATTRIBUTES).await? else {
            return Ok(Found::Other);
        };
        Ok(match decode_provisioning(key, &item)? {
            Some(p) if p.certificate_id == certificate_id => match p.state {
                ProvisioningState::Pending => Found::Pending {
                    replaced: p.replaced_certificate_id,
                },
                ProvisioningState::Confirmed => Found::Confirmed {
                    replaced: p.replaced_certificate_id,
                },
            },
            _ => Found::Other,
        })
    }
}

impl Confirmations for DynamoRegistry {
    async fn confirm(
        &self,
        serial: &str,
        certificate_id: &str,
        at: u64,
    ) -> Result<Confirmation, RegistryError> {
        let key = DeviceId::Serial(serial.to_owned()).key();
        let replaced = match self.recorded(&key, certificate_id).await? {
            Found::Other => return Ok(Confirmation::NotRecorded),
            Found::Confirmed { replaced } => {
                return Ok(Confirmation::Recorded {
                    newly: false,
                    replaced,
                })
            }
            Found::Pending { replaced } => replaced,
        };
        // Only while the item still holds this certificate, pending: a new provisioning that
        // won meanwhile is not confirmed by the old certificate's connection.
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .update_expression("SET provisioning_state = :confirmed, confirmed_at = :now")
            .condition_expression("certificate_id = :cert AND provisioning_state = :pending")
            .expression_attribute_values(":confirmed", s(ProvisioningState::Confirmed.as_str()))
            .expression_attribute_values(":pending", s(ProvisioningState::Pending.as_str()))
            .expression_attribute_values(":cert", s(certificate_id))
            .expression_attribute_values(":now", n(at))
            .send()
            .await;
        if conditional(result).map_err(RegistryError::from_failure)? {
            return Ok(Confirmation::Recorded {
                newly: true,
                replaced,
            });
        }
        // Changed since the read: confirmed by a duplicate event, or replaced. Read once more
        // rather than guess.
        Ok(match self.recorded(&key, certificate_id).await? {
            Found::Confirmed { replaced } => Confirmation::Recorded {
                newly: false,
                replaced,
            },
            Found::Other | Found::Pending { .. } => Confirmation::NotRecorded,
        })
    }

    async fn retired(
        &self,
        serial: &str,
        certificate_id: &str,
        replaced: &str,
    ) -> Result<(), RegistryError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&DeviceId::Serial(serial.to_owned()).key()))
            .update_expression("REMOVE replaced_certificate_id")
            .condition_expression("certificate_id = :cert AND replaced_certificate_id = :old")
            .expression_attribute_values(":cert", s(certificate_id))
            .expression_attribute_values(":old", s(replaced))
            .send()
            .await;
        // Already forgotten, or a newer provisioning took over: either way nothing to do.
        conditional(result)
            .map(|_| ())
            .map_err(RegistryError::from_failure)
    }
}
