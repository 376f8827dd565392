//! The device table: who may provision, and what happened when they did.
//!
//! One DynamoDB table (`DEVICES_TABLE`) with a string partition key `pk` and no sort key serves
//! all three functions. Item schema:
//!
//! | attribute | type | meaning |
//! |---|---|---|
//! | `pk` | S | `sim#<imsi>` for a SORACOM SIM, `serial#<serial>` for a fleet device |
//! | `status` | S | `allowed` or `blocked`; anything else is treated as blocked |
//! | `valid_until` | N | optional: allowlist entry ends at this Unix time |
//! | `allow_reprovision` | BOOL | optional: a new certificate may replace the recorded one |
//! | `overrides` | M of S | optional: fleet template parameter overrides for this device |
//! | `device_key` | S | optional: individual-enrollment key (read only by the secret store) |
//! | `registration_id`, `assigned_hub`, `device_id` | S | last Azure DPS registration |
//! | `registered_at` | N | Unix time of that registration |
//! | `certificate_id`, `claim_certificate_id` | S | certificate provisioned through fleet provisioning |
//! | `provisioned_at` | N | Unix time of that provisioning |
//! | `provisioning_state` | S | `pending` (the hook said yes; nothing confirmed the device since) or `confirmed` |
//! | `replaced_certificate_id` | S | the certificate a re-provisioning replaced (for the operator to revoke) |
//! | `expires_at` | N | DynamoDB TTL attribute, for records that expire (audit, rate limits) |
//!
//! Claim certificates issued by claim-issuer are recorded as `pk = claim#<certificateId>` with
//! `issued_to` (S, the installer's `sub`), `serial` (S, optional binding), `issued_at` (N),
//! `valid_until` (N, the certificate's expiry) and `expires_at` (N, TTL: end of audit retention);
//! fleet-prehook marks it used with `used_by_certificate` (S), `used_for_serial` (S) and
//! `used_at` (N), in the same transaction that records the serial's provisioning.
//! Rate-limit counters are `pk = rate#<subject>#<window start>` with `count` (N) and
//! `expires_at` (N, TTL).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, TransactWriteItem, Update};

use crate::aws::{classify, Failure};

/// Device serial numbers unless configured otherwise: letters, digits and `_:-`, 1 to 64
/// characters, starting alphanumeric. AWS IoT thing names allow `[a-zA-Z0-9:_-]` only (no `.`),
/// and the thing name is the template's prefix plus the serial: a serial outside this set would
/// pass the hook and then fail in AWS IoT.
pub const DEFAULT_SERIAL_PATTERN: &str = "[A-Za-z0-9][A-Za-z0-9_:-]{0,63}";

/// The table's partition key attribute.
pub const KEY_ATTRIBUTE: &str = "pk";

/// The attributes of a SIM's item (`sim#`, `simid#`) that azure-dps-register reads and writes.
/// The IAM policies list exactly these per function (`dynamodb:Attributes`), so a function can
/// touch nothing else: `tests/tests/e2e/infra.rs` checks the template against these lists.
pub const SIM_ATTRIBUTES: &[&str] = &[
    KEY_ATTRIBUTE,
    "status",
    "valid_until",
    "registration_id",
    "assigned_hub",
    "device_id",
    "registered_at",
];
/// The individual-enrollment key on a SIM's item: read by the secret store only.
pub const DEVICE_KEY_ATTRIBUTE: &str = "device_key";
/// The attributes of a serial's item (`serial#`) that fleet-prehook reads and writes.
pub const SERIAL_ATTRIBUTES: &[&str] = &[
    KEY_ATTRIBUTE,
    "status",
    "valid_until",
    "allow_reprovision",
    "overrides",
    "certificate_id",
    "claim_certificate_id",
    "provisioned_at",
    "provisioning_state",
    "replaced_certificate_id",
];
/// The attributes claim-issuer writes on a claim's item (`claim#`).
pub const CLAIM_ISSUE_ATTRIBUTES: &[&str] = &[
    KEY_ATTRIBUTE,
    "issued_to",
    "serial",
    "issued_at",
    "valid_until",
    "expires_at",
];
/// All attributes of a claim's item: as issued, and as fleet-prehook spends it.
pub const CLAIM_ATTRIBUTES: &[&str] = &[
    KEY_ATTRIBUTE,
    "issued_to",
    "serial",
    "issued_at",
    "valid_until",
    "expires_at",
    "used_by_certificate",
    "used_for_serial",
    "used_at",
];

/// A projection of `attributes` with every name aliased (`status` is a reserved word).
fn projection(attributes: &[&str]) -> (String, HashMap<String, String>) {
    let names: HashMap<String, String> = attributes
        .iter()
        .enumerate()
        .map(|(i, a)| (format!("#p{i}"), (*a).to_owned()))
        .collect();
    let expression = (0..attributes.len())
        .map(|i| format!("#p{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    (expression, names)
}

/// Which device an item describes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceId {
    /// A SORACOM subscription, by IMSI.
    Sim(String),
    /// A SORACOM SIM card, by SIM ID: a multi-IMSI SIM has several IMSIs, one SIM ID, and an
    /// entry here covers all of them.
    SimCard(String),
    Serial(String),
}

impl DeviceId {
    pub fn key(&self) -> String {
        match self {
            Self::Sim(imsi) => format!("sim#{imsi}"),
            Self::SimCard(sim_id) => format!("simid#{sim_id}"),
            Self::Serial(serial) => format!("serial#{serial}"),
        }
    }
}

/// Why an entry does not allow provisioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryRefusal {
    Blocked,
    /// Nobody listed the device (see [`DeviceStatus::Unlisted`]).
    Unlisted,
    Expired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceStatus {
    Allowed,
    Blocked,
    /// The item has no `status`: nobody listed the device; it exists only because something
    /// about it was recorded (a SIM's registration while `REQUIRE_SIM_ALLOWLIST` is off). It
    /// counts as not in the table, never as allowed.
    Unlisted,
}

impl DeviceStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Blocked => "blocked",
            Self::Unlisted => "unlisted",
        }
    }
}

/// The last Azure DPS registration of a SIM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub registration_id: String,
    pub assigned_hub: String,
    pub device_id: String,
    pub registered_at: u64,
}

/// Whether anything confirmed that a provisioned device got its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisioningState {
    /// The hook said yes; AWS IoT may still have failed after it, or the device lost its new
    /// key. Another certificate may replace it once it is old enough.
    Pending,
    /// The device is known to hold the certificate. Records written before the state existed
    /// read as confirmed: only `allow_reprovision` replaces them.
    Confirmed,
}

impl ProvisioningState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
        }
    }
}

/// The certificate a fleet device was provisioned with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioning {
    pub certificate_id: String,
    pub claim_certificate_id: Option<String>,
    pub provisioned_at: u64,
    pub state: ProvisioningState,
    /// The certificate this provisioning replaced, if it replaced one.
    pub replaced_certificate_id: Option<String>,
}

/// What recording a new certificate for a serial replaces; each case is its own condition, so
/// that whatever the hook read cannot have changed by the time it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replaces {
    /// The serial has no certificate yet.
    Nothing,
    /// The same certificate again (AWS IoT retrying): nothing changes.
    Itself,
    /// `old`, through the operator's one-time `allow_reprovision`, which the write consumes.
    Reprovisioning { old: String },
    /// `old`, still pending and provisioned at or before `pending_since_before`.
    StalePending {
        old: String,
        pending_since_before: u64,
    },
}

/// A claim certificate being spent on one provisioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimUse {
    pub claim_certificate_id: String,
    /// The claim is still valid at this time (Unix seconds).
    pub at: u64,
}

/// One provisioning, recorded atomically: the serial's new certificate and, if claim-issuer
/// recorded the claim, the claim's single use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisioningWrite {
    pub serial: String,
    pub certificate_id: String,
    /// The claim certificate AWS IoT named, kept on the serial's item.
    pub claim_certificate_id: Option<String>,
    /// Set when the claim is recorded: it is marked used in the same transaction.
    pub spend_claim: Option<ClaimUse>,
    pub at: u64,
    pub replaces: Replaces,
}

/// One device's item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub id: DeviceId,
    pub status: DeviceStatus,
    pub valid_until: Option<u64>,
    pub allow_reprovision: bool,
    pub overrides: BTreeMap<String, String>,
    pub registration: Option<Registration>,
    pub provisioning: Option<Provisioning>,
}

impl DeviceRecord {
    /// A new allowed entry with nothing recorded yet.
    pub fn allowed(id: DeviceId) -> Self {
        Self {
            id,
            status: DeviceStatus::Allowed,
            valid_until: None,
            allow_reprovision: false,
            overrides: BTreeMap::new(),
            registration: None,
            provisioning: None,
        }
    }

    /// Why this entry does not allow provisioning at `now`, or `None` if it does.
    pub fn refusal(&self, now: u64) -> Option<EntryRefusal> {
        match self.status {
            DeviceStatus::Allowed => {}
            DeviceStatus::Blocked => return Some(EntryRefusal::Blocked),
            DeviceStatus::Unlisted => return Some(EntryRefusal::Unlisted),
        }
        if self.valid_until.is_some_and(|until| now >= until) {
            return Some(EntryRefusal::Expired);
        }
        None
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// A conditional write lost: the item changed (blocked, or provisioned by someone else).
    #[error("device {0} changed concurrently or no longer qualifies")]
    Conflict(String),
    /// The claim certificate was used meanwhile (or expired, or was bound elsewhere).
    #[error("claim {0} was used meanwhile or no longer qualifies")]
    ClaimSpent(String),
    #[error("device table throttled the request")]
    Throttled,
    #[error("device table unavailable: {0}")]
    Unavailable(String),
    #[error("device item {key} has a malformed {field}")]
    Malformed { key: String, field: &'static str },
}

impl RegistryError {
    fn from_failure(failure: Failure) -> Self {
        match failure {
            Failure::Throttled => Self::Throttled,
            Failure::Service(code) | Failure::Unavailable(code) => Self::Unavailable(code),
        }
    }
}

/// A claim certificate issued to an installer, optionally bound to one device serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRecord {
    pub certificate_id: String,
    pub issued_to: String,
    pub serial: Option<String>,
    pub issued_at: u64,
    /// When the claim certificate expires.
    pub valid_until: u64,
    /// When DynamoDB may delete the audit record (TTL).
    pub retain_until: u64,
    /// The provisioning it was spent on, if any.
    pub used: Option<ClaimUsed>,
}

/// The one provisioning a claim certificate was spent on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimUsed {
    pub certificate_id: String,
    pub serial: String,
    pub at: u64,
}

fn claim_key(certificate_id: &str) -> String {
    format!("claim#{certificate_id}")
}

/// A SIM's entries in the device table: its IMSI's, and its SIM card's if Funk named the card.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimEntries {
    pub by_imsi: Option<DeviceRecord>,
    pub by_card: Option<DeviceRecord>,
}

/// What azure-dps-register needs of the device table. Writes that decide who gets in are
/// conditional, so two concurrent requests cannot both pass.
pub trait SimRegistry: Send + Sync {
    /// The entries of the SIM with this IMSI and (if known) SIM ID.
    fn sim(
        &self,
        imsi: &str,
        sim_id: Option<&str>,
    ) -> impl Future<Output = Result<SimEntries, RegistryError>> + Send;

    /// Records a DPS registration of `imsi`, unless the SIM is blocked meanwhile.
    fn record_registration(
        &self,
        imsi: &str,
        registration: &Registration,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
}

/// What fleet-prehook needs of the device table's serials.
pub trait SerialRegistry: Send + Sync {
    fn serial(
        &self,
        serial: &str,
    ) -> impl Future<Output = Result<Option<DeviceRecord>, RegistryError>> + Send;

    /// Records a fleet provisioning as pending, if the serial's entry is still allowed and
    /// still in the state `write.replaces` describes (else `Conflict`), and spends the claim in
    /// the same transaction if it is still unused, valid and not bound elsewhere (else
    /// `ClaimSpent`).
    fn record_provisioning(
        &self,
        write: &ProvisioningWrite,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;
}

/// The claims claim-issuer issued: it records them, fleet-prehook reads them.
pub trait ClaimLog: Send + Sync {
    /// Records an issued claim certificate (expires with the `expires_at` TTL); a certificate
    /// id is recorded once.
    fn record_claim(
        &self,
        claim: &ClaimRecord,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    fn claim(
        &self,
        certificate_id: &str,
    ) -> impl Future<Output = Result<Option<ClaimRecord>, RegistryError>> + Send;
}

/// The DynamoDB adapter.
#[derive(Clone, Debug)]
pub struct DynamoRegistry {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

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
        // Allowed and within its validity, whatever the case.
        let qualifies =
            "#status = :allowed AND (attribute_not_exists(valid_until) OR valid_until > :now)";
        let mut values = HashMap::from([
            (":allowed".to_owned(), s(DeviceStatus::Allowed.as_str())),
            (":now".to_owned(), n(w.at)),
        ]);
        let names = HashMap::from([("#status".to_owned(), "status".to_owned())]);
        let (condition, replaced) = match &w.replaces {
            Replaces::Itself => {
                values.insert(":cert".into(), s(&w.certificate_id));
                let check = ConditionCheck::builder()
                    .table_name(&self.table)
                    .key(KEY_ATTRIBUTE, s(key))
                    .condition_expression(format!("{qualifies} AND certificate_id = :cert"))
                    .set_expression_attribute_names(Some(names))
                    .set_expression_attribute_values(Some(values))
                    .build()
                    .map_err(not_built)?;
                return Ok(TransactWriteItem::builder().condition_check(check).build());
            }
            Replaces::Nothing => (
                format!(
                    "attribute_exists(pk) AND {qualifies} AND attribute_not_exists(certificate_id)"
                ),
                None,
            ),
            Replaces::Reprovisioning { old } => {
                values.insert(":yes".into(), AttributeValue::Bool(true));
                (
                    format!("{qualifies} AND certificate_id = :old AND allow_reprovision = :yes"),
                    Some(old),
                )
            }
            Replaces::StalePending {
                old,
                pending_since_before,
            } => {
                values.insert(":before".into(), n(*pending_since_before));
                (
                    format!(
                        "{qualifies} AND certificate_id = :old AND provisioning_state = :pending \
                         AND provisioned_at <= :before"
                    ),
                    Some(old),
                )
            }
        };
        let mut set = vec![
            "certificate_id = :cert",
            "provisioned_at = :now",
            "provisioning_state = :pending",
        ];
        let mut remove = Vec::new();
        values.insert(":cert".into(), s(&w.certificate_id));
        values.insert(":pending".into(), s(ProvisioningState::Pending.as_str()));
        match &w.claim_certificate_id {
            Some(claim) => {
                set.push("claim_certificate_id = :claim");
                values.insert(":claim".into(), s(claim));
            }
            None => remove.push("claim_certificate_id"),
        }
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
        let update = Update::builder()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(key))
            .update_expression(expression)
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

/// A transaction item the SDK's builder refused (a required field unset): a bug, answered as
/// an unavailable table rather than a panic that would end the Lambda sandbox.
fn not_built(e: aws_sdk_dynamodb::error::BuildError) -> RegistryError {
    RegistryError::Unavailable(format!("request not built: {e}"))
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
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
        let (expression, names) = projection(match id {
            DeviceId::Sim(_) | DeviceId::SimCard(_) => SIM_ATTRIBUTES,
            DeviceId::Serial(_) => SERIAL_ATTRIBUTES,
        });
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
        out.item
            .map(|item| decode(id.clone(), &key, &item))
            .transpose()
    }

    pub async fn put(&self, record: &DeviceRecord) -> Result<(), RegistryError> {
        let key = record.id.key();
        let mut item = HashMap::from([
            (KEY_ATTRIBUTE.to_owned(), s(&key)),
            ("status".to_owned(), s(record.status.as_str())),
            (
                "allow_reprovision".to_owned(),
                AttributeValue::Bool(record.allow_reprovision),
            ),
        ]);
        if let Some(until) = record.valid_until {
            item.insert("valid_until".into(), n(until));
        }
        if !record.overrides.is_empty() {
            let map = record
                .overrides
                .iter()
                .map(|(k, v)| (k.clone(), s(v)))
                .collect();
            item.insert("overrides".into(), AttributeValue::M(map));
        }
        if let Some(r) = &record.registration {
            item.insert("registration_id".into(), s(&r.registration_id));
            item.insert("assigned_hub".into(), s(&r.assigned_hub));
            item.insert("device_id".into(), s(&r.device_id));
            item.insert("registered_at".into(), n(r.registered_at));
        }
        if let Some(p) = &record.provisioning {
            item.insert("certificate_id".into(), s(&p.certificate_id));
            if let Some(claim) = &p.claim_certificate_id {
                item.insert("claim_certificate_id".into(), s(claim));
            }
            item.insert("provisioned_at".into(), n(p.provisioned_at));
            item.insert("provisioning_state".into(), s(p.state.as_str()));
            if let Some(old) = &p.replaced_certificate_id {
                item.insert("replaced_certificate_id".into(), s(old));
            }
        }
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| write_error(&key, e))?;
        Ok(())
    }
}

impl SimRegistry for DynamoRegistry {
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
        registration: &Registration,
    ) -> Result<(), RegistryError> {
        let key = DeviceId::Sim(imsi.to_owned()).key();
        self.client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .update_expression(
                "SET registration_id = :rid, assigned_hub = :hub, device_id = :dev, \
                 registered_at = :at",
            )
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
        let reasons = err
            .as_service_error()
            .and_then(|e| match e {
                aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => {
                    Some(c.cancellation_reasons().to_vec())
                }
                _ => None,
            });
        match reasons {
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
        let (expression, names) = projection(CLAIM_ATTRIBUTES);
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&claim_key(certificate_id)))
            .projection_expression(expression)
            .set_expression_attribute_names(Some(names))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| RegistryError::from_failure(classify(&e)))?;
        out.item
            .map(|item| decode_claim(certificate_id, &item))
            .transpose()
    }
}

fn decode_claim(
    certificate_id: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<ClaimRecord, RegistryError> {
    let key = claim_key(certificate_id);
    let malformed = |field| RegistryError::Malformed {
        key: key.clone(),
        field,
    };
    let number = |field: &'static str| match item.get(field) {
        Some(AttributeValue::N(v)) => v.parse::<u64>().map_err(|_| malformed(field)),
        _ => Err(malformed(field)),
    };
    let issued_to = match item.get("issued_to") {
        Some(AttributeValue::S(v)) => v.clone(),
        _ => return Err(malformed("issued_to")),
    };
    let text = |field: &'static str| match item.get(field) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::S(v)) => Ok(Some(v.clone())),
        Some(_) => Err(malformed(field)),
    };
    let serial = text("serial")?;
    let used = match text("used_by_certificate")? {
        Some(certificate_id) => Some(ClaimUsed {
            certificate_id,
            serial: text("used_for_serial")?.unwrap_or_default(),
            at: number("used_at")?,
        }),
        None => None,
    };
    Ok(ClaimRecord {
        certificate_id: certificate_id.to_owned(),
        issued_to,
        serial,
        issued_at: number("issued_at")?,
        valid_until: number("valid_until")?,
        retain_until: number("expires_at")?,
        used,
    })
}

fn decode(
    id: DeviceId,
    key: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<DeviceRecord, RegistryError> {
    let malformed = |field| RegistryError::Malformed {
        key: key.to_owned(),
        field,
    };
    let text = |field: &'static str| -> Result<Option<String>, RegistryError> {
        match item.get(field) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::S(v)) => Ok(Some(v.clone())),
            Some(_) => Err(malformed(field)),
        }
    };
    let number = |field: &'static str| -> Result<Option<u64>, RegistryError> {
        match item.get(field) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(v)) => v.parse().map(Some).map_err(|_| malformed(field)),
            Some(_) => Err(malformed(field)),
        }
    };
    // Deny by default: an unknown status value is a blocked device, not an allowed one. No
    // status at all is an item nobody listed (see `DeviceStatus::Unlisted`).
    let status = match text("status")?.as_deref() {
        Some("allowed") => DeviceStatus::Allowed,
        None | Some("unlisted") => DeviceStatus::Unlisted,
        Some(_) => DeviceStatus::Blocked,
    };
    let allow_reprovision = match item.get("allow_reprovision") {
        None | Some(AttributeValue::Null(_)) => false,
        Some(AttributeValue::Bool(b)) => *b,
        Some(_) => return Err(malformed("allow_reprovision")),
    };
    let overrides = match item.get("overrides") {
        None | Some(AttributeValue::Null(_)) => BTreeMap::new(),
        Some(AttributeValue::M(m)) => m
            .iter()
            .map(|(k, v)| match v {
                AttributeValue::S(v) => Ok((k.clone(), v.clone())),
                _ => Err(malformed("overrides")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(malformed("overrides")),
    };
    let registration = match (
        text("registration_id")?,
        text("assigned_hub")?,
        text("device_id")?,
        number("registered_at")?,
    ) {
        (Some(registration_id), Some(assigned_hub), Some(device_id), Some(registered_at)) => {
            Some(Registration {
                registration_id,
                assigned_hub,
                device_id,
                registered_at,
            })
        }
        _ => None,
    };
    let provisioning = match (text("certificate_id")?, number("provisioned_at")?) {
        (Some(certificate_id), Some(provisioned_at)) => Some(Provisioning {
            certificate_id,
            claim_certificate_id: text("claim_certificate_id")?,
            provisioned_at,
            // Deny by default: anything but `pending` cannot be replaced without the operator.
            state: match text("provisioning_state")?.as_deref() {
                Some("pending") => ProvisioningState::Pending,
                _ => ProvisioningState::Confirmed,
            },
            replaced_certificate_id: text("replaced_certificate_id")?,
        }),
        _ => None,
    };
    Ok(DeviceRecord {
        id,
        status,
        valid_until: number("valid_until")?,
        allow_reprovision,
        overrides,
        registration,
        provisioning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_device_has_its_own_keys() {
        // The same identifier as an IMSI, a SIM ID and a serial: three different items.
        let mut keys = std::collections::HashSet::new();
        for id in [
            DeviceId::Sim("123".into()),
            DeviceId::SimCard("123".into()),
            DeviceId::Serial("123".into()),
        ] {
            assert!(keys.insert(id.key()), "{id:?} shares its key");
        }
    }

    #[test]
    fn an_item_without_status_is_unlisted_not_blocked_nor_allowed() {
        let item = HashMap::from([("registration_id".to_owned(), s("440103123456789"))]);
        let record = decode(DeviceId::Sim("1".into()), "sim#1", &item).unwrap();
        assert_eq!(record.status, DeviceStatus::Unlisted);
        assert_eq!(record.refusal(0), Some(EntryRefusal::Unlisted));
    }

    #[test]
    fn unknown_status_is_blocked() {
        let item = HashMap::from([("status".to_owned(), s("ALLOWED"))]);
        let record = decode(DeviceId::Sim("1".into()), "sim#1", &item).unwrap();
        assert_eq!(record.refusal(0), Some(EntryRefusal::Blocked));
    }

    #[test]
    fn expiry_refuses_at_and_after_the_limit() {
        let mut record = DeviceRecord::allowed(DeviceId::Serial("a".into()));
        record.valid_until = Some(100);
        assert_eq!(record.refusal(99), None);
        assert_eq!(record.refusal(100), Some(EntryRefusal::Expired));
    }

    #[test]
    fn wrong_attribute_type_is_malformed() {
        let item = HashMap::from([
            ("status".to_owned(), s("allowed")),
            ("valid_until".to_owned(), s("tomorrow")),
        ]);
        assert_eq!(
            decode(DeviceId::Sim("1".into()), "sim#1", &item).unwrap_err(),
            RegistryError::Malformed {
                key: "sim#1".into(),
                field: "valid_until"
            }
        );
    }
}
