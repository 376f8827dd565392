//! The documented local replay path, for every function: `cargo lambda watch` with the
//! `local-replay` feature and `cargo lambda invoke` (with `--client-context-file` for the Funk
//! function) against the local stack. The same story `make demo` prints; here every step must
//! give its expected outcome, so the README cannot rot.

use local_emulators::lambda_watch::{self, LambdaWatch};
use local_emulators::stack::LocalStack;
use local_emulators::story;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sample_story_replays_through_cargo_lambda() {
    let stack = LocalStack::start().await.unwrap();
    lambda_watch::prebuild().await.unwrap();
    let env_file = stack.dir().join("functions.env");
    stack.write_env_file(&env_file).unwrap();
    let watch = LambdaWatch::start(&env_file, &stack.dir().join("watch.log"))
        .await
        .unwrap();
    let steps = story::run(&stack, &watch, |_| {}).await;
    let failed: Vec<String> = steps
        .iter()
        .filter(|s| !s.ok)
        .map(|s| format!("{}\n  $ {}\n  {}", s.title, s.command, s.detail))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    assert_eq!(steps.len(), 10);

    // No secret the story handled reaches the functions' logs (all three, as real processes
    // under the emulator) or what the demo prints.
    let secrets = story::secrets(&stack);
    let kinds: std::collections::BTreeSet<&str> = secrets.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        [
            "group key",
            "device key",
            "SAS signature",
            "claim private key",
            "device private key"
        ]
        .iter()
        .all(|k| kinds.contains(k)),
        "the story must have handled every kind of secret: {kinds:?}"
    );
    let log = std::fs::read_to_string(watch.log()).unwrap();
    assert!(
        log.contains("provisioning allowed"),
        "the log holds the functions' output"
    );
    let printed: String = steps
        .iter()
        .map(|s| format!("{} {}\n", s.command, s.detail))
        .collect();
    for (kind, secret) in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a {kind} appears in the functions' log"
        );
        assert!(
            !printed.contains(secret.as_str()),
            "a {kind} appears in the demo's output"
        );
    }
}

/// Every client context in events/ must be usable by `cargo lambda invoke
/// --client-context-file`, which sends the file as an HTTP header value: one line, no line
/// break at the end, and within Lambda's 3583-byte limit once base64-encoded.
#[test]
fn client_context_files_are_valid_header_values() {
    let dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../events/azure-dps-register");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("client-context") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains('\n') && !text.contains('\r'),
            "{name} must be a single line without a final newline"
        );
        assert!(
            text.len() * 4 / 3 + 4 <= 3583,
            "{name} is too large for a client context"
        );
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            json["custom"]["imsi"].is_string(),
            "{name} lacks custom.imsi"
        );
        checked += 1;
    }
    assert!(checked >= 2);
}
