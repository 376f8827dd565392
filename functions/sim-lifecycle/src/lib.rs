//! sim-lifecycle: SORACOM's Event Handler calls it when a SIM's status changes. A suspended or
//! terminated SIM is blocked in the device table (so azure-dps-register refuses it, record or
//! not) and its device is disabled in Azure IoT Hub (so the connection string it already holds
//! stops working). A SIM that becomes active again is unblocked only if the operator opted in,
//! and only if SORACOM's event blocked it. A malformed or unknown event changes nothing.

pub mod config;
pub mod event;
pub mod handler;
pub mod hub;
