//! Secret lookup: enrollment-group keys and individual device keys.
//!
//! [`SecretStore`] is the seam; `SsmSecretStore` (feature `ssm`: Parameter Store SecureString, decrypted
//! through KMS) and [`DynamoSecretStore`] (one attribute of an item) are the adapters, and
//! [`CachedSecretStore`] keeps answers for a TTL so a warm function does not call SSM on every
//! invocation (SSM's default throughput is 40 TPS per account, shared with everything else).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

// Tokio's clock, so that tests can move time instead of waiting for it.
use tokio::time::Instant;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::aws::{classify, Failure};
use crate::keys::{KeyError, SymmetricKey};

/// A secret value. `Debug` is redacted and memory is wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(zeroize::Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(zeroize::Zeroizing::new(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Why a secret could not be had. Names the secret, never its value.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("secret {0} not found")]
    NotFound(String),
    #[error("secret {0} is stored as plain text; store it as an SSM SecureString")]
    NotEncrypted(String),
    #[error("secret {0} is empty")]
    Empty(String),
    #[error("secret store throttled the lookup of {0}")]
    Throttled(String),
    #[error("secret store unavailable for {name}: {reason}")]
    Unavailable { name: String, reason: String },
}

impl SecretError {
    fn from_failure(name: &str, failure: Failure) -> Self {
        match failure {
            Failure::Throttled => Self::Throttled(name.to_owned()),
            Failure::Service(code) | Failure::Unavailable(code) => Self::Unavailable {
                name: name.to_owned(),
                reason: code,
            },
        }
    }

    /// Whether a later attempt may succeed (as opposed to a configuration problem).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Throttled(_) | Self::Unavailable { .. })
    }
}

/// Looks a secret up by name.
pub trait SecretStore: Send + Sync {
    fn get(&self, name: &str) -> impl Future<Output = Result<Secret, SecretError>> + Send;
}

/// Why a key could not be loaded: the lookup failed, or the stored value is not a key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyLookupError {
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error("secret {name} does not hold a usable key: {source}")]
    Key {
        name: String,
        #[source]
        source: KeyError,
    },
}

/// Fetches the secret `name` and decodes it as a base64 symmetric key.
pub async fn load_key(
    store: &impl SecretStore,
    name: &str,
) -> Result<SymmetricKey, KeyLookupError> {
    let secret = store.get(name).await?;
    SymmetricKey::from_base64(secret.expose()).map_err(|source| KeyLookupError::Key {
        name: name.to_owned(),
        source,
    })
}

/// SSM Parameter Store (feature `ssm`). Only `SecureString` parameters are accepted: a key stored as a plain
/// `String` is readable by anyone with `ssm:GetParameter*` and shows in the console.
#[cfg(feature = "ssm")]
#[derive(Clone, Debug)]
pub struct SsmSecretStore {
    client: aws_sdk_ssm::Client,
}

#[cfg(feature = "ssm")]
impl SsmSecretStore {
    pub fn new(client: aws_sdk_ssm::Client) -> Self {
        Self { client }
    }
}

#[cfg(feature = "ssm")]
impl SecretStore for SsmSecretStore {
    async fn get(&self, name: &str) -> Result<Secret, SecretError> {
        let out = self
            .client
            .get_parameter()
            .name(name)
            .with_decryption(true)
            .send()
            .await
            .map_err(|e| {
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found())
                {
                    SecretError::NotFound(name.to_owned())
                } else {
                    SecretError::from_failure(name, classify(&e))
                }
            })?;
        let parameter = out
            .parameter
            .ok_or_else(|| SecretError::NotFound(name.to_owned()))?;
        if parameter.r#type != Some(aws_sdk_ssm::types::ParameterType::SecureString) {
            return Err(SecretError::NotEncrypted(name.to_owned()));
        }
        match parameter.value {
            Some(v) if !v.trim().is_empty() => Ok(Secret::new(v)),
            _ => Err(SecretError::Empty(name.to_owned())),
        }
    }
}

/// One string attribute of a DynamoDB item whose partition key `pk` is the secret's name
/// (for example the `device_key` of `sim#<imsi>` in the device table).
#[derive(Clone, Debug)]
pub struct DynamoSecretStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    attribute: String,
}

impl DynamoSecretStore {
    pub fn new(client: aws_sdk_dynamodb::Client, table: &str, attribute: &str) -> Self {
        Self {
            client,
            table: table.to_owned(),
            attribute: attribute.to_owned(),
        }
    }
}

impl SecretStore for DynamoSecretStore {
    async fn get(&self, name: &str) -> Result<Secret, SecretError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(
                crate::registry::KEY_ATTRIBUTE,
                AttributeValue::S(name.to_owned()),
            )
            .projection_expression("#a")
            .expression_attribute_names("#a", &self.attribute)
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| SecretError::from_failure(name, classify(&e)))?;
        match out.item.as_ref().and_then(|item| item.get(&self.attribute)) {
            None => Err(SecretError::NotFound(name.to_owned())),
            Some(AttributeValue::S(v)) if !v.trim().is_empty() => Ok(Secret::new(v.clone())),
            Some(_) => Err(SecretError::Empty(name.to_owned())),
        }
    }
}

/// Most secrets a cache keeps; beyond it the oldest make room. Secrets are few (a group key,
/// maybe its successor): the bound only matters if someone points the cache at many.
pub const MAX_CACHED_SECRETS: usize = 16;

/// Keeps every answer of the inner store for `ttl` but transient failures: a secret, and also
/// its absence or another configuration failure (not found, not a SecureString, empty), because
/// a route anyone can call must cost at most one lookup per `ttl` whatever the store says. A
/// transient failure (throttled, unavailable) is not kept, so that a store that recovers serves
/// the next call. A fixed or rotated parameter is therefore picked up within `ttl`; at most
/// [`MAX_CACHED_SECRETS`] names are held; an expired entry is wiped as soon as another lookup
/// sees it.
pub struct CachedSecretStore<S> {
    inner: S,
    ttl: Duration,
    entries: Mutex<HashMap<String, Entry>>,
    inserted: std::sync::atomic::AtomicU64,
}

/// One remembered answer: when it was fetched and for how long it holds, its insertion number
/// (ties of the clock broken in insertion order), the answer.
struct Entry {
    at: Instant,
    hold: Duration,
    n: u64,
    answer: Result<Secret, SecretError>,
}

impl<S: SecretStore> CachedSecretStore<S> {
    pub fn new(inner: S, ttl: Duration) -> Self {
        Self {
            inner,
            ttl,
            entries: Mutex::new(HashMap::new()),
            inserted: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The store without the cache, for secrets that must not stay in memory (per-device keys,
    /// which a refused SIM would otherwise leave behind).
    pub fn uncached(&self) -> &S {
        &self.inner
    }

    /// How many secrets are held now (remembered failures not counted).
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|e| e.answer.is_ok())
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn cached(&self, name: &str) -> Option<Result<Secret, SecretError>> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| e.at.elapsed() < e.hold);
        entries.get(name).map(|e| e.answer.clone())
    }

    fn remember(&self, name: &str, answer: &Result<Secret, SecretError>) {
        let hold = self.ttl;
        if hold.is_zero() || answer.as_ref().is_err_and(SecretError::is_transient) {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        while entries.len() >= MAX_CACHED_SECRETS && !entries.contains_key(name) {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| (e.at, e.n))
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => entries.remove(&k),
                None => break,
            };
        }
        let n = self
            .inserted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        entries.insert(
            name.to_owned(),
            Entry {
                at: Instant::now(),
                hold,
                n,
                answer: answer.clone(),
            },
        );
    }
}

impl<S: SecretStore> SecretStore for CachedSecretStore<S> {
    async fn get(&self, name: &str) -> Result<Secret, SecretError> {
        if let Some(hit) = self.cached(name) {
            return hit;
        }
        let fresh = self.inner.get(name).await;
        self.remember(name, &fresh);
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts lookups and answers with the current "version" of the secret.
    struct Counting {
        calls: AtomicUsize,
    }

    impl SecretStore for Counting {
        async fn get(&self, name: &str) -> Result<Secret, SecretError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(Secret::new(format!("{name}-v{n}")))
        }
    }

    #[tokio::test]
    async fn cache_serves_within_ttl_and_refreshes_after() {
        let store = CachedSecretStore::new(
            Counting {
                calls: AtomicUsize::new(0),
            },
            Duration::from_secs(3600),
        );
        assert_eq!(store.get("a").await.unwrap().expose(), "a-v0");
        assert_eq!(store.get("a").await.unwrap().expose(), "a-v0");
        assert_eq!(store.get("b").await.unwrap().expose(), "b-v1");
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 2);

        let expiring = CachedSecretStore::new(
            Counting {
                calls: AtomicUsize::new(0),
            },
            Duration::ZERO,
        );
        expiring.get("a").await.unwrap();
        assert_eq!(expiring.get("a").await.unwrap().expose(), "a-v1");
    }

    #[tokio::test(start_paused = true)]
    async fn the_cache_is_bounded_and_forgets_expired_secrets() {
        let store = CachedSecretStore::new(
            Counting {
                calls: AtomicUsize::new(0),
            },
            Duration::from_secs(3600),
        );
        for i in 0..MAX_CACHED_SECRETS + 5 {
            store.get(&format!("k{i}")).await.unwrap();
        }
        assert_eq!(store.len(), MAX_CACHED_SECRETS);
        // The newest stayed, the oldest made room.
        let calls = store.inner.calls.load(Ordering::SeqCst);
        store
            .get(&format!("k{}", MAX_CACHED_SECRETS + 4))
            .await
            .unwrap();
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), calls);
        store.get("k0").await.unwrap();
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), calls + 1);

        let expiring = CachedSecretStore::new(
            Counting {
                calls: AtomicUsize::new(0),
            },
            Duration::from_secs(300),
        );
        expiring.get("a").await.unwrap();
        assert_eq!(expiring.len(), 1);
        tokio::time::advance(Duration::from_secs(301)).await;
        // Seen expired by the next lookup, it is dropped rather than kept until overwritten.
        expiring.get("b").await.unwrap();
        assert_eq!(expiring.len(), 1);
    }

    /// Answers with `failure` (or a secret when `None`) and counts the lookups.
    struct Failing {
        calls: AtomicUsize,
        failure: Option<SecretError>,
    }

    impl SecretStore for Failing {
        async fn get(&self, name: &str) -> Result<Secret, SecretError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            match &self.failure {
                Some(e) => Err(e.clone()),
                None => Ok(Secret::new(format!("{name}-value"))),
            }
        }
    }

    fn failing(failure: SecretError, ttl: Duration) -> CachedSecretStore<Failing> {
        CachedSecretStore::new(
            Failing {
                calls: AtomicUsize::new(0),
                failure: Some(failure),
            },
            ttl,
        )
    }

    /// The hole: a missing Beam PSK was never cached, so every unsigned request on the public
    /// route asked SSM, and a flood throttled SSM for the whole account.
    #[tokio::test(start_paused = true)]
    async fn a_missing_secret_costs_one_lookup_per_ttl_however_often_it_is_asked() {
        let ttl = Duration::from_secs(300);
        let store = failing(SecretError::NotFound("psk".into()), ttl);
        for _ in 0..100 {
            assert_eq!(
                store.get("psk").await,
                Err(SecretError::NotFound("psk".into()))
            );
        }
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 1);
        assert!(store.is_empty(), "a remembered absence is no secret held");
        tokio::time::advance(ttl - Duration::from_secs(1)).await;
        store.get("psk").await.unwrap_err();
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 1);
        // Once the period is over the store is asked again: a parameter created since is seen.
        tokio::time::advance(Duration::from_secs(1)).await;
        store.get("psk").await.unwrap_err();
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 2);
        for failure in [
            SecretError::NotEncrypted("psk".into()),
            SecretError::Empty("psk".into()),
        ] {
            let store = failing(failure, ttl);
            for _ in 0..10 {
                store.get("psk").await.unwrap_err();
            }
            assert_eq!(store.inner.calls.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn transient_failures_are_not_kept() {
        let store = failing(
            SecretError::Throttled("a".into()),
            Duration::from_secs(3600),
        );
        assert!(store.get("a").await.unwrap_err().is_transient());
        assert!(store.get("a").await.is_err());
        assert_eq!(store.inner.calls.load(Ordering::SeqCst), 2);
        let none = failing(SecretError::NotFound("a".into()), Duration::ZERO);
        none.get("a").await.unwrap_err();
        none.get("a").await.unwrap_err();
        assert_eq!(none.inner.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "Secret([redacted])");
    }
}
