//! The accept loops every stand-in runs: plain HTTP/1.1 services (the IoT control-plane double,
//! the Runtime API, the fault proxy) and TLS streams (the MQTT simulators).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A server's accept loop, stopped when dropped: the stand-ins hold one and need no `Drop`.
pub struct Background(JoinHandle<()>);

impl Background {
    pub fn new(task: JoinHandle<()>) -> Self {
        Self(task)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `handler` on every connection `admit` lets in (a refused one is closed at once, as a
/// stopped service's port would be). Stops when the task is aborted.
pub fn http<H, Fut>(
    listener: TcpListener,
    admit: impl Fn() -> bool + Send + 'static,
    handler: H,
) -> Background
where
    H: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    Background(tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if !admit() {
                continue;
            }
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    }))
}

/// Runs the TLS handshake (at most 10 s) on every connection and hands `handler` the stream or
/// why the handshake failed. `on_accept` runs before the handshake, so a client that refuses
/// the server's certificate has been counted by the time it has seen it; when it answers
/// `false` the connection is reset instead (RST, as a crashing or overloaded server's would be).
pub fn tls<H, Fut>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    on_accept: impl Fn() -> bool + Send + 'static,
    handler: H,
) -> Background
where
    H: Fn(Result<TlsStream<TcpStream>, String>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Background(tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            if !on_accept() {
                let _ = tcp.set_zero_linger();
                drop(tcp);
                continue;
            }
            // Replies are small packets written back to back; no Nagle delay.
            let _ = tcp.set_nodelay(true);
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                let stream = match handshake {
                    Ok(Ok(stream)) => Ok(stream),
                    Ok(Err(e)) => Err(format!("TLS: {e}")),
                    Err(_) => Err("TLS: handshake timed out".to_owned()),
                };
                handler(stream).await;
            });
        }
    }))
}
