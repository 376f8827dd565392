//! Cold start: logging, configuration, SDK clients; then the runtime loop.

use azure_dps_register::config::Config;
use azure_dps_register::handler::handle;
use azure_dps_register::state::State;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;
use shared::aws::CallLimits;
use shared::config::ProcessEnv;

fn main() -> Result<(), Error> {
    lambda_support::startup::main(run())
}

async fn run() -> Result<(), Error> {
    let config =
        lambda_support::startup::logged(Config::from_env(&ProcessEnv), "invalid configuration")?;
    let sdk = shared::aws::loader(&CallLimits::default()).load().await;
    let state = lambda_support::startup::logged(State::new(config, &sdk), "cannot start")?;
    let state = &state;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        Ok::<_, Error>(handle(event.payload, &event.context, state).await)
    }))
    .await
}
