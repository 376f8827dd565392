//! One HTTP/1.1 request to a local server (`http://HOST:PORT/...`) on a fresh connection: what
//! the stand-ins and tests use to call each other (the Lambda Invoke API, a user pool's JWKS,
//! the claims API), without a client library's pools or proxies in between.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, ToSocketAddrs};

/// The answer: status, headers and the whole body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `method url` with `headers` and `body`; an error only if no answer came.
pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let (Some(host), Some(port)) = (uri.host(), uri.port_u16()) else {
        return Err(format!("{url}: needs http://HOST:PORT/..."));
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", format!("{host}:{port}"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    let (parts, body) = exchange((host, port), request).await?;
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Sends `request` as it is on a new connection to `addr`: the answer's head and whole body.
pub async fn exchange(
    addr: impl ToSocketAddrs + std::fmt::Debug,
    request: Request<Full<Bytes>>,
) -> Result<(hyper::http::response::Parts, Bytes), String> {
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("cannot reach {addr:?}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts, body))
}
