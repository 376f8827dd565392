//! `make demo`: the whole product on this machine. It starts the local AWS endpoint, the DPS
//! simulator and the IoT control-plane double, seeds them, runs the three functions in the
//! `cargo lambda watch` emulator, and replays the sample story with `cargo lambda invoke`,
//! printing each step's outcome. It exits non-zero if any step's outcome is not the expected
//! one, and stops everything it started on exit, failure or Ctrl-C.
//!
//! Run from a terminal, it then keeps everything up, the installers' page with an installer's
//! sign-in printed, until Enter (`make demo | tee` or CI does not wait).
//!
//! `demo --serve ENV_FILE` starts and seeds the emulators only, writes the functions'
//! environment to ENV_FILE, and waits for Ctrl-C (`make emulators`).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use local_emulators::installer_site::LocalInstallers;
use local_emulators::iot_mqtt::{Hook, IotMqttConfig, IotMqttSimulator, Template};
use local_emulators::lambda_watch::{self, LambdaWatch};
use local_emulators::stack::{LocalStack, TEMPLATE};

/// Where `cargo lambda watch` (`make watch`) serves the Lambda Invoke API by default.
const WATCH_DEFAULT: &str = "http://127.0.0.1:9000";
use local_emulators::story;

async fn demo() -> Result<bool, String> {
    println!("==> starting the local AWS endpoint, DPS simulator and IoT control-plane double");
    let stack = LocalStack::start().await.map_err(|e| e.to_string())?;
    println!("    AWS (SSM, DynamoDB)  {}", stack.aws.endpoint());
    println!(
        "    Azure DPS (MQTT/TLS) 127.0.0.1:{}",
        stack.dps.addr().port()
    );
    println!("    AWS IoT control      {}", stack.iot.endpoint());
    println!("    seeded: group key (SSM SecureString), device CA (KMS key, certificate in SSM, its root enrolled in DPS), blocked SIM, serials SN-0001 (allowed) and SN-0666 (blocked)");

    println!("==> building the functions for local replay (cargo build --features local-replay)");
    lambda_watch::prebuild().await.map_err(|e| e.to_string())?;

    let env_file = stack.dir().join("functions.env");
    stack.write_env_file(&env_file).map_err(|e| e.to_string())?;
    let log = stack.dir().join("cargo-lambda-watch.log");
    println!("==> starting cargo lambda watch (Runtime API emulator)");
    let watch = LambdaWatch::start(&env_file, &log)
        .await
        .map_err(|e| e.to_string())?;

    println!("==> replaying the story\n");
    let mut number = 0;
    let story = story::run(&stack, &watch, |step| {
        number += 1;
        let mark = if step.ok { "ok  " } else { "FAIL" };
        println!("{number:>2}. [{mark}] {}", step.title);
        println!("           $ {}", step.command);
        println!("           {}\n", step.detail);
    })
    .await;
    let steps = &story.steps;
    let failed = steps.iter().filter(|s| !s.ok).count();
    if failed > 0 {
        if let Ok(text) = std::fs::read_to_string(watch.log()) {
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            println!("last lines of the emulator log:");
            for line in tail.iter().rev() {
                println!("  {line}");
            }
        }
    }
    println!("demo: {} passed, {} failed", steps.len() - failed, failed);
    // A person at a terminal may try the page: it stays up, with claim-issuer in the watch.
    let person = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    if let (true, Some(installers)) = (person, &story.installers) {
        println!("\n==> everything stays up for you to try the installers' page");
        println!("{}", sign_in_help(installers));
        println!("press Enter to stop everything");
        // A plain thread: one blocked on the terminal must not hold up the exit on Ctrl-C.
        let (entered, enter) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_line(&mut String::new());
            let _ = entered.send(());
        });
        let _ = enter.await;
    }
    Ok(failed == 0)
}

/// How a person signs in to the local installers' page.
fn sign_in_help(installers: &LocalInstallers) -> String {
    format!(
        "installers' page: {}\n  sign in as {} with the temporary password {}; the page then \
         asks for a new password and sets up an authenticator app (the local Cognito's key is \
         fixed: the page shows it; any TOTP app or `oathtool --totp -b KEY` gives the code)",
        installers.site.page_url(),
        installers.user,
        installers.temporary_password
    )
}

async fn serve(env_file: PathBuf) -> Result<bool, String> {
    let stack = LocalStack::start().await.map_err(|e| e.to_string())?;
    stack.write_env_file(&env_file).map_err(|e| e.to_string())?;
    // AWS IoT calls the hook where `make watch` serves it (cargo lambda's default port).
    let hook = Hook::lambda(WATCH_DEFAULT, "fleet-prehook");
    let iot = IotMqttSimulator::start(
        IotMqttConfig::new(
            stack.iot.ca_pem(),
            vec![Template::new(TEMPLATE, "fleet-", hook)],
        ),
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let ca = env_file.with_file_name("iot-ca.pem");
    std::fs::write(&ca, iot.ca_pem()).map_err(|e| e.to_string())?;
    println!(
        "emulators ready; the functions' environment is in {}",
        env_file.display()
    );
    println!(
        "in another terminal:  make watch    then    make invoke FN=... EVENT=... [CONTEXT=...]"
    );
    println!(
        "AWS IoT fleet provisioning (MQTT/TLS) on localhost:{}, its CA in {}; with a claim from\n\
         claim-issuer saved as claim.pem.crt / claim.pem.key:\n  \
         target/debug/fleet-device --endpoint localhost:{} --ca {} --claim-cert claim.pem.crt \\\n    \
         --claim-key claim.pem.key --template {TEMPLATE} --param SerialNumber=SN-0001 --out device --verify",
        iot.addr().port(),
        ca.display(),
        iot.addr().port(),
        ca.display()
    );
    // The installers' page, its API invoking claim-issuer where `make watch` serves it.
    let installers = LocalInstallers::start(
        stack.aws.endpoint(),
        &format!("localhost:{}", iot.addr().port()),
        WATCH_DEFAULT,
    )
    .await?;
    println!(
        "{}\n  (its API needs `make watch`)",
        sign_in_help(&installers)
    );
    println!("Ctrl-C stops them");
    let _ = tokio::signal::ctrl_c().await;
    let _ = std::fs::remove_file(&env_file);
    let _ = std::fs::remove_file(&ca);
    Ok(true)
}

/// Builds, starts the local stand-ins and replays the sample story through `cargo lambda
/// invoke`, showing each step; with --serve, starts and seeds the stand-ins only.
#[derive(Debug, clap::Parser)]
#[command(name = "demo")]
struct Args {
    /// Start and seed the stand-ins, write the functions' environment to this file for
    /// `make watch`, and keep running until Ctrl-C
    #[arg(long, value_name = "ENV_FILE")]
    serve: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    let work = async {
        match args.serve {
            Some(path) => serve(path).await,
            None => demo().await,
        }
    };
    // Ctrl-C drops everything started so far; each part stops its processes when dropped.
    let outcome = tokio::select! {
        outcome = work => outcome,
        _ = tokio::signal::ctrl_c() => Err("interrupted".to_owned()),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
