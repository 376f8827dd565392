//! The end-to-end tests: one test binary (the heavy dependencies link once), one module per
//! topic, each running the real code against the local emulators (moto server, the DPS and AWS
//! IoT simulators); `tests/README.md` says what each emulator checks. What runs cargo itself
//! (`cargo lambda watch`, release builds) is the other binary, `tests/replay.rs`, so that it
//! never competes for the two cores with the tests that measure deadlines.

/// The operators' CLI (provisioning-admin) against the device table in moto.
mod admin;
/// The official AWS IoT Device SDK (Python) provisioning by claim through the AWS IoT simulator.
mod aws_interop;
/// azure-dps-register's handler against moto and the DPS simulator.
mod azure_dps_register;
/// SORACOM Beam's front door of azure-dps-register: signed HTTP API events.
mod beam;
/// claim-issuer's handler against the IoT control-plane double and the device table.
mod claim_issuer;
/// The DPS client in a TLS MQTT conversation with the DPS simulator.
mod dps_client;
/// azure-dps-register at fleet scale: records, key rotation, the per-SIM and fleet limits.
mod dps_scale;
/// Installer → claim → fleet-device → AWS IoT MQTT simulator → hook → thing.
mod fleet_flow;
/// fleet-prehook's handler against the device table.
mod hook;
/// The SAM template and deploy script.
mod infra;
/// The installers' page in headless Chromium: Cognito sign-in, the JWT authorizer stand-in,
/// claim-issuer, the downloads.
mod installer_page;
/// The official Azure IoT device SDKs against the DPS simulator.
mod interop;
/// The X.509 device CA whose key stays in KMS (moto).
mod kms_ca;
/// sim-lifecycle (SORACOM Event Handler) against moto and the IoT Hub registry stand-in.
mod lifecycle;
/// The AWS stores (SSM, DynamoDB) against moto.
mod stores;

mod dps_fixture;
mod fleet_fixture;
