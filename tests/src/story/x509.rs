//! The same azure-dps-register deployed for X.509 devices (`ATTESTATION=x509`): its own
//! `cargo lambda watch` with that environment, the device CA's key in the local KMS and its
//! certificate in SSM, DPS enrolling the operator's root. The device gets a certificate and key
//! instead of a connection string with a key.

use serde_json::Value;

use super::{events, field, invoke, Invocation, Step};
use crate::lambda_watch::LambdaWatch;
use crate::stack::LocalStack;

/// Where the step keeps what the device was given (its key is a secret the logs must not show).
pub const DEVICE_KEY: &str = "x509-device/private.pem.key";
/// The SIM `events/azure-dps-register/client-context-x509.json` names.
pub const X509_IMSI: &str = "440103123450509";

pub async fn steps(stack: &LocalStack) -> Vec<Step> {
    let env_file = stack.dir().join("functions-x509.env");
    let started = match stack.write_x509_env_file(&env_file) {
        Ok(()) => LambdaWatch::start(&env_file, &stack.dir().join("watch-x509.log"))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let watch = match started {
        Ok(watch) => watch,
        Err(e) => {
            return vec![Step {
                title: "azure-dps-register for X.509 devices starts in its own watch",
                command: "cargo lambda watch --env-file functions-x509.env".into(),
                ok: false,
                detail: e,
            }]
        }
    };
    let dps_events = events().join("azure-dps-register");
    let ca_pem = stack.device_ca.intermediate_pem.clone();
    let key_file = stack.dir().join(DEVICE_KEY);
    let invocation = Invocation {
        title: "deployed with ATTESTATION=x509, the function gives a SIM a certificate signed in KMS by the device CA",
        function: "azure-dps-register",
        data: dps_events.join("register.json"),
        context: Some(dps_events.join("client-context-x509.json")),
        logged_reason: None,
        check: Box::new(move |v| issued(v, &ca_pem, &key_file)),
    };
    vec![invoke(&watch, invocation).await]
}

/// The answer holds a certificate for the SIM under the device CA, its key and the chain; the
/// device keeps them (the key in a file, as firmware would).
fn issued(v: &Value, ca_pem: &str, key_file: &std::path::Path) -> Result<String, String> {
    if v["statusCode"] != 200 || !field(v, "body").ends_with(";x509=true") {
        return Err(format!(
            "expected 200 with an x509 body, got statusCode {} {}",
            v["statusCode"],
            field(v, "error")
        ));
    }
    if field(v, "caChainPem") != ca_pem {
        return Err("the chain is not the device CA's certificate in SSM".into());
    }
    let key = field(v, "privateKeyPem");
    if !key.contains("PRIVATE KEY") {
        return Err("no private key in the answer".into());
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(field(v, "certificatePem").as_bytes())
        .map_err(|e| format!("certificatePem: {e}"))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| format!("certificatePem: {e}"))?;
    let (_, ca) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
        .map_err(|e| format!("the CA certificate: {e}"))?;
    let ca = ca
        .parse_x509()
        .map_err(|e| format!("the CA certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
        .unwrap_or("");
    if cn != X509_IMSI || cert.issuer() != ca.subject() {
        return Err(format!("certificate for {cn} issued by {}", cert.issuer()));
    }
    // Signed by the CA's key in KMS: the signature verifies with the CA certificate's key.
    cert.verify_signature(Some(ca.public_key()))
        .map_err(|e| format!("the certificate's signature: {e}"))?;
    if let Some(dir) = key_file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    std::fs::write(key_file, key).map_err(|e| e.to_string())?;
    Ok(format!(
        "200 {}; certificate CN={cn} serial {} until {}, signed by {} (verified), DPS checked its chain to the operator's root in the TLS handshake; privateKeyPem [not shown]",
        field(v, "body"),
        cert.raw_serial_as_string(),
        cert.validity().not_after,
        ca.subject()
    ))
}
