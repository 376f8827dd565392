//! What the handler needs from outside, by what it needs it for: the device key of a SIM (or,
//! with X.509 attestation, a device certificate), a DPS registration, and leave to start one.
//! The deployed function's implementations are in `state`; the unit tests use in-memory ones.
//! (The device table is `shared::registry::SimRegistry`.)

use std::future::Future;
use std::time::Duration;

use dps_client::{Assignment, DpsError};
use serde_json::Value;
use shared::ca::{CaError, DeviceCertificate};
use shared::keys::SymmetricKey;
use shared::quota::QuotaError;
use tokio::time::Instant;

/// Why a SIM's device key could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFailure {
    /// Individual enrollment: this SIM has no key, so no enrollment.
    #[error("no individual key for this SIM")]
    NoEnrollment,
    /// The store may answer later (throttled, unreachable).
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// The key is missing or unusable where the configuration says it is.
    #[error("key unusable: {0}")]
    Misconfigured(String),
}

/// The device key of a SIM: derived from the enrollment group's key, or its individual key.
pub trait DeviceKeys: Send + Sync {
    fn device_key(
        &self,
        imsi: &str,
        registration_id: &str,
    ) -> impl Future<Output = Result<SymmetricKey, KeyFailure>> + Send;
}

/// A device certificate, its key and the chain above it, as the device receives them.
pub struct Credentials {
    pub certificate: DeviceCertificate,
    /// The certificates the device presents above its own, PEM.
    pub chain_pem: String,
}

/// The device CA of X.509 attestation.
pub trait DeviceCa: Send + Sync {
    /// A client certificate for `registration_id` (its CN) with a fresh key, valid for
    /// `lifetime`. Unbounded: the caller bounds the wait.
    fn issue(
        &self,
        registration_id: &str,
        lifetime: Duration,
    ) -> impl Future<Output = Result<Credentials, CaError>> + Send;
}

/// How the device proves itself to DPS.
#[derive(Clone, Copy)]
pub enum Proof<'a> {
    /// A SAS token of this key.
    Key(&'a SymmetricKey),
    /// This certificate in the TLS handshake.
    Certificate(&'a Credentials),
}

/// One device's registration, as DPS receives it.
pub struct Enrollment<'a> {
    pub registration_id: &'a str,
    pub proof: Proof<'a>,
    /// Custom allocation data (the device's body).
    pub payload: Option<&'a Value>,
}

/// Azure DPS's device registration API.
pub trait Dps: Send + Sync {
    /// A connection to DPS on which nothing about any device has been sent yet.
    type Line: Send;

    /// Opens a connection (TCP + TLS), so that it can be opened while the SIM is still being
    /// checked; dropping it closes it. Unbounded: the caller bounds the wait.
    fn open(&self) -> impl Future<Output = Result<Self::Line, DpsError>> + Send;

    /// Registers the device, answering by `deadline`: first on `opened` if the caller opened a
    /// connection for it (a failed opening counts as the first connection's failure). A
    /// certificate is presented in the handshake: never on a connection opened before it.
    fn register(
        &self,
        enrollment: &Enrollment<'_>,
        opened: Option<Result<Self::Line, DpsError>>,
        deadline: Instant,
    ) -> impl Future<Output = Result<Assignment, DpsError>> + Send;
}

/// Whether a DPS registration may start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// This SIM has caused `DPS_PER_SIM_PER_HOUR` registrations within the hour.
    SimLimited {
        retry_after: Duration,
    },
    /// The fleet's `DPS_REGISTRATIONS_PER_MINUTE` are spent for this minute; the wait spreads
    /// the refused over the coming minutes.
    OverBudget {
        retry_after: Duration,
    },
}

/// The limits on DPS registrations: the whole fleet's budget and one SIM's share. Only an
/// admitted registration counts against either: a call the fleet refuses spends nothing of its
/// SIM's hour, and a SIM past its share takes nothing from the fleet's budget.
pub trait DpsLimits: Send + Sync {
    /// Whether a registration asked for now would likely be admitted, as far as this instance
    /// knows without asking: false while the fleet's budget is known spent. A connection to
    /// DPS is opened ahead only then, so that a storm over budget costs DPS no handshakes.
    fn likely_admitted(&self, now: u64) -> bool;

    fn admit(
        &self,
        imsi: &str,
        now: u64,
    ) -> impl Future<Output = Result<Admission, QuotaError>> + Send;
}
