//! claim-issuer's real handler, with the real aws-sdk-iot client against the IoT control-plane
//! double and the real DynamoDB client against the local AWS endpoint.

use std::sync::Arc;

use local_emulators::fixtures;
use local_emulators::local_aws::LocalAws;
use serde_json::Value;
use shared::registry::ClaimLog;

use crate::fleet_fixture::*;
use ::claim_issuer::config::Config as IssuerConfig;
use ::claim_issuer::handler::{handle as issue, HttpResponse, Refused, State};
use local_emulators::iot_control::{IotControlPlane, IotFault};
use local_emulators::local_aws::local_sdk_config;

const TEMPLATE: &str = "fleet-template";
const NOW: u64 = 1_800_000_000;

fn claim_event(name: &str) -> Value {
    fixtures::event("claim-issuer", name)
}

struct Setup {
    _aws: LocalAws,
    iot: IotControlPlane,
    state: State,
}

async fn setup(extra: &[(&str, &str)]) -> Setup {
    let aws = LocalAws::start().await.unwrap();
    aws.create_devices_table(TABLE).await.unwrap();
    let iot = IotControlPlane::start(&[TEMPLATE, "other-template"])
        .await
        .unwrap();
    let env = fixtures::env(
        &[
            ("DEVICES_TABLE", TABLE),
            ("PROVISIONING_TEMPLATE", TEMPLATE),
            ("IOT_DATA_ENDPOINT", "example-ats.iot.local"),
        ],
        extra,
    );
    let state = state(&aws, &iot, IssuerConfig::from_env(&env).unwrap()).await;
    Setup {
        _aws: aws,
        iot,
        state,
    }
}

/// claim-issuer's state as its cold start builds it, with the IoT client on the double.
pub(crate) async fn state(aws: &LocalAws, iot: &IotControlPlane, config: IssuerConfig) -> State {
    let iot = aws_sdk_iot::Client::new(&local_sdk_config(&iot.endpoint()).await);
    State::from_clients(config, iot, aws.dynamodb().await)
}

fn body(r: &HttpResponse) -> Value {
    serde_json::from_str(&r.body).unwrap()
}

/// Captures what the handler logs while `f` runs on this thread.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn installer_gets_a_five_minute_claim_bound_to_the_serial() {
    let s = setup(&[]).await;
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .json()
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let response = issue(claim_event("issue.json"), NOW, &s.state).await;
    drop(guard);

    assert_eq!(response.status_code, 200, "{}", response.body);
    assert_eq!(response.header("cache-control"), Some("no-store"));
    let b = body(&response);
    assert_eq!(b["templateName"], TEMPLATE);
    assert_eq!(b["serial"], "SN-0001");
    assert_eq!(b["iotEndpoint"], "example-ats.iot.local");
    let certificate_id = b["certificateId"].as_str().unwrap();
    assert_eq!(s.iot.issued()[0].certificate_id, certificate_id);

    // A real certificate, from the double's CA, valid for five minutes.
    let pem = b["certificatePem"].as_str().unwrap();
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let cert = parsed.parse_x509().unwrap();
    let validity = cert.validity();
    let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
    assert!((299..=301).contains(&lifetime), "{lifetime}");
    assert_eq!(
        b["expiration"].as_u64().unwrap() as i64,
        validity.not_after.timestamp()
    );
    let key = b["privateKey"].as_str().unwrap();
    assert!(key.contains("PRIVATE KEY"));

    // The audit record fleet-prehook reads.
    let claim = s
        .state
        .registry
        .claim(certificate_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.issued_to, "7d1e2f3a-4b5c-6d7e-8f90-a1b2c3d4e5f6");
    assert_eq!(claim.serial.as_deref(), Some("SN-0001"));
    assert!(claim.retain_until > claim.valid_until);

    // Logged, without the key.
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("claim certificate issued") && logged.contains(certificate_id),
        "{logged}"
    );
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!logged.contains(&key_body[..40]));
}

#[tokio::test]
async fn identity_group_and_body_are_checked_first() {
    let s = setup(&[]).await;
    for (event, status, code) in [
        ("no-claims.json", 401, "unauthenticated"),
        ("not-in-group.json", 403, "not-an-installer"),
        ("bad-body.json", 400, "bad-request"),
        ("template-not-allowed.json", 400, "template-not-allowed"),
    ] {
        let r = issue(claim_event(event), NOW, &s.state).await;
        assert_eq!(
            (r.status_code, body(&r)["error"].as_str()),
            (status, Some(code)),
            "{event}"
        );
    }
    let mut bad_serial = claim_event("issue.json");
    bad_serial["body"] = Value::String(r#"{"serial":"../../etc"}"#.into());
    assert_eq!(issue(bad_serial, NOW, &s.state).await.status_code, 400);
    // Nothing reached AWS IoT.
    assert_eq!(s.iot.requests(), 0);
}

#[tokio::test]
async fn template_missing_in_iot_and_upstream_failures() {
    let s = setup(&[("ALLOWED_TEMPLATES", "retired-template")]).await;
    let mut retired = claim_event("issue.json");
    retired["body"] =
        Value::String(r#"{"serial":"SN-0001","templateName":"retired-template"}"#.into());
    let r = issue(retired, NOW, &s.state).await;
    assert_eq!(
        (r.status_code, body(&r)["error"].as_str()),
        (502, Some("upstream"))
    );
    // The caller gets the fixed sentence; which template AWS IoT lacked is for the log.
    assert_eq!(body(&r)["message"], Refused::Upstream.message());

    s.iot.set_faults(&[IotFault::ServerError]);
    let r = issue(claim_event("issue.json"), NOW, &s.state).await;
    assert_eq!(r.status_code, 502);

    s.iot.set_faults(&[IotFault::Throttle]);
    let r = issue(claim_event("issue.json"), NOW, &s.state).await;
    assert_eq!((r.status_code, r.header("retry-after")), (503, Some("2")));

    s.iot.set_faults(&[]);
    assert_eq!(
        issue(claim_event("issue.json"), NOW, &s.state)
            .await
            .status_code,
        200
    );
    assert_eq!(
        s.iot.unauthenticated(),
        0,
        "every SDK request was SigV4-signed"
    );
}

fn issue_at(s: &Setup, now: u64) -> impl std::future::Future<Output = HttpResponse> + '_ {
    issue(claim_event("issue.json"), now, &s.state)
}

#[tokio::test]
async fn rate_limit_is_per_user_and_recovers_after_the_window() {
    let s = setup(&[("CLAIMS_PER_WINDOW", "2"), ("CLAIM_WINDOW_SECONDS", "600")]).await;
    for _ in 0..2 {
        assert_eq!(issue_at(&s, NOW + 10).await.status_code, 200);
    }
    let limited = issue_at(&s, NOW + 100).await;
    assert_eq!(
        (limited.status_code, limited.header("retry-after")),
        (429, Some("510"))
    );

    // Another installer is not affected.
    let mut other = claim_event("issue.json");
    other["requestContext"]["authorizer"]["jwt"]["claims"]["sub"] =
        Value::String("another-installer".into());
    assert_eq!(issue(other, NOW + 100, &s.state).await.status_code, 200);

    // Once the first claims are a window old, there is room again.
    assert_eq!(issue_at(&s, NOW + 609).await.status_code, 429);
    assert_eq!(issue_at(&s, NOW + 610).await.status_code, 200);
    assert_eq!(s.iot.issued().len(), 4);
}

/// The hole: a fixed window let an installer take the whole quota just before a window
/// boundary and again just after it.
#[tokio::test]
async fn the_claim_quota_cannot_be_doubled_across_a_window_boundary() {
    let s = setup(&[("CLAIMS_PER_WINDOW", "2"), ("CLAIM_WINDOW_SECONDS", "600")]).await;
    let boundary = NOW - NOW % 600 + 600;
    for t in [boundary - 2, boundary - 1] {
        assert_eq!(issue_at(&s, t).await.status_code, 200);
    }
    for t in [boundary, boundary + 1, boundary + 300] {
        assert_eq!(
            issue_at(&s, t).await.status_code,
            429,
            "at boundary + {}",
            t - boundary
        );
    }
    assert_eq!(s.iot.issued().len(), 2);
}

/// The hole: a claim without a serial was bound to nothing. Now it needs a serial, unless
/// the operator opts in to unbound claims.
#[tokio::test]
async fn a_claim_without_a_serial_is_refused_unless_unbound_claims_are_allowed() {
    let mut no_serial = claim_event("issue.json");
    no_serial["body"] = Value::String("{}".into());
    let s = setup(&[]).await;
    let r = issue(no_serial.clone(), NOW, &s.state).await;
    assert_eq!(
        (r.status_code, body(&r)["error"].as_str()),
        (400, Some("serial-required"))
    );
    assert_eq!(s.iot.requests(), 0);

    let opted_in = setup(&[("ALLOW_UNBOUND_CLAIMS", "true")]).await;
    let r = issue(no_serial, NOW, &opted_in.state).await;
    assert_eq!(r.status_code, 200);
    let id = body(&r)["certificateId"].as_str().unwrap().to_owned();
    let claim = opted_in.state.registry.claim(&id).await.unwrap().unwrap();
    assert_eq!(claim.serial, None);
}

#[tokio::test]
async fn the_double_refuses_unsigned_requests() {
    let iot = IotControlPlane::start(&[TEMPLATE]).await.unwrap();
    let url = format!(
        "{}/provisioning-templates/{TEMPLATE}/provisioning-claim",
        iot.endpoint()
    );
    let mut stream = tokio::net::TcpStream::connect(iot.endpoint().trim_start_matches("http://"))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "POST {url} HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer
        .to_ascii_lowercase()
        .contains("x-amzn-errortype: missingauthenticationtokenexception"));
    assert!(iot.issued().is_empty());
    assert_eq!(iot.unauthenticated(), 1);
}
