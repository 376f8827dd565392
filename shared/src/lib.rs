//! Domain code and AWS stores shared by the provisioning functions.
//!
//! Nothing here knows about `lambda_runtime` or event types: the functions adapt their events to
//! these types, so the same logic serves Lambda, the local emulators and the tests. The DPS MQTT
//! client is its own crate (`dps-client`), and so is what only a Lambda process needs
//! (`lambda-support`: start-up, logging, local replay), so that a function links only what it
//! uses; the SSM adapter is behind the `ssm` feature for the same reason.
//!
//! - [`keys`]: symmetric keys, DPS group-key derivation, constant-time comparison.
//! - [`sas`]: Azure DPS SAS tokens (build, parse, verify).
//! - [`soracom`]: SIM identity from a SORACOM Funk client context, SORACOM Beam signatures.
//! - [`secrets`]: secret lookup (SSM Parameter Store, DynamoDB) behind a trait, with a TTL cache.
//! - [`registry`]: the device table (SIM and serial allowlists, provisioning records).
//! - [`quota`]: per-subject sliding-window rate limits in the device table.
//! - [`config`]: environment configuration read once, with errors that name the variable.
//! - [`aws`]: one SDK configuration on rustls + ring, bounded by timeouts.
//! - `memory` (feature `memory`, tests only): in-memory stores with the adapters' conditions.
//! - `strategies` (feature `test-strategies`, tests only): hostile input for property tests.

pub mod aws;
pub mod clock;
pub mod config;
pub mod keys;
#[cfg(any(test, feature = "memory"))]
pub mod memory;
pub mod quota;
pub mod registry;
pub mod sas;
pub mod secrets;
pub mod soracom;
#[cfg(any(test, feature = "test-strategies"))]
pub mod strategies;
