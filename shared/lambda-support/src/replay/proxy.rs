//! The Runtime API proxy (feature `local-replay`, debug builds only).

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{decode_client_context, real_deadline, split_api, CLIENT_CONTEXT, DEADLINE};

const RUNTIME_API: &str = "AWS_LAMBDA_RUNTIME_API";

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("AWS_LAMBDA_RUNTIME_API is not set: run under `cargo lambda watch`")]
    NoRuntimeApi,
    #[error("cannot start the local Runtime API proxy: {0}")]
    Start(String),
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
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    if let Some(deadline) = parts
        .headers
        .get(DEADLINE)
        .and_then(|v| real_deadline(v.as_bytes(), now_ms))
    {
        parts
            .headers
            .insert(DEADLINE, http::HeaderValue::from(deadline));
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}
