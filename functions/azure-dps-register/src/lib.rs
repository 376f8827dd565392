//! azure-dps-register: SORACOM Funk invokes this function for a SIM; it registers the SIM's
//! device with Azure DPS and answers with the IoT Hub connection string (with
//! `ATTESTATION=x509`: a device certificate and its key, see [`x509`]).
//!
//! `main.rs` only initialises; [`handler::handle`] is the per-invocation logic, [`state::State`]
//! the cold-start state, [`config::Config`] the environment.

pub mod answer;
pub mod beam;
#[cfg(test)]
mod beam_tests;
pub mod config;
pub mod handler;
#[cfg(test)]
mod handler_tests;
mod opening;
pub mod ports;
#[cfg(test)]
mod scale_tests;
pub mod state;
mod x509;
#[cfg(test)]
mod x509_tests;
