//! The provisioning rules, without I/O: everything here is a pure function of its input (and
//! the clock), so it is tested without any server, and every other crate builds on it.
//!
//! - [`keys`]: symmetric keys, DPS group-key derivation, constant-time comparison.
//! - [`sas`]: Azure DPS SAS tokens (build, parse, verify).
//! - [`soracom`]: SIM identity from a SORACOM Funk client context, SORACOM Beam signatures.
//! - [`config`]: environment configuration read once, with errors that name the variable.
//! - [`clock`]: Unix time.
//! - `strategies` (feature `test-strategies`, tests only): hostile input for property tests.

pub mod clock;
pub mod config;
pub mod keys;
pub mod sas;
pub mod soracom;
#[cfg(any(test, feature = "test-strategies"))]
pub mod strategies;
