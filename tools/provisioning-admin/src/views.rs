//! What each command shows of the table's records. Times are RFC 3339 (UTC); nothing secret is
//! ever here (the registry does not even read an individual device key).

use serde_json::{json, Value};
use shared::registry::{
    CertificateIssue, ClaimRecord, DeviceId, DeviceRecord, DeviceStatus, Listing, ProvisioningState,
};

use crate::dates;
use crate::output::Rows;

fn time(unix: Option<u64>) -> Value {
    unix.map_or(Value::Null, |t| json!(dates::format(t)))
}

fn text(value: Option<&str>) -> Value {
    value.map_or(Value::Null, |v| json!(v))
}

/// How a listing reads after `allow`/`block`.
pub fn describe(listing: &Listing) -> String {
    let mut text = listing.status.as_str().to_owned();
    if let Some(until) = listing.valid_until {
        text.push_str(&format!(" until {}", dates::format(until)));
    }
    if listing.allow_reprovision {
        text.push_str(", one re-provisioning allowed");
    }
    text
}

const SIM_COLUMNS: &[&str] = &[
    "imsi",
    "sim_id",
    "status",
    "valid_until",
    "registered_at",
    "device_id",
    "assigned_hub",
];

pub fn sims<'a>(records: impl IntoIterator<Item = &'a DeviceRecord>) -> Rows {
    let mut rows = Rows::new(SIM_COLUMNS);
    for r in records {
        let (imsi, sim_id) = match &r.id {
            DeviceId::Sim(imsi) => (Some(imsi.as_str()), None),
            DeviceId::SimCard(id) => (None, Some(id.as_str())),
            DeviceId::Serial(_) => continue,
        };
        let registration = r.registration.as_ref();
        rows.push(vec![
            text(imsi),
            text(sim_id),
            json!(r.status.as_str()),
            time(r.valid_until),
            time(registration.map(|g| g.registered_at)),
            text(registration.map(|g| g.device_id.as_str())),
            text(registration.map(|g| g.assigned_hub.as_str())),
        ]);
    }
    rows
}

const SERIAL_COLUMNS: &[&str] = &[
    "serial",
    "status",
    "valid_until",
    "allow_reprovision",
    "certificate_id",
    "provisioning_state",
    "provisioned_at",
    "claim_certificate_id",
    "replaced_certificate_id",
];

pub fn serials<'a>(records: impl IntoIterator<Item = &'a DeviceRecord>) -> Rows {
    let mut rows = Rows::new(SERIAL_COLUMNS);
    for r in records {
        let DeviceId::Serial(serial) = &r.id else {
            continue;
        };
        let p = r.provisioning.as_ref();
        rows.push(vec![
            json!(serial),
            json!(r.status.as_str()),
            time(r.valid_until),
            json!(r.allow_reprovision),
            text(p.map(|p| p.certificate_id.as_str())),
            text(p.map(|p| match p.state {
                ProvisioningState::Pending => "pending",
                ProvisioningState::Confirmed => "confirmed",
            })),
            time(p.map(|p| p.provisioned_at)),
            text(p.and_then(|p| p.claim_certificate_id.as_deref())),
            text(p.and_then(|p| p.replaced_certificate_id.as_deref())),
        ]);
    }
    rows
}

const CLAIM_COLUMNS: &[&str] = &[
    "certificate_id",
    "issued_to",
    "serial",
    "issued_at",
    "valid_until",
    "used_at",
    "used_for_serial",
    "used_by_certificate",
];

pub fn claims<'a>(claims: impl IntoIterator<Item = &'a ClaimRecord>) -> Rows {
    let mut rows = Rows::new(CLAIM_COLUMNS);
    for c in claims {
        let used = c.used.as_ref();
        rows.push(vec![
            json!(c.certificate_id),
            json!(c.issued_to),
            text(c.serial.as_deref()),
            time(Some(c.issued_at)),
            time(Some(c.valid_until)),
            time(used.map(|u| u.at)),
            text(used.map(|u| u.serial.as_str())),
            text(used.map(|u| u.certificate_id.as_str())),
        ]);
    }
    rows
}

const CERTIFICATE_COLUMNS: &[&str] = &[
    "imsi",
    "registration_id",
    "serial",
    "fingerprint",
    "issued_at",
    "expires_at",
];

/// The device certificates still valid, as the device table lists them.
pub fn certificates<'a>(issued: impl IntoIterator<Item = &'a CertificateIssue>) -> Rows {
    let mut rows = Rows::new(CERTIFICATE_COLUMNS);
    for c in issued {
        rows.push(vec![
            json!(c.imsi),
            json!(c.registration_id),
            json!(c.serial),
            json!(c.fingerprint),
            time(Some(c.issued_at)),
            time(Some(c.expires_at)),
        ]);
    }
    rows
}

const REGISTRATION_COLUMNS: &[&str] = &[
    "registered_at",
    "imsi",
    "status",
    "registration_id",
    "device_id",
    "assigned_hub",
    "cert_serial",
    "cert_expires_at",
];

/// The SIMs' last DPS registrations at or after `since`, oldest first. A SIM blocked since
/// still shows (with its status): its identity may still exist in IoT Hub.
pub fn registrations(records: &[DeviceRecord], since: u64) -> Rows {
    let mut found: Vec<(&DeviceRecord, u64)> = records
        .iter()
        .filter(|r| matches!(r.id, DeviceId::Sim(_)))
        .filter_map(|r| r.registration.as_ref().map(|g| (r, g.registered_at)))
        .filter(|(_, at)| *at >= since)
        .collect();
    found.sort_by_key(|(r, at)| (*at, r.id.key()));
    let mut rows = Rows::new(REGISTRATION_COLUMNS);
    for (r, at) in found {
        let (DeviceId::Sim(imsi), Some(g)) = (&r.id, &r.registration) else {
            continue;
        };
        let status = match r.status {
            DeviceStatus::Unlisted => "unlisted",
            other => other.as_str(),
        };
        rows.push(vec![
            time(Some(at)),
            json!(imsi),
            json!(status),
            json!(g.registration_id),
            json!(g.device_id),
            json!(g.assigned_hub),
            // X.509 devices: which certificate, and when it must be renewed.
            text(g.certificate.as_ref().map(|c| c.serial.as_str())),
            time(g.certificate.as_ref().map(|c| c.expires_at)),
        ]);
    }
    rows
}
