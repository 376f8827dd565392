//! The installers' page (web/) end to end: Debian's headless Chromium, driven by selenium,
//! signs in against the local AWS endpoint's Cognito (SRP, first-sign-in password, authenticator
//! set-up and code), gets a claim through the JWT authorizer stand-in and the real claim-issuer
//! handler (AWS IoT's control-plane double, the claim log in moto), and downloads the two files
//! `fleet-device` reads. The authorizer refuses forged, expired and foreign tokens before the
//! function runs. Screenshots of each page state go to target/screenshots/.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use ::claim_issuer::config::Config as IssuerConfig;
use ::claim_issuer::handler::handle as issue;
use base64::Engine;
use local_emulators::installer_site::{
    self, InstallerSite, Invoke, JwtAuthorizer, PageConfig, Rejection,
};
use local_emulators::iot_control::IotControlPlane;
use local_emulators::local_aws::LocalAws;
use serde_json::{json, Value};
use shared::registry::{ClaimLog, DynamoRegistry};

use crate::fleet_fixture::TABLE;

const TEMPLATE: &str = "fleet-template";
const SERIAL: &str = "SN-0042";

async fn python(script: &str, env: &HashMap<&str, String>) -> Value {
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.clone())).collect();
    installer_site::python_json(script, &[], &env)
        .await
        .unwrap()
}

struct Setup {
    aws: LocalAws,
    _iot: IotControlPlane,
    pool: String,
    client: String,
    site: InstallerSite,
    users: HashMap<&'static str, String>,
}

/// The local stack for the page: moto (Cognito, the table), the IoT double, claim-issuer in
/// process behind the authorizer, the page on its own origin.
async fn setup() -> Setup {
    let aws = LocalAws::start().await.unwrap();
    aws.create_devices_table(TABLE).await.unwrap();
    let iot = IotControlPlane::start(&[TEMPLATE]).await.unwrap();
    let users: HashMap<&str, String> = [
        ("INSTALLER_USER", "installer@example.com".to_owned()),
        ("INSTALLER_PASSWORD", installer_site::new_password()),
        ("INSTALLER_NEW_PASSWORD", installer_site::new_password()),
        ("VISITOR_USER", "visitor@example.com".to_owned()),
        ("VISITOR_PASSWORD", installer_site::new_password()),
        ("VISITOR_NEW_PASSWORD", installer_site::new_password()),
    ]
    .into_iter()
    .collect();
    let listed: Vec<(&str, String)> = users.iter().map(|(k, v)| (*k, v.clone())).collect();
    let (pool, client) = installer_site::installers_pool(aws.endpoint(), &listed)
        .await
        .unwrap();
    let env = local_emulators::fixtures::env(
        &[
            ("DEVICES_TABLE", TABLE),
            ("PROVISIONING_TEMPLATE", TEMPLATE),
            ("IOT_DATA_ENDPOINT", "example-ats.iot.local"),
            // One claim an hour per installer: the second shows the refusal with its wait.
            ("CLAIMS_PER_WINDOW", "1"),
        ],
        &[],
    );
    let state = Arc::new(
        crate::claim_issuer::state(&aws, &iot, IssuerConfig::from_env(&env).unwrap()).await,
    );
    let invoke: Invoke = Arc::new(move |event| {
        let state = Arc::clone(&state);
        Box::pin(async move {
            let answer = issue(event, shared::clock::unix_now(), &state).await;
            serde_json::to_value(answer).map_err(|e| e.to_string())
        })
    });
    let authorizer = JwtAuthorizer::for_user_pool(aws.endpoint(), "us-east-1", &pool, &client)
        .await
        .unwrap();
    let page = PageConfig {
        region: "us-east-1".into(),
        user_pool_id: pool.clone(),
        client_id: client.clone(),
        cognito_endpoint: Some(format!("{}/", aws.endpoint())),
        iot_endpoint: "example-ats.iot.local".into(),
    };
    let site = InstallerSite::start(page, authorizer, invoke)
        .await
        .unwrap();
    Setup {
        aws,
        _iot: iot,
        pool,
        client,
        site,
        users,
    }
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn an_installer_signs_in_gets_a_claim_and_downloads_its_files_in_chromium() {
    let s = setup().await;
    let downloads = local_emulators::stack::temp_dir("page-downloads").unwrap();
    let shots = screenshots();
    let mut env = s.users.clone();
    env.insert("PAGE_URL", s.site.page_url());
    env.insert("SERIAL", SERIAL.to_owned());
    env.insert("SECOND_SERIAL", "SN-0043".to_owned());
    env.insert("SCAN_SERIAL", "SN-0077".to_owned());
    env.insert("DOWNLOAD_DIR", downloads.path().display().to_string());
    env.insert("SCREENSHOT_DIR", shots.display().to_string());
    let seen = python("installer_browser.py", &env).await;

    // The two files parse as a certificate and the key of that certificate.
    let cert_pem = seen["downloads"]["claim.pem.crt"].as_str().unwrap();
    let key_pem = seen["downloads"]["claim.pem.key"].as_str().unwrap();
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).expect("a PEM certificate");
    let cert = pem.parse_x509().expect("an X.509 certificate");
    let key = rcgen::KeyPair::from_pem(key_pem).expect("a PEM private key");
    assert_eq!(
        key.public_key_raw(),
        cert.public_key().subject_public_key.data.as_ref(),
        "the key is the certificate's"
    );
    // The claim was recorded, bound to the serial, for the installer who asked.
    let registry = DynamoRegistry::new(s.aws.dynamodb().await, TABLE);
    let claim = registry
        .claim(&local_emulators::tls::certificate_id(&pem.contents))
        .await
        .unwrap()
        .expect("the claim is recorded");
    assert_eq!(claim.serial.as_deref(), Some(SERIAL));

    // What the page showed.
    assert_eq!(seen["resultSerial"], SERIAL);
    let countdown = seen["countdown"].as_str().unwrap();
    assert!(
        countdown.starts_with("4:") || countdown.starts_with("5:"),
        "{countdown}"
    );
    let command = seen["command"].as_str().unwrap();
    for part in [
        "fleet-device",
        "--endpoint example-ats.iot.local",
        "--claim-cert claim.pem.crt --claim-key claim.pem.key",
        "--template fleet-template",
        "--param SerialNumber=SN-0042",
    ] {
        assert!(command.contains(part), "{part}: {command}");
    }
    assert_eq!(
        seen["clipboard"].as_str(),
        Some(command),
        "the copied command"
    );
    assert_eq!(
        seen["copied"],
        "The command is copied: paste it in the device's terminal."
    );
    assert!(seen["mfaUri"]
        .as_str()
        .unwrap()
        .starts_with("otpauth://totp/"));
    assert_eq!(
        seen["badSerial"],
        "That is not a device serial number: check it against the label."
    );
    // The wait comes from the API's Retry-After, which CORS exposes to the page.
    // (60 minutes less the seconds since the first claim, rounded up: 60, or 59 on a slow run.)
    let limited = seen["rateLimited"].as_str().unwrap();
    let told = |minutes: u32| {
        format!(
            "You have asked for the most claims allowed for now: try again in {minutes} minutes."
        )
    };
    assert!(limited == told(60) || limited == told(59), "{limited}");
    // The camera: the QR code's web address was read and passed over, the serial's Code 128
    // filled the field, and the camera was released (after a find, and when stopped by hand).
    assert_eq!(
        seen["scanOther"],
        "That code (https://example.com/manuals/sensor-x) is not a device serial: point the camera at the serial's barcode."
    );
    assert_eq!(
        seen["scanned"],
        "Read SN-0077 from the label: check it against the device, then get the claim."
    );
    assert_eq!(
        seen["scanAfter"],
        // Decoded in the worker: the page's own thread never loaded ZXing.
        json!({"scannerHidden": true, "camera": "released", "decoderOnPage": "undefined"})
    );
    assert_eq!(seen["scanStopped"], true);
    assert_eq!(
        seen["cameraBlocked"],
        "The camera is blocked for this page: allow it in the browser's site settings, or type the serial."
    );
    assert_eq!(seen["cameraBlockedAfter"], true, "the scan button is back");
    // Signing out revoked the refresh token at Cognito (the page says less if it could not).
    assert_eq!(seen["signedOut"], "Signed out.");
    assert!(seen["signedInAgain"]
        .as_str()
        .unwrap()
        .contains("installer@example.com"));
    assert_eq!(
        seen["notInstaller"],
        "Your account is not an installer account: ask your administrator to add you to the installers group."
    );
    // Nothing kept: no Web Storage, cookies, IndexedDB or caches, before or after.
    for at in ["storage", "storageAtEnd"] {
        assert_eq!(
            seen[at],
            json!({"local": 0, "session": 0, "cookies": "", "indexedDb": 0, "caches": 0}),
            "{at}"
        );
    }
    // No script error and no Content-Security-Policy violation; Chromium logs the refusals the
    // test provoked (400, 429, 403) as failed loads, and those only.
    let errors: Vec<&str> = seen["consoleErrors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|e| {
            !e.contains(
                "/claims - Failed to load resource: the server responded with a status of 4",
            )
        })
        .collect();
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    for shot in [
        "11-sign-in",
        "12-new-password",
        "13-authenticator-setup",
        "14-claim-form",
        "15-claim-issued",
        "15p-claim-issued-phone",
        "16-refused-serial",
        "16b-rate-limited",
        "16c-scanning",
        "16d-scanned",
        "17-authenticator-code",
        "18-not-an-installer",
    ] {
        let file = shots.join(format!("{shot}.png"));
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(bytes.starts_with(b"\x89PNG"), "{}", file.display());
    }
}

/// The barcode decoder the page loads (web/zxing.min.js) is the pinned npm package's own build,
/// byte for byte: nothing edited or of unknown origin is served to installers.
#[test]
fn the_vendored_barcode_decoder_is_the_pinned_package_byte_for_byte() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("tests/interop/package.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["dependencies"]["@zxing/library"], "0.23.0");
    let package = root.join("tests/interop/node_modules/@zxing/library");
    let installed: Value =
        serde_json::from_str(&std::fs::read_to_string(package.join("package.json")).unwrap())
            .unwrap();
    assert_eq!(installed["version"], "0.23.0");
    let built = std::fs::read(package.join("umd/index.min.js")).unwrap();
    let served = std::fs::read(root.join("web/zxing.min.js")).unwrap();
    assert!(
        built == served,
        "web/zxing.min.js differs from @zxing/library 0.23.0's umd/index.min.js"
    );
    assert_eq!(
        std::fs::read(package.join("LICENSE")).unwrap(),
        std::fs::read(root.join("web/zxing.LICENSE")).unwrap()
    );
}

async fn post_claim(site: &InstallerSite, token: Option<&str>) -> (u16, String) {
    installer_site::post_claim(&site.api_url(), token, &json!({"serial": SERIAL}))
        .await
        .unwrap()
}

#[tokio::test]
async fn the_authorizer_stand_in_lets_only_the_pools_valid_access_tokens_through() {
    let s = setup().await;
    let tokens = installer_site::test_tokens(s.aws.endpoint(), &s.pool, &s.client)
        .await
        .unwrap();
    let access = tokens["access"].as_str().unwrap();
    let authorizer =
        JwtAuthorizer::for_user_pool(s.aws.endpoint(), "us-east-1", &s.pool, &s.client)
            .await
            .unwrap();
    let now = shared::clock::unix_now();
    let claims = authorizer.verify(access, now).unwrap();
    assert_eq!(claims["cognito:groups"], json!(["installers"]));
    let exp = claims["exp"].as_u64().unwrap();

    // A payload changed after signing (another group), an unsigned token: no signature by
    // the pool's key.
    let forged = installer_site::forged(access);
    let parts: Vec<&str> = access.split('.').collect();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let unsigned_header = b64.encode(r#"{"alg":"none","kid":"dummy"}"#);
    let unsigned = format!("{unsigned_header}.{}.", parts[1]);
    let cases: Vec<(&str, String, u64, Rejection)> = vec![
        ("forged payload", forged, now, Rejection::Signature),
        ("alg none", unsigned, now, Rejection::Algorithm),
        ("expired", access.to_owned(), exp, Rejection::Expired),
        (
            "ID token",
            tokens["id"].as_str().unwrap().to_owned(),
            now,
            Rejection::TokenUse,
        ),
        (
            "another app client",
            tokens["otherClientAccess"].as_str().unwrap().to_owned(),
            now,
            Rejection::Audience,
        ),
        (
            "another pool",
            tokens["otherPoolAccess"].as_str().unwrap().to_owned(),
            now,
            Rejection::Issuer,
        ),
        ("not a JWT", "abc".to_owned(), now, Rejection::Malformed),
    ];
    for (what, token, at, rejection) in &cases {
        assert_eq!(
            authorizer.verify(token, *at).err(),
            Some(*rejection),
            "{what}"
        );
    }

    // Over HTTP: every refused token is a 401 and never reaches claim-issuer; the valid one
    // does.
    for (what, token, _, _) in cases.iter().filter(|c| c.2 == now) {
        let (status, body) = post_claim(&s.site, Some(token)).await;
        assert_eq!(
            (status, body.as_str()),
            (401, r#"{"message":"Unauthorized"}"#),
            "{what}"
        );
    }
    assert_eq!(post_claim(&s.site, None).await.0, 401);
    assert_eq!(s.site.invocations(), 0);
    let (status, body) = post_claim(&s.site, Some(access)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.site.invocations(), 1);
}

#[tokio::test]
async fn the_pages_srp_proof_is_the_one_an_established_cognito_client_computes() {
    // moto accepts any SRP proof: this is what shows the page's proof would pass Cognito.
    let checked = python("installer_srp_check.py", &HashMap::new()).await;
    assert_eq!(checked["cases"], 25);
}
