//! What Funk hands back to the device: the connection string (with X.509 attestation: the
//! certificate and its key), or a refusal with a stable code and one fixed sentence. What
//! exactly went wrong (rumqttc, TLS and I/O texts, host names, table keys, AWS error codes) goes
//! to the log only: the caller is a device, or whoever holds its SIM.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use shared::clock::unix_seconds;

use crate::ports::Credentials;

/// How a connection string was had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The SIM's recorded registration, made with the key it has now: no DPS round trip.
    Record,
    /// A DPS registration made for this call.
    Dps,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::Dps => "dps",
        }
    }
}

/// The answer. The firmware reads `statusCode` and `body`; the rest are additions. No `Debug`:
/// a successful answer carries the device key.
#[derive(Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Response {
    pub status_code: u16,
    /// On success `HostName=...;DeviceId=...;SharedAccessKey=...`; otherwise the refusal's
    /// sentence.
    pub body: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'static str>,
    /// Seconds after which a retry may succeed (throttling, timeouts, outages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assigned_hub: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// What a custom allocation policy returned to the device through DPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_data: Option<Value>,
    /// X.509 attestation: the device's certificate, PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
    /// X.509 attestation: the certificate's private key (PKCS#8 PEM), made for this answer
    /// and kept nowhere else.
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Wiped when the answer is dropped (the runtime's serialized copy is its own).
    pub private_key_pem: Option<zeroize::Zeroizing<String>>,
    /// X.509 attestation: the certificates to present above the device's own, PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_chain_pem: Option<String>,
    /// X.509 attestation: the certificate's `notAfter`, Unix seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl Response {
    /// What may be shown of the answer (logs, test failures): never the connection string.
    pub fn outline(&self) -> String {
        let body = if self.status_code == 200 {
            "[connection]"
        } else {
            &self.body
        };
        format!(
            "{} {} {body} retryAfter={:?} source={}",
            self.status_code,
            self.error.unwrap_or("-"),
            self.retry_after,
            self.source.map_or("-", Source::as_str),
        )
    }

    /// An answer with only a status and a body; the constructors below add the rest.
    fn bare(status_code: u16, body: String) -> Self {
        Self {
            status_code,
            body,
            error: None,
            retry_after: None,
            assigned_hub: None,
            device_id: None,
            source: None,
            return_data: None,
            certificate_pem: None,
            private_key_pem: None,
            ca_chain_pem: None,
            expires_at: None,
        }
    }

    /// The device's IoT Hub connection string and where it came from.
    pub fn connection(
        assigned_hub: String,
        device_id: String,
        key_base64: &str,
        source: Source,
        return_data: Option<Value>,
    ) -> Self {
        let body =
            format!("HostName={assigned_hub};DeviceId={device_id};SharedAccessKey={key_base64}");
        Self {
            assigned_hub: Some(assigned_hub),
            device_id: Some(device_id),
            source: Some(source),
            return_data,
            ..Self::bare(200, body)
        }
    }

    /// An X.509 device's connection: its hub and id (as the Azure IoT SDKs' connection string
    /// for certificate devices: `x509=true` instead of a key), its certificate, key and chain.
    pub fn certificate(
        assigned_hub: String,
        device_id: String,
        credentials: &Credentials,
        return_data: Option<Value>,
    ) -> Self {
        let certificate = &credentials.certificate;
        let body = format!("HostName={assigned_hub};DeviceId={device_id};x509=true");
        Self {
            assigned_hub: Some(assigned_hub),
            device_id: Some(device_id),
            source: Some(Source::Dps),
            return_data,
            certificate_pem: Some(certificate.certificate_pem.clone()),
            private_key_pem: Some(certificate.private_key_pem.clone()),
            ca_chain_pem: Some(credentials.chain_pem.clone()),
            expires_at: Some(unix_seconds(certificate.not_after)),
            ..Self::bare(200, body)
        }
    }

    pub fn refused(refused: Refused, retry_after: Option<Duration>) -> Self {
        Self {
            error: Some(refused.code()),
            retry_after: retry_after.map(|d| d.as_secs().max(1)),
            ..Self::bare(refused.status(), refused.sentence().to_owned())
        }
    }
}

/// Why a device got no connection string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    BadRequest,
    NoIdentity,
    BadIdentity,
    OperatorNotAllowed,
    SimBlocked,
    SimExpired,
    SimUnknown,
    SimRateLimited,
    NoEnrollment,
    EnrollmentRefused,
    EnrollmentNotAssigned,
    Misconfigured,
    DpsFailed,
    DpsThrottled,
    DpsTimeout,
    DpsBudget,
    KeyStoreUnavailable,
    RegistryUnavailable,
    CertificateCurrent,
    CertificateRefused,
    CaUnavailable,
}

impl Refused {
    /// Every refusal, for tests that check answers against the fixed sentences.
    pub const ALL: [Refused; 21] = [
        Self::BadRequest,
        Self::NoIdentity,
        Self::BadIdentity,
        Self::OperatorNotAllowed,
        Self::SimBlocked,
        Self::SimExpired,
        Self::SimUnknown,
        Self::SimRateLimited,
        Self::NoEnrollment,
        Self::EnrollmentRefused,
        Self::EnrollmentNotAssigned,
        Self::Misconfigured,
        Self::DpsFailed,
        Self::DpsThrottled,
        Self::DpsTimeout,
        Self::DpsBudget,
        Self::KeyStoreUnavailable,
        Self::RegistryUnavailable,
        Self::CertificateCurrent,
        Self::CertificateRefused,
        Self::CaUnavailable,
    ];

    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::NoIdentity
            | Self::BadIdentity
            | Self::OperatorNotAllowed
            | Self::SimBlocked
            | Self::SimExpired
            | Self::SimUnknown
            | Self::NoEnrollment
            | Self::EnrollmentRefused
            | Self::EnrollmentNotAssigned => 403,
            Self::CertificateCurrent => 409,
            Self::SimRateLimited => 429,
            Self::Misconfigured => 500,
            Self::DpsFailed | Self::CertificateRefused => 502,
            Self::CaUnavailable
            | Self::DpsThrottled
            | Self::DpsTimeout
            | Self::DpsBudget
            | Self::KeyStoreUnavailable
            | Self::RegistryUnavailable => 503,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "bad-request",
            Self::NoIdentity => "no-identity",
            Self::BadIdentity => "bad-identity",
            Self::OperatorNotAllowed => "operator-not-allowed",
            Self::SimBlocked => "sim-blocked",
            Self::SimExpired => "sim-expired",
            Self::SimUnknown => "sim-unknown",
            Self::SimRateLimited => "sim-rate-limited",
            Self::NoEnrollment => "no-enrollment",
            Self::EnrollmentRefused => "enrollment-refused",
            Self::EnrollmentNotAssigned => "enrollment-not-assigned",
            Self::Misconfigured => "misconfigured",
            Self::DpsFailed => "dps-failed",
            Self::DpsThrottled => "dps-throttled",
            Self::DpsTimeout => "dps-timeout",
            Self::DpsBudget => "dps-budget",
            Self::KeyStoreUnavailable => "key-store-unavailable",
            Self::RegistryUnavailable => "registry-unavailable",
            Self::CertificateCurrent => "certificate-current",
            Self::CertificateRefused => "certificate-refused",
            Self::CaUnavailable => "ca-unavailable",
        }
    }

    /// The one sentence the caller sees for this refusal.
    pub fn sentence(self) -> &'static str {
        match self {
            Self::BadRequest => "The request body must be a JSON object of at most 4096 bytes.",
            Self::NoIdentity => "No SORACOM identity: call this function through SORACOM Funk.",
            Self::BadIdentity => "The SORACOM identity is incomplete or malformed.",
            Self::OperatorNotAllowed => "This SIM's operator may not register devices here.",
            Self::SimBlocked => "This SIM is blocked.",
            Self::SimExpired => "This SIM's registration permission has expired.",
            Self::SimUnknown => "This SIM is not registered for provisioning.",
            Self::SimRateLimited => "This SIM has registered too often; try again after retryAfter seconds.",
            Self::NoEnrollment => "This SIM has no enrollment.",
            Self::EnrollmentRefused => "The provisioning service refused this device.",
            Self::EnrollmentNotAssigned => "The provisioning service did not assign this device.",
            Self::Misconfigured => "The provisioning function is misconfigured.",
            Self::DpsFailed => "The provisioning service failed; try again later.",
            Self::DpsThrottled => "The provisioning service is busy; try again after retryAfter seconds.",
            Self::DpsTimeout => "The provisioning service did not answer in time; try again after retryAfter seconds.",
            Self::DpsBudget => "Too many devices are registering at once; try again after retryAfter seconds.",
            Self::KeyStoreUnavailable => "The key store is unavailable; try again after retryAfter seconds.",
            Self::RegistryUnavailable => "The device table is unavailable; try again after retryAfter seconds.",
            Self::CertificateCurrent => "This device's certificate is still valid: keep using it, renew after retryAfter seconds, or ask with \"rotate\": true.",
            Self::CertificateRefused => "The provisioning service refused the device certificate; try again later.",
            Self::CaUnavailable => "The certificate authority is unavailable; try again after retryAfter seconds.",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_sentences_are_distinct() {
        let mut codes: Vec<_> = Refused::ALL.iter().map(|r| r.code()).collect();
        let mut sentences: Vec<_> = Refused::ALL.iter().map(|r| r.sentence()).collect();
        codes.sort_unstable();
        codes.dedup();
        sentences.sort_unstable();
        sentences.dedup();
        assert_eq!(codes.len(), Refused::ALL.len());
        assert_eq!(sentences.len(), Refused::ALL.len());
    }
}
