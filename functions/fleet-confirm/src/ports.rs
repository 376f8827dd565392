//! What the handler needs of AWS IoT, by its needs.

use std::future::Future;

use shared::aws::Failure;

/// A certificate attached to a thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub certificate_id: String,
    /// Its ARN, as `ListThingPrincipals` names it (what `DetachThingPrincipal` takes).
    pub arn: String,
}

/// The thing's certificates. Calls are bounded by the SDK's timeouts.
pub trait Certificates: Send + Sync {
    /// The certificates attached to `thing`.
    fn attached(&self, thing: &str) -> impl Future<Output = Result<Vec<Attached>, Failure>> + Send;

    /// Sets `certificate` INACTIVE (it can no longer connect) and detaches it from `thing`.
    /// Idempotent.
    fn retire(
        &self,
        thing: &str,
        certificate: &Attached,
    ) -> impl Future<Output = Result<(), Failure>> + Send;
}
