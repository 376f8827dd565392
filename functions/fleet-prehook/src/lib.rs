//! fleet-prehook: the pre-provisioning hook AWS IoT calls during RegisterThing. It allows a
//! device only when every check passes, and denies (never errors) otherwise, with the reason
//! logged. Nothing about one device survives into the next invocation.

pub mod config;
pub mod handler;
