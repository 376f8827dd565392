//! A fleet-wide budget: at most `limit` starts per fixed window, shared by every concurrent
//! instance of a function, counted atomically in the device table.
//!
//! Each window has one small item, `budget#<name>#<window start>`, whose `count` every caller
//! increments in one `UpdateItem` (`ADD`, which DynamoDB applies atomically) and reads back:
//! callers `1..=limit` of a window are granted, so two instances together never overshoot. A
//! refused caller learns from its number where it stands in the queue and is told to come
//! back in the window and at the moment that its place gives it: the refused are spread over
//! the coming windows, `limit` per window, instead of all returning at the next second. The
//! item expires through the table's TTL.

use std::future::Future;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};

use crate::aws::classify;
use crate::quota::QuotaError;
use crate::registry::KEY_ATTRIBUTE;

/// The attributes of a budget item (for the IAM policy of whoever counts).
pub const BUDGET_ATTRIBUTES: &[&str] = &[KEY_ATTRIBUTE, "count", "expires_at"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    Granted,
    /// The window's budget is spent: come back in this many seconds.
    Spent {
        retry_after: u64,
    },
}

/// What a caller needs of a fleet-wide budget: one start, now, if the window has room.
pub trait Budget: Send + Sync {
    fn take(&self, now: u64) -> impl Future<Output = Result<Grant, QuotaError>> + Send;

    /// Returns a unit granted by `take(now)` that will not be used after all (the caller was
    /// refused for another reason), so that it is not lost to the window.
    fn give_back(&self, now: u64) -> impl Future<Output = Result<(), QuotaError>> + Send;
}

/// The window `now` falls in: its start.
pub fn window_start(now: u64, window_secs: u64) -> u64 {
    now - now % window_secs.max(1)
}

/// The verdict for the caller numbered `count` (1-based) in the window that starts at `start`:
/// granted within the limit; otherwise its place among the refused picks a later window (the
/// first `limit` refused the next one, the next `limit` the one after) and a moment within it
/// (spread evenly over the window).
pub fn grant(count: u64, limit: u32, start: u64, window_secs: u64, now: u64) -> Grant {
    let limit = u64::from(limit.max(1));
    if count <= limit {
        return Grant::Granted;
    }
    let place = count - limit - 1;
    let windows_ahead = place / limit + 1;
    let offset = (place % limit) * window_secs / limit;
    let at = start + windows_ahead * window_secs + offset;
    Grant::Spent {
        retry_after: at.saturating_sub(now).max(1),
    }
}

/// The DynamoDB adapter.
#[derive(Clone, Debug)]
pub struct DynamoBudget {
    client: aws_sdk_dynamodb::Client,
    table: String,
    name: String,
    limit: u32,
    window_secs: u64,
}

impl DynamoBudget {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        name: &str,
        limit: u32,
        window_secs: u64,
    ) -> Self {
        Self {
            client,
            table: table.to_owned(),
            name: name.to_owned(),
            limit,
            window_secs: window_secs.max(1),
        }
    }
}

impl Budget for DynamoBudget {
    async fn take(&self, now: u64) -> Result<Grant, QuotaError> {
        let start = window_start(now, self.window_secs);
        let n = |v: u64| AttributeValue::N(v.to_string());
        let out = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(
                KEY_ATTRIBUTE,
                AttributeValue::S(format!("budget#{}#{start}", self.name)),
            )
            // `count` is a reserved word.
            .update_expression("ADD #count :one SET expires_at = :expires")
            .expression_attribute_names("#count", "count")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":expires", n(start + 2 * self.window_secs + 3600))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await
            .map_err(|e| QuotaError::from_failure(classify(&e)))?;
        let count = out
            .attributes
            .as_ref()
            .and_then(|a| a.get("count"))
            .and_then(|c| c.as_n().ok()?.parse::<u64>().ok())
            .ok_or_else(|| QuotaError::Unavailable("budget count not returned".into()))?;
        Ok(grant(count, self.limit, start, self.window_secs, now))
    }

    async fn give_back(&self, now: u64) -> Result<(), QuotaError> {
        let start = window_start(now, self.window_secs);
        self.client
            .update_item()
            .table_name(&self.table)
            .key(
                KEY_ATTRIBUTE,
                AttributeValue::S(format!("budget#{}#{start}", self.name)),
            )
            .update_expression("ADD #count :minus_one")
            .expression_attribute_names("#count", "count")
            .expression_attribute_values(":minus_one", AttributeValue::N("-1".into()))
            // Only a window that exists: a unit cannot be given back to a window nobody took
            // from (an expired item would otherwise be recreated without its TTL).
            .condition_expression("attribute_exists(#count)")
            .send()
            .await
            .map_err(|e| QuotaError::from_failure(classify(&e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_limit_callers_of_a_window_are_granted() {
        for count in 1..=3 {
            assert_eq!(grant(count, 3, 600, 60, 630), Grant::Granted);
        }
        assert_ne!(grant(4, 3, 600, 60, 630), Grant::Granted);
    }

    #[test]
    fn the_refused_are_spread_limit_per_window_over_the_coming_windows() {
        // Window [600, 660), limit 4, asked at 630: callers 5..=8 go to [660, 720), spread
        // 15 s apart; callers 9..=12 to [720, 780).
        let retry = |count| match grant(count, 4, 600, 60, 630) {
            Grant::Spent { retry_after } => 630 + retry_after,
            Grant::Granted => panic!("caller {count} granted"),
        };
        let returns: Vec<u64> = (5..=12).map(retry).collect();
        assert_eq!(returns, vec![660, 675, 690, 705, 720, 735, 750, 765]);
        // However many are refused, no later window is given more than the limit.
        let mut per_window = std::collections::HashMap::new();
        for count in 5..=1000 {
            *per_window
                .entry(window_start(retry(count), 60))
                .or_insert(0) += 1;
        }
        assert!(per_window.values().all(|n| *n <= 4), "{per_window:?}");
    }

    #[test]
    fn a_retry_is_never_sooner_than_a_second() {
        assert_eq!(grant(2, 1, 600, 60, 659), Grant::Spent { retry_after: 1 });
    }
}
