//! Per-subject rate limits in the device table: a fixed-window counter per subject, incremented
//! atomically with a conditional update so that concurrent requests cannot overshoot the limit.
//! Counters expire through the table's TTL.

use aws_sdk_dynamodb::types::AttributeValue;

use crate::aws::{classify, Failure};
use crate::registry::KEY_ATTRIBUTE;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed {
        remaining: u32,
    },
    /// Over the limit until the window ends, in this many seconds.
    Exceeded {
        retry_after: u64,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuotaError {
    #[error("rate-limit store throttled the request")]
    Throttled,
    #[error("rate-limit store unavailable: {0}")]
    Unavailable(String),
}

#[derive(Clone, Debug)]
pub struct Quota {
    client: aws_sdk_dynamodb::Client,
    table: String,
    limit: u32,
    window_secs: u64,
}

impl Quota {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table: &str,
        limit: u32,
        window_secs: u64,
    ) -> Self {
        Self {
            client,
            table: table.to_owned(),
            limit,
            window_secs: window_secs.max(1),
        }
    }

    /// Counts one use by `subject` at `now` (Unix seconds), if the window has room.
    pub async fn consume(&self, subject: &str, now: u64) -> Result<Verdict, QuotaError> {
        let window_start = now - now % self.window_secs;
        let window_end = window_start + self.window_secs;
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(
                KEY_ATTRIBUTE,
                AttributeValue::S(format!("rate#{subject}#{window_start}")),
            )
            .update_expression("ADD #count :one SET expires_at = :expires")
            .condition_expression("attribute_not_exists(#count) OR #count < :limit")
            .expression_attribute_names("#count", "count")
            .expression_attribute_values(":one", AttributeValue::N("1".into()))
            .expression_attribute_values(":limit", AttributeValue::N(self.limit.to_string()))
            .expression_attribute_values(
                ":expires",
                AttributeValue::N((window_end + 3600).to_string()),
            )
            .return_values(aws_sdk_dynamodb::types::ReturnValue::UpdatedNew)
            .send()
            .await;
        match result {
            Ok(out) => {
                let used = out
                    .attributes
                    .as_ref()
                    .and_then(|a| a.get("count"))
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse::<u32>().ok())
                    .unwrap_or(self.limit);
                Ok(Verdict::Allowed {
                    remaining: self.limit.saturating_sub(used),
                })
            }
            Err(e) => match classify(&e) {
                Failure::Service(code) if code == "ConditionalCheckFailedException" => {
                    Ok(Verdict::Exceeded {
                        retry_after: (window_end - now).max(1),
                    })
                }
                Failure::Throttled => Err(QuotaError::Throttled),
                Failure::Service(code) | Failure::Unavailable(code) => {
                    Err(QuotaError::Unavailable(code))
                }
            },
        }
    }
}
