//! Cold start: logging, configuration, SDK clients; then the runtime loop. Funk invocations and
//! SORACOM Beam's requests (through the HTTP API) arrive at the same function; an HTTP API event
//! goes through the Beam gate first.

use std::time::Duration;

use azure_dps_register::beam::{self, Gate};
use azure_dps_register::config::Config;
use azure_dps_register::handler::handle;
use azure_dps_register::state::State;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;
use shared::aws::CallLimits;
use shared::config::ProcessEnv;
use shared::secrets::{CachedSecretStore, SsmSecretStore};

fn main() -> Result<(), Error> {
    lambda_support::startup::main(run())
}

async fn run() -> Result<(), Error> {
    let config =
        lambda_support::startup::logged(Config::from_env(&ProcessEnv), "invalid configuration")?;
    let sdk = shared::aws::loader(&CallLimits::default()).load().await;
    let state = lambda_support::startup::logged(State::new(config, &sdk), "cannot start")?;
    let gate = Gate {
        config: state.config.beam.clone(),
        // The PSK changes rarely; a warm function asks SSM at most every 5 minutes.
        psk: CachedSecretStore::new(
            SsmSecretStore::new(aws_sdk_ssm::Client::new(&sdk)),
            Duration::from_secs(300),
        ),
        // The same device table client as the registrations: no second client at cold start.
        used: state.registry.clone(),
    };
    let (state, gate) = (&state, &gate);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        if beam::is_http_event(&event.payload) {
            return Ok::<_, Error>(beam::handle(event.payload, &event.context, state, gate).await);
        }
        let answer = handle(event.payload, &event.context, state).await;
        Ok(serde_json::to_value(&answer)?)
    }))
    .await
}
