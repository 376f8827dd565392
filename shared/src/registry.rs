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
//! | `expires_at` | N | DynamoDB TTL attribute, for records that expire (audit, rate limits) |
//!
//! Claim certificates issued by claim-issuer are recorded as `pk = claim#<certificateId>` with
//! `issued_to` (S, the installer's `sub`), `serial` (S, optional binding), `issued_at` (N),
//! `valid_until` (N, the certificate's expiry) and `expires_at` (N, TTL: end of audit retention).
//! Rate-limit counters are `pk = rate#<subject>#<window start>` with `count` (N) and
//! `expires_at` (N, TTL).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::aws::{classify, Failure};

/// Device serial numbers unless configured otherwise: letters, digits and `-_.:`, 1 to 64
/// characters, starting alphanumeric (safe in keys, topics and thing names).
pub const DEFAULT_SERIAL_PATTERN: &str = "[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}";

/// The table's partition key attribute.
pub const KEY_ATTRIBUTE: &str = "pk";

/// Which device an item describes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeviceId {
    Sim(String),
    Serial(String),
}

impl DeviceId {
    pub fn key(&self) -> String {
        match self {
            Self::Sim(imsi) => format!("sim#{imsi}"),
            Self::Serial(serial) => format!("serial#{serial}"),
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        if let Some(imsi) = key.strip_prefix("sim#") {
            Some(Self::Sim(imsi.to_owned()))
        } else {
            key.strip_prefix("serial#")
                .map(|s| Self::Serial(s.to_owned()))
        }
    }
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

/// The certificate a fleet device was provisioned with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioning {
    pub certificate_id: String,
    pub claim_certificate_id: Option<String>,
    pub provisioned_at: u64,
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
    pub fn refusal(&self, now: u64) -> Option<&'static str> {
        match self.status {
            DeviceStatus::Allowed => {}
            DeviceStatus::Blocked => return Some("blocked"),
            DeviceStatus::Unlisted => return Some("unlisted"),
        }
        if self.valid_until.is_some_and(|until| now >= until) {
            return Some("expired");
        }
        None
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    /// A conditional write lost: the item changed (blocked, or provisioned by someone else).
    #[error("device {0} changed concurrently or no longer qualifies")]
    Conflict(String),
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
}

fn claim_key(certificate_id: &str) -> String {
    format!("claim#{certificate_id}")
}

/// Reads and records devices. Writes that decide who gets in are conditional, so two
/// concurrent requests cannot both pass.
pub trait DeviceRegistry: Send + Sync {
    fn get(
        &self,
        id: &DeviceId,
    ) -> impl Future<Output = Result<Option<DeviceRecord>, RegistryError>> + Send;

    /// Creates or replaces an entry (administration, seeding, tests).
    fn put(&self, record: &DeviceRecord) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Records a DPS registration of `imsi`, unless the SIM is blocked meanwhile.
    fn record_registration(
        &self,
        imsi: &str,
        registration: &Registration,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Records a fleet provisioning of `serial` if the entry exists, is allowed, and either has
    /// no certificate yet, has this one, or allows re-provisioning. Otherwise `Conflict`.
    fn record_provisioning(
        &self,
        serial: &str,
        provisioning: &Provisioning,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Records an issued claim certificate (expires with the `expires_at` TTL).
    fn put_claim(
        &self,
        claim: &ClaimRecord,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    fn get_claim(
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

impl DeviceRegistry for DynamoRegistry {
    async fn get(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, RegistryError> {
        let key = id.key();
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            // The individual key stays out of the record: only the secret store reads it.
            .projection_expression(
                "pk, #status, valid_until, allow_reprovision, overrides, registration_id, \
                 assigned_hub, device_id, registered_at, certificate_id, claim_certificate_id, \
                 provisioned_at",
            )
            .expression_attribute_names("#status", "status")
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| RegistryError::from_failure(classify(&e)))?;
        out.item
            .map(|item| decode(id.clone(), &key, &item))
            .transpose()
    }

    async fn put(&self, record: &DeviceRecord) -> Result<(), RegistryError> {
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

    async fn record_provisioning(
        &self,
        serial: &str,
        provisioning: &Provisioning,
    ) -> Result<(), RegistryError> {
        let key = DeviceId::Serial(serial.to_owned()).key();
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .condition_expression(
                "attribute_exists(pk) AND #status = :allowed AND (attribute_not_exists(certificate_id) \
                 OR certificate_id = :cert OR allow_reprovision = :yes)",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":allowed", s(DeviceStatus::Allowed.as_str()))
            .expression_attribute_values(":cert", s(&provisioning.certificate_id))
            .expression_attribute_values(":yes", AttributeValue::Bool(true))
            .expression_attribute_values(":at", n(provisioning.provisioned_at));
        update = match &provisioning.claim_certificate_id {
            Some(claim) => update
                .update_expression(
                    "SET certificate_id = :cert, provisioned_at = :at, claim_certificate_id = :claim",
                )
                .expression_attribute_values(":claim", s(claim)),
            None => update.update_expression(
                "SET certificate_id = :cert, provisioned_at = :at REMOVE claim_certificate_id",
            ),
        };
        update.send().await.map_err(|e| write_error(&key, e))?;
        Ok(())
    }

    async fn put_claim(&self, claim: &ClaimRecord) -> Result<(), RegistryError> {
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

    async fn get_claim(&self, certificate_id: &str) -> Result<Option<ClaimRecord>, RegistryError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&claim_key(certificate_id)))
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
    let serial = match item.get("serial") {
        None | Some(AttributeValue::Null(_)) => None,
        Some(AttributeValue::S(v)) => Some(v.clone()),
        Some(_) => return Err(malformed("serial")),
    };
    Ok(ClaimRecord {
        certificate_id: certificate_id.to_owned(),
        issued_to,
        serial,
        issued_at: number("issued_at")?,
        valid_until: number("valid_until")?,
        retain_until: number("expires_at")?,
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
    fn keys_round_trip() {
        for id in [
            DeviceId::Sim("440103123456789".into()),
            DeviceId::Serial("SN-1".into()),
        ] {
            assert_eq!(DeviceId::from_key(&id.key()), Some(id));
        }
        assert_eq!(DeviceId::from_key("claim#x"), None);
    }

    #[test]
    fn an_item_without_status_is_unlisted_not_blocked_nor_allowed() {
        let item = HashMap::from([("registration_id".to_owned(), s("440103123456789"))]);
        let record = decode(DeviceId::Sim("1".into()), "sim#1", &item).unwrap();
        assert_eq!(record.status, DeviceStatus::Unlisted);
        assert_eq!(record.refusal(0), Some("unlisted"));
    }

    #[test]
    fn unknown_status_is_blocked() {
        let item = HashMap::from([("status".to_owned(), s("ALLOWED"))]);
        let record = decode(DeviceId::Sim("1".into()), "sim#1", &item).unwrap();
        assert_eq!(record.refusal(0), Some("blocked"));
    }

    #[test]
    fn expiry_refuses_at_and_after_the_limit() {
        let mut record = DeviceRecord::allowed(DeviceId::Serial("a".into()));
        record.valid_until = Some(100);
        assert_eq!(record.refusal(99), None);
        assert_eq!(record.refusal(100), Some("expired"));
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
