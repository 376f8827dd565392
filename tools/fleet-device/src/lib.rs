//! The device side of AWS IoT fleet provisioning by claim, as a library and the `fleet-device`
//! program: connect with the claim certificate, get a permanent certificate (AWS IoT creates the
//! keys, or signs a CSR for a key that never leaves the device), register the thing through the
//! provisioning template (and so through its pre-provisioning hook), and keep the result in a
//! directory only the owner can read. Works against AWS IoT Core and the local simulator.

pub mod files;
pub mod payload;
pub mod session;
pub mod tls;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::files::{CERTIFICATE_FILE, PRIVATE_KEY_FILE, THING_FILE};
pub use crate::payload::Format;
use crate::session::Session;

/// Client ids of claim connections begin with this: the claim policy admits only such ids, and
/// no thing name can take one (thing names have no '.').
pub const CLAIM_CLIENT_PREFIX: &str = "claim.";

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Setup(String),
    #[error("the server refused the claim certificate: it has expired (claim certificates live 5 minutes; ask for a new one)")]
    CertificateExpired,
    #[error("the server refused the client certificate: {0}")]
    CertificateRefused(String),
    #[error("the server's certificate is not trusted for this endpoint: {0}")]
    ServerNotTrusted(String),
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    #[error("{step} rejected ({status} {code}): {message}")]
    Rejected {
        step: &'static str,
        status: u64,
        code: String,
        message: String,
    },
    #[error("no answer within the timeout while waiting for {step}")]
    Timeout { step: &'static str },
    #[error("connection failed: {0}")]
    Connection(String),
    #[error("unexpected answer: {0}")]
    Malformed(String),
}

impl DeviceError {
    /// The process exit code: 2 for what the user must fix locally, 3 for refusals by the
    /// service, 4 for timeouts and connection failures (worth retrying).
    pub fn exit_code(&self) -> u8 {
        match self {
            DeviceError::Setup(_) => 2,
            DeviceError::Timeout { .. } | DeviceError::Connection(_) => 4,
            _ => 3,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// The AWS IoT data endpoint (`xxxx-ats.iot.REGION.amazonaws.com`) or `localhost`.
    pub host: String,
    pub port: u16,
    /// The CA to trust for the server; `None` trusts the system roots.
    pub ca_file: Option<PathBuf>,
    pub claim_certificate: PathBuf,
    pub claim_key: PathBuf,
    pub template: String,
    pub parameters: BTreeMap<String, String>,
    /// Send a CSR for a key made here (`CreateCertificateFromCsr`) instead of letting AWS IoT
    /// make the key (`CreateKeysAndCertificate`).
    pub csr: bool,
    pub client_id: String,
    pub out_dir: PathBuf,
    pub force: bool,
    pub timeout: Duration,
    /// After provisioning, connect once with the new certificate as the thing.
    pub verify: bool,
    /// The payload encoding: the `.../json` or the `.../cbor` topics.
    pub format: Format,
}

#[derive(Debug, Clone)]
pub struct Provisioned {
    pub thing_name: String,
    pub certificate_id: String,
    pub certificate_file: PathBuf,
    pub private_key_file: PathBuf,
    pub verified: bool,
}

fn field(body: &Value, name: &str, step: &str) -> Result<String, DeviceError> {
    body.get(name)
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| DeviceError::Malformed(format!("{step} accepted without {name}")))
}

/// Provisions this device. `progress` receives one line per step (never a secret).
pub async fn provision(
    options: &Options,
    mut progress: impl FnMut(&str),
) -> Result<Provisioned, DeviceError> {
    let deadline = Instant::now() + options.timeout;
    let claim = tls::client_config(
        options.ca_file.as_deref(),
        tls::read_certificates(&options.claim_certificate)?,
        tls::read_private_key(&options.claim_key)?,
        options.port,
    )?;
    files::prepare(&options.out_dir, options.force)?;

    let local_key = if options.csr {
        Some(key_and_csr()?)
    } else {
        None
    };

    progress(&format!(
        "connecting to {}:{} with the claim certificate as '{}'",
        options.host, options.port, options.client_id
    ));
    let mut session = Session::connect(
        &options.host,
        options.port,
        &options.client_id,
        claim,
        deadline,
    )
    .await?;
    let outcome = register(&mut session, options, local_key, &mut progress).await;
    session.close().await;
    let mut provisioned = match outcome {
        Ok(p) => p,
        Err(e) => {
            files::discard(&options.out_dir);
            return Err(e);
        }
    };

    if options.verify {
        progress(&format!(
            "connecting with the new certificate as '{}'",
            provisioned.thing_name
        ));
        connect_as_thing(options, &provisioned, deadline).await?;
        provisioned.verified = true;
    }
    Ok(provisioned)
}

/// A key made on this device and a CSR for it: with a CSR the key is never sent anywhere.
/// Returns (key PEM, CSR PEM).
fn key_and_csr() -> Result<(String, String), DeviceError> {
    let key = rcgen::KeyPair::generate()
        .map_err(|e| DeviceError::Setup(format!("cannot generate a key: {e}")))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| DeviceError::Setup(format!("cannot make a CSR: {e}")))?;
    Ok((key.serialize_pem(), csr))
}

/// Proves the new identity: a connection with the new certificate as the thing.
async fn connect_as_thing(
    options: &Options,
    provisioned: &Provisioned,
    deadline: Instant,
) -> Result<(), DeviceError> {
    let identity = tls::client_config(
        options.ca_file.as_deref(),
        tls::read_certificates(&provisioned.certificate_file)?,
        tls::read_private_key(&provisioned.private_key_file)?,
        options.port,
    )?;
    let session = Session::connect(
        &options.host,
        options.port,
        &provisioned.thing_name,
        identity,
        deadline,
    )
    .await?;
    session.close().await;
    Ok(())
}

/// The new certificate (with a CSR, for the key made here; else AWS IoT makes the key too):
/// AWS IoT's answer and the private key.
async fn create_certificate(
    session: &mut Session,
    local_key: Option<(String, String)>,
    format: Format,
    progress: &mut impl FnMut(&str),
) -> Result<(Value, String), DeviceError> {
    match local_key {
        Some((key, csr)) => {
            progress("CreateCertificateFromCsr: sending a CSR for a key made on this device");
            let created = session
                .request(
                    "CreateCertificateFromCsr",
                    "$aws/certificates/create-from-csr",
                    format,
                    &json!({ "certificateSigningRequest": csr }),
                )
                .await?;
            Ok((created, key))
        }
        None => {
            progress("CreateKeysAndCertificate: asking AWS IoT for a key and certificate");
            let created = session
                .request(
                    "CreateKeysAndCertificate",
                    "$aws/certificates/create",
                    format,
                    &json!({}),
                )
                .await?;
            let key = field(&created, "privateKey", "CreateKeysAndCertificate")?;
            Ok((created, key))
        }
    }
}

async fn register(
    session: &mut Session,
    options: &Options,
    local_key: Option<(String, String)>,
    progress: &mut impl FnMut(&str),
) -> Result<Provisioned, DeviceError> {
    let dir = &options.out_dir;
    let (created, private_key) =
        create_certificate(session, local_key, options.format, progress).await?;
    let certificate_id = field(&created, "certificateId", "certificate creation")?;
    let certificate_pem = field(&created, "certificatePem", "certificate creation")?;
    let token = field(
        &created,
        "certificateOwnershipToken",
        "certificate creation",
    )?;
    tls::certificates_from_pem(certificate_pem.as_bytes(), "the new certificate")?;
    tls::private_key_from_pem(private_key.as_bytes(), "the new private key")?;

    // Kept before RegisterThing: should this process die after AWS IoT activated the
    // certificate, the identity is still on disk (as .pending) rather than lost.
    files::write_pending(dir, CERTIFICATE_FILE, certificate_pem.as_bytes(), 0o644)?;
    files::write_pending(dir, PRIVATE_KEY_FILE, private_key.as_bytes(), 0o600)?;
    progress(&format!(
        "certificate {}… created; RegisterThing with template '{}'",
        certificate_id.chars().take(12).collect::<String>(),
        options.template
    ));

    let registered = session
        .request(
            "RegisterThing",
            &format!("$aws/provisioning-templates/{}/provision", options.template),
            options.format,
            &json!({ "certificateOwnershipToken": token, "parameters": options.parameters }),
        )
        .await?;
    let thing_name = field(&registered, "thingName", "RegisterThing")?;
    let record = json!({
        "thingName": thing_name,
        "certificateId": certificate_id,
        "endpoint": format!("{}:{}", options.host, options.port),
        "deviceConfiguration": registered.get("deviceConfiguration").cloned().unwrap_or(Value::Null),
    });
    files::write_pending(dir, THING_FILE, format!("{record:#}\n").as_bytes(), 0o644)?;
    let certificate_file = files::commit(dir, CERTIFICATE_FILE)?;
    let private_key_file = files::commit(dir, PRIVATE_KEY_FILE)?;
    files::commit(dir, THING_FILE)?;
    progress(&format!("registered as thing '{thing_name}'"));
    Ok(Provisioned {
        thing_name,
        certificate_id,
        certificate_file,
        private_key_file,
        verified: false,
    })
}
