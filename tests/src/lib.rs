//! Local stand-ins for the services the functions talk to, shared by the end-to-end tests and
//! `make demo`.
//!
//! - [`local_aws`]: a real moto server (SSM, DynamoDB) on a free loopback port, and SDK clients
//!   pointed at it the way `AWS_ENDPOINT_URL` points them in a local run.
//! - [`dps_sim`]: a strict Azure DPS MQTT/TLS simulator (also the `dps-simulator` binary).
//! - [`iot_control`]: a strict AWS IoT control-plane double for CreateProvisioningClaim.
//! - [`iot_mqtt`]: a strict AWS IoT fleet provisioning MQTT/TLS simulator (also the
//!   `iot-simulator` binary) that calls the pre-provisioning hook.
//! - [`stack`]: all of the above started and seeded together, with the functions' environment.
//! - [`lambda_watch`]: `cargo lambda watch` and `cargo lambda invoke`, driven for real.
//! - [`tls`]: run-time certificates for the simulators; [`mqtt_io`]: their MQTT packet I/O.

pub mod bench;
pub mod device_ca;
pub mod dps_sim;
pub mod fault_proxy;
pub mod fixtures;
pub mod http_client;
pub mod installer_site;
pub mod iot_control;
pub mod iot_hub;
pub mod iot_mqtt;
pub mod lambda_watch;
pub mod latency_proxy;
pub mod local_aws;
pub mod mqtt_io;
pub mod mqtt_session;
pub mod mqtt_wire;
pub mod provisioning_template;
pub mod runtime_api;
pub mod serve;
pub mod stack;
pub mod story;
pub mod tls;
