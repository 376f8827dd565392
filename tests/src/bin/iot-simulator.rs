//! `iot-simulator`: the strict AWS IoT fleet provisioning MQTT stand-in as a program.

use std::process::ExitCode;
use std::time::Duration;

use local_emulators::iot_mqtt::{Hook, IotMqttConfig, IotMqttSimulator, Template};

const USAGE: &str = "\
usage: iot-simulator --claim-ca FILE --template NAME[=PREFIX]... [--hook-url URL]
                     [--listen HOST:PORT] [--serial-parameter NAME] [--hook-timeout-ms MS]
                     --ca-out FILE [--device-ca-out FILE]

A TLS MQTT server that behaves like AWS IoT Core's fleet provisioning MQTT API: devices connect
with a claim certificate signed by the --claim-ca (and unexpired), then use
$aws/certificates/create/json or $aws/certificates/create-from-csr/json and
$aws/provisioning-templates/NAME/provision/json, with /accepted and /rejected replies.
RegisterThing calls the pre-provisioning hook (deny on error or after 5 s) and creates the
thing PREFIX + SerialNumber. Certificates it creates may connect once registered.

  --claim-ca FILE           CA certificate (PEM) that signs claim certificates
  --template NAME[=PREFIX]  a provisioning template and its thing-name prefix (repeatable)
  --hook-url URL            the pre-provisioning hook's Lambda Invoke URL, e.g. cargo lambda
                            watch: http://127.0.0.1:9000/2015-03-31/functions/fleet-prehook/invocations
                            (without it every valid RegisterThing is provisioned)
  --serial-parameter NAME   the parameter the thing name is built from (default SerialNumber)
  --hook-timeout-ms MS      how long to wait for the hook (default 5000, as AWS IoT)
  --listen HOST:PORT        address to listen on (default 127.0.0.1:8884; port 0 = any free)
  --ca-out FILE             write the server's CA certificate (PEM) here; devices trust it
  --device-ca-out FILE      write the CA that signs the certificates it creates

When ready it prints one line: listening on HOST:PORT. Stop it with Ctrl-C.";

struct Args {
    config: IotMqttConfig,
    listen: String,
    ca_out: String,
    device_ca_out: Option<String>,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let (mut claim_ca, mut hook_url, mut ca_out, mut device_ca_out) = (None, None, None, None);
    let mut templates: Vec<(String, String)> = Vec::new();
    let mut listen = "127.0.0.1:8884".to_owned();
    let mut serial_parameter = "SerialNumber".to_owned();
    let mut hook_timeout = Duration::from_secs(5);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .clone();
        match flag.as_str() {
            "--claim-ca" => {
                claim_ca = Some(
                    std::fs::read_to_string(&value)
                        .map_err(|e| format!("--claim-ca {value}: {e}"))?,
                )
            }
            "--template" => {
                let (name, prefix) = value.split_once('=').unwrap_or((&value, ""));
                templates.push((name.to_owned(), prefix.to_owned()));
            }
            "--hook-url" => hook_url = Some(value),
            "--serial-parameter" => serial_parameter = value,
            "--hook-timeout-ms" => {
                hook_timeout = Duration::from_millis(
                    value
                        .parse()
                        .map_err(|_| "--hook-timeout-ms takes milliseconds")?,
                )
            }
            "--listen" => listen = value,
            "--ca-out" => ca_out = Some(value),
            "--device-ca-out" => device_ca_out = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    let claim_ca = claim_ca.ok_or("--claim-ca is required")?;
    if templates.is_empty() {
        return Err("give at least one --template".into());
    }
    let hook = hook_url.map(Hook::Lambda).unwrap_or(Hook::None);
    let templates = templates
        .iter()
        .map(|(name, prefix)| {
            let mut t = Template::new(name, prefix, hook.clone());
            t.serial_parameter = serial_parameter.clone();
            t
        })
        .collect();
    let mut config = IotMqttConfig::new(&claim_ca, templates);
    config.hook_timeout = hook_timeout;
    Ok(Args {
        config,
        listen,
        ca_out: ca_out.ok_or("--ca-out is required")?,
        device_ca_out,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match parse(&args) {
        Ok(parsed) => parsed,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("iot-simulator: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let Ok(addr) = args.listen.parse() else {
        eprintln!("iot-simulator: --listen takes HOST:PORT with an IP address");
        return ExitCode::from(2);
    };
    let sim = match IotMqttSimulator::start(args.config, addr).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("iot-simulator: cannot start on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let outputs = [
        (Some(args.ca_out), sim.ca_pem()),
        (args.device_ca_out, sim.device_ca_pem()),
    ];
    for (path, pem) in outputs {
        if let Some(path) = path {
            if let Err(e) = std::fs::write(&path, pem) {
                eprintln!("iot-simulator: cannot write {path}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("listening on {}", sim.addr());
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
