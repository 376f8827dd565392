//! `ATTESTATION=x509` from the handler, with the device table, the CA and DPS in memory: who
//! gets a certificate, who is told to keep theirs, and that a refused SIM costs no key.

use std::sync::atomic::Ordering;

use dps_client::DpsError;
use serde_json::{json, Value};
use shared::ca::CaError;
use shared::clock::unix_now;
use shared::registry::{
    CertificateIssue, DeviceId, DeviceStatus, IssuedCertificate, Registration, SimRegistry,
};

use crate::answer::{Response, Source};
use crate::handler::handle;
use crate::handler_tests::{entry, funk, sim, state, TestState, IMSI};

const DAY: u64 = 86_400;

pub(crate) fn x509(extra: &[(&str, &str)]) -> TestState {
    let env: Vec<(&str, &str)> = [
        ("ATTESTATION", "x509"),
        ("CA_KMS_KEY_ID", "alias/device-ca"),
        ("CA_CERTIFICATE_PARAMETER", "/dps/device-ca"),
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect();
    state(&env)
}

async fn call(s: &TestState, body: Value) -> Response {
    handle(body, &funk(sim(IMSI), None), s).await
}

fn recorded(s: &TestState) -> Option<Registration> {
    s.registry
        .get(&DeviceId::Sim(IMSI.into()))
        .and_then(|r| r.registration)
}

/// The recorded certificate as if it had been issued `seconds` earlier.
fn age_certificate(s: &TestState, seconds: u64) {
    let mut entry = s.registry.get(&DeviceId::Sim(IMSI.into())).unwrap();
    let registration = entry.registration.as_mut().unwrap();
    let certificate = registration.certificate.as_mut().unwrap();
    certificate.expires_at -= seconds;
    s.registry.put(entry);
}

fn issued(s: &TestState) -> usize {
    s.ca.issued.load(Ordering::Relaxed)
}

#[tokio::test]
async fn a_cleared_sim_gets_a_certificate_registered_with_dps_and_recorded() {
    let s = x509(&[]);
    let before = unix_now();
    let r = call(&s, json!({})).await;
    assert_eq!(r.status_code, 200, "{}", r.outline());
    assert_eq!(
        r.body,
        format!("HostName=hub-1.azure-devices.net;DeviceId={IMSI};x509=true")
    );
    assert_eq!(r.source, Some(Source::Dps));
    let certificate = r.certificate_pem.clone().unwrap();
    assert_eq!(certificate, format!("certificate 1 of {IMSI}\n"));
    assert_eq!(
        r.private_key_pem.as_deref().map(String::as_str),
        Some("key 1\n")
    );
    assert_eq!(r.ca_chain_pem.as_deref(), Some("device CA\n"));
    let expires_at = r.expires_at.unwrap();
    assert!((before + 365 * DAY..=unix_now() + 365 * DAY).contains(&expires_at));
    // DPS saw that certificate, in a handshake of its own.
    assert_eq!(
        *s.dps.certificates.lock().unwrap(),
        vec![(certificate, false)]
    );
    assert_eq!(s.dps.opened.load(Ordering::Relaxed), 0);
    let record = recorded(&s).unwrap();
    assert_eq!(
        record.certificate,
        Some(IssuedCertificate {
            serial: format!("{:032x}", 1),
            fingerprint: format!("{:064x}", 7),
            expires_at,
        })
    );
    assert_eq!(record.key_fingerprint, None);
    // The serialized answer carries the key to the device, and nothing that outlines it does.
    let wire = serde_json::to_value(&r).unwrap();
    assert_eq!(wire["privateKeyPem"], "key 1\n");
    assert_eq!(wire["expiresAt"], expires_at);
    assert!(!r.outline().contains("key 1"));
}

#[tokio::test]
async fn a_device_asking_again_keeps_its_certificate_unless_it_rotates() {
    let s = x509(&[]);
    assert_eq!(call(&s, json!({})).await.status_code, 200);
    let again = call(&s, json!({})).await;
    assert_eq!(
        (again.status_code, again.error),
        (409, Some("certificate-current"))
    );
    assert!(again.certificate_pem.is_none() && again.private_key_pem.is_none());
    // It may renew once RENEW_BEFORE_DAYS of its 365 are left.
    let wait = again.retry_after.unwrap();
    assert!(
        ((365 - 30) * DAY - 5..=(365 - 30) * DAY).contains(&wait),
        "{wait}"
    );
    assert_eq!(
        (issued(&s), s.dps.certificates.lock().unwrap().len()),
        (1, 1)
    );

    // A day later (MIN_ROTATION_HOURS' default for 30 renewal days), it may rotate.
    age_certificate(&s, DAY);
    let rotated = call(&s, json!({"rotate": true, "site": "a"})).await;
    assert_eq!(rotated.status_code, 200, "{}", rotated.outline());
    assert_eq!(
        rotated.private_key_pem.as_deref().map(String::as_str),
        Some("key 2\n")
    );
    assert_eq!(
        recorded(&s).unwrap().certificate.unwrap().serial,
        format!("{:032x}", 2)
    );
    // `rotate` is the function's, not allocation data.
    let registered = s.dps.registered.lock().unwrap().clone();
    assert_eq!(registered.last().unwrap().1, Some(json!({"site": "a"})));
    let bad = call(&s, json!({"rotate": "yes"})).await;
    assert_eq!(bad.error, Some("bad-request"));
}

#[tokio::test]
async fn a_certificate_in_its_renewal_window_is_renewed_without_asking() {
    let s = x509(&[]);
    let mut record = entry(DeviceId::Sim(IMSI.into()), DeviceStatus::Allowed, None);
    record.registration = Some(Registration {
        registration_id: IMSI.into(),
        assigned_hub: "hub-1.azure-devices.net".into(),
        device_id: IMSI.into(),
        registered_at: unix_now() - 340 * DAY,
        key_fingerprint: None,
        return_data: None,
        certificate: Some(IssuedCertificate {
            serial: "01".into(),
            fingerprint: "aa".into(),
            expires_at: unix_now() + 25 * DAY,
        }),
    });
    s.registry.put(record);
    let r = call(&s, json!({})).await;
    assert_eq!(r.status_code, 200, "{}", r.outline());
    assert_eq!(issued(&s), 1);
}

#[tokio::test]
async fn refused_sims_get_no_key_made() {
    let s = x509(&[("REQUIRE_SIM_ALLOWLIST", "true")]);
    // Unknown with the allowlist required.
    assert_eq!(call(&s, json!({})).await.error, Some("sim-unknown"));
    s.registry.put(entry(
        DeviceId::Sim(IMSI.into()),
        DeviceStatus::Blocked,
        None,
    ));
    let r = call(&s, json!({"rotate": true})).await;
    assert_eq!((r.status_code, r.error), (403, Some("sim-blocked")));
    assert_eq!(issued(&s), 0);
    assert!(s.dps.registered.lock().unwrap().is_empty());
}

#[tokio::test]
async fn limits_refuse_before_a_certificate_is_made() {
    let s = x509(&[("DPS_PER_SIM_PER_HOUR", "2")]);
    assert_eq!(call(&s, json!({})).await.status_code, 200);
    age_certificate(&s, DAY);
    assert_eq!(call(&s, json!({"rotate": true})).await.status_code, 200);
    age_certificate(&s, DAY);
    let limited = call(&s, json!({"rotate": true})).await;
    assert_eq!(
        (limited.status_code, limited.error),
        (429, Some("sim-rate-limited"))
    );
    assert!(limited.retry_after.is_some());
    assert_eq!(issued(&s), 2);

    let fleet = x509(&[("DPS_REGISTRATIONS_PER_MINUTE", "1")]);
    assert_eq!(call(&fleet, json!({})).await.status_code, 200);
    let other = handle(json!({}), &funk(sim("440103000000002"), None), &fleet).await;
    assert_eq!((other.status_code, other.error), (503, Some("dps-budget")));
    assert_eq!(issued(&fleet), 1);
}

#[tokio::test]
async fn kms_unavailable_or_denied_is_a_503_with_nothing_issued() {
    for failure in [
        CaError::Unavailable("timed out".into()),
        CaError::Refused("AccessDeniedException".into()),
    ] {
        let s = x509(&[]);
        *s.ca.failure.lock().unwrap() = Some(failure);
        let r = call(&s, json!({})).await;
        assert_eq!((r.status_code, r.error), (503, Some("ca-unavailable")));
        assert!(r.retry_after.is_some());
        assert!(s.dps.registered.lock().unwrap().is_empty());
        assert_eq!(recorded(&s), None);
    }
    let s = x509(&[]);
    *s.ca.failure.lock().unwrap() = Some(CaError::Misconfigured("not this key".into()));
    assert_eq!(call(&s, json!({})).await.error, Some("misconfigured"));
}

#[tokio::test]
async fn a_certificate_dps_refuses_is_a_502_and_nothing_is_recorded() {
    let s = x509(&[]);
    *s.dps.answer.lock().unwrap() = Some(DpsError::Unauthorized("CONNACK 5".into()));
    let r = call(&s, json!({})).await;
    assert_eq!((r.status_code, r.error), (502, Some("certificate-refused")));
    assert!(r.private_key_pem.is_none());
    assert_eq!(recorded(&s), None);
    // Throttling stays what it is for symmetric keys.
    *s.dps.answer.lock().unwrap() = Some(DpsError::Throttled {
        retry_after: std::time::Duration::from_secs(9),
    });
    let r = call(&s, json!({})).await;
    assert_eq!((r.error, r.retry_after), (Some("dps-throttled"), Some(9)));
}

/// Issue: `rotate` revoked nothing and only the last certificate was recorded, so a SIM held
/// for an hour could mint six 365-day certificates IoT Hub would all accept. Every certificate
/// is recorded before anyone can use it, and rotations are at most one per MIN_ROTATION_HOURS.
#[tokio::test]
async fn every_certificate_is_recorded_and_rotations_are_bounded() {
    let s = x509(&[("MIN_ROTATION_HOURS", "6")]);
    assert_eq!(call(&s, json!({})).await.status_code, 200);
    for _ in 0..5 {
        let r = call(&s, json!({"rotate": true})).await;
        assert_eq!(
            (r.status_code, r.error),
            (409, Some("certificate-current")),
            "{}",
            r.outline()
        );
        let wait = r.retry_after.unwrap();
        assert!((6 * 3600 - 5..=6 * 3600).contains(&wait), "{wait}");
        assert!(r.private_key_pem.is_none());
    }
    assert_eq!(issued(&s), 1, "a refused rotation costs no signature");
    age_certificate(&s, 6 * 3600);
    let rotated = call(&s, json!({"rotate": true})).await;
    assert_eq!(rotated.status_code, 200, "{}", rotated.outline());
    let certificates = s.registry.certificates();
    assert_eq!(certificates.len(), 2, "{certificates:?}");
    for (n, issue) in certificates.iter().enumerate() {
        assert_eq!(issue.serial, format!("{:032x}", n + 1));
        assert_eq!(
            (issue.imsi.as_str(), issue.registration_id.as_str()),
            (IMSI, IMSI)
        );
        assert!(issue.expires_at > issue.issued_at + 364 * DAY);
    }
    assert_eq!(certificates[1].expires_at, rotated.expires_at.unwrap());

    // A certificate that cannot be recorded is discarded before DPS or the device sees it
    // (here: its serial is recorded already).
    let s = x509(&[]);
    let taken = CertificateIssue {
        serial: format!("{:032x}", 1),
        fingerprint: "ff".into(),
        imsi: "440103000000999".into(),
        registration_id: "440103000000999".into(),
        issued_at: 1,
        expires_at: 2,
    };
    s.registry.record_certificate(&taken).await.unwrap();
    let r = call(&s, json!({})).await;
    assert_eq!(
        (r.status_code, r.error),
        (503, Some("registry-unavailable")),
        "{}",
        r.outline()
    );
    assert!(r.certificate_pem.is_none() && r.private_key_pem.is_none());
    assert!(s.dps.certificates.lock().unwrap().is_empty());
    assert_eq!(recorded(&s), None);
}
