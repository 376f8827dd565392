//! Structured logs: JSON lines in Lambda (CloudWatch parses them), readable text elsewhere, as
//! Lambda's advanced logging controls ask.
//!
//! - format: `AWS_LAMBDA_LOG_FORMAT` (`JSON` or `Text`, set by the function's `LoggingConfig`);
//!   unset, JSON in Lambda and text elsewhere;
//! - level: `RUST_LOG` when set (a developer's filter), else `AWS_LAMBDA_LOG_LEVEL` (`TRACE`,
//!   `DEBUG`, `INFO`, `WARN`, `ERROR`, `FATAL`), else `info`.

use tracing_subscriber::EnvFilter;

/// Whether to write JSON lines, given `AWS_LAMBDA_LOG_FORMAT` and whether this is Lambda.
pub fn json_format(log_format: Option<&str>, in_lambda: bool) -> bool {
    match log_format.map(str::trim) {
        Some(f) if f.eq_ignore_ascii_case("json") => true,
        Some(f) if f.eq_ignore_ascii_case("text") => false,
        _ => in_lambda,
    }
}

/// The `tracing` filter directive for `AWS_LAMBDA_LOG_LEVEL` (Lambda's names; FATAL has no
/// `tracing` level of its own and means errors only). Unknown or unset: `info`.
pub fn level_directive(log_level: Option<&str>) -> &'static str {
    match log_level.map(|l| l.trim().to_ascii_uppercase()).as_deref() {
        Some("TRACE") => "trace",
        Some("DEBUG") => "debug",
        Some("WARN") => "warn",
        Some("ERROR") | Some("FATAL") => "error",
        _ => "info",
    }
}

/// Installs the global subscriber once; later calls are no-ops.
pub fn init() {
    let env = |name: &str| std::env::var(name).ok();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(level_directive(env("AWS_LAMBDA_LOG_LEVEL").as_deref()))
    });
    let in_lambda = std::env::var_os("AWS_LAMBDA_FUNCTION_NAME").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json_format(env("AWS_LAMBDA_LOG_FORMAT").as_deref(), in_lambda) {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_ansi(false)
            .try_init()
    } else {
        builder.try_init()
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambdas_log_settings_choose_format_and_level() {
        assert!(json_format(None, true));
        assert!(!json_format(None, false));
        assert!(!json_format(Some("Text"), true));
        assert!(json_format(Some("JSON"), false));
        assert!(json_format(Some("bogus"), true));
        assert_eq!(level_directive(Some("DEBUG")), "debug");
        assert_eq!(level_directive(Some("fatal")), "error");
        assert_eq!(level_directive(Some("WARN")), "warn");
        assert_eq!(level_directive(None), "info");
        assert_eq!(level_directive(Some("LOUD")), "info");
    }
}
