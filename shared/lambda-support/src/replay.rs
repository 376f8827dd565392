//! Local replay fix for `cargo lambda watch`: the proxy itself is compiled only with the
//! `local-replay` feature, and only into debug builds (see `release_guard`); the decoding it
//! relies on is plain code, tested in every build.
//!
//! The real Lambda service hands the runtime the client context as raw JSON in the
//! `lambda-runtime-client-context` header, and lambda_runtime parses it as such before any
//! handler runs. cargo-lambda's watch emulator (1.9.2, `functions_router.rs`) base64-encodes it,
//! as the public Invoke API's `X-Amz-Client-Context` is encoded, so every invocation with
//! `--client-context-file` fails in lambda_runtime with `Error("expected value", line: 1,
//! column: 1)` and the process exits: a crash loop.
//!
//! The emulator also sends `lambda-runtime-deadline-ms: 600000` (1970) with every invocation,
//! where the real service sends when the invocation ends; a function that honours its deadline
//! would give up on every local invocation at once.
//!
//! `proxy::install` puts a small Runtime API proxy on loopback between the function and the
//! emulator: it forwards every request unchanged, except that in `/next` answers it replaces a
//! base64 client context with the JSON it encodes and the placeholder deadline with a real one,
//! which is what the real service sends.
//! Deployed builds do not compile this module, so the production path stays the runtime's own.

use base64::Engine;

mod release_guard;

#[cfg(feature = "local-replay")]
mod proxy;
#[cfg(feature = "local-replay")]
pub use proxy::{install, ReplayError};

/// The header that carries the client context on the Runtime API.
pub const CLIENT_CONTEXT: &str = "lambda-runtime-client-context";
/// The header that carries the invocation's deadline (Unix milliseconds).
pub const DEADLINE: &str = "lambda-runtime-deadline-ms";
/// What a placeholder deadline becomes: Lambda's longest timeout from now.
pub const LOCAL_INVOCATION_TIME_MS: u64 = 15 * 60 * 1000;

/// The real service hands out invocations whose deadline lies ahead; one already past when it
/// is handed out is the emulator's placeholder. Returns the deadline to use instead (Lambda's
/// longest timeout from `now_ms`), or `None` to leave the header as it is.
pub fn real_deadline(value: &[u8], now_ms: u64) -> Option<u64> {
    let deadline: u64 = std::str::from_utf8(value).ok()?.trim().parse().ok()?;
    (deadline <= now_ms).then_some(now_ms + LOCAL_INVOCATION_TIME_MS)
}

/// The emulator sends base64; the real service sends JSON. Returns the JSON, or `None` if the
/// value is already JSON (a fixed emulator) or not base64 of JSON (left as it is).
pub fn decode_client_context(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() || text.starts_with('{') {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    serde_json::from_slice::<serde_json::Value>(&decoded).ok()?;
    Some(decoded)
}

/// Splits `host:port/prefix` (optionally with `http://`) into authority and path prefix.
pub fn split_api(api: &str) -> (String, String) {
    let api = api.trim_start_matches("http://");
    match api.find('/') {
        Some(at) => (api[..at].to_owned(), api[at..].to_owned()),
        None => (api.to_owned(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_emulator_sends_and_leaves_json_alone() {
        let json = br#"{"custom":{"imsi":"440103123456789"}}"#;
        let encoded = base64::engine::general_purpose::STANDARD.encode(json);
        assert_eq!(
            decode_client_context(encoded.as_bytes()).as_deref(),
            Some(&json[..])
        );
        assert_eq!(decode_client_context(json), None);
        assert_eq!(decode_client_context(b"bm90IGpzb24="), None); // base64 of "not json"
        assert_eq!(decode_client_context(b""), None);
    }

    #[test]
    fn only_the_emulators_placeholder_deadline_is_replaced() {
        let now = 1_800_000_000_000;
        assert_eq!(
            real_deadline(b"600000", now),
            Some(now + LOCAL_INVOCATION_TIME_MS)
        );
        assert_eq!(real_deadline(b"1800000003000", now), None);
        assert_eq!(real_deadline(b"soon", now), None);
    }

    #[test]
    fn splits_the_runtime_api_address() {
        assert_eq!(
            split_api("127.0.0.1:9000/.rt/fn"),
            ("127.0.0.1:9000".into(), "/.rt/fn".into())
        );
        assert_eq!(
            split_api("http://[::1]:9000"),
            ("[::1]:9000".into(), String::new())
        );
    }
}
