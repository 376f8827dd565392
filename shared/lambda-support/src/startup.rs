//! The common first lines of every function's `main`: logging, the local-replay proxy when
//! compiled for local runs, then the async runtime running the function's own start-up.

use std::future::Future;

/// Error type of `main` (the same as `lambda_runtime::Error`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs `start` (cold start, then the runtime loop) on a multi-threaded tokio runtime.
pub fn main(start: impl Future<Output = Result<(), BoxError>>) -> Result<(), BoxError> {
    crate::logging::init();
    // Local runs only (see `replay`); before the async runtime starts, because it repoints
    // AWS_LAMBDA_RUNTIME_API while no other thread reads the environment.
    #[cfg(feature = "local-replay")]
    crate::replay::install()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(start)
}

/// A cold-start step's result, with its failure logged (one structured line, saying `what`)
/// before it ends the process: Lambda shows the log, not the returned error's `Debug`.
pub fn logged<T, E>(result: Result<T, E>, what: &str) -> Result<T, BoxError>
where
    E: std::fmt::Display + Into<BoxError>,
{
    result.map_err(|e| {
        tracing::error!(error = %e, "{what}");
        e.into()
    })
}
