//! A small HTTP proxy in front of the local AWS endpoint that can be stopped, slowed or made to
//! throttle while a test runs, so the functions meet the faults real SSM and DynamoDB have: an
//! endpoint that refuses connections, one that answers too late, and `ThrottlingException`.
//! Requests in the normal mode are forwarded untouched (SigV4 signatures stay valid, as the
//! proxy keeps the `Host` header).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::mqtt_io::lock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Close every connection at once, as a stopped service's port does.
    Stopped,
    /// Forward after this delay.
    Slow(Duration),
    /// Answer every request `400 ThrottlingException`.
    Throttle,
    /// Forward this many more requests, then throttle every one (a table whose capacity runs
    /// out part way through a long job).
    ThrottleAfter(u64),
    /// Forward after `delay` the requests for one operation (`X-Amz-Target`, such as
    /// `DynamoDB_20120810.UpdateItem`) whose body contains `containing` (an attribute name,
    /// say, to tell one item's writes from another's), the others at once.
    SlowOperation {
        target: &'static str,
        containing: &'static str,
        delay: Duration,
    },
    /// Answer the requests for one operation (`X-Amz-Target`, such as `TrentService.Sign`)
    /// `400 AccessDeniedException`, as IAM does when a policy lacks it; forward the others.
    DenyOperation(&'static str),
    /// Answer the requests for one operation `400 ThrottlingException` (a service that stops
    /// answering one call); forward the others.
    ThrottleOperation(&'static str),
}

struct State {
    upstream: SocketAddr,
    mode: Mutex<Mode>,
    requests: AtomicU64,
    /// With `ThrottleAfter`: the first request number that is throttled.
    throttle_from: AtomicU64,
}

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    _task: crate::serve::Background,
}

impl FaultProxy {
    /// Proxies to `upstream` (an `http://HOST:PORT` endpoint).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .map_err(std::io::Error::other)?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            mode: Mutex::new(Mode::Pass),
            requests: AtomicU64::new(0),
            throttle_from: AtomicU64::new(u64::MAX),
        });
        let gate = Arc::clone(&state);
        let shared = Arc::clone(&state);
        let _task = crate::serve::http(
            listener,
            move || *lock(&gate.mode) != Mode::Stopped,
            move |req| {
                let state = Arc::clone(&shared);
                async move { forward(&state, req).await }
            },
        );
        Ok(Self { addr, state, _task })
    }

    /// The value for `AWS_ENDPOINT_URL`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        if let Mode::ThrottleAfter(n) = mode {
            self.state
                .throttle_from
                .store(self.requests() + n, Ordering::Relaxed);
        }
        *lock(&self.state.mode) = mode;
    }

    /// Requests that reached the proxy (not counting connections closed while stopped).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }
}

fn answer(status: StatusCode, kind: Option<&str>, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::builder()
        .status(status)
        .header("content-type", "application/x-amz-json-1.0");
    if let Some(kind) = kind {
        response = response.header("x-amzn-ErrorType", kind);
    }
    response
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// The AWS JSON protocol's operation name of a request.
fn operation_of(headers: &hyper::HeaderMap) -> &str {
    headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn operation(req: &Request<Incoming>) -> &str {
    operation_of(req.headers())
}

async fn forward(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let number = state.requests.fetch_add(1, Ordering::Relaxed);
    // The conditional modes come down to throttling this request or passing it.
    let configured = *lock(&state.mode);
    let throttled = match configured {
        Mode::ThrottleAfter(_) => Some(number >= state.throttle_from.load(Ordering::Relaxed)),
        Mode::ThrottleOperation(target) => Some(operation(&req) == target),
        _ => None,
    };
    let mode = match throttled {
        Some(true) => Mode::Throttle,
        Some(false) => Mode::Pass,
        None => configured,
    };
    match mode {
        Mode::Stopped => {
            // Stopped mid-connection: fail the request as a dead peer would.
            return answer(StatusCode::BAD_GATEWAY, None, String::new());
        }
        Mode::Throttle => {
            return answer(
                StatusCode::BAD_REQUEST,
                Some("ThrottlingException"),
                r#"{"__type":"com.amazon.coral.availability#ThrottlingException","message":"Rate exceeded"}"#
                    .into(),
            );
        }
        Mode::Slow(delay) => tokio::time::sleep(delay).await,
        Mode::DenyOperation(target) if operation(&req) == target => {
            return answer(
                StatusCode::BAD_REQUEST,
                Some("AccessDeniedException"),
                r#"{"__type":"AccessDeniedException","message":"not authorized"}"#.into(),
            );
        }
        Mode::SlowOperation { .. }
        | Mode::DenyOperation(_)
        | Mode::ThrottleOperation(_)
        | Mode::Pass
        | Mode::ThrottleAfter(_) => {}
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if let Mode::SlowOperation {
        target,
        containing,
        delay,
    } = mode
    {
        let operation = operation_of(&parts.headers);
        let marked = containing.is_empty()
            || body
                .windows(containing.len())
                .any(|w| w == containing.as_bytes());
        if operation == target && marked {
            tokio::time::sleep(delay).await;
        }
    }
    let upstream = async {
        let request = Request::from_parts(parts, Full::new(body));
        let (parts, body) = crate::http_client::exchange(state.upstream, request).await?;
        Ok::<_, String>(Response::from_parts(parts, Full::new(body)))
    };
    upstream
        .await
        .unwrap_or_else(|e| answer(StatusCode::BAD_GATEWAY, None, e))
}
