//! `ATTESTATION=x509`: a cleared SIM gets a device certificate from the CA whose key is in KMS,
//! registered with DPS by presenting it, and answered with the certificate and its key. The
//! key is made here, for this answer only: nothing can answer from the record, so a device
//! that still holds a certificate with long to live is told to keep it.
//!
//! Order, each step only if the one before passed: the SIM (identity, operator, device
//! table), its current certificate (and, for a rotation, the last one's age), the SIM's and
//! the fleet's DPS limits, then the key and the certificate (KMS), its record among the
//! certificates issued, then DPS, then the SIM's record. A refused SIM costs no key and no
//! signature.

use std::convert::Infallible;
use std::time::Duration;

use dps_client::DpsError;
use shared::ca::CaError;
use shared::clock::{unix_now, unix_seconds};
use shared::registry::{CertificateIssue, IssuedCertificate, Registration, SimRegistry};
use shared::soracom::SimIdentity;
use tokio::time::{timeout_at, Instant};

use crate::answer::Refused;
use crate::config::X509Settings;
use crate::handler::{
    admit_or, check_sim, dps_payload, dps_refusal, record, refuse, registration, store_unavailable,
    Deadlines, DeviceRequest, Granted, Refusal, Registered, RETRY_SOON,
};
use crate::ports::{DeviceCa, Dps, DpsLimits, Enrollment, Proof};
use crate::state::State;

pub(crate) async fn register<R: SimRegistry, K, D: Dps, L: DpsLimits, C: DeviceCa>(
    state: &State<R, K, D, L, C>,
    sim: &SimIdentity,
    registration_id: String,
    request: DeviceRequest,
    deadlines: Deadlines,
    settings: &X509Settings,
) -> Result<Registered, Refusal> {
    let recorded = timeout_at(deadlines.answer_by, check_sim(state, sim))
        .await
        .map_err(|_| store_unavailable("device table gave no answer before the deadline"))??;
    let now = unix_now();
    if !request.rotate {
        if let Some(wait) = renewal_wait(recorded.as_ref(), &registration_id, settings, now) {
            return Err(refuse(
                Refused::CertificateCurrent,
                format!(
                    "its certificate has longer than RENEW_BEFORE_DAYS to live; renewal in {} s",
                    wait.as_secs()
                ),
            )
            .retry_in(wait));
        }
    }
    // Rotation on request, but not in a loop: every certificate stays valid until it expires.
    if let Some(wait) = rotation_wait(recorded.as_ref(), &registration_id, settings, now) {
        return Err(refuse(
            Refused::CertificateCurrent,
            format!(
                "its last certificate was issued less than MIN_ROTATION_HOURS ago; the next in {} s",
                wait.as_secs()
            ),
        )
        .retry_in(wait));
    }
    // No record can answer for an X.509 device: past a limit it is refused.
    if let Some(never) =
        admit_or::<Infallible, _, _, _, _, _>(state, &sim.imsi, &request, None, now, deadlines)
            .await?
    {
        match never {}
    }
    let credentials = timeout_at(
        deadlines.answer_by,
        state.ca.issue(&registration_id, settings.lifetime),
    )
    .await
    .map_err(|_| {
        refuse(
            Refused::CaUnavailable,
            "KMS signed no certificate before the deadline",
        )
        .retry_in(RETRY_SOON)
    })?
    .map_err(ca_refusal)?;
    let certificate = &credentials.certificate;
    // Recorded before anyone can use it: a certificate this function cannot record is thrown
    // away unused (nobody else ever sees its key).
    let issue = CertificateIssue {
        serial: certificate.serial.clone(),
        fingerprint: certificate.fingerprint.clone(),
        imsi: sim.imsi.clone(),
        registration_id: registration_id.clone(),
        issued_at: now,
        expires_at: unix_seconds(certificate.not_after),
    };
    timeout_at(
        deadlines.answer_by,
        state.registry.record_certificate(&issue),
    )
    .await
    .map_err(|_| store_unavailable("device table gave no answer before the deadline"))?
    .map_err(|e| {
        tracing::warn!(imsi = %sim.imsi, serial = %certificate.serial, error = %e,
                "the issued certificate is discarded: it could not be recorded");
        refuse(Refused::RegistryUnavailable, e.to_string()).retry_in(RETRY_SOON)
    })?;
    let payload = dps_payload(request.payload, state.config.model_id.as_deref());
    let enrollment = Enrollment {
        registration_id: &registration_id,
        proof: Proof::Certificate(&credentials),
        payload: payload.as_ref(),
    };
    let asked = Instant::now();
    let result = state
        .dps
        .register(&enrollment, None, deadlines.dps_until)
        .await;
    let dps_ms = asked.elapsed().as_secs_f64() * 1000.0;
    let assignment = result.map_err(|e| {
        tracing::warn!(imsi = %sim.imsi, serial = %certificate.serial,
            "the issued certificate is discarded: DPS did not register it");
        certificate_refusal(e).after_dps(dps_ms)
    })?;
    let issued = IssuedCertificate {
        serial: certificate.serial.clone(),
        fingerprint: certificate.fingerprint.clone(),
        expires_at: unix_seconds(certificate.not_after),
    };
    tracing::info!(imsi = %sim.imsi, serial = %issued.serial, fingerprint = %issued.fingerprint,
        expires_at = issued.expires_at, "device certificate issued");
    let recorded = Registration {
        certificate: Some(issued),
        ..registration(&registration_id, &assignment)
    };
    record(state, sim, &recorded, deadlines).await?;
    Ok(Registered::from_dps(
        registration_id,
        assignment,
        Granted::Certificate(credentials),
        dps_ms,
    ))
}

/// The SIM's recorded certificate, if it was issued for this registration id.
fn current<'r>(
    recorded: Option<&'r Registration>,
    registration_id: &str,
) -> Option<&'r IssuedCertificate> {
    recorded
        .filter(|r| r.registration_id == registration_id)?
        .certificate
        .as_ref()
}

/// How long until `now` reaches `at`, if it has not yet.
fn wait_until(at: u64, now: u64) -> Option<Duration> {
    (now < at).then(|| Duration::from_secs(at - now))
}

/// How long until the SIM's recorded certificate (for this registration id) enters its renewal
/// window, if it has not yet: until then the device should keep using it.
fn renewal_wait(
    recorded: Option<&Registration>,
    registration_id: &str,
    settings: &X509Settings,
    now: u64,
) -> Option<Duration> {
    let certificate = current(recorded, registration_id)?;
    let renew_from = certificate
        .expires_at
        .saturating_sub(settings.renew_before.as_secs());
    wait_until(renew_from, now)
}

/// How long until the device may have another certificate, if its recorded one (for this
/// registration id) was issued less than `min_rotation` ago. Issue time is the recorded
/// expiry less the configured lifetime.
fn rotation_wait(
    recorded: Option<&Registration>,
    registration_id: &str,
    settings: &X509Settings,
    now: u64,
) -> Option<Duration> {
    let certificate = current(recorded, registration_id)?;
    let issued = certificate
        .expires_at
        .saturating_sub(settings.lifetime.as_secs());
    wait_until(issued.saturating_add(settings.min_rotation.as_secs()), now)
}

/// KMS or SSM unavailable, or refusing (the key disabled, access denied): nothing was issued,
/// and a later attempt may pass once the operator has looked. A CA that does not fit its key
/// is configuration.
fn ca_refusal(e: CaError) -> Refusal {
    let detail = e.to_string();
    match e {
        CaError::Unavailable(_) | CaError::Refused(_) => {
            refuse(Refused::CaUnavailable, detail).retry_in(RETRY_SOON)
        }
        CaError::Misconfigured(_) | CaError::Build(_) => refuse(Refused::Misconfigured, detail),
    }
}

/// DPS refusing a certificate this function just issued is not the device's doing (the CA is
/// not enrolled, or not as it should be): a 502. Everything else as for symmetric keys.
fn certificate_refusal(e: DpsError) -> Refusal {
    match &e {
        DpsError::Unauthorized(_)
        | DpsError::Rejected {
            status: 401 | 403 | 404,
            ..
        } => refuse(Refused::CertificateRefused, e.to_string()),
        _ => dps_refusal(e),
    }
}
