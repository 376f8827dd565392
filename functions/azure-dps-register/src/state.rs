//! What the function builds once, at cold start, and reuses while warm: configuration, the
//! device table, the key store with its cache (or the device CA), DPS with its TLS
//! configuration, and the limits on DPS registrations. Nothing here is per-device.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dps_client::{Assignment, DpsError, RegistrationRequest, TrustedRoots};
use rustls::ClientConfig;
use shared::aws::{classify, Failure};
use shared::budget::{Budget, DynamoBudget, Grant};
use shared::ca::{CaError, KmsCa};
use shared::config::HostPort;
use shared::keys::SymmetricKey;
use shared::quota::{DynamoQuota, Quota, QuotaError, Verdict};
use shared::registry::{DeviceId, DynamoRegistry};
use shared::secrets::{
    load_key, CachedSecretStore, DynamoSecretStore, KeyLookupError, Secret, SecretError,
    SecretStore, SsmSecretStore,
};
use tokio::time::Instant;

use crate::config::{Attestation, Config, KeySource, X509Settings};
use crate::ports::{
    Admission, Credentials, DeviceCa, DeviceKeys, Dps, DpsLimits, Enrollment, KeyFailure, Proof,
};

/// The configured key store.
pub enum KeyStore {
    Ssm(SsmSecretStore),
    Dynamo(DynamoSecretStore),
}

impl SecretStore for KeyStore {
    async fn get(&self, name: &str) -> Result<Secret, SecretError> {
        match self {
            Self::Ssm(s) => s.get(name).await,
            Self::Dynamo(s) => s.get(name).await,
        }
    }
}

/// Cold-start state, by the traits the handler needs (in the unit tests: in memory).
pub struct State<R = DynamoRegistry, K = ConfiguredKeys, D = MqttDps, L = Limits, C = KmsDeviceCa> {
    pub config: Config,
    pub registry: R,
    pub keys: K,
    pub dps: D,
    pub limits: L,
    /// X.509 attestation's certificate authority (unused with symmetric keys).
    pub ca: C,
}

impl<R, K, D, L, C> State<R, K, D, L, C> {
    /// The same state over another device table and other limits (the reboot storm's run with
    /// the table in memory, to tell the function's own cost from the local emulator's).
    pub fn with_stores<R2, L2>(self, registry: R2, limits: L2) -> State<R2, K, D, L2, C> {
        State {
            config: self.config,
            registry,
            keys: self.keys,
            dps: self.dps,
            limits,
            ca: self.ca,
        }
    }
}

/// The per-SIM sliding window and the fleet's budget per minute, both in the device table.
pub struct Limits<Q = DynamoQuota, B = DynamoBudget> {
    pub per_sim: Q,
    pub fleet: B,
    /// The length of `fleet`'s windows, seconds.
    fleet_window: u64,
    /// Until when (Unix seconds) this instance last saw the fleet's budget spent.
    spent_until: AtomicU64,
}

impl<Q, B> Limits<Q, B> {
    pub fn new(per_sim: Q, fleet: B, fleet_window: u64) -> Self {
        Self {
            per_sim,
            fleet,
            fleet_window: fleet_window.max(1),
            spent_until: AtomicU64::new(0),
        }
    }
}

/// The per-SIM window: an hour.
pub const SIM_WINDOW_SECS: u64 = 3600;
/// The fleet budget's windows for `per_minute` registrations a minute: (limit, seconds).
///
/// DPS enforces its quota per minute, and the DPS simulator over any sixty seconds, as the
/// safe reading; a budget counted per calendar minute lets twice its size through across a
/// minute's boundary (the 10,000-SIM storm met DPS's 429 that way). So the budget is counted in
/// windows of about 5 s of a twelfth of it each: no sixty seconds hold more than thirteen
/// windows, 13/12 of the budget (the default 900: at most 975, under DPS's 1,000).
pub fn fleet_windows(per_minute: u32) -> (u32, u64) {
    let per_minute = per_minute.max(1);
    let limit = (per_minute / 12).max(1);
    let seconds = (60 * u64::from(limit) + u64::from(per_minute) / 2) / u64::from(per_minute);
    (limit, seconds.max(1))
}

impl<Q: Quota, B: Budget> DpsLimits for Limits<Q, B> {
    fn likely_admitted(&self, now: u64) -> bool {
        now >= self.spent_until.load(Ordering::Relaxed)
    }

    /// A SIM known past its share is refused before it touches the fleet's budget (concurrent
    /// calls of one looping SIM would otherwise hold units of it, and push every other SIM's
    /// `retryAfter` later). Then the fleet's budget, then the SIM's share: a call the fleet
    /// refuses spends none of its SIM's hour (in a storm, a device refused six times by the
    /// budget would otherwise be locked out for an hour), and a SIM that went past its share
    /// meanwhile gives its unit of the fleet's budget back.
    async fn admit(&self, imsi: &str, now: u64) -> Result<Admission, QuotaError> {
        if let Some(retry_after) = self.per_sim.exceeded(imsi, now).await? {
            return Ok(Admission::SimLimited {
                retry_after: Duration::from_secs(retry_after),
            });
        }
        if let Grant::Spent { retry_after } = self.fleet.take(now).await? {
            let window_ends = now - now % self.fleet_window + self.fleet_window;
            self.spent_until.fetch_max(window_ends, Ordering::Relaxed);
            return Ok(Admission::OverBudget {
                retry_after: Duration::from_secs(retry_after),
            });
        }
        let share = self.per_sim.consume(imsi, now).await;
        if !matches!(share, Ok(Verdict::Allowed { .. })) {
            if let Err(e) = self.fleet.give_back(now).await {
                // Lost to this window only: the budget errs on the side of fewer registrations.
                tracing::warn!(error = %e, "a unit of the fleet's DPS budget could not be given back");
            }
        }
        Ok(match share? {
            Verdict::Allowed { .. } => Admission::Admitted,
            Verdict::Exceeded { retry_after } => Admission::SimLimited {
                retry_after: Duration::from_secs(retry_after),
            },
        })
    }
}

/// Device keys where the configuration says: derived from the (cached) group key, or the SIM's
/// individual key, which is never cached: a refused SIM's key must not stay in memory.
pub struct ConfiguredKeys {
    /// `None` with X.509 attestation, where there are no device keys.
    source: Option<KeySource>,
    store: CachedSecretStore<KeyStore>,
}

impl ConfiguredKeys {
    /// How many secrets the cache holds now.
    pub fn cached(&self) -> usize {
        self.store.len()
    }
}

impl DeviceKeys for ConfiguredKeys {
    async fn device_key(
        &self,
        imsi: &str,
        registration_id: &str,
    ) -> Result<SymmetricKey, KeyFailure> {
        let Some(source) = &self.source else {
            return Err(KeyFailure::Misconfigured(
                "no device keys with X.509 attestation".into(),
            ));
        };
        let (lookup, per_device) = match source {
            KeySource::Group { parameter } => (
                load_key(&self.store, parameter)
                    .await
                    .map(|group| group.derive_device_key(registration_id)),
                false,
            ),
            KeySource::IndividualSsm { prefix } => (
                load_key(self.store.uncached(), &format!("{prefix}{registration_id}")).await,
                true,
            ),
            KeySource::IndividualDynamoDb => (
                load_key(self.store.uncached(), &DeviceId::Sim(imsi.to_owned()).key()).await,
                true,
            ),
        };
        lookup.map_err(|error| match error {
            // No individual key: no enrollment. No group key: the function is broken.
            KeyLookupError::Secret(SecretError::NotFound(_)) if per_device => {
                KeyFailure::NoEnrollment
            }
            KeyLookupError::Secret(e) if e.is_transient() => KeyFailure::Unavailable(e.to_string()),
            other => KeyFailure::Misconfigured(other.to_string()),
        })
    }
}

/// Azure DPS over MQTT/TLS at the configured endpoint and id scope.
pub struct MqttDps {
    endpoint: HostPort,
    id_scope: String,
    tls: DpsTls,
}

impl Dps for MqttDps {
    type Line = dps_client::Line;

    async fn open(&self) -> Result<Self::Line, DpsError> {
        dps_client::open(&self.endpoint, self.tls.get().await?).await
    }

    async fn register(
        &self,
        enrollment: &Enrollment<'_>,
        opened: Option<Result<Self::Line, DpsError>>,
        deadline: Instant,
    ) -> Result<Assignment, DpsError> {
        let (attestation, tls, opened) = match enrollment.proof {
            Proof::Key(key) => (
                dps_client::Attestation::SymmetricKey(key),
                self.tls.get().await?,
                opened,
            ),
            // The certificate goes in the handshake: a connection opened before it is of no
            // use. The roots are shared; only the client part is per device.
            Proof::Certificate(credentials) => {
                let chain = format!(
                    "{}{}",
                    credentials.certificate.certificate_pem, credentials.chain_pem
                );
                let tls = self
                    .tls
                    .roots()
                    .await?
                    .config_with_certificate(&chain, &credentials.certificate.private_key_pem)?;
                (dps_client::Attestation::X509, tls, None)
            }
        };
        let request = RegistrationRequest {
            endpoint: &self.endpoint,
            id_scope: &self.id_scope,
            registration_id: enrollment.registration_id,
            attestation,
            payload: enrollment.payload,
            tls,
        };
        dps_client::register_over(&request, opened, deadline).await
    }
}

/// The trusted roots, and the configuration without a client certificate made of them.
#[derive(Clone)]
struct Built {
    roots: TrustedRoots,
    config: Arc<ClientConfig>,
}

type Building = tokio::task::JoinHandle<Result<Built, DpsError>>;

/// The TLS configuration for DPS, built on a blocking thread from cold start on: reading and
/// parsing the system's root certificates took 14 ms of a 46 ms cold start in `make bench`, and
/// this way it overlaps the first invocation's device-table and key lookups instead of
/// preceding them.
pub struct DpsTls {
    ready: tokio::sync::OnceCell<Built>,
    building: tokio::sync::Mutex<Option<Building>>,
}

impl DpsTls {
    /// Starts building; needs a Tokio runtime.
    pub fn start(extra_root: Option<Vec<u8>>) -> Self {
        let building = tokio::task::spawn_blocking(move || {
            let roots = TrustedRoots::load(extra_root.as_deref())?;
            Ok(Built {
                config: roots.config()?,
                roots,
            })
        });
        Self {
            ready: tokio::sync::OnceCell::new(),
            building: tokio::sync::Mutex::new(Some(building)),
        }
    }

    /// The configuration, once built. A failed build fails this call and every later one.
    /// Cancel-safe: a caller dropped while waiting (a connection opened ahead for a SIM that is
    /// then refused) leaves the build to the next caller.
    pub async fn get(&self) -> Result<Arc<ClientConfig>, DpsError> {
        Ok(self.built().await?.config)
    }

    /// The trusted roots, for configurations that present a client certificate.
    pub async fn roots(&self) -> Result<TrustedRoots, DpsError> {
        Ok(self.built().await?.roots)
    }

    async fn built(&self) -> Result<Built, DpsError> {
        self.ready
            .get_or_try_init(|| async {
                let mut building = self.building.lock().await;
                let Some(handle) = building.as_mut() else {
                    return Err(DpsError::Tls(
                        "TLS setup failed at cold start (see the first error)".into(),
                    ));
                };
                let built = handle
                    .await
                    .map_err(|e| DpsError::Tls(format!("TLS setup stopped: {e}")));
                *building = None;
                built?
            })
            .await
            .cloned()
    }
}

/// The device CA of `ATTESTATION=x509`: its certificate from SSM and its key in KMS, loaded at
/// the first certificate (not at cold start, so that a KMS or SSM hiccup then costs one
/// device a retry instead of the instance its start). Its certificate is read again once it is
/// `refresh` old (`SECRET_CACHE_SECONDS`), so that a renewed CA certificate reaches warm
/// instances too; an unchanged one costs no KMS call, and an SSM that does not answer then
/// leaves the one in use in place.
/// With symmetric keys there is none: no KMS client is built at their cold start.
pub struct KmsDeviceCa {
    source: Option<CaSource>,
    refresh: Duration,
    current: tokio::sync::Mutex<Option<LoadedCa>>,
}

/// The CA in use: its certificate chain as SSM held it, and when that was read.
struct LoadedCa {
    ca: Arc<KmsCa>,
    chain: String,
    read_at: Instant,
}

/// Where the device CA is: its settings and the clients that read them.
struct CaSource {
    settings: X509Settings,
    kms: aws_sdk_kms::Client,
    ssm: aws_sdk_ssm::Client,
}

impl KmsDeviceCa {
    /// The CA to sign with: the one in use while fresh, else as SSM now names it.
    async fn ca(&self) -> Result<Arc<KmsCa>, CaError> {
        let Some(source) = &self.source else {
            return Err(CaError::Misconfigured("ATTESTATION is not x509".into()));
        };
        // One reader at a time: concurrent devices of a stale instance wait for one SSM read.
        let mut current = self.current.lock().await;
        if let Some(loaded) = current
            .as_ref()
            .filter(|l| l.read_at.elapsed() < self.refresh)
        {
            return Ok(Arc::clone(&loaded.ca));
        }
        let chain = match (source.read_chain().await, current.as_mut()) {
            (Ok(chain), _) => chain,
            (Err(CaError::Unavailable(why)), Some(loaded)) => {
                tracing::warn!(error = %why, "the device CA certificate could not be read again; the one in use stays until the next try");
                loaded.read_at = Instant::now();
                return Ok(Arc::clone(&loaded.ca));
            }
            (Err(e), _) => return Err(e),
        };
        if let Some(loaded) = current.as_mut().filter(|l| l.chain == chain) {
            loaded.read_at = Instant::now();
            return Ok(Arc::clone(&loaded.ca));
        }
        let ca =
            Arc::new(KmsCa::new(source.kms.clone(), &source.settings.kms_key_id, &chain).await?);
        if current.is_some() {
            tracing::info!("the device CA certificate changed in SSM: issuing under the new one");
        }
        *current = Some(LoadedCa {
            ca: Arc::clone(&ca),
            chain,
            read_at: Instant::now(),
        });
        Ok(ca)
    }
}

impl CaSource {
    async fn read_chain(&self) -> Result<String, CaError> {
        let Self { settings, ssm, .. } = self;
        let parameter = ssm
            .get_parameter()
            .name(&settings.ca_certificate_parameter)
            .send()
            .await
            .map_err(|e| match classify(&e) {
                Failure::Service(code) if code == "ParameterNotFound" => {
                    CaError::Misconfigured("CA_CERTIFICATE_PARAMETER does not exist".into())
                }
                other => CaError::from_failure(other),
            })?;
        parameter
            .parameter
            .and_then(|p| p.value)
            .ok_or_else(|| CaError::Misconfigured("CA_CERTIFICATE_PARAMETER is empty".into()))
    }
}

impl DeviceCa for KmsDeviceCa {
    async fn issue(
        &self,
        registration_id: &str,
        lifetime: Duration,
    ) -> Result<Credentials, CaError> {
        let ca = self.ca().await?;
        Ok(Credentials {
            certificate: ca.issue(registration_id, lifetime).await?,
            chain_pem: ca.chain_pem().to_owned(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot read DPS_TRUSTED_CA_FILE {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] DpsError),
}

impl State {
    pub fn new(config: Config, sdk: &aws_config::SdkConfig) -> Result<Self, StartupError> {
        let extra_root = match &config.trusted_ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|source| StartupError::CaFile {
                path: path.display().to_string(),
                source,
            })?),
            None => None,
        };
        // A bad CA file is a configuration error: refuse to start rather than fail later.
        if let Some(pem) = &extra_root {
            dps_client::tls_config_roots_check(pem)?;
        }
        let tls = DpsTls::start(extra_root);
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        // Only the clients this attestation uses: each costs cold-start time.
        let (key_source, ca_source) = match &config.attestation {
            Attestation::SymmetricKey(source) => (Some(source.clone()), None),
            Attestation::X509(settings) => (
                None,
                Some(CaSource {
                    settings: settings.clone(),
                    kms: aws_sdk_kms::Client::new(sdk),
                    ssm: aws_sdk_ssm::Client::new(sdk),
                }),
            ),
        };
        let store = match (&key_source, &ca_source) {
            (Some(KeySource::IndividualDynamoDb), _) => KeyStore::Dynamo(DynamoSecretStore::new(
                dynamodb.clone(),
                &config.devices_table,
                shared::registry::DEVICE_KEY_ATTRIBUTE,
            )),
            // X.509: no device keys are ever read; the CA's client serves the (unused) store.
            (None, Some(ca)) => KeyStore::Ssm(SsmSecretStore::new(ca.ssm.clone())),
            _ => KeyStore::Ssm(SsmSecretStore::new(aws_sdk_ssm::Client::new(sdk))),
        };
        let (limit, window) = fleet_windows(config.dps_registrations_per_minute);
        Ok(Self {
            ca: KmsDeviceCa {
                source: ca_source,
                refresh: config.secret_cache,
                current: tokio::sync::Mutex::new(None),
            },
            keys: ConfiguredKeys {
                source: key_source,
                store: CachedSecretStore::new(store, config.secret_cache),
            },
            limits: Limits::new(
                DynamoQuota::new(
                    dynamodb.clone(),
                    &config.devices_table,
                    "dps",
                    config.dps_per_sim_per_hour,
                    SIM_WINDOW_SECS,
                ),
                DynamoBudget::new(
                    dynamodb.clone(),
                    &config.devices_table,
                    "dps",
                    limit,
                    window,
                ),
                window,
            ),
            registry: DynamoRegistry::new(dynamodb, &config.devices_table),
            dps: MqttDps {
                endpoint: config.endpoint.clone(),
                id_scope: config.id_scope.clone(),
                tls,
            },
            config,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_windows_keep_any_sixty_seconds_near_the_budget() {
        assert_eq!(fleet_windows(900), (75, 5));
        for per_minute in [1, 6, 12, 100, 900, 1000, 5000] {
            let (limit, seconds) = fleet_windows(per_minute);
            // Windows touching any sixty seconds, each full.
            let worst = (60 / seconds + 1) * u64::from(limit);
            let rate = f64::from(limit) * 60.0 / seconds as f64;
            assert!(
                rate <= f64::from(per_minute) * 1.05 && rate >= f64::from(per_minute) * 0.9,
                "{per_minute}: {limit} per {seconds} s"
            );
            assert!(
                worst as f64 <= f64::from(per_minute) * 1.1 + 1.0,
                "{per_minute}: {worst}"
            );
        }
    }

    #[tokio::test]
    async fn a_caller_dropped_while_the_tls_setup_builds_leaves_it_to_the_next() {
        let tls = DpsTls::start(None);
        // Dropped at its first wait, as a connection opened for a refused SIM is.
        let _ = tokio::time::timeout(Duration::ZERO, tls.get()).await;
        let direct = dps_client::tls_config(None).map(|_| ());
        assert_eq!(tls.get().await.map(|_| ()), direct);
    }
}
