//! The DPS simulator as the DPS tests use it: one group key, two hubs, a client registering.

use std::time::Duration;

use dps_client::{self as dps, DpsError, RegistrationRequest};
use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator, Fault};
use local_emulators::local_aws::random_key_base64;
use shared::config::HostPort;
use shared::keys::SymmetricKey;
use tokio::time::Instant;

pub(crate) const SCOPE: &str = "0ne00SIM001";
pub(crate) const IMSI: &str = "440103123456789";

pub(crate) struct Fixture {
    pub(crate) sim: DpsSimulator,
    pub(crate) group_key: SymmetricKey,
    pub(crate) endpoint: HostPort,
}

pub(crate) async fn simulator(configure: impl FnOnce(&mut DpsSimConfig)) -> Fixture {
    let group_key = SymmetricKey::from_base64(&random_key_base64()).unwrap();
    let mut config = DpsSimConfig::new(SCOPE);
    config.group_keys.push(group_key.clone());
    config.hubs = vec![
        "hub-a.azure-devices.net".into(),
        "hub-b.azure-devices.net".into(),
    ];
    configure(&mut config);
    let sim = DpsSimulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let endpoint = HostPort {
        host: "127.0.0.1".into(),
        port: sim.addr().port(),
    };
    Fixture {
        sim,
        group_key,
        endpoint,
    }
}

impl Fixture {
    pub(crate) async fn register_with(
        &self,
        key: &SymmetricKey,
        payload: Option<&serde_json::Value>,
        budget: Duration,
    ) -> (Result<dps::Assignment, DpsError>, Duration) {
        let tls = dps::tls_config(Some(self.sim.ca_pem().as_bytes())).unwrap();
        let request = RegistrationRequest {
            endpoint: &self.endpoint,
            id_scope: SCOPE,
            registration_id: IMSI,
            attestation: dps_client::Attestation::SymmetricKey(key),
            payload,
            tls,
        };
        let started = Instant::now();
        let result = dps::register(&request, started + budget).await;
        (result, started.elapsed())
    }

    pub(crate) async fn register(
        &self,
        budget: Duration,
    ) -> (Result<dps::Assignment, DpsError>, Duration) {
        let key = self.group_key.derive_device_key(IMSI);
        self.register_with(&key, None, budget).await
    }
}

/// Outcomes must arrive within the budget (plus scheduling slack), never after.
pub(crate) fn assert_within(elapsed: Duration, budget: Duration) {
    assert!(
        elapsed <= budget + Duration::from_millis(400),
        "took {elapsed:?} for a {budget:?} budget"
    );
}

/// The failures that may pass on their own, each for the first `n` times: CONNACK "server
/// unavailable", a reset during the TLS handshake, a registration failed on DPS's side, an
/// expired operation.
pub(crate) fn transient_faults(n: u32) -> [Fault; 4] {
    [
        Fault::ConnackUnavailable(n),
        Fault::ResetHandshake(n),
        Fault::FailServerError(n),
        Fault::ExpireOperation(n),
    ]
}
