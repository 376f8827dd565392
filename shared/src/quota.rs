//! Per-subject rate limits in the device table: a sliding window, exact.
//!
//! A fixed window lets a subject spend its whole allowance just before a window ends and again
//! just after: twice the limit in a moment. Instead each subject has one item,
//! `rate#<scope>#<subject>` (the scope names the limit, so that each function's role reaches
//! only its own limits' items), holding the times of its uses within the last window (`uses`, a list of
//! Unix seconds) and a `version`. A use reads the item, drops times older than the window,
//! refuses if the rest reach the limit, and writes the new list on the condition that the
//! version is still the one it read: of two concurrent uses, one writes and the other reads
//! again. The item expires through the table's TTL once idle for a window.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::aws::{classify, conditional, Failure};
use crate::registry::KEY_ATTRIBUTE;

/// The attributes of a rate-limit item (for the IAM policy of whoever counts).
pub const RATE_ATTRIBUTES: &[&str] = &[KEY_ATTRIBUTE, "uses", "version", "expires_at"];

/// Tries of the read-check-write before giving up on a subject hammered concurrently.
const ATTEMPTS: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed {
        remaining: u32,
    },
    /// Over the limit until the oldest use leaves the window, in this many seconds.
    Exceeded {
        retry_after: u64,
    },
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum QuotaError {
    #[error("rate-limit store throttled the request")]
    Throttled,
    #[error("rate-limit store unavailable: {0}")]
    Unavailable(String),
}

impl QuotaError {
    pub(crate) fn from_failure(failure: Failure) -> Self {
        match failure {
            Failure::Throttled => Self::Throttled,
            Failure::Service(code) | Failure::Unavailable(code) => Self::Unavailable(code),
        }
    }
}

/// The decision for one use, given the recorded uses: the new list, or when to come back.
pub fn decide(used_at: &[u64], now: u64, limit: u32, window_secs: u64) -> Result<Vec<u64>, u64> {
    let since = now.saturating_sub(window_secs);
    let mut recent: Vec<u64> = used_at.iter().copied().filter(|t| *t > since).collect();
    if recent.len() >= limit as usize {
        let oldest = recent.iter().copied().min().unwrap_or(now);
        return Err((oldest + window_secs).saturating_sub(now).max(1));
    }
    recent.push(now);
    Ok(recent)
}

/// What claim-issuer needs: count one use by a subject, if its window has room.
pub trait Quota: Send + Sync {
    fn consume(
        &self,
        subject: &str,
        now: u64,
    ) -> impl std::future::Future<Output = Result<Verdict, QuotaError>> + Send;

    /// When the subject may come back, if its window is full now; counts nothing (a check
    /// before something scarcer is taken on the subject's behalf).
    fn exceeded(
        &self,
        subject: &str,
        now: u64,
    ) -> impl std::future::Future<Output = Result<Option<u64>, QuotaError>> + Send;
}

/// The DynamoDB adapter.
#[derive(Clone, Debug)]
pub struct DynamoQuota {
    client: aws_sdk_dynamodb::Client,
    table: String,
    scope: String,
    limit: u32,
    window_secs: u64,
}

impl DynamoQuota {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        scope: &str,
        limit: u32,
        window_secs: u64,
    ) -> Self {
        Self {
            client,
            table: table.to_owned(),
            scope: scope.to_owned(),
            limit,
            window_secs: window_secs.max(1),
        }
    }
}

impl Quota for DynamoQuota {
    /// Counts one use by `subject` at `now` (Unix seconds), if the last window has room.
    async fn consume(&self, subject: &str, now: u64) -> Result<Verdict, QuotaError> {
        let key = AttributeValue::S(format!("rate#{}#{subject}", self.scope));
        for _ in 0..ATTEMPTS {
            let (used_at, version) = self.read(&key).await?;
            let recent = match decide(&used_at, now, self.limit, self.window_secs) {
                Ok(recent) => recent,
                Err(retry_after) => return Ok(Verdict::Exceeded { retry_after }),
            };
            let remaining = self.limit.saturating_sub(recent.len() as u32);
            if self.write(&key, &recent, version, now).await? {
                return Ok(Verdict::Allowed { remaining });
            }
        }
        Err(QuotaError::Unavailable(
            "rate-limit item contended; retry".into(),
        ))
    }

    async fn exceeded(&self, subject: &str, now: u64) -> Result<Option<u64>, QuotaError> {
        let key = AttributeValue::S(format!("rate#{}#{subject}", self.scope));
        let (used_at, _) = self.read(&key).await?;
        Ok(decide(&used_at, now, self.limit, self.window_secs).err())
    }
}

impl DynamoQuota {
    async fn read(&self, key: &AttributeValue) -> Result<(Vec<u64>, u64), QuotaError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY_ATTRIBUTE, key.clone())
            .projection_expression("uses, version")
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| QuotaError::from_failure(classify(&e)))?;
        let item = out.item.unwrap_or_default();
        let used_at = match item.get("uses") {
            Some(AttributeValue::L(times)) => times
                .iter()
                .filter_map(|t| t.as_n().ok()?.parse().ok())
                .collect(),
            _ => Vec::new(),
        };
        let version = item
            .get("version")
            .and_then(|v| v.as_n().ok()?.parse().ok())
            .unwrap_or(0);
        Ok((used_at, version))
    }

    /// Writes the new list if nobody wrote since `version` was read; `false` if someone did.
    async fn write(
        &self,
        key: &AttributeValue,
        used_at: &[u64],
        version: u64,
        now: u64,
    ) -> Result<bool, QuotaError> {
        let n = |v: u64| AttributeValue::N(v.to_string());
        let item = HashMap::from([
            (KEY_ATTRIBUTE.to_owned(), key.clone()),
            (
                "uses".to_owned(),
                AttributeValue::L(used_at.iter().copied().map(n).collect()),
            ),
            ("version".to_owned(), n(version + 1)),
            ("expires_at".to_owned(), n(now + self.window_secs + 3600)),
        ]);
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(version) OR version = :read")
            .expression_attribute_values(":read", n(version))
            .send()
            .await;
        conditional(result).map_err(QuotaError::from_failure)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliding_window_cannot_be_doubled_at_a_boundary() {
        // Two uses just before a fixed window would end, then two more just after: a fixed
        // window allows all four; the sliding window only two.
        let limit = 2;
        let mut used = Vec::new();
        for t in [590, 595] {
            used = decide(&used, t, limit, 600).unwrap();
        }
        assert_eq!(decide(&used, 605, limit, 600), Err(585));
        // Once the first use is a window old, there is room for one.
        let used = decide(&used, 1190, limit, 600).unwrap();
        assert_eq!(used, vec![595, 1190]);
    }

    #[test]
    fn old_uses_are_dropped_and_retry_after_is_at_least_a_second() {
        assert_eq!(decide(&[1, 2, 3], 1000, 2, 10).unwrap(), vec![1000]);
        assert_eq!(decide(&[999], 1000, 1, 1), Ok(vec![1000]));
        assert_eq!(decide(&[1000], 1000, 1, 10), Err(10));
    }
}
