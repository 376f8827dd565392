//! Cold start: logging, configuration, SDK clients; then the runtime loop.

use claim_issuer::config::Config;
use claim_issuer::handler::{handle, State};
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
    let state = State::new(config, &sdk);
    let state = &state;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        Ok::<_, Error>(handle(event.payload, shared::clock::unix_now(), state).await)
    }))
    .await
}
