//! The DynamoDB adapter of the registry traits: conditional writes and transactions, so that
//! whatever a function read cannot have changed by the time it writes.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, TransactWriteItem, Update};

use super::item::{decode, decode_claim, encode, n, projection, s};
use super::*;
use crate::aws::classify;

/// The DynamoDB adapter.
#[derive(Clone, Debug)]
pub struct DynamoRegistry {
    pub(super) client: aws_sdk_dynamodb::Client,
    pub(super) table: String,
}

/// A serial qualifies for a new certificate while it is allowed and within its validity,
/// whatever else the condition asks.
const QUALIFIES: &str =
    "#status = :allowed AND (attribute_not_exists(valid_until) OR valid_until > :now)";

impl DynamoRegistry {
    pub fn new(client: aws_sdk_dynamodb::Client, table: &str) -> Self {
        Self {
            client,
            table: table.to_owned(),
        }
    }

    /// The serial's part of a provisioning: a condition that the item is still what the hook
    /// read, and the new pending certificate.
    fn serial_write(
        &self,
        key: &str,
        w: &ProvisioningWrite,
    ) -> Result<TransactWriteItem, RegistryError> {
        let names = HashMap::from([("#status".to_owned(), "status".to_owned())]);
        let mut values = HashMap::from([
            (":allowed".to_owned(), s(DeviceStatus::Allowed.as_str())),
            (":now".to_owned(), n(w.at)),
            (":cert".to_owned(), s(&w.certificate_id)),
        ]);
        let (condition, replaced) = match &w.replaces {
            // AWS IoT retrying: nothing to write, only to check.
            Replaces::Itself => {
                let check = ConditionCheck::builder()
                    .table_name(&self.table)
                    .key(KEY_ATTRIBUTE, s(key))
                    .condition_expression(format!("{QUALIFIES} AND certificate_id = :cert"))
                    .set_expression_attribute_names(Some(names))
                    .set_expression_attribute_values(Some(values))
                    .build()
                    .map_err(not_built)?;
                return Ok(TransactWriteItem::builder().condition_check(check).build());
            }
            Replaces::Nothing => (
                format!(
                    "attribute_exists(pk) AND {QUALIFIES} AND attribute_not_exists(certificate_id)"
                ),
                None,
            ),
            Replaces::Reprovisioning { old } => {
                values.insert(":yes".into(), AttributeValue::Bool(true));
                (
                    format!("{QUALIFIES} AND certificate_id = :old AND allow_reprovision = :yes"),
                    Some(old),
                )
            }
            Replaces::StalePending {
                old,
                pending_since_before,
                issued_to,
            } => {
                values.insert(":before".into(), n(*pending_since_before));
                values.insert(":issuer".into(), s(issued_to));
                (
                    format!(
                        "{QUALIFIES} AND certificate_id = :old AND provisioning_state = :pending \
                         AND provisioned_at <= :before AND issued_to = :issuer"
                    ),
                    Some(old),
                )
            }
        };
        let update = Update::builder()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(key))
            .update_expression(pending_certificate(w, replaced, &mut values))
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .build()
            .map_err(not_built)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }

    /// The claim's part: spent on this certificate and serial, if it is still unused (or used
    /// by this same certificate: AWS IoT retrying), valid and not bound to another serial.
    fn claim_spend(
        &self,
        w: &ProvisioningWrite,
        claim: &ClaimUse,
    ) -> Result<TransactWriteItem, RegistryError> {
        let update = Update::builder()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&claim_key(&claim.claim_certificate_id)))
            .update_expression(
                "SET used_by_certificate = :cert, used_for_serial = :serial, \
                 used_at = if_not_exists(used_at, :now)",
            )
            .condition_expression(
                "attribute_exists(pk) AND valid_until > :now \
                 AND (attribute_not_exists(used_by_certificate) OR used_by_certificate = :cert) \
                 AND (attribute_not_exists(#serial) OR #serial = :serial)",
            )
            .expression_attribute_names("#serial", "serial")
            .expression_attribute_values(":cert", s(&w.certificate_id))
            .expression_attribute_values(":serial", s(&w.serial))
            .expression_attribute_values(":now", n(claim.at))
            .build()
            .map_err(not_built)?;
        Ok(TransactWriteItem::builder().update(update).build())
    }
}

/// The update that records `w`'s certificate as pending, with the claim it was provisioned
/// with and the certificate it replaced (both removed when there is none, so that nothing from
/// an earlier provisioning lingers); `values` gains what the expression names.
fn pending_certificate(
    w: &ProvisioningWrite,
    replaced: Option<&String>,
    values: &mut HashMap<String, AttributeValue>,
) -> String {
    let mut set = vec![
        "certificate_id = :cert",
        "provisioned_at = :now",
        "provisioning_state = :pending",
    ];
    let mut remove = Vec::new();
    values.insert(":pending".into(), s(ProvisioningState::Pending.as_str()));
    match &w.claim_certificate_id {
        Some(claim) => {
            set.push("claim_certificate_id = :claim");
            values.insert(":claim".into(), s(claim));
        }
        None => remove.push("claim_certificate_id"),
    }
    match &w.issued_to {
        Some(installer) => {
            set.push("issued_to = :installer");
            values.insert(":installer".into(), s(installer));
        }
        None => remove.push("issued_to"),
    }
    // A new certificate has not connected yet.
    remove.push("confirmed_at");
    match replaced {
        Some(old) => {
            set.push("replaced_certificate_id = :old");
            values.insert(":old".into(), s(old));
            // `allow_reprovision` is good for one certificate: this one.
            remove.push("allow_reprovision");
        }
        None => remove.push("replaced_certificate_id"),
    }
    let mut expression = format!("SET {}", set.join(", "));
    if !remove.is_empty() {
        expression.push_str(&format!(" REMOVE {}", remove.join(", ")));
    }
    expression
}

/// Why DynamoDB cancelled a transaction, item by item (`None`: it failed otherwise).
pub(super) fn cancellation_reasons<R>(
    err: &aws_sdk_dynamodb::error::SdkError<
        aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError,
        R,
    >,
) -> Option<Vec<aws_sdk_dynamodb::types::CancellationReason>> {
    use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
    match err.as_service_error()? {
        TransactWriteItemsError::TransactionCanceledException(c) => {
            Some(c.cancellation_reasons().to_vec())
        }
        _ => None,
    }
}

/// A transaction item the SDK's builder refused (a required field unset): a bug, answered as
/// an unavailable table rather than a panic that would end the Lambda sandbox.
fn not_built(e: aws_sdk_dynamodb::error::BuildError) -> RegistryError {
    RegistryError::Unavailable(format!("request not built: {e}"))
}

fn write_error<E, R>(key: &str, err: aws_sdk_dynamodb::error::SdkError<E, R>) -> RegistryError
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    match classify(&err) {
        Failure::Service(code) if code == "ConditionalCheckFailedException" => {
            RegistryError::Conflict(key.to_owned())
        }
        other => RegistryError::from_failure(other),
    }
}

/// Administration and seeding (tests, the demo, operators' tools): not a function's trait.
impl DynamoRegistry {
    pub async fn get(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        let key = id.key();
        // Only what this kind of item holds for its function: what the IAM policy allows it.
        // The individual key stays out of the record: only the secret store reads it.
        let attributes = match id {
            DeviceId::Sim(_) | DeviceId::SimCard(_) => SIM_ATTRIBUTES,
            DeviceId::Serial(_) => SERIAL_ATTRIBUTES,
        };
        self.read(&key, attributes)
            .await?
            .map(|item| decode(id.clone(), &key, &item))
            .transpose()
    }

    /// One item, strongly consistent, with only `attributes` (all the IAM policy allows).
    pub(super) async fn read(
        &self,
        key: &str,
        attributes: &[&str],
    ) -> Result<Option<HashMap<String, AttributeValue>>, RegistryError> {
        let (expression, names) = projection(attributes);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(key))
            .projection_expression(expression)
            .set_expression_attribute_names(Some(names))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| RegistryError::from_failure(classify(&e)))?;
        Ok(out.item)
    }

    pub async fn put(&self, record: &DeviceRecord) -> Result<(), RegistryError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(encode(record)))
            .send()
            .await
            .map_err(|e| write_error(&record.id.key(), e))?;
        Ok(())
    }
}

impl SimRegistry for DynamoRegistry {
    async fn record_certificate(&self, issue: &CertificateIssue) -> Result<(), RegistryError> {
        let key = certificate_key(&issue.serial);
        self.client
            .put_item()
            .table_name(&self.table)
            .item(KEY_ATTRIBUTE, s(&key))
            .item("fingerprint", s(&issue.fingerprint))
            .item("imsi", s(&issue.imsi))
            .item("registration_id", s(&issue.registration_id))
            .item("issued_at", n(issue.issued_at))
            .item("expires_at", n(issue.expires_at))
            // A serial is issued once (random, 16 bytes): never overwrite another's record.
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await
            .map_err(|e| write_error(&key, e))?;
        Ok(())
    }

    async fn sim(&self, imsi: &str, sim_id: Option<&str>) -> Result<SimEntries, RegistryError> {
        let by_imsi = DeviceId::Sim(imsi.to_owned());
        let by_card = sim_id.map(|id| DeviceId::SimCard(id.to_owned()));
        let card = async {
            match &by_card {
                Some(id) => self.get(id).await,
                None => Ok(None),
            }
        };
        let (imsi_entry, card_entry) = tokio::join!(self.get(&by_imsi), card);
        Ok(SimEntries {
            by_imsi: imsi_entry?,
            by_card: card_entry?,
        })
    }

    async fn record_registration(
        &self,
        imsi: &str,
        sim_id: Option<&str>,
        registration: &Registration,
    ) -> Result<(), RegistryError> {
        if let Some(sim_id) = sim_id {
            // Before the IMSI's record: a registration recorded is always one the card lists.
            let card = DeviceId::SimCard(sim_id.to_owned()).key();
            self.client
                .update_item()
                .table_name(&self.table)
                .key(KEY_ATTRIBUTE, s(&card))
                .update_expression("ADD #imsis :imsi")
                .expression_attribute_names("#imsis", CARD_IMSIS_ATTRIBUTE)
                .expression_attribute_values(":imsi", AttributeValue::Ss(vec![imsi.to_owned()]))
                .send()
                .await
                .map_err(|e| write_error(&card, e))?;
        }
        let key = DeviceId::Sim(imsi.to_owned()).key();
        let mut set = "SET registration_id = :rid, assigned_hub = :hub, device_id = :dev, \
                   registered_at = :at"
            .to_owned();
        let mut remove = Vec::new();
        let mut values = HashMap::new();
        // A registration without a fingerprint, allocation data or certificate must not keep
        // the previous one's.
        let certificate = registration.certificate.as_ref();
        for (attribute, placeholder, value) in [
            (
                "key_fingerprint",
                ":fp",
                registration.key_fingerprint.as_ref().map(|v| s(v)),
            ),
            (
                "return_data",
                ":data",
                registration.return_data.as_ref().map(|v| s(v)),
            ),
            ("cert_serial", ":cs", certificate.map(|c| s(&c.serial))),
            (
                "cert_fingerprint",
                ":cf",
                certificate.map(|c| s(&c.fingerprint)),
            ),
            (
                "cert_expires_at",
                ":ce",
                certificate.map(|c| n(c.expires_at)),
            ),
        ] {
            match value {
                Some(value) => {
                    set.push_str(&format!(", {attribute} = {placeholder}"));
                    values.insert(placeholder.to_owned(), value);
                }
                None => remove.push(attribute),
            }
        }
        let expression = if remove.is_empty() {
            set
        } else {
            format!("{set} REMOVE {}", remove.join(", "))
        };
        self.client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .update_expression(expression)
            .set_expression_attribute_values(Some(values))
            .condition_expression("attribute_not_exists(#status) OR #status <> :blocked")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":rid", s(&registration.registration_id))
            .expression_attribute_values(":hub", s(&registration.assigned_hub))
            .expression_attribute_values(":dev", s(&registration.device_id))
            .expression_attribute_values(":at", n(registration.registered_at))
            .expression_attribute_values(":blocked", s(DeviceStatus::Blocked.as_str()))
            .send()
            .await
            .map_err(|e| write_error(&key, e))?;
        Ok(())
    }
}

impl SerialRegistry for DynamoRegistry {
    async fn serial(&self, serial: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.get(&DeviceId::Serial(serial.to_owned())).await
    }

    async fn record_provisioning(&self, write: &ProvisioningWrite) -> Result<(), RegistryError> {
        let serial_key = DeviceId::Serial(write.serial.clone()).key();
        let mut items = vec![self.serial_write(&serial_key, write)?];
        if let Some(claim) = &write.spend_claim {
            items.push(self.claim_spend(write, claim)?);
        }
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        let Err(err) = result else {
            return Ok(());
        };
        // Which condition failed: the serial's (first item) or the claim's (second).
        match cancellation_reasons(&err) {
            Some(reasons) => {
                let failed = |i: usize| {
                    reasons
                        .get(i)
                        .and_then(|r| r.code())
                        .is_some_and(|c| c != "None")
                };
                match &write.spend_claim {
                    Some(claim) if !failed(0) && failed(1) => Err(RegistryError::ClaimSpent(
                        claim.claim_certificate_id.clone(),
                    )),
                    // A condition failed, or a concurrent transaction touched the items: one of
                    // two racing requests loses, which is the point.
                    _ => Err(RegistryError::Conflict(serial_key)),
                }
            }
            None => Err(RegistryError::from_failure(classify(&err))),
        }
    }
}

impl ClaimLog for DynamoRegistry {
    async fn record_claim(&self, claim: &ClaimRecord) -> Result<(), RegistryError> {
        let key = claim_key(&claim.certificate_id);
        let mut put = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(KEY_ATTRIBUTE, s(&key))
            .item("issued_to", s(&claim.issued_to))
            .item("issued_at", n(claim.issued_at))
            .item("valid_until", n(claim.valid_until))
            .item("expires_at", n(claim.retain_until))
            // A certificate id is issued once; never overwrite an existing record.
            .condition_expression("attribute_not_exists(pk)");
        if let Some(serial) = &claim.serial {
            put = put.item("serial", s(serial));
        }
        put.send().await.map_err(|e| write_error(&key, e))?;
        Ok(())
    }
    async fn claim(&self, certificate_id: &str) -> Result<Option<ClaimRecord>, RegistryError> {
        self.read(&claim_key(certificate_id), CLAIM_ATTRIBUTES)
            .await?
            .map(|item| decode_claim(certificate_id, &item))
            .transpose()
    }
}
