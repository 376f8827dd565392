//! What operators do to the device table (the `provisioning-admin` CLI): list and unlist
//! devices without losing what the functions recorded on them, read the table whole, and
//! import thousands of entries in batches.
//!
//! No function calls this: their IAM policies allow none of it (no `Scan`, no batch writes).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, PutRequest, WriteRequest};

use super::item::{decode, decode_claim, encode, n, projection, s};
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

/// Items per BatchWriteItem (DynamoDB's limit) and keys per BatchGetItem.
const WRITE_BATCH: usize = 25;
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
        self.client
            .update_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, s(&key))
            .update_expression(expression)
            .expression_attribute_names("#status", "status")
            .set_expression_attribute_values(Some(values))
            .send()
            .await
            .map_err(|e| RegistryError::from_failure(classify(&e)))?;
        Ok(())
    }

    /// Every device of `kind`, in key order. A whole-table scan: an operator's tool, not a
    /// function's path.
    pub async fn devices(&self, kind: Kind) -> Result<Vec<DeviceRecord>, RegistryError> {
        let mut records = Vec::new();
        for item in self.scan(kind.prefixes()).await? {
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
        for item in self.scan(&["claim#"]).await? {
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

    async fn scan(
        &self,
        prefixes: &[&str],
    ) -> Result<Vec<HashMap<String, AttributeValue>>, RegistryError> {
        let (expression, mut names) = projection(&listing_attributes());
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

    /// Writes new entries (devices with no item yet: a put replaces a whole item) in batches of
    /// 25, retrying what DynamoDB leaves unprocessed. `written` is told after each batch how
    /// many entries are in the table so far, for progress and for saying how far an error
    /// got.
    pub async fn put_new(
        &self,
        records: &[DeviceRecord],
        mut written: impl FnMut(usize),
    ) -> Result<(), RegistryError> {
        let mut done = 0;
        for chunk in records.chunks(WRITE_BATCH) {
            let requests: Vec<WriteRequest> = chunk
                .iter()
                .map(|r| {
                    PutRequest::builder()
                        .set_item(Some(encode(r)))
                        .build()
                        .map(|put| WriteRequest::builder().put_request(put).build())
                        .map_err(not_built)
                })
                .collect::<Result<_, _>>()?;
            write_all(requests, |batch| async move {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, batch)
                    .send()
                    .await
                    .map_err(|e| RegistryError::from_failure(classify(&e)))?;
                Ok(out
                    .unprocessed_items
                    .unwrap_or_default()
                    .remove(&self.table)
                    .unwrap_or_default())
            })
            .await?;
            done += chunk.len();
            written(done);
        }
        Ok(())
    }
}

/// Sends `requests`, then what each answer leaves unprocessed, until nothing is left or
/// [`UNPROCESSED_ROUNDS`] rounds have passed (then `Throttled`: the caller says how far it got).
async fn write_all<F, Fut>(
    mut requests: Vec<WriteRequest>,
    mut send: F,
) -> Result<(), RegistryError>
where
    F: FnMut(Vec<WriteRequest>) -> Fut,
    Fut: Future<Output = Result<Vec<WriteRequest>, RegistryError>>,
{
    let mut round = 0;
    while !requests.is_empty() {
        if round > 0 {
            pause(round).await?;
        }
        round += 1;
        requests = send(requests).await?;
    }
    Ok(())
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

    fn put(i: u32) -> WriteRequest {
        let item = HashMap::from([(KEY_ATTRIBUTE.to_owned(), n(u64::from(i)))]);
        WriteRequest::builder()
            .put_request(PutRequest::builder().set_item(Some(item)).build().unwrap())
            .build()
    }

    #[tokio::test(start_paused = true)]
    async fn unprocessed_items_are_sent_again_until_none_is_left() {
        let mut sent = Vec::new();
        let result = write_all((0..25).map(put).collect(), |batch| {
            sent.push(batch.len());
            // DynamoDB throttles part of each batch: the last 10, then 3, then none.
            let left = match sent.len() {
                1 => batch[15..].to_vec(),
                2 => batch[7..].to_vec(),
                _ => Vec::new(),
            };
            async move { Ok(left) }
        })
        .await;
        assert_eq!(result, Ok(()));
        assert_eq!(sent, vec![25, 10, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_table_that_never_takes_the_rest_is_throttling() {
        let mut rounds = 0;
        let result = write_all(vec![put(1)], |batch| {
            rounds += 1;
            async move { Ok(batch) }
        })
        .await;
        assert_eq!(result, Err(RegistryError::Throttled));
        assert_eq!(rounds, UNPROCESSED_ROUNDS);
    }

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
