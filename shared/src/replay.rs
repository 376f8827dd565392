//! Local replay fix for `cargo lambda watch` (compiled only with the `local-replay` feature).
//!
//! The real Lambda service hands the runtime the client context as raw JSON in the
//! `lambda-runtime-client-context` header, and lambda_runtime parses it as such before any
//! handler runs. cargo-lambda's watch emulator (1.9.2, `functions_router.rs`) base64-encodes it,
//! as the public Invoke API's `X-Amz-Client-Context` is encoded, so every invocation with
//! `--client-context-file` fails in lambda_runtime with `Error("expected value", line: 1,
//! column: 1)` and the process exits: a crash loop.
//!
//! [`install`] puts a small Runtime API proxy on loopback between the function and the
//! emulator: it forwards every request unchanged, and in `/next` answers replaces a base64
//! client context with the JSON it encodes, which is exactly what the real service sends.
//! Deployed builds do not compile this module, so the production path stays the runtime's own.

use std::net::SocketAddr;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

const RUNTIME_API: &str = "AWS_LAMBDA_RUNTIME_API";
const CLIENT_CONTEXT: &str = "lambda-runtime-client-context";

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("AWS_LAMBDA_RUNTIME_API is not set: run under `cargo lambda watch`")]
    NoRuntimeApi,
    #[error("cannot start the local Runtime API proxy: {0}")]
    Start(String),
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
fn split_api(api: &str) -> (String, String) {
    let api = api.trim_start_matches("http://");
    match api.find('/') {
        Some(at) => (api[..at].to_owned(), api[at..].to_owned()),
        None => (api.to_owned(), String::new()),
    }
}

/// Starts the proxy on its own thread and points `AWS_LAMBDA_RUNTIME_API` at it. Call it
/// first thing in `main`, before the async runtime exists, so no other thread reads the
/// environment while it changes.
pub fn install() -> Result<(), ReplayError> {
    let api = std::env::var(RUNTIME_API).map_err(|_| ReplayError::NoRuntimeApi)?;
    let (upstream, prefix) = split_api(&api);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<SocketAddr, String>>();
    std::thread::Builder::new()
        .name("runtime-api-proxy".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            runtime.block_on(serve(upstream, ready_tx));
        })
        .map_err(|e| ReplayError::Start(e.to_string()))?;
    let addr = ready_rx
        .recv()
        .map_err(|e| ReplayError::Start(e.to_string()))?
        .map_err(ReplayError::Start)?;
    // Same form as the emulator's value (cargo-lambda gives a full `http://` URL).
    let scheme = if api.starts_with("http://") {
        "http://"
    } else {
        ""
    };
    std::env::set_var(RUNTIME_API, format!("{scheme}{addr}{prefix}"));
    tracing::info!(proxy = %addr, "local-replay: Runtime API proxy decodes base64 client contexts");
    Ok(())
}

async fn serve(upstream: String, ready: std::sync::mpsc::Sender<Result<SocketAddr, String>>) {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    match listener.local_addr() {
        Ok(addr) => {
            let _ = ready.send(Ok(addr));
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    }
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move { forward(&client, &upstream, req).await }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn forward(
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &str,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, String> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: hyper::Uri = format!("http://{upstream}{path}")
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    let mut outgoing = Request::builder().method(parts.method).uri(uri);
    for (name, value) in parts.headers.iter() {
        if name != hyper::header::HOST {
            outgoing = outgoing.header(name, value);
        }
    }
    let outgoing = outgoing.body(Full::new(body)).map_err(|e| e.to_string())?;
    let response = client.request(outgoing).await.map_err(|e| e.to_string())?;
    let (mut parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    if let Some(json) = parts
        .headers
        .get(CLIENT_CONTEXT)
        .and_then(|v| decode_client_context(v.as_bytes()))
    {
        if let Ok(value) = http::HeaderValue::from_bytes(&json) {
            parts.headers.insert(CLIENT_CONTEXT, value);
        }
    }
    Ok(Response::from_parts(parts, Full::new(body)))
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
