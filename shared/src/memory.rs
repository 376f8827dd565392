//! In-memory stand-ins for the stores (feature `memory`), shared by the functions' unit tests:
//! the same traits, the same conditions as the DynamoDB adapters (a write that would fail its
//! condition there fails here with the same error), and switches for the failures a real table
//! has. The DynamoDB adapters themselves are proved against the local AWS endpoint in
//! `tests/`; these let every rule of a handler be tested with no server at all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::budget::{grant, window_start, Budget, Grant};
use crate::quota::{decide, Quota, QuotaError, Verdict};
use crate::registry::{
    certificate_key, CertificateIssue, ClaimLog, ClaimRecord, ClaimUsed, Confirmation,
    Confirmations, DeviceId, DeviceRecord, DeviceStatus, OnceLog, Provisioning, ProvisioningState,
    ProvisioningWrite, Registration, RegistryError, Replaces, SerialRegistry, SimEntries,
    SimRegistry,
};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device table, in memory.
#[derive(Default)]
pub struct MemoryTable {
    devices: Mutex<HashMap<DeviceId, DeviceRecord>>,
    claims: Mutex<HashMap<String, ClaimRecord>>,
    /// One-time uses (`OnceLog`), by key, with when they may be forgotten.
    once: Mutex<HashMap<String, u64>>,
    /// Certificates recorded as issued, by serial.
    certificates: Mutex<std::collections::BTreeMap<String, CertificateIssue>>,
    /// The IMSIs each SIM card lists (by SIM ID), as `record_registration` adds them.
    card_imsis: Mutex<HashMap<String, std::collections::BTreeSet<String>>>,
    /// Every call fails with this while set.
    failure: Mutex<Option<RegistryError>>,
    /// Every call waits this long first (a slow or hanging table).
    delay: Mutex<Option<Duration>>,
    calls: AtomicUsize,
    /// The next this many registration records fail as an overloaded table's do.
    failing_records: AtomicUsize,
    /// The next registration record finds its SIM blocked (by an operator, between the
    /// function's check and its write).
    block_before_record: std::sync::atomic::AtomicBool,
}

impl MemoryTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates or replaces an entry.
    pub fn put(&self, record: DeviceRecord) {
        lock(&self.devices).insert(record.id.clone(), record);
    }

    pub fn get(&self, id: &DeviceId) -> Option<DeviceRecord> {
        lock(&self.devices).get(id).cloned()
    }

    /// The certificates recorded as issued, by serial.
    pub fn certificates(&self) -> Vec<CertificateIssue> {
        lock(&self.certificates).values().cloned().collect()
    }

    /// The IMSIs the card `sim_id` lists, in order.
    pub fn card_imsis(&self, sim_id: &str) -> Vec<String> {
        lock(&self.card_imsis)
            .get(sim_id)
            .map(|imsis| imsis.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn put_claim(&self, claim: ClaimRecord) {
        lock(&self.claims).insert(claim.certificate_id.clone(), claim);
    }

    pub fn get_claim(&self, certificate_id: &str) -> Option<ClaimRecord> {
        lock(&self.claims).get(certificate_id).cloned()
    }

    /// From now on every call fails with `failure` (`None`: works again).
    pub fn fail_with(&self, failure: Option<RegistryError>) {
        *lock(&self.failure) = failure;
    }

    /// From now on every call waits `delay` first.
    pub fn delay(&self, delay: Option<Duration>) {
        *lock(&self.delay) = delay;
    }

    /// The next `n` registration records fail with `Unavailable`, then they work again.
    pub fn fail_next_records(&self, n: usize) {
        self.failing_records.store(n, Ordering::Relaxed);
    }

    /// The next registration record finds its IMSI's entry blocked: the operator blocked the
    /// SIM while its registration was in flight.
    pub fn block_before_next_record(&self) {
        self.block_before_record.store(true, Ordering::Relaxed);
    }

    /// Calls made so far (reads and writes).
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Relaxed)
    }

    async fn enter(&self) -> Result<(), RegistryError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let delay = *lock(&self.delay);
        if let Some(delay) = delay {
            tokio::time::sleep(delay).await;
        }
        match lock(&self.failure).clone() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}

/// Allowed and within its validity at `now`: what every provisioning condition starts with.
fn qualifies(record: &DeviceRecord, now: u64) -> bool {
    record.status == DeviceStatus::Allowed && record.valid_until.is_none_or(|until| until > now)
}

/// The serial's condition of `write`, as the DynamoDB adapter words it.
fn serial_condition_holds(record: &DeviceRecord, write: &ProvisioningWrite) -> bool {
    let current = record.provisioning.as_ref();
    qualifies(record, write.at)
        && match &write.replaces {
            Replaces::Nothing => current.is_none(),
            Replaces::Itself => current.is_some_and(|p| p.certificate_id == write.certificate_id),
            Replaces::Reprovisioning { old } => {
                record.allow_reprovision && current.is_some_and(|p| &p.certificate_id == old)
            }
            Replaces::StalePending {
                old,
                pending_since_before,
                issued_to,
            } => current.is_some_and(|p| {
                &p.certificate_id == old
                    && p.state == ProvisioningState::Pending
                    && p.provisioned_at <= *pending_since_before
                    && p.issued_to.as_ref() == Some(issued_to)
            }),
        }
}

/// The claim's condition: still valid, unused or used by this certificate, bound to this
/// serial or none.
fn claim_condition_holds(claim: &ClaimRecord, write: &ProvisioningWrite, at: u64) -> bool {
    claim.valid_until > at
        && claim
            .used
            .as_ref()
            .is_none_or(|u| u.certificate_id == write.certificate_id)
        && claim.serial.as_ref().is_none_or(|s| *s == write.serial)
}

impl OnceLog for MemoryTable {
    async fn first_use(&self, key: &str, until: u64) -> Result<bool, RegistryError> {
        self.enter().await?;
        let mut once = lock(&self.once);
        if once.contains_key(key) {
            return Ok(false);
        }
        once.insert(key.to_owned(), until);
        Ok(true)
    }
}

impl MemoryTable {
    /// Until when a one-time use is kept, if it was recorded.
    pub fn used_until(&self, key: &str) -> Option<u64> {
        lock(&self.once).get(key).copied()
    }
}

impl SimRegistry for MemoryTable {
    async fn record_certificate(&self, issue: &CertificateIssue) -> Result<(), RegistryError> {
        self.enter().await?;
        let mut certificates = lock(&self.certificates);
        if certificates.contains_key(&issue.serial) {
            return Err(RegistryError::Conflict(certificate_key(&issue.serial)));
        }
        certificates.insert(issue.serial.clone(), issue.clone());
        Ok(())
    }

    async fn sim(&self, imsi: &str, sim_id: Option<&str>) -> Result<SimEntries, RegistryError> {
        self.enter().await?;
        let devices = lock(&self.devices);
        Ok(SimEntries {
            by_imsi: devices.get(&DeviceId::Sim(imsi.to_owned())).cloned(),
            by_card: sim_id.and_then(|id| devices.get(&DeviceId::SimCard(id.to_owned())).cloned()),
        })
    }

    async fn record_registration(
        &self,
        imsi: &str,
        sim_id: Option<&str>,
        registration: &Registration,
    ) -> Result<(), RegistryError> {
        self.enter().await?;
        let failing =
            self.failing_records
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(RegistryError::Unavailable("RequestTimeout".into()));
        }
        let id = DeviceId::Sim(imsi.to_owned());
        let mut devices = lock(&self.devices);
        let entry = devices.entry(id.clone()).or_insert_with(|| DeviceRecord {
            status: DeviceStatus::Unlisted,
            ..DeviceRecord::allowed(id.clone())
        });
        if let Some(sim_id) = sim_id {
            lock(&self.card_imsis)
                .entry(sim_id.to_owned())
                .or_default()
                .insert(imsi.to_owned());
        }
        if self.block_before_record.swap(false, Ordering::Relaxed) {
            entry.status = DeviceStatus::Blocked;
        }
        if entry.status == DeviceStatus::Blocked {
            return Err(RegistryError::Conflict(id.key()));
        }
        entry.registration = Some(registration.clone());
        Ok(())
    }
}

impl SerialRegistry for MemoryTable {
    async fn serial(&self, serial: &str) -> Result<Option<DeviceRecord>, RegistryError> {
        self.enter().await?;
        Ok(self.get(&DeviceId::Serial(serial.to_owned())))
    }

    async fn record_provisioning(&self, write: &ProvisioningWrite) -> Result<(), RegistryError> {
        self.enter().await?;
        let id = DeviceId::Serial(write.serial.clone());
        // One lock over both items: the transaction is atomic.
        let mut devices = lock(&self.devices);
        let mut claims = lock(&self.claims);
        let record = devices
            .get_mut(&id)
            .filter(|r| serial_condition_holds(r, write))
            .ok_or_else(|| RegistryError::Conflict(id.key()))?;
        if let Some(spend) = &write.spend_claim {
            let spent = || RegistryError::ClaimSpent(spend.claim_certificate_id.clone());
            let claim = claims
                .get_mut(&spend.claim_certificate_id)
                .filter(|c| claim_condition_holds(c, write, spend.at))
                .ok_or_else(spent)?;
            let at = claim.used.as_ref().map_or(spend.at, |u| u.at);
            claim.used = Some(ClaimUsed {
                certificate_id: write.certificate_id.clone(),
                serial: write.serial.clone(),
                at,
            });
        }
        if write.replaces == Replaces::Itself {
            return Ok(());
        }
        let replaced = match &write.replaces {
            Replaces::Reprovisioning { old } | Replaces::StalePending { old, .. } => {
                Some(old.clone())
            }
            _ => None,
        };
        if matches!(write.replaces, Replaces::Reprovisioning { .. }) {
            record.allow_reprovision = false;
        }
        record.provisioning = Some(Provisioning {
            certificate_id: write.certificate_id.clone(),
            claim_certificate_id: write.claim_certificate_id.clone(),
            provisioned_at: write.at,
            state: ProvisioningState::Pending,
            replaced_certificate_id: replaced,
            issued_to: write.issued_to.clone(),
            confirmed_at: None,
        });
        Ok(())
    }
}

impl Confirmations for MemoryTable {
    async fn confirm(
        &self,
        serial: &str,
        certificate_id: &str,
        at: u64,
    ) -> Result<Confirmation, RegistryError> {
        self.enter().await?;
        let mut devices = lock(&self.devices);
        let provisioning = devices
            .get_mut(&DeviceId::Serial(serial.to_owned()))
            .and_then(|r| r.provisioning.as_mut())
            .filter(|p| p.certificate_id == certificate_id);
        let Some(p) = provisioning else {
            return Ok(Confirmation::NotRecorded);
        };
        let newly = p.state == ProvisioningState::Pending;
        if newly {
            p.state = ProvisioningState::Confirmed;
            p.confirmed_at = Some(at);
        }
        Ok(Confirmation::Recorded {
            newly,
            replaced: p.replaced_certificate_id.clone(),
        })
    }

    async fn retired(
        &self,
        serial: &str,
        certificate_id: &str,
        replaced: &str,
    ) -> Result<(), RegistryError> {
        self.enter().await?;
        let mut devices = lock(&self.devices);
        if let Some(p) = devices
            .get_mut(&DeviceId::Serial(serial.to_owned()))
            .and_then(|r| r.provisioning.as_mut())
            .filter(|p| {
                p.certificate_id == certificate_id
                    && p.replaced_certificate_id.as_deref() == Some(replaced)
            })
        {
            p.replaced_certificate_id = None;
        }
        Ok(())
    }
}

impl ClaimLog for MemoryTable {
    async fn record_claim(&self, claim: &ClaimRecord) -> Result<(), RegistryError> {
        self.enter().await?;
        let mut claims = lock(&self.claims);
        if claims.contains_key(&claim.certificate_id) {
            return Err(RegistryError::Conflict(format!(
                "claim#{}",
                claim.certificate_id
            )));
        }
        claims.insert(claim.certificate_id.clone(), claim.clone());
        Ok(())
    }

    async fn claim(&self, certificate_id: &str) -> Result<Option<ClaimRecord>, RegistryError> {
        self.enter().await?;
        Ok(self.get_claim(certificate_id))
    }
}

/// A per-subject sliding window, in memory, with the DynamoDB adapter's decision.
pub struct MemoryQuota {
    limit: u32,
    window_secs: u64,
    uses: Mutex<HashMap<String, Vec<u64>>>,
    failure: Mutex<Option<QuotaError>>,
}

impl MemoryQuota {
    pub fn new(limit: u32, window_secs: u64) -> Self {
        Self {
            limit,
            window_secs,
            uses: Mutex::new(HashMap::new()),
            failure: Mutex::new(None),
        }
    }

    pub fn fail_with(&self, failure: Option<QuotaError>) {
        *lock(&self.failure) = failure;
    }
}

impl Quota for MemoryQuota {
    async fn consume(&self, subject: &str, now: u64) -> Result<Verdict, QuotaError> {
        if let Some(failure) = lock(&self.failure).clone() {
            return Err(failure);
        }
        let mut uses = lock(&self.uses);
        let used = uses.entry(subject.to_owned()).or_default();
        match decide(used, now, self.limit, self.window_secs) {
            Ok(recent) => {
                *used = recent;
                Ok(Verdict::Allowed {
                    remaining: self.limit.saturating_sub(used.len() as u32),
                })
            }
            Err(retry_after) => Ok(Verdict::Exceeded { retry_after }),
        }
    }

    async fn exceeded(&self, subject: &str, now: u64) -> Result<Option<u64>, QuotaError> {
        if let Some(failure) = lock(&self.failure).clone() {
            return Err(failure);
        }
        let uses = lock(&self.uses);
        let used = uses.get(subject).map(Vec::as_slice).unwrap_or_default();
        Ok(decide(used, now, self.limit, self.window_secs).err())
    }
}

/// A fleet-wide budget, in memory, with the DynamoDB adapter's decision.
pub struct MemoryBudget {
    limit: u32,
    window_secs: u64,
    counts: Mutex<HashMap<u64, u64>>,
    /// Every unit ever taken, given back or not.
    taken: AtomicUsize,
    failure: Mutex<Option<QuotaError>>,
}

impl MemoryBudget {
    pub fn new(limit: u32, window_secs: u64) -> Self {
        Self {
            limit,
            window_secs: window_secs.max(1),
            counts: Mutex::new(HashMap::new()),
            taken: AtomicUsize::new(0),
            failure: Mutex::new(None),
        }
    }

    pub fn fail_with(&self, failure: Option<QuotaError>) {
        *lock(&self.failure) = failure;
    }

    /// How many units were ever taken, including those given back.
    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Relaxed)
    }

    /// How many starts were asked for in the window `now` falls in.
    pub fn asked(&self, now: u64) -> u64 {
        let start = window_start(now, self.window_secs);
        lock(&self.counts).get(&start).copied().unwrap_or(0)
    }
}

impl Budget for MemoryBudget {
    async fn take(&self, now: u64) -> Result<Grant, QuotaError> {
        if let Some(failure) = lock(&self.failure).clone() {
            return Err(failure);
        }
        self.taken.fetch_add(1, Ordering::Relaxed);
        let start = window_start(now, self.window_secs);
        let mut counts = lock(&self.counts);
        let count = counts.entry(start).or_insert(0);
        *count += 1;
        Ok(grant(*count, self.limit, start, self.window_secs, now))
    }

    async fn give_back(&self, now: u64) -> Result<(), QuotaError> {
        if let Some(failure) = lock(&self.failure).clone() {
            return Err(failure);
        }
        let start = window_start(now, self.window_secs);
        if let Some(count) = lock(&self.counts).get_mut(&start) {
            *count = count.saturating_sub(1);
        }
        Ok(())
    }
}
