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
    let steps = story::run(&stack, &watch, |_| {}).await.steps;
    let failed: Vec<String> = steps
        .iter()
        .filter(|s| !s.ok)
        .map(|s| format!("{}\n  $ {}\n  {}", s.title, s.command, s.detail))
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    // Every function answered through `cargo lambda invoke`, and the device CLI ran: a story
    // that silently skipped a part would pass the check above with fewer steps.
    for part in [
        "cargo lambda invoke azure-dps-register",
        "cargo lambda invoke claim-issuer",
        "cargo lambda invoke fleet-prehook",
        "cargo lambda invoke sim-lifecycle",
        "-> fleet-confirm",
        "fleet-device ",
        "provisioning-admin ",
        "--client-context-file",
        "/claims (Bearer <access token>)",
    ] {
        assert!(
            steps.iter().any(|s| s.command.contains(part)),
            "no step ran {part}"
        );
    }

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
            "device private key",
            "X.509 device private key"
        ]
        .iter()
        .all(|k| kinds.contains(k)),
        "the story must have handled every kind of secret: {kinds:?}"
    );
    // Both watches' output: the symmetric-key functions' and the X.509 deployment's.
    let log = std::fs::read_to_string(watch.log()).unwrap()
        + &std::fs::read_to_string(stack.dir().join("watch-x509.log")).unwrap();
    assert!(
        log.contains("provisioning allowed"),
        "the log holds the functions' output"
    );
    // Each function, as a real process under the emulator, wrote its answers as CloudWatch
    // metrics (Embedded Metric Format lines), by outcome.
    let metrics: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| l.find("{\"Answers\"").map(|at| &l[at..]))
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|d: &serde_json::Value| d["_aws"]["CloudWatchMetrics"].is_array())
        .collect();
    for (function, outcome) in [
        ("azure-dps-register", "dps"),
        ("azure-dps-register", "sim-blocked"),
        ("fleet-prehook", "allowed"),
        ("claim-issuer", "issued"),
        ("sim-lifecycle", "blocked"),
        ("sim-lifecycle", "ignored"),
    ] {
        assert!(
            metrics
                .iter()
                .any(|d| d["Function"] == function && d["Outcome"] == outcome),
            "no {function} {outcome} metric among {metrics:?}"
        );
    }
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

fn workspace() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// What `cargo ARGS` prints in the workspace; it must succeed.
fn cargo_stdout(cargo: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cargo)
        .args(args)
        .current_dir(workspace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The hole: `tests/Cargo.toml` enabled `local-replay` (then on `shared`), and features unify across
/// the workspace, so `cargo build --workspace --release` put the local Runtime API proxy into
/// the deployed functions. No member may enable it; the functions' own feature stays opt-in.
#[test]
fn local_replay_is_enabled_by_no_workspace_member() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("-vV")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout);
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // This machine's platform only: the others' dependencies need not be downloaded.
    let out = cargo_stdout(
        &cargo,
        &[
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--locked",
            "--filter-platform",
            host,
        ],
    );
    let metadata: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nodes = metadata["resolve"]["nodes"].as_array().unwrap();
    let mut checked = 0;
    for node in nodes {
        let id = node["id"].as_str().unwrap_or("");
        let ours = [
            "shared",
            "azure-dps-register",
            "fleet-prehook",
            "claim-issuer",
            "sim-lifecycle",
        ]
        .iter()
        .any(|name| id.contains(&format!("/{name}#")) || id.contains(&format!("#{name}@")));
        if !ours {
            continue;
        }
        checked += 1;
        let features: Vec<&str> = node["features"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f.as_str())
            .collect();
        assert!(!features.contains(&"local-replay"), "{id}: {features:?}");
    }
    assert_eq!(
        checked, 5,
        "found {checked} of the five crates in the metadata"
    );
}

/// And should anything enable it in a release build, that build fails: the guard compiled as
/// the release profile compiles it (no debug assertions) refuses, in a debug build it is silent.
#[test]
fn a_release_build_with_local_replay_does_not_compile() {
    let guard = workspace().join("shared/lambda-support/src/replay/release_guard.rs");
    let out_dir = local_emulators::stack::temp_dir("release-guard").unwrap();
    let compile = |feature: bool, debug_assertions: bool| {
        let mut rustc =
            std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
        rustc
            .args([
                "--edition",
                "2021",
                "--crate-type",
                "lib",
                "--emit",
                "metadata",
            ])
            .arg("--out-dir")
            .arg(out_dir.path())
            .args(["--crate-name", "release_guard"])
            .args([
                "-C",
                &format!(
                    "debug-assertions={}",
                    if debug_assertions { "on" } else { "off" }
                ),
            ]);
        if feature {
            rustc.args(["--cfg", "feature=\"local-replay\""]);
        }
        rustc.arg(&guard).output().unwrap()
    };
    let release = compile(true, false);
    assert!(!release.status.success());
    assert!(
        String::from_utf8_lossy(&release.stderr).contains("never be part of a release build"),
        "{}",
        String::from_utf8_lossy(&release.stderr)
    );
    assert!(
        compile(true, true).status.success(),
        "debug build with the feature"
    );
    assert!(
        compile(false, false).status.success(),
        "release build without it"
    );
}

/// Each function links only the layers it uses: the hook and claim-issuer talk neither MQTT nor
/// SSM, so neither rumqttc nor the SSM client is in their dependency tree.
#[test]
fn functions_link_only_the_layers_they_use() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = |package: &str| {
        let args = [
            "tree",
            "--offline",
            "--locked",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ];
        cargo_stdout(&cargo, &args)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect::<std::collections::BTreeSet<String>>()
    };
    for function in ["fleet-prehook", "claim-issuer"] {
        let crates = tree(function);
        for unwanted in ["rumqttc", "aws-sdk-ssm", "dps-client"] {
            assert!(!crates.contains(unwanted), "{function} links {unwanted}");
        }
        assert!(
            crates.contains("aws-sdk-dynamodb"),
            "{function}: {crates:?}"
        );
    }
    let azure = tree("azure-dps-register");
    assert!(azure.contains("rumqttc") && azure.contains("aws-sdk-ssm"));
    // The rules without I/O and the DPS client build on no AWS crate at all.
    for layer in ["domain", "dps-client"] {
        let crates = tree(layer);
        assert!(
            !crates.iter().any(|c| c.starts_with("aws-")),
            "{layer} links the AWS SDK: {crates:?}"
        );
        assert!(!crates.contains("shared"), "{layer} links the stores");
    }
}
