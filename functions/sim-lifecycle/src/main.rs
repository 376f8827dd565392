//! Cold start: logging, configuration, the AWS clients and the IoT Hub TLS client; then the
//! runtime loop.

use std::time::Duration;

use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;
use shared::config::ProcessEnv;
use shared::registry::DynamoRegistry;
use shared::secrets::{CachedSecretStore, SsmSecretStore};
use sim_lifecycle::config::Config;
use sim_lifecycle::handler::{handle, State};
use sim_lifecycle::hub::HubClient;

fn main() -> Result<(), Error> {
    lambda_support::startup::main(run())
}

async fn run() -> Result<(), Error> {
    let config =
        lambda_support::startup::logged(Config::from_env(&ProcessEnv), "invalid configuration")?;
    let extra_roots = match &config.hub_trusted_ca_file {
        Some(path) => Some(lambda_support::startup::logged(
            std::fs::read(path),
            "IOT_HUB_TRUSTED_CA_FILE unreadable",
        )?),
        None => None,
    };
    let tls = lambda_support::startup::logged(
        dps_client::tls_config(extra_roots.as_deref()),
        "TLS configuration",
    )?;
    let sdk = shared::aws::loader(&Default::default()).load().await;
    let state = State {
        registry: DynamoRegistry::new(aws_sdk_dynamodb::Client::new(&sdk), &config.devices_table),
        // Hub credentials change rarely; a warm function asks SSM at most every 5 minutes.
        secrets: CachedSecretStore::new(
            SsmSecretStore::new(aws_sdk_ssm::Client::new(&sdk)),
            Duration::from_secs(300),
        ),
        hub: HubClient::new(tls, config.hub_endpoint.clone()),
        config,
    };
    let state = &state;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        // Within the invocation's own deadline, less a margin to answer.
        let left = event
            .context
            .deadline()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .saturating_sub(Duration::from_millis(300));
        let budget = state.config.budget.min(left);
        handle(event.payload, state, budget)
            .await
            .map_err(Error::from)
    }))
    .await
}
