//! Domain code shared by the provisioning functions.
//!
//! Nothing here knows about `lambda_runtime` or event types: the functions adapt their events to
//! these types, so the same logic serves Lambda, the local emulators and the tests.
//!
//! - [`keys`]: symmetric keys, DPS group-key derivation, constant-time comparison.
//! - [`sas`]: Azure DPS SAS tokens (build, parse, verify).
//! - [`soracom`]: SIM identity from a SORACOM Funk client context, SORACOM Beam signatures.
//! - [`secrets`]: secret lookup (SSM Parameter Store, DynamoDB) behind a trait, with a TTL cache.
//! - [`registry`]: the device table (SIM and serial allowlists, provisioning records).
//! - [`dps`]: the Azure DPS MQTT registration client, bounded by a deadline.
//! - [`quota`]: per-subject fixed-window rate limits in the device table.
//! - [`config`]: environment configuration read once, with errors that name the variable.
//! - [`replay`]: the local fix for replaying Funk client contexts through `cargo lambda watch`
//!   (its proxy only with the `local-replay` feature, and never in a release build).
//! - [`aws`]: one SDK configuration on rustls + ring, bounded by timeouts.
//! - `strategies` (feature `test-strategies`, tests only): hostile input for property tests.

pub mod aws;
pub mod clock;
pub mod config;
pub mod dps;
pub mod keys;
pub mod logging;
pub mod quota;
pub mod registry;
pub mod replay;
pub mod sas;
pub mod secrets;
pub mod soracom;
pub mod startup;
#[cfg(any(test, feature = "test-strategies"))]
pub mod strategies;
