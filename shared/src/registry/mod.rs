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
//! | `key_fingerprint` | S | which device key that registration used (a hash, not the key) |
//! | `return_data` | S | the allocation data DPS returned with it (JSON text), if any |
//! | `cert_serial`, `cert_fingerprint` | S | X.509 attestation: the device certificate that registration was made with (hex serial, SHA-256 of its DER; never its key) |
//! | `cert_expires_at` | N | that certificate's `notAfter`, Unix time |
//! | `blocked_by` | S | `soracom:<status>` when sim-lifecycle blocked the SIM (only such a block is lifted by an event) |
//! | `certificate_id`, `claim_certificate_id` | S | certificate provisioned through fleet provisioning |
//! | `provisioned_at` | N | Unix time of that provisioning |
//! | `provisioning_state` | S | `pending` (the hook said yes; the device has not connected with it since) or `confirmed` (fleet-confirm saw its first connection) |
//! | `issued_to` | S | on a serial: the installer (`sub`) whose claim made the provisioning, if claim-issuer recorded it |
//! | `confirmed_at` | N | when the device first connected with that certificate |
//! | `replaced_certificate_id` | S | the certificate a re-provisioning replaced, until fleet-confirm set it (and any other the thing held) INACTIVE and detached it |
//! | `expires_at` | N | DynamoDB TTL attribute, for records that expire (audit, rate limits) |
//!
//! Claim certificates issued by claim-issuer are recorded as `pk = claim#<certificateId>` with
//! `issued_to` (S, the installer's `sub`), `serial` (S, optional binding), `issued_at` (N),
//! `valid_until` (N, the certificate's expiry) and `expires_at` (N, TTL: end of audit retention);
//! fleet-prehook marks it used with `used_by_certificate` (S), `used_for_serial` (S) and
//! `used_at` (N), in the same transaction that records the serial's provisioning.
//! Rate limits are `pk = rate#<scope>#<subject>` with the times of the subject's recent uses (`uses`,
//! L of N), a `version` and `expires_at` (N, TTL) (see `quota`); fleet-wide budgets are
//! `pk = budget#<name>#<window start>` with `count` (N) and `expires_at` (N, TTL). A SORACOM
//! Beam signature azure-dps-register accepted is `pk = beam#<signature>` with `expires_at`.

mod admin;
mod confirm;
mod dynamo;
mod item;
mod lifecycle;
mod once;

use std::collections::BTreeMap;
use std::future::Future;

use crate::aws::Failure;

pub use admin::{device_id, Kind, Listing};
pub use confirm::{Confirmation, Confirmations, CONFIRM_ATTRIBUTES};
pub use dynamo::DynamoRegistry;
pub use lifecycle::{Change, Lift, CARD_IMSIS_ATTRIBUTE, LIFECYCLE_ATTRIBUTES};
pub use once::{beam_key, OnceLog, ONCE_ATTRIBUTES};

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
    "key_fingerprint",
    "return_data",
    "cert_serial",
    "cert_fingerprint",
    "cert_expires_at",
    lifecycle::CARD_IMSIS_ATTRIBUTE,
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
    "issued_to",
    "confirmed_at",
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
    /// A stored status. Deny by default: an unknown value is a blocked device, not an allowed
    /// one.
    pub fn parse(text: &str) -> Self {
        match text {
            "allowed" => Self::Allowed,
            "unlisted" => Self::Unlisted,
            _ => Self::Blocked,
        }
    }

    pub fn as_str(self) -> &'static str {
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
    /// Which device key the registration was made with (`SymmetricKey::fingerprint`); `None`
    /// in records written before it was kept, which therefore never answer in DPS's place.
    pub key_fingerprint: Option<String>,
    /// The custom allocation data DPS returned (`payload`), as JSON text: a device answered
    /// from the record gets it again.
    pub return_data: Option<String>,
    /// X.509 attestation: the certificate the device was issued for this registration.
    pub certificate: Option<IssuedCertificate>,
}

/// A device certificate as the table remembers it: enough to find, audit and renew it, never
/// its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// Hex, as in the certificate.
    pub serial: String,
    /// SHA-256 of the DER, hex (IoT Hub's and DPS's thumbprint).
    pub fingerprint: String,
    /// `notAfter`, Unix time.
    pub expires_at: u64,
}

/// Whether anything confirmed that a provisioned device got its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProvisioningState {
    /// The hook said yes; AWS IoT may still have failed after it, or the device lost its new
    /// key. Another certificate may replace it once it is old enough, through a claim of the
    /// same installer.
    Pending,
    /// The device connected with the certificate (fleet-confirm saw AWS IoT's lifecycle
    /// event). Records written before the state existed read as confirmed: only
    /// `allow_reprovision` replaces them.
    Confirmed,
}

impl ProvisioningState {
    pub fn as_str(self) -> &'static str {
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
    /// The certificate this provisioning replaced, until it was retired.
    pub replaced_certificate_id: Option<String>,
    /// The installer (Cognito `sub`) the provisioning's claim was issued to, if recorded.
    pub issued_to: Option<String>,
    /// When the device first connected with the certificate.
    pub confirmed_at: Option<u64>,
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
    /// `old`, still pending (never connected), provisioned at or before
    /// `pending_since_before`, through a claim issued to the same installer as `old`'s.
    StalePending {
        old: String,
        pending_since_before: u64,
        issued_to: String,
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
    /// The installer the recorded claim was issued to, kept on the serial's item.
    pub issued_to: Option<String>,
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

/// A device certificate azure-dps-register issued (X.509 attestation), kept until it expires:
/// IoT Hub accepts every unexpired certificate the CA signed for a device id, so operators
/// must be able to see every one that may still be in use, not only the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateIssue {
    pub serial: String,
    pub fingerprint: String,
    pub imsi: String,
    pub registration_id: String,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// The item key of an issued certificate.
pub fn certificate_key(serial: &str) -> String {
    format!("cert#{serial}")
}

/// The attributes of an issued certificate's item (`expires_at` is also the table's TTL: the
/// item goes once the certificate is no longer valid).
pub const CERTIFICATE_ATTRIBUTES: &[&str] = &[
    KEY_ATTRIBUTE,
    "fingerprint",
    "imsi",
    "registration_id",
    "issued_at",
    "expires_at",
];

/// What azure-dps-register needs of the device table. Writes that decide who gets in are
/// conditional, so two concurrent requests cannot both pass.
pub trait SimRegistry: Send + Sync {
    /// The entries of the SIM with this IMSI and (if known) SIM ID.
    fn sim(
        &self,
        imsi: &str,
        sim_id: Option<&str>,
    ) -> impl Future<Output = Result<SimEntries, RegistryError>> + Send;

    /// Records a certificate issued, before it is registered or handed out (a certificate
    /// never recorded is one nobody gets).
    fn record_certificate(
        &self,
        issue: &CertificateIssue,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Records a DPS registration of `imsi`, unless the SIM is blocked meanwhile (then
    /// `Conflict`). With the SIM card's `sim_id`, the card's item lists the IMSI first, so
    /// that a card's termination finds every device registered through it.
    fn record_registration(
        &self,
        imsi: &str,
        sim_id: Option<&str>,
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
    fn expiry_refuses_at_and_after_the_limit() {
        let mut record = DeviceRecord::allowed(DeviceId::Serial("a".into()));
        record.valid_until = Some(100);
        assert_eq!(record.refusal(99), None);
        assert_eq!(record.refusal(100), Some(EntryRefusal::Expired));
    }
}
