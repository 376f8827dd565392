//! What a function's process needs around its handler, apart from the domain: `startup` (the
//! first lines of every `main`), `logging` (JSON lines in Lambda, as `AWS_LAMBDA_LOG_FORMAT`
//! asks), `metrics` (CloudWatch Embedded Metric Format), and `replay` (the local fix for replaying Funk client contexts through `cargo lambda
//! watch`; its proxy only with the `local-replay` feature, and never in a release build).

pub mod logging;
pub mod metrics;
pub mod replay;
pub mod startup;
