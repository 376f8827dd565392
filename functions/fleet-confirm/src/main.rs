//! Cold start: logging, configuration, the DynamoDB and AWS IoT clients; then the runtime loop.

use fleet_confirm::config::Config;
use fleet_confirm::handler::handle;
use lambda_runtime::{service_fn, Error, LambdaEvent};
use serde_json::{json, Value};
use shared::aws::CallLimits;
use shared::config::ProcessEnv;
use shared::registry::DynamoRegistry;

fn main() -> Result<(), Error> {
    lambda_support::startup::main(run())
}

async fn run() -> Result<(), Error> {
    let config =
        lambda_support::startup::logged(Config::from_env(&ProcessEnv), "invalid configuration")?;
    let sdk = shared::aws::loader(&CallLimits::default()).load().await;
    let registry = DynamoRegistry::new(aws_sdk_dynamodb::Client::new(&sdk), &config.devices_table);
    let iot = aws_sdk_iot::Client::new(&sdk);
    let (config, registry, iot) = (&config, &registry, &iot);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let report = handle(event.payload, config, registry, iot).await?;
        Ok::<_, Error>(json!({
            "outcome": report.outcome.code(),
            "retired": report.retired,
        }))
    }))
    .await
}
