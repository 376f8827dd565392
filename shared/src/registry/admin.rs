//! What operators do to the device table (the `provisioning-admin` CLI): list and unlist
//! devices without losing what the functions recorded on them, read the table whole, and
//! import thousands of entries. An import's writes are conditional on what its
//! plan read: a function or SORACOM's event that wrote an item meanwhile (a block) is never
//! overwritten.
//!
//! No function calls this: their IAM policies allow none of it (no `Scan`, no batch writes).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};

use super::item::{decode, decode_certificate, decode_claim, encode, n, projection, s};
use super::*;
use crate::aws::classify;

/// The kinds of item an operator lists, by key prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `sim#` and `simid#` items.
    Sims,
    Serials,
}

impl Kind {
    fn prefixes(self) -> &'static [&'static str] {
        match self {
            Self::Sims => &["sim#", "simid#"],
            Self::Serials => &["serial#"],
        }
    }
}

/// How an operator lists a device: the part of its item that is theirs. Everything the
/// functions recorded on the item (registrations, certificates) is left as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub status: DeviceStatus,
    /// `None` removes an earlier limit.
    pub valid_until: Option<u64>,
    /// Serials only: one certificate may replace the recorded one (consumed by that one).
    pub allow_reprovision: bool,
}

impl Listing {
    /// Whether `record` is listed exactly so already (an import leaves it untouched).
    pub fn matches(&self, record: &DeviceRecord) -> bool {
        record.status == self.status
            && record.valid_until == self.valid_until
            && record.allow_reprovision == self.allow_reprovision
    }
}

/// Conditional puts in flight at once, and keys per BatchGetItem (DynamoDB's limit).
const WRITE_BATCH: usize = 32;
const READ_BATCH: usize = 100;
/// Rounds of retrying what DynamoDB left unprocessed (throttling), with growing pauses.
const UNPROCESSED_ROUNDS: u32 = 8;

/// Everything an operator's tool may show: what the functions read and write, never the
/// individual device key (`device_key` is not even read).
fn listing_attributes() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = SIM_ATTRIBUTES
        .iter()
        .chain(SERIAL_ATTRIBUTES)
        .chain(CLAIM_ATTRIBUTES)
        .copied()
        .collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The device an item key names, if it is a device's.
pub fn device_id(key: &str) -> Option<DeviceId> {
    let (prefix, rest) = key.split_once('#')?;
    let rest = rest.to_owned();
    match prefix {
        "sim" => Some(DeviceId::Sim(rest)),
        "simid" => Some(DeviceId::SimCard(rest)),
        "serial" => Some(DeviceId::Serial(rest)),
        _ => None,
    }
}

impl DynamoRegistry {
    /// Lists `id` as `listing`, creating its item if there is none and keeping whatever the
    /// functions recorded on it. A SIM's registration stays (so a device allowed again is
    /// answered from its record); a serial's certificate stays (so `allow_reprovision` is what
    /// lets a new one replace it).
    pub async fn list_device(&self, id: &DeviceId, listing: &Listing) -> Result<(), RegistryError> {
        self.list_device_if(id, listing, None).await.map(|_| ())
    }

    /// [`list_device`](Self::list_device), only while the item's status is still `seen` (what
    /// an import's plan read): `false`, and nothing written, if it changed meanwhile.
    pub async fn list_device_if(
        &self,
        id: &DeviceId,
        listing: &Listing,
        seen: Option<DeviceStatus>,
    ) -> Result<bool, RegistryError> {
        let key = id.key();
        let mut set = vec!["#status = :status"];
        // The operator's word replaces SORACOM's: a SIM the operator lists is never unblocked
        // (or re-blocked on its own) by a lifecycle event's mark.
        let mut remove = vec!["blocked_by", super::lifecycle::PRIOR_ATTRIBUTE];
        let mut values = HashMap::from([(":status".to_owned(), s(listing.status.as_str()))]);
        match listing.valid_until {
            Some(until) => {
                set.push("valid_until = :until");
                values.insert(":until".into(), n(until));
            }
            None => remove.push("valid_until"),
        }
        if matches!(id, DeviceId::Serial(_)) {
            if listing.allow_reprovision {
                set.push("allow_reprovision = :yes");
                values.insert(":yes".into(), AttributeValue::Bool(true));
            } else {
                remove.push("allow_reprovision");
            }
        }
        let mut expression = format!("SET {}", set.join(", "));
        if !remove.is_empty() {
            expression.push_str(&format!(" REMOVE {}", remove.join(", ")));
        }
        let condition = seen.map(|seen| {
            values.insert(":seen".into(), s(seen.as_str()));
            match seen {
                DeviceStatus::Unlisted => {
                    "attribute_exists(pk) AND (attribute_not_exists(#status) OR #status = :seen)"
                }
                _ => "#status = :seen",
            }
        });
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .update_expression(expression)
            .set_condition_expression(condition.map(str::to_owned))
            .expression_attribute_names("#status", "status")
            .set_expression_attribute_values(Some(values))
            .send()
            .await;
        crate::aws::conditional(result).map_err(RegistryError::from_failure)
    }

    /// Every device of `kind`, in key order. A whole-table scan: an operator's tool, not a
    /// function's path.
    pub async fn devices(&self, kind: Kind) -> Result<Vec<DeviceRecord>, RegistryError> {
        let mut records = Vec::new();
        for item in self.scan(kind.prefixes(), &listing_attributes()).await? {
            let Some(AttributeValue::S(key)) = item.get(KEY_ATTRIBUTE) else {
                continue;
            };
            if let Some(id) = device_id(key) {
                records.push(decode(id, key, &item)?);
            }
        }
        records.sort_by_key(|r| r.id.key());
        Ok(records)
    }

    /// Every claim certificate claim-issuer recorded (and the TTL has not yet removed), oldest
    /// first.
    pub async fn claims(&self) -> Result<Vec<ClaimRecord>, RegistryError> {
        let mut claims = Vec::new();
        for item in self.scan(&["claim#"], &listing_attributes()).await? {
            if let Some(AttributeValue::S(key)) = item.get(KEY_ATTRIBUTE) {
                if let Some(id) = key.strip_prefix("claim#") {
                    claims.push(decode_claim(id, &item)?);
                }
            }
        }
        claims.sort_by(|a, b| {
            (a.issued_at, &a.certificate_id).cmp(&(b.issued_at, &b.certificate_id))
        });
        Ok(claims)
    }

    /// Every device certificate recorded as issued and not yet expired (the TTL removes the
    /// rest, within a day or two of their expiry), by IMSI and then by issue time.
    pub async fn certificates(&self, now: u64) -> Result<Vec<CertificateIssue>, RegistryError> {
        let mut issued = Vec::new();
        for item in self.scan(&["cert#"], CERTIFICATE_ATTRIBUTES).await? {
            if let Some(AttributeValue::S(key)) = item.get(KEY_ATTRIBUTE) {
                if let Some(serial) = key.strip_prefix("cert#") {
                    let issue = decode_certificate(serial, &item)?;
                    if issue.expires_at > now {
                        issued.push(issue);
                    }
                }
            }
        }
        issued.sort_by(|a, b| (&a.imsi, a.issued_at).cmp(&(&b.imsi, b.issued_at)));
        Ok(issued)
    }

    async fn scan(
        &self,
        prefixes: &[&str],
        attributes: &[&str],
    ) -> Result<Vec<HashMap<String, AttributeValue>>, RegistryError> {
        let (expression, mut names) = projection(attributes);
        names.insert("#key".into(), KEY_ATTRIBUTE.into());
        let filter = (0..prefixes.len())
            .map(|i| format!("begins_with(#key, :prefix{i})"))
            .collect::<Vec<_>>()
            .join(" OR ");
        let values: HashMap<String, AttributeValue> = prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| (format!(":prefix{i}"), s(p)))
            .collect();
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table)
                .projection_expression(&expression)
                .filter_expression(&filter)
                .set_expression_attribute_names(Some(names.clone()))
                .set_expression_attribute_values(Some(values.clone()))
                .set_exclusive_start_key(start.take())
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| RegistryError::from_failure(classify(&e)))?;
            items.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(items),
            }
        }
    }

    /// The current items of `ids` (absent ones are not in the map), read in batches of 100.
    pub async fn existing(
        &self,
        ids: &[DeviceId],
    ) -> Result<HashMap<String, DeviceRecord>, RegistryError> {
        let (expression, names) = projection(&listing_attributes());
        // BatchGetItem refuses a request that names a key twice.
        let mut seen = std::collections::HashSet::new();
        let ids: Vec<&DeviceId> = ids.iter().filter(|id| seen.insert(id.key())).collect();
        let mut found = HashMap::new();
        for chunk in ids.chunks(READ_BATCH) {
            let mut keys: Vec<HashMap<String, AttributeValue>> = chunk
                .iter()
                .map(|id| HashMap::from([(KEY_ATTRIBUTE.to_owned(), s(&id.key()))]))
                .collect();
            let mut round = 0;
            while !keys.is_empty() {
                if round > 0 {
                    pause(round).await?;
                }
                round += 1;
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut keys)))
                    .projection_expression(&expression)
                    .set_expression_attribute_names(Some(names.clone()))
                    .consistent_read(true)
                    .build()
                    .map_err(not_built)?;
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(|e| RegistryError::from_failure(classify(&e)))?;
                for item in out
                    .responses
                    .unwrap_or_default()
                    .remove(&self.table)
                    .unwrap_or_default()
                {
                    if let Some(AttributeValue::S(key)) = item.get(KEY_ATTRIBUTE) {
                        if let Some(id) = device_id(key) {
                            found.insert(key.clone(), decode(id, key, &item)?);
                        }
                    }
                }
                keys = out
                    .unprocessed_keys
                    .unwrap_or_default()
                    .remove(&self.table)
                    .map(|k| k.keys)
                    .unwrap_or_default();
            }
        }
        Ok(found)
    }

    /// Writes new entries, each only if its device still has no item (a put replaces a whole
    /// item, and SORACOM's event or a function may have written one since the plan read the
    /// table): `WRITE_BATCH` conditional puts in flight at once (a batch write cannot carry a
    /// condition; a transaction of them copies moto's whole table and costs real DynamoDB
    /// twice). Returns the keys that had an item by then, which are left as they are.
    /// `written` is told after each batch how many entries are in the table so far, for
    /// progress and for saying how far an error got (every put of a batch that went through
    /// is counted).
    pub async fn put_new(
        &self,
        records: &[DeviceRecord],
        mut written: impl FnMut(usize),
    ) -> Result<Vec<String>, RegistryError> {
        let mut done = 0;
        let mut taken = Vec::new();
        for chunk in records.chunks(WRITE_BATCH) {
            let mut puts = tokio::task::JoinSet::new();
            for (i, record) in chunk.iter().enumerate() {
                let put = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(encode(record)))
                    .condition_expression("attribute_not_exists(pk)");
                puts.spawn(async move { (i, crate::aws::conditional(put.send().await)) });
            }
            let mut failure = None;
            let mut taken_here = Vec::new();
            while let Some(joined) = puts.join_next().await {
                let (i, result) = joined
                    .map_err(|e| RegistryError::Unavailable(format!("a write task ended: {e}")))?;
                match result {
                    Ok(true) => done += 1,
                    Ok(false) => taken_here.push(i),
                    Err(e) => {
                        failure.get_or_insert(RegistryError::from_failure(e));
                    }
                }
            }
            taken_here.sort_unstable();
            taken.extend(taken_here.into_iter().map(|i| chunk[i].id.key()));
            written(done);
            if let Some(failure) = failure {
                return Err(failure);
            }
        }
        Ok(taken)
    }
}

/// The pause before retry round `round` (1-based): 100 ms doubling to 3.2 s, as DynamoDB asks
/// of unprocessed items; past the last round the table is throttling for real.
async fn pause(round: u32) -> Result<(), RegistryError> {
    if round >= UNPROCESSED_ROUNDS {
        return Err(RegistryError::Throttled);
    }
    tokio::time::sleep(Duration::from_millis(50 << round.min(6))).await;
    Ok(())
}

fn not_built(e: aws_sdk_dynamodb::error::BuildError) -> RegistryError {
    RegistryError::Unavailable(format!("request not built: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_keys_name_their_devices() {
        for id in [
            DeviceId::Sim("440103123456789".into()),
            DeviceId::SimCard("8942310000000000000".into()),
            DeviceId::Serial("SN-1#odd".into()),
        ] {
            assert_eq!(device_id(&id.key()), Some(id));
        }
        assert_eq!(device_id("claim#abc"), None);
        assert_eq!(device_id("rate#dps#1"), None);
    }

    #[test]
    fn the_tool_never_reads_an_individual_key() {
        assert!(!listing_attributes().contains(&DEVICE_KEY_ATTRIBUTE));
    }
}
