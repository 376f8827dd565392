//! The installers' page as it runs locally: `web/` served with the headers CloudFront adds
//! (strict Content-Security-Policy among them) on one origin, and on another a stand-in of the
//! claims HTTP API that does what API Gateway's JWT authorizer does before claim-issuer runs.
//!
//! The authorizer checks what API Gateway documents for JWT authorizers, against the user
//! pool's own JWKS (the local AWS endpoint's Cognito): an RS256 signature by a key of the
//! JWKS, `iss` = the pool, `client_id` (access tokens) or `aud` (ID tokens) = the app client,
//! `exp` in the future, `nbf`/`iat` not ahead of now; and, stricter than API Gateway, only
//! access tokens (`token_use`), which is what the page sends. A token that fails never reaches
//! the function. Then claim-issuer gets the payload-2.0 event with
//! `requestContext.authorizer.jwt.claims` as the HTTP API formats them: every claim a string,
//! lists as `[a b]` (`cognito:groups`), the `scope` claim's words in `jwt.scopes`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

/// How a request reaches claim-issuer: the payload-2.0 event in, the function's answer out.
pub type Invoke =
    Arc<dyn Fn(Value) -> Pin<Box<dyn Future<Output = Result<Value, String>> + Send>> + Send + Sync>;

/// Why a token was refused (answered 401 `Unauthorized`, as API Gateway answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Missing,
    Malformed,
    Algorithm,
    UnknownKey,
    Signature,
    Issuer,
    Audience,
    TokenUse,
    Expired,
    NotYetValid,
}

/// One RSA key of the pool's JWKS.
struct RsaKey {
    n: Vec<u8>,
    e: Vec<u8>,
}

/// API Gateway's JWT authorizer for one user pool and app client.
pub struct JwtAuthorizer {
    issuer: String,
    client_id: String,
    keys: HashMap<String, RsaKey>,
}

fn b64url(text: &str) -> Result<Vec<u8>, Rejection> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| Rejection::Malformed)
}

impl JwtAuthorizer {
    /// Reads the JWKS of `pool_id` from the local AWS endpoint (`http://HOST:PORT`), as API
    /// Gateway reads it from the issuer's `/.well-known/jwks.json`.
    pub async fn for_user_pool(
        aws_endpoint: &str,
        region: &str,
        pool_id: &str,
        client_id: &str,
    ) -> Result<Self, String> {
        let jwks = get_json(aws_endpoint, &format!("/{pool_id}/.well-known/jwks.json")).await?;
        let mut keys = HashMap::new();
        for key in jwks["keys"].as_array().into_iter().flatten() {
            let (Some(kid), Some(n), Some(e)) =
                (key["kid"].as_str(), key["n"].as_str(), key["e"].as_str())
            else {
                continue;
            };
            if key["kty"] != "RSA" {
                continue;
            }
            let decode =
                |v: &str| b64url(v).map_err(|_| format!("JWKS key {kid} is not base64url"));
            keys.insert(
                kid.to_owned(),
                RsaKey {
                    n: decode(n)?,
                    e: decode(e)?,
                },
            );
        }
        if keys.is_empty() {
            return Err("the user pool's JWKS has no RSA key".into());
        }
        Ok(Self {
            issuer: format!("https://cognito-idp.{region}.amazonaws.com/{pool_id}"),
            client_id: client_id.to_owned(),
            keys,
        })
    }

    /// The token's claims if API Gateway would let it through at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Map<String, Value>, Rejection> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Rejection::Malformed);
        };
        let header: Value =
            serde_json::from_slice(&b64url(header)?).map_err(|_| Rejection::Malformed)?;
        if header["alg"] != "RS256" {
            return Err(Rejection::Algorithm);
        }
        let key = header["kid"]
            .as_str()
            .and_then(|kid| self.keys.get(kid))
            .ok_or(Rejection::UnknownKey)?;
        let signed = &token[..header_and_payload_len(token)];
        ring::signature::RsaPublicKeyComponents {
            n: &key.n,
            e: &key.e,
        }
        .verify(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            signed.as_bytes(),
            &b64url(signature)?,
        )
        .map_err(|_| Rejection::Signature)?;
        let claims: Map<String, Value> =
            serde_json::from_slice(&b64url(payload)?).map_err(|_| Rejection::Malformed)?;
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(Rejection::Issuer);
        }
        if claims.get("token_use").and_then(Value::as_str) != Some("access") {
            return Err(Rejection::TokenUse);
        }
        if claims.get("client_id").and_then(Value::as_str) != Some(self.client_id.as_str()) {
            return Err(Rejection::Audience);
        }
        let time = |name: &str| claims.get(name).and_then(Value::as_u64);
        match time("exp") {
            Some(exp) if exp > now => {}
            _ => return Err(Rejection::Expired),
        }
        if time("nbf").or(time("iat")).is_some_and(|t| t > now + 60) {
            return Err(Rejection::NotYetValid);
        }
        Ok(claims)
    }
}

fn header_and_payload_len(token: &str) -> usize {
    token.rfind('.').unwrap_or(0)
}

/// The claims as the HTTP API hands them to a Lambda: strings, lists as `[a b]`.
fn event_claims(claims: &Map<String, Value>) -> Map<String, Value> {
    claims
        .iter()
        .map(|(name, value)| {
            let text = match value {
                Value::String(s) => s.clone(),
                Value::Array(items) => format!(
                    "[{}]",
                    items
                        .iter()
                        .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
                other => other.to_string(),
            };
            (name.clone(), Value::String(text))
        })
        .collect()
}

/// What the page needs to know (written as its `config.json`).
#[derive(Debug, Clone)]
pub struct PageConfig {
    pub region: String,
    pub user_pool_id: String,
    pub client_id: String,
    /// The local AWS endpoint, where the page reaches Cognito (the real one is derived from
    /// the region).
    pub cognito_endpoint: Option<String>,
    pub iot_endpoint: String,
}

/// The page's origin and the API's, each its own listener.
pub struct InstallerSite {
    page: SocketAddr,
    api: SocketAddr,
    invocations: Arc<AtomicUsize>,
    _page_task: crate::serve::Background,
    _api_task: crate::serve::Background,
}

struct Site {
    web: PathBuf,
    config: Value,
    csp: String,
}

struct Api {
    authorizer: JwtAuthorizer,
    page_origin: String,
    invoke: Invoke,
    invocations: Arc<AtomicUsize>,
}

/// The page's files: the project's `web/` folder.
pub fn web_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web")
}

/// The Content-Security-Policy the page is served with: its own scripts and styles only, and
/// connections only to Cognito and the claims API.
pub fn content_security_policy(cognito: &str, api: &str) -> String {
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self' {cognito} {api}; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    )
}

/// What the page may use of the browser: the camera (scanning a label), on its own origin only,
/// and nothing else a page could ask for.
pub const PERMISSIONS_POLICY: &str =
    "camera=(self), microphone=(), geolocation=(), payment=(), usb=(), serial=()";

impl InstallerSite {
    /// Serves `web/` and the API on loopback ports.
    pub async fn start(
        page: PageConfig,
        authorizer: JwtAuthorizer,
        invoke: Invoke,
    ) -> std::io::Result<Self> {
        let page_listener = TcpListener::bind("127.0.0.1:0").await?;
        let api_listener = TcpListener::bind("127.0.0.1:0").await?;
        let page_addr = page_listener.local_addr()?;
        let api_addr = api_listener.local_addr()?;
        let api_url = format!("http://{api_addr}");
        let cognito = page
            .cognito_endpoint
            .clone()
            .unwrap_or_else(|| format!("https://cognito-idp.{}.amazonaws.com", page.region));
        let site = Arc::new(Site {
            web: web_dir(),
            csp: content_security_policy(cognito.trim_end_matches('/'), &api_url),
            config: json!({
                "region": page.region,
                "userPoolId": page.user_pool_id,
                "clientId": page.client_id,
                "cognitoEndpoint": page.cognito_endpoint,
                "apiUrl": api_url,
                "iotEndpoint": page.iot_endpoint,
                // As `make deploy` writes it from the stack's SerialPattern (claim-issuer's).
                "serialPattern": shared::registry::DEFAULT_SERIAL_PATTERN,
            }),
        });
        let invocations = Arc::new(AtomicUsize::new(0));
        let api = Arc::new(Api {
            authorizer,
            page_origin: format!("http://{page_addr}"),
            invoke,
            invocations: Arc::clone(&invocations),
        });
        let _page_task = crate::serve::http(
            page_listener,
            || true,
            move |req| {
                let site = Arc::clone(&site);
                async move { serve_page(&site, &req) }
            },
        );
        let _api_task = crate::serve::http(
            api_listener,
            || true,
            move |req| {
                let api = Arc::clone(&api);
                async move { serve_api(&api, req).await }
            },
        );
        Ok(Self {
            page: page_addr,
            api: api_addr,
            invocations,
            _page_task,
            _api_task,
        })
    }

    pub fn page_url(&self) -> String {
        format!("http://{}/", self.page)
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api)
    }

    /// How many requests got past the authorizer to the function.
    pub fn invocations(&self) -> usize {
        self.invocations.load(Ordering::Relaxed)
    }
}

fn respond(
    status: StatusCode,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::builder().status(status);
    for (name, value) in headers {
        response = response.header(*name, *value);
    }
    response.body(Full::new(body.into())).unwrap_or_default()
}

fn serve_page(site: &Site, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = match req.uri().path() {
        "/" => "index.html",
        p => p.trim_start_matches('/'),
    };
    let (body, kind) = if path == "config.json" {
        (site.config.to_string().into_bytes(), "application/json")
    } else {
        let kind = match path.rsplit('.').next() {
            Some("html") => "text/html; charset=utf-8",
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            _ => return respond(StatusCode::NOT_FOUND, &[], "not found"),
        };
        // Only the folder's own files: no `..`, no subfolders.
        if path.contains('/') || path.contains("..") {
            return respond(StatusCode::NOT_FOUND, &[], "not found");
        }
        match std::fs::read(site.web.join(path)) {
            Ok(bytes) => (bytes, kind),
            Err(_) => return respond(StatusCode::NOT_FOUND, &[], "not found"),
        }
    };
    respond(
        StatusCode::OK,
        &[
            ("content-type", kind),
            ("content-security-policy", &site.csp),
            ("permissions-policy", PERMISSIONS_POLICY),
            ("x-content-type-options", "nosniff"),
            ("x-frame-options", "DENY"),
            ("referrer-policy", "no-referrer"),
            ("cache-control", "no-store"),
        ],
        body,
    )
}

async fn serve_api(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let origin = req
        .headers()
        .get("origin")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    // CORS for the page's origin only, as the stack's HTTP API is configured.
    let allowed = origin == api.page_origin;
    let cors: Vec<(&str, &str)> = if allowed {
        vec![
            ("access-control-allow-origin", api.page_origin.as_str()),
            ("access-control-expose-headers", "retry-after"),
            ("vary", "origin"),
        ]
    } else {
        vec![]
    };
    if req.method() == Method::OPTIONS {
        let mut headers = cors.clone();
        if allowed {
            headers.push(("access-control-allow-methods", "POST"));
            headers.push((
                "access-control-allow-headers",
                "authorization, content-type",
            ));
            headers.push(("access-control-max-age", "300"));
        }
        return respond(StatusCode::NO_CONTENT, &headers, Bytes::new());
    }
    if req.method() != Method::POST || req.uri().path() != "/claims" {
        return respond(StatusCode::NOT_FOUND, &cors, r#"{"message":"Not Found"}"#);
    }
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_owned());
    let verdict = match token {
        Some(t) if !t.is_empty() => api.authorizer.verify(&t, shared::clock::unix_now()),
        _ => Err(Rejection::Missing),
    };
    let claims = match verdict {
        Ok(claims) => claims,
        Err(rejection) => {
            tracing::info!(?rejection, "token refused by the JWT authorizer");
            return respond(
                StatusCode::UNAUTHORIZED,
                &cors,
                r#"{"message":"Unauthorized"}"#,
            );
        }
    };
    let body = match req.into_body().collect().await {
        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
        Err(_) => return respond(StatusCode::BAD_REQUEST, &cors, "unreadable body"),
    };
    let scopes: Vec<Value> = claims
        .get("scope")
        .and_then(Value::as_str)
        .map(|s| s.split_whitespace().map(|w| json!(w)).collect())
        .unwrap_or_default();
    let event = json!({
        "version": "2.0",
        "routeKey": "POST /claims",
        "rawPath": "/claims",
        "rawQueryString": "",
        "headers": {"content-type": "application/json", "origin": origin},
        "requestContext": {
            "authorizer": {"jwt": {"claims": event_claims(&claims), "scopes": scopes}},
            "http": {"method": "POST", "path": "/claims", "protocol": "HTTP/1.1",
                     "sourceIp": "127.0.0.1", "userAgent": "local"},
            "routeKey": "POST /claims",
            "stage": "$default",
        },
        "body": body,
        "isBase64Encoded": false,
    });
    api.invocations.fetch_add(1, Ordering::Relaxed);
    let answer = match (api.invoke)(event).await {
        Ok(answer) => answer,
        Err(e) => {
            tracing::warn!(error = %e, "claim-issuer could not be invoked");
            return respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                &cors,
                r#"{"message":"Internal Server Error"}"#,
            );
        }
    };
    let status = answer["statusCode"]
        .as_u64()
        .and_then(|s| StatusCode::from_u16(s as u16).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = cors;
    let function_headers: Vec<(String, String)> = answer["headers"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| v.as_str().map(|v| (k.to_ascii_lowercase(), v.to_owned())))
        .collect();
    for (k, v) in &function_headers {
        headers.push((k.as_str(), v.as_str()));
    }
    let body = answer["body"].as_str().unwrap_or("").to_owned();
    respond(status, &headers, body)
}

/// Runs `tests/interop/<script>` with the project's Python (`.venv`), `env` added; its last
/// stdout line as JSON.
pub async fn python_json(
    script: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> Result<Value, String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("interop")
        .join(script);
    let output = tokio::process::Command::new(crate::local_aws::venv_bin("python"))
        .arg(&path)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{script}: {e} (python from .venv: run `make tools`)"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{script} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .map_err(|e| format!("{script}: not JSON ({e}): {stdout}"))
}

/// The installers' user pool in the local AWS endpoint's Cognito (tests/interop/cognito_pool.py),
/// with `users`' (INSTALLER_USER/PASSWORD, VISITOR_USER/PASSWORD) temporary passwords: the pool
/// id and the app client id.
pub async fn installers_pool(
    aws_endpoint: &str,
    users: &[(&str, String)],
) -> Result<(String, String), String> {
    let made = python_json(
        "cognito_pool.py",
        &["setup", "--endpoint", aws_endpoint],
        users,
    )
    .await?;
    match (made["userPoolId"].as_str(), made["clientId"].as_str()) {
        (Some(pool), Some(client)) => Ok((pool.to_owned(), client.to_owned())),
        _ => Err(format!("cognito_pool.py setup: {made}")),
    }
}

/// Tokens for the authorizer's checks (cognito_pool.py tokens): `access`, `id`,
/// `otherClientAccess`, `otherPoolAccess`.
pub async fn test_tokens(aws_endpoint: &str, pool: &str, client: &str) -> Result<Value, String> {
    python_json(
        "cognito_pool.py",
        &[
            "tokens",
            "--endpoint",
            aws_endpoint,
            "--pool",
            pool,
            "--client",
            client,
        ],
        &[],
    )
    .await
}

/// A password the installers' pool accepts (12+ characters, upper, lower, digit, symbol),
/// random every time (96 bits), and short enough for a person to type from the demo's output.
pub fn new_password() -> String {
    let random: String = crate::local_aws::random_key_base64()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    format!("Aa1!{random}")
}

/// `token` with its payload changed after signing (the `admins` group added), its header and
/// signature kept: what a forger without the pool's key can make.
pub fn forged(token: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Value = parts
        .get(1)
        .and_then(|p| b64.decode(p).ok())
        .and_then(|p| serde_json::from_slice(&p).ok())
        .unwrap_or(Value::Null);
    payload["cognito:groups"] = json!(["installers", "admins"]);
    format!(
        "{}.{}.{}",
        parts.first().unwrap_or(&""),
        b64.encode(payload.to_string()),
        parts.get(2).unwrap_or(&"")
    )
}

/// The page as `make demo` and `make emulators` run it: the installers' pool with one
/// installer, and the site whose API invokes claim-issuer through a Lambda Invoke API at
/// `invoke_base` (`cargo lambda watch`).
pub struct LocalInstallers {
    pub site: InstallerSite,
    pub pool: String,
    pub client: String,
    pub user: String,
    pub temporary_password: String,
}

impl LocalInstallers {
    pub async fn start(
        aws_endpoint: &str,
        iot_endpoint: &str,
        invoke_base: &str,
    ) -> Result<Self, String> {
        let user = "installer@example.com".to_owned();
        let temporary_password = new_password();
        let users = [
            ("INSTALLER_USER", user.clone()),
            ("INSTALLER_PASSWORD", temporary_password.clone()),
            ("VISITOR_USER", "visitor@example.com".to_owned()),
            ("VISITOR_PASSWORD", new_password()),
        ];
        let (pool, client) = installers_pool(aws_endpoint, &users).await?;
        let authorizer = JwtAuthorizer::for_user_pool(aws_endpoint, REGION, &pool, &client).await?;
        let url = format!(
            "{}/2015-03-31/functions/claim-issuer/invocations",
            invoke_base.trim_end_matches('/')
        );
        let invoke: Invoke = Arc::new(move |event| {
            let url = url.clone();
            Box::pin(async move { crate::iot_mqtt::invoke_lambda(&url, &event).await })
        });
        let page = PageConfig {
            region: REGION.into(),
            user_pool_id: pool.clone(),
            client_id: client.clone(),
            cognito_endpoint: Some(format!("{}/", aws_endpoint.trim_end_matches('/'))),
            iot_endpoint: iot_endpoint.to_owned(),
        };
        let site = InstallerSite::start(page, authorizer, invoke)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            site,
            pool,
            client,
            user,
            temporary_password,
        })
    }
}

/// The local stack's region.
pub const REGION: &str = "us-east-1";

/// GET `path` from `http://HOST:PORT` as JSON.
async fn get_json(endpoint: &str, path: &str) -> Result<Value, String> {
    let url = format!("{}{path}", endpoint.trim_end_matches('/'));
    let answer = crate::http_client::send(Method::GET, &url, &[], Bytes::new()).await?;
    if !answer.status.is_success() {
        return Err(format!("GET {path}: {}", answer.status));
    }
    serde_json::from_slice(&answer.body).map_err(|e| format!("GET {path}: {e}"))
}

/// `POST {api}/claims` as the page sends it, with `token` as the bearer if given: the status
/// and the body.
pub async fn post_claim(
    api_url: &str,
    token: Option<&str>,
    body: &Value,
) -> Result<(u16, String), String> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(bearer) = &bearer {
        headers.push(("authorization", bearer.as_str()));
    }
    let url = format!("{}/claims", api_url.trim_end_matches('/'));
    let answer = crate::http_client::send(Method::POST, &url, &headers, body.to_string()).await?;
    Ok((answer.status.as_u16(), answer.text()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_formatted_as_the_http_api_formats_them() {
        let claims = json!({"sub": "s", "cognito:groups": ["installers", "admins"], "exp": 5});
        let formatted = event_claims(claims.as_object().unwrap());
        assert_eq!(formatted["cognito:groups"], "[installers admins]");
        assert_eq!(formatted["exp"], "5");
        assert_eq!(formatted["sub"], "s");
    }
}
