//! Cold start: logging, configuration, the DynamoDB client; then the runtime loop.

use fleet_prehook::config::Config;
use fleet_prehook::handler::handle;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::Value;
use shared::aws::CallLimits;
use shared::config::ProcessEnv;
use shared::registry::DynamoRegistry;
use std::time::Duration;

fn main() -> Result<(), Error> {
    lambda_support::startup::main(run())
}

async fn run() -> Result<(), Error> {
    let config =
        lambda_support::startup::logged(Config::from_env(&ProcessEnv), "invalid configuration")?;
    // One attempt of DynamoDB may not eat the whole 5 s AWS IoT allows.
    let limits = CallLimits {
        connect: Duration::from_millis(500),
        attempt: Duration::from_millis(800),
        operation: Duration::from_millis(1_500),
        max_attempts: 2,
    };
    let sdk = shared::aws::loader(&limits).load().await;
    let registry = DynamoRegistry::new(aws_sdk_dynamodb::Client::new(&sdk), &config.devices_table);
    let (config, registry) = (&config, &registry);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        Ok::<_, Error>(handle(event.payload, config, registry).await)
    }))
    .await
}
