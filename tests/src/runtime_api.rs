//! A minimal AWS Lambda Runtime API (2018-06-01) on loopback, for the benchmarks: it hands one
//! queued event at a time to whatever runtime polls it (a Rust function's lambda_runtime, or the
//! Node.js baseline's bootstrap) and times each invocation from the moment the event is handed
//! out to the moment the response arrives. Client contexts travel as raw JSON in
//! `Lambda-Runtime-Client-Context`, as the real service sends them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

use crate::mqtt_io::lock;

struct Queued {
    id: String,
    event: Vec<u8>,
    client_context: Option<String>,
    deadline_ms: u64,
}

/// What came back for one invocation.
#[derive(Debug)]
pub struct Answer {
    pub body: Result<Value, String>,
    /// When the runtime took the event.
    pub handed_out: Instant,
    /// When its response arrived.
    pub answered: Instant,
}

/// Where a waiting invocation learns its outcome and when it arrived.
type Reply = oneshot::Sender<(Result<Value, String>, Instant)>;

struct State {
    queue: Mutex<VecDeque<Queued>>,
    arrived: Notify,
    handed_out: Mutex<HashMap<String, Instant>>,
    waiting: Mutex<HashMap<String, Reply>>,
    sequence: AtomicU64,
}

pub struct RuntimeApi {
    addr: SocketAddr,
    state: Arc<State>,
    _task: crate::serve::Background,
}

impl RuntimeApi {
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            queue: Mutex::new(VecDeque::new()),
            arrived: Notify::new(),
            handed_out: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            sequence: AtomicU64::new(0),
        });
        let shared = Arc::clone(&state);
        let _task = crate::serve::http(
            listener,
            || true,
            move |req| {
                let state = Arc::clone(&shared);
                async move { route(&state, req).await }
            },
        );
        Ok(Self { addr, state, _task })
    }

    /// The value for `AWS_LAMBDA_RUNTIME_API`.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Queues `event` and waits for its answer, at most `timeout` (also the deadline the
    /// function is given).
    pub async fn invoke(
        &self,
        event: &Value,
        client_context: Option<&Value>,
        timeout: Duration,
    ) -> Result<Answer, String> {
        let n = self.state.sequence.fetch_add(1, Ordering::Relaxed);
        let id = format!("bench-{n:08}");
        let (tx, rx) = oneshot::channel();
        lock(&self.state.waiting).insert(id.clone(), tx);
        let deadline_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| (d + timeout).as_millis() as u64)
            .unwrap_or_default();
        lock(&self.state.queue).push_back(Queued {
            id: id.clone(),
            event: event.to_string().into_bytes(),
            client_context: client_context.map(Value::to_string),
            deadline_ms,
        });
        self.state.arrived.notify_one();
        let (body, answered) = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| format!("no answer within {timeout:?}"))?
            .map_err(|_| "runtime API stopped".to_owned())?;
        let handed_out = lock(&self.state.handed_out)
            .remove(&id)
            .ok_or("answered before it was handed out")?;
        Ok(Answer {
            body,
            handed_out,
            answered,
        })
    }
}

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

async fn route(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let Some(rest) = path.strip_prefix("/2018-06-01/runtime/") else {
        return reply(StatusCode::NOT_FOUND, Vec::new());
    };
    if rest == "invocation/next" {
        let next = loop {
            let notified = state.arrived.notified();
            if let Some(next) = lock(&state.queue).pop_front() {
                break next;
            }
            notified.await;
        };
        lock(&state.handed_out).insert(next.id.clone(), Instant::now());
        let mut response = Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .header("lambda-runtime-aws-request-id", &next.id)
            .header("lambda-runtime-deadline-ms", next.deadline_ms.to_string())
            .header(
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:us-east-1:123456789012:function:bench",
            )
            .header(
                "lambda-runtime-trace-id",
                "Root=1-00000000-000000000000000000000000",
            );
        if let Some(context) = &next.client_context {
            response = response.header("lambda-runtime-client-context", context);
        }
        return response
            .body(Full::new(Bytes::from(next.event)))
            .unwrap_or_default();
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let answered = Instant::now();
    if rest == "init/error" {
        // The process will exit; every waiting invocation fails with the reason.
        let reason = String::from_utf8_lossy(&body).into_owned();
        for (_, tx) in lock(&state.waiting).drain() {
            let _ = tx.send((Err(format!("init error: {reason}")), answered));
        }
        return reply(StatusCode::ACCEPTED, Vec::new());
    }
    let Some((id, outcome)) = rest
        .strip_prefix("invocation/")
        .and_then(|r| r.rsplit_once('/'))
    else {
        return reply(StatusCode::NOT_FOUND, Vec::new());
    };
    let result = match outcome {
        "response" => serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}")),
        "error" => Err(String::from_utf8_lossy(&body).into_owned()),
        _ => return reply(StatusCode::NOT_FOUND, Vec::new()),
    };
    if let Some(tx) = lock(&state.waiting).remove(id) {
        let _ = tx.send((result, answered));
    }
    reply(StatusCode::ACCEPTED, Vec::new())
}
