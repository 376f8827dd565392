//! Signed requests that may be used once: a SORACOM Beam request is signed with its timestamp,
//! and within the accepted window a captured copy would verify again. Each signature is
//! recorded (`beam#<signature>`, TTL'd past the window); a second use finds it.

use super::item::{n, s};
use super::*;
use crate::aws::conditional;

/// The item key of a used Beam signature.
pub fn beam_key(signature: &str) -> String {
    format!("beam#{signature}")
}

/// The attributes of a used signature's item (its IAM policy lists exactly these).
pub const ONCE_ATTRIBUTES: &[&str] = &[KEY_ATTRIBUTE, "expires_at"];

/// Uses that may happen once.
pub trait OnceLog: Send + Sync {
    /// Records `key` as used, kept until `until` (Unix seconds; the TTL removes it after);
    /// `false` if it was used already.
    fn first_use(
        &self,
        key: &str,
        until: u64,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;
}

impl OnceLog for DynamoRegistry {
    async fn first_use(&self, key: &str, until: u64) -> Result<bool, RegistryError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(KEY_ATTRIBUTE, s(key))
            .item("expires_at", n(until))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        conditional(result).map_err(RegistryError::from_failure)
    }
}
