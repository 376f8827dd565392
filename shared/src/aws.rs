//! One AWS SDK configuration for every function and tool.
//!
//! The HTTPS client is rustls on ring (no aws-lc C build, so `cargo lambda build --arm64` cross
//! compiles with zig alone). Every call is bounded: a connect timeout, a per-attempt timeout and
//! an overall operation timeout, so an unreachable endpoint costs a known amount of the Lambda's
//! deadline. `AWS_ENDPOINT_URL` (standard SDK variable) redirects all clients to a local emulator.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, ConfigLoader};
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::error::SdkError;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

/// Bounds on SDK calls. The defaults fit a function that answers within a few seconds.
#[derive(Debug, Clone)]
pub struct CallLimits {
    pub connect: Duration,
    pub attempt: Duration,
    pub operation: Duration,
    pub max_attempts: u32,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(1_000),
            attempt: Duration::from_millis(1_500),
            operation: Duration::from_millis(3_000),
            max_attempts: 3,
        }
    }
}

/// A config loader with the project's HTTP client, timeouts and retries. Callers may chain more
/// (tests add an endpoint, a region and static credentials) before `.load().await`.
pub fn loader(limits: &CallLimits) -> ConfigLoader {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(limits.connect)
                .operation_attempt_timeout(limits.attempt)
                .operation_timeout(limits.operation)
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(limits.max_attempts))
}

/// What went wrong calling AWS, reduced to what callers decide on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The service asked us to slow down; retry later.
    Throttled,
    /// A service error with this code (e.g. `ConditionalCheckFailedException`).
    Service(String),
    /// Timeout, connection failure or an unreadable response.
    Unavailable(String),
}

/// Classifies an SDK error. The text kept is the error's code and kind, never request data.
pub fn classify<E, R>(err: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata,
{
    match err {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or("Unknown").to_owned();
            if is_throttling(&code) {
                Failure::Throttled
            } else {
                Failure::Service(code)
            }
        }
        SdkError::TimeoutError(_) => Failure::Unavailable("timed out".into()),
        SdkError::DispatchFailure(f) if f.is_timeout() => Failure::Unavailable("timed out".into()),
        SdkError::DispatchFailure(_) => Failure::Unavailable("connection failed".into()),
        SdkError::ResponseError(_) => Failure::Unavailable("unreadable response".into()),
        SdkError::ConstructionFailure(_) => Failure::Unavailable("request not built".into()),
        _ => Failure::Unavailable("unknown SDK error".into()),
    }
}

/// A conditional write's outcome: `Ok(true)` written, `Ok(false)` its condition did not hold
/// (someone else got there first, or it is already so), else what went wrong.
pub fn conditional<T, E, R>(result: Result<T, SdkError<E, R>>) -> Result<bool, Failure>
where
    E: ProvideErrorMetadata,
{
    match result {
        Ok(_) => Ok(true),
        Err(e) => match classify(&e) {
            Failure::Service(code) if code == "ConditionalCheckFailedException" => Ok(false),
            other => Err(other),
        },
    }
}

fn is_throttling(code: &str) -> bool {
    matches!(
        code,
        "ThrottlingException"
            | "Throttling"
            | "ThrottledException"
            | "TooManyRequestsException"
            | "ProvisionedThroughputExceededException"
            | "RequestLimitExceeded"
            | "LimitExceededException"
    )
}
