//! The device table's item shapes: how records become attribute maps and back. Only the
//! DynamoDB adapter uses this; nothing outside the registry knows an attribute name.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;

use super::{
    certificate_key, claim_key, CertificateIssue, ClaimRecord, ClaimUsed, DeviceId, DeviceRecord,
    DeviceStatus, IssuedCertificate, Provisioning, ProvisioningState, Registration, RegistryError,
    KEY_ATTRIBUTE,
};

pub(super) fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

pub(super) fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A projection of `attributes` with every name aliased (`status` is a reserved word).
pub(super) fn projection(attributes: &[&str]) -> (String, HashMap<String, String>) {
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

/// One item's attributes, read by type: absent (or NULL) is `None`, a present attribute of
/// another type is `Malformed`, never a default that could let a device in.
struct Attributes<'a> {
    key: &'a str,
    item: &'a HashMap<String, AttributeValue>,
}

impl Attributes<'_> {
    fn malformed(&self, field: &'static str) -> RegistryError {
        RegistryError::Malformed {
            key: self.key.to_owned(),
            field,
        }
    }

    fn get(&self, field: &str) -> Option<&AttributeValue> {
        self.item
            .get(field)
            .filter(|v| !matches!(v, AttributeValue::Null(_)))
    }

    fn text(&self, field: &'static str) -> Result<Option<String>, RegistryError> {
        match self.get(field) {
            None => Ok(None),
            Some(AttributeValue::S(v)) => Ok(Some(v.clone())),
            Some(_) => Err(self.malformed(field)),
        }
    }

    fn number(&self, field: &'static str) -> Result<Option<u64>, RegistryError> {
        match self.get(field) {
            None => Ok(None),
            Some(AttributeValue::N(v)) => v.parse().map(Some).map_err(|_| self.malformed(field)),
            Some(_) => Err(self.malformed(field)),
        }
    }

    fn flag(&self, field: &'static str) -> Result<bool, RegistryError> {
        match self.get(field) {
            None => Ok(false),
            Some(AttributeValue::Bool(b)) => Ok(*b),
            Some(_) => Err(self.malformed(field)),
        }
    }

    fn text_map(&self, field: &'static str) -> Result<BTreeMap<String, String>, RegistryError> {
        match self.get(field) {
            None => Ok(BTreeMap::new()),
            Some(AttributeValue::M(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    AttributeValue::S(v) => Ok((k.clone(), v.clone())),
                    _ => Err(self.malformed(field)),
                })
                .collect(),
            Some(_) => Err(self.malformed(field)),
        }
    }

    fn required<T>(
        &self,
        field: &'static str,
        value: Result<Option<T>, RegistryError>,
    ) -> Result<T, RegistryError> {
        value?.ok_or_else(|| self.malformed(field))
    }
}

pub(super) fn decode(
    id: DeviceId,
    key: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<DeviceRecord, RegistryError> {
    let a = Attributes { key, item };
    // No status at all is an item nobody listed (see `DeviceStatus::Unlisted`).
    let status = a
        .text("status")?
        .as_deref()
        .map_or(DeviceStatus::Unlisted, DeviceStatus::parse);
    Ok(DeviceRecord {
        id,
        status,
        valid_until: a.number("valid_until")?,
        allow_reprovision: a.flag("allow_reprovision")?,
        overrides: a.text_map("overrides")?,
        registration: registration(&a)?,
        provisioning: provisioning(&a)?,
    })
}

/// The certificate of an X.509 registration, if all of it is recorded.
fn issued_certificate(a: &Attributes) -> Result<Option<IssuedCertificate>, RegistryError> {
    Ok(
        match (
            a.text("cert_serial")?,
            a.text("cert_fingerprint")?,
            a.number("cert_expires_at")?,
        ) {
            (Some(serial), Some(fingerprint), Some(expires_at)) => Some(IssuedCertificate {
                serial,
                fingerprint,
                expires_at,
            }),
            _ => None,
        },
    )
}

/// The last DPS registration, if all of it is recorded.
fn registration(a: &Attributes) -> Result<Option<Registration>, RegistryError> {
    Ok(
        match (
            a.text("registration_id")?,
            a.text("assigned_hub")?,
            a.text("device_id")?,
            a.number("registered_at")?,
        ) {
            (Some(registration_id), Some(assigned_hub), Some(device_id), Some(registered_at)) => {
                Some(Registration {
                    registration_id,
                    assigned_hub,
                    device_id,
                    registered_at,
                    key_fingerprint: a.text("key_fingerprint")?,
                    return_data: a.text("return_data")?,
                    certificate: issued_certificate(a)?,
                })
            }
            _ => None,
        },
    )
}

fn provisioning(a: &Attributes) -> Result<Option<Provisioning>, RegistryError> {
    let (Some(certificate_id), Some(provisioned_at)) =
        (a.text("certificate_id")?, a.number("provisioned_at")?)
    else {
        return Ok(None);
    };
    Ok(Some(Provisioning {
        certificate_id,
        claim_certificate_id: a.text("claim_certificate_id")?,
        provisioned_at,
        // Deny by default: anything but `pending` cannot be replaced without the operator.
        state: match a.text("provisioning_state")?.as_deref() {
            Some("pending") => ProvisioningState::Pending,
            _ => ProvisioningState::Confirmed,
        },
        replaced_certificate_id: a.text("replaced_certificate_id")?,
        issued_to: a.text("issued_to")?,
        confirmed_at: a.number("confirmed_at")?,
    }))
}

/// Only the provisioning of a serial's item (what fleet-confirm reads).
pub(super) fn decode_provisioning(
    key: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<Option<Provisioning>, RegistryError> {
    provisioning(&Attributes { key, item })
}

/// An issued certificate's item (`cert#<serial>`).
pub(super) fn decode_certificate(
    serial: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<CertificateIssue, RegistryError> {
    let key = certificate_key(serial);
    let a = Attributes { key: &key, item };
    let text = |field| a.required(field, a.text(field));
    let number = |field| a.required(field, a.number(field));
    Ok(CertificateIssue {
        serial: serial.to_owned(),
        fingerprint: text("fingerprint")?,
        imsi: text("imsi")?,
        registration_id: text("registration_id")?,
        issued_at: number("issued_at")?,
        expires_at: number("expires_at")?,
    })
}

pub(super) fn decode_claim(
    certificate_id: &str,
    item: &HashMap<String, AttributeValue>,
) -> Result<ClaimRecord, RegistryError> {
    let key = claim_key(certificate_id);
    let a = Attributes { key: &key, item };
    let number = |field| a.required(field, a.number(field));
    let used = match a.text("used_by_certificate")? {
        Some(certificate_id) => Some(ClaimUsed {
            certificate_id,
            serial: a.text("used_for_serial")?.unwrap_or_default(),
            at: number("used_at")?,
        }),
        None => None,
    };
    Ok(ClaimRecord {
        certificate_id: certificate_id.to_owned(),
        issued_to: a.required("issued_to", a.text("issued_to"))?,
        serial: a.text("serial")?,
        issued_at: number("issued_at")?,
        valid_until: number("valid_until")?,
        retain_until: number("expires_at")?,
        used,
    })
}

/// A whole device item, as an administrator or a test seeds it.
pub(super) fn encode(record: &DeviceRecord) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        (KEY_ATTRIBUTE.to_owned(), s(&record.id.key())),
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
        if let Some(fingerprint) = &r.key_fingerprint {
            item.insert("key_fingerprint".into(), s(fingerprint));
        }
        if let Some(data) = &r.return_data {
            item.insert("return_data".into(), s(data));
        }
        if let Some(c) = &r.certificate {
            item.insert("cert_serial".into(), s(&c.serial));
            item.insert("cert_fingerprint".into(), s(&c.fingerprint));
            item.insert("cert_expires_at".into(), n(c.expires_at));
        }
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
        if let Some(installer) = &p.issued_to {
            item.insert("issued_to".into(), s(installer));
        }
        if let Some(at) = p.confirmed_at {
            item.insert("confirmed_at".into(), n(at));
        }
    }
    item
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::EntryRefusal;

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

    #[test]
    fn a_record_survives_encoding() {
        let mut record = DeviceRecord::allowed(DeviceId::Serial("SN-1".into()));
        record.valid_until = Some(1_900_000_000);
        record.allow_reprovision = true;
        record.overrides = BTreeMap::from([("Location".to_owned(), "tokyo-1".to_owned())]);
        record.provisioning = Some(Provisioning {
            certificate_id: "c1".into(),
            claim_certificate_id: Some("claim-1".into()),
            provisioned_at: 1_800_000_000,
            state: ProvisioningState::Pending,
            replaced_certificate_id: Some("c0".into()),
            issued_to: Some("installer-sub".into()),
            confirmed_at: Some(1_800_000_060),
        });
        let item = encode(&record);
        assert_eq!(decode(record.id.clone(), "serial#SN-1", &item), Ok(record));
    }

    #[test]
    fn a_claim_without_its_issue_facts_is_malformed() {
        let item = HashMap::from([("issued_to".to_owned(), s("sub"))]);
        assert_eq!(
            decode_claim("c1", &item).unwrap_err(),
            RegistryError::Malformed {
                key: "claim#c1".into(),
                field: "issued_at"
            }
        );
    }
}
