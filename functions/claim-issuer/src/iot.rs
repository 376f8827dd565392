//! AWS IoT's `CreateProvisioningClaim`, behind the trait the handler needs.

use std::future::Future;

use aws_sdk_iot::operation::create_provisioning_claim::CreateProvisioningClaimError;
use shared::aws::{classify, Failure};

/// A claim certificate as AWS IoT issued it. No `Debug`: it carries the private key.
pub struct IssuedClaim {
    pub certificate_id: String,
    pub certificate_pem: String,
    pub private_key: String,
    /// Unix seconds.
    pub expiration: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("AWS IoT has no such provisioning template")]
    NoSuchTemplate,
    #[error("AWS IoT is throttling")]
    Throttled,
    #[error("AWS IoT failed: {0}")]
    Failed(String),
    #[error("AWS IoT answered without certificate, key or expiration")]
    Incomplete,
}

/// What claim-issuer needs of AWS IoT: a short-lived claim certificate for a template.
pub trait ClaimMinter: Send + Sync {
    fn mint(&self, template: &str) -> impl Future<Output = Result<IssuedClaim, MintError>> + Send;
}

impl ClaimMinter for aws_sdk_iot::Client {
    async fn mint(&self, template: &str) -> Result<IssuedClaim, MintError> {
        let out = self
            .create_provisioning_claim()
            .template_name(template)
            .send()
            .await
            .map_err(|e| {
                let not_found = matches!(
                    e.as_service_error(),
                    Some(CreateProvisioningClaimError::ResourceNotFoundException(_))
                );
                match classify(&e) {
                    _ if not_found => MintError::NoSuchTemplate,
                    Failure::Throttled => MintError::Throttled,
                    Failure::Service(code) | Failure::Unavailable(code) => MintError::Failed(code),
                }
            })?;
        Ok(IssuedClaim {
            certificate_id: out.certificate_id.ok_or(MintError::Incomplete)?,
            certificate_pem: out.certificate_pem.ok_or(MintError::Incomplete)?,
            private_key: out
                .key_pair
                .and_then(|k| k.private_key)
                .ok_or(MintError::Incomplete)?,
            expiration: out
                .expiration
                .map(|t| t.secs().max(0) as u64)
                .ok_or(MintError::Incomplete)?,
        })
    }
}
