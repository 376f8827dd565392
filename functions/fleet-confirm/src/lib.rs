//! fleet-confirm: AWS IoT publishes a lifecycle event when a client connects
//! (`$aws/events/presence/connected/<clientId>`); a topic rule hands the provisioned things'
//! events to this function, which confirms the serial's provisioning when the certificate that
//! connected is the one fleet-prehook recorded, and then retires every other certificate the
//! thing still holds (the ones a re-provisioning replaced).
//!
//! `main.rs` only initialises; [`handler::handle`] decides, over [`ports::Certificates`] and the
//! device table's [`shared::registry::Confirmations`].

pub mod config;
pub mod event;
pub mod handler;
pub mod iot;
pub mod ports;
