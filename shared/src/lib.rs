//! The AWS stores of the provisioning functions, behind the traits their consumers need, and
//! the domain crate's modules re-exported so that a function depends on one crate for both.
//!
//! Nothing here knows about `lambda_runtime` or event types: the functions adapt their events to
//! these types, so the same logic serves Lambda, the local emulators and the tests. The rules
//! without I/O are the `domain` crate; the DPS MQTT client is `dps-client` (built on `domain`
//! alone); what only a Lambda process needs is `lambda-support` (start-up, logging, local
//! replay); the SSM adapter is behind the `ssm` feature. A function links only what it uses.
//!
//! - [`secrets`]: secret lookup (SSM Parameter Store, DynamoDB) behind a trait, with a TTL cache.
//! - [`registry`]: the device table (SIM and serial allowlists, provisioning records).
//! - [`quota`]: per-subject sliding-window rate limits in the device table.
//! - [`budget`]: fleet-wide budgets per fixed window, counted atomically in the device table.
//! - [`aws`]: one SDK configuration on rustls + ring, bounded by timeouts.
//! - `ca` (feature `kms`): the X.509 device CA whose key is held in AWS KMS.
//! - `memory` (feature `memory`, tests only): in-memory stores with the adapters' conditions.

#[cfg(feature = "test-strategies")]
pub use domain::strategies;
pub use domain::{clock, config, keys, sas, soracom};

pub mod aws;
pub mod budget;
#[cfg(feature = "kms")]
pub mod ca;
#[cfg(any(test, feature = "memory"))]
pub mod memory;
pub mod quota;
pub mod registry;
pub mod secrets;
