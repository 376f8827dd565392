//! `dps-simulator`: the strict Azure DPS stand-in as a program, for real devices and SDKs.

use std::process::ExitCode;

use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator, Fault};
use shared::keys::SymmetricKey;

const USAGE: &str = "\
usage: dps-simulator --id-scope SCOPE [--listen HOST:PORT] [--group-key BASE64]...
                     [--device-key REGID=BASE64]... [--hub NAME]... [--fault KIND]...
                     [--retry-after SECONDS] [--polls-before-assign N] --ca-out PATH

A TLS MQTT server that behaves like the Azure DPS device registration API (api-version
2019-03-31). It verifies each device's SAS token against its group keys (device key =
HMAC-SHA256(group key, registration id)) or its individual keys, answers register with 202
and polling with 200 assigned, assigning one of its hubs.

  --listen HOST:PORT        address to listen on (default 127.0.0.1:8883; port 0 = any free)
  --id-scope SCOPE          the DPS id scope devices must present
  --group-key BASE64        an enrollment-group key (repeatable)
  --device-key REGID=BASE64 an individual enrollment (repeatable)
  --hub NAME                an IoT hub host name to assign (repeatable; default one sim hub)
  --fault KIND              inject a fault (repeatable): throttle-register[:N], throttle-poll[:N],
                            throttle-percent:P, status:CODE, disabled, drop-after-connack,
                            slow:MS, never-assign
  --retry-after SECONDS     retry-after sent with 202 and 429 (default 1)
  --polls-before-assign N   polls answered 'assigning' before 'assigned' (default 0)
  --ca-out PATH             write the simulator's CA certificate (PEM) here; trust it on clients

When ready it prints one line: listening on HOST:PORT. Stop it with Ctrl-C.";

fn parse(args: &[String]) -> Result<(DpsSimConfig, String, String), String> {
    let mut config = DpsSimConfig::new("");
    config.retry_after = 1;
    config.hubs.clear();
    let (mut listen, mut ca_out) = ("127.0.0.1:8883".to_owned(), None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value"))?
            .clone();
        let key =
            |v: &str, what: &str| SymmetricKey::from_base64(v).map_err(|e| format!("{what}: {e}"));
        match flag.as_str() {
            "--listen" => listen = value,
            "--id-scope" => config.id_scope = value,
            "--group-key" => config.group_keys.push(key(&value, "--group-key")?),
            "--device-key" => {
                let (id, k) = value
                    .split_once('=')
                    .ok_or("--device-key takes REGID=BASE64")?;
                config
                    .device_keys
                    .insert(id.to_owned(), key(k, "--device-key")?);
            }
            "--hub" => config.hubs.push(value),
            "--fault" => config.faults.push(value.parse::<Fault>()?),
            "--retry-after" => {
                config.retry_after = value.parse().map_err(|_| "--retry-after takes seconds")?
            }
            "--polls-before-assign" => {
                config.polls_before_assign = value
                    .parse()
                    .map_err(|_| "--polls-before-assign takes a number")?
            }
            "--ca-out" => ca_out = Some(value),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if config.id_scope.is_empty() {
        return Err("--id-scope is required".into());
    }
    if config.group_keys.is_empty() && config.device_keys.is_empty() {
        return Err("give at least one --group-key or --device-key".into());
    }
    if config.hubs.is_empty() {
        config.hubs.push("sim-hub-1.azure-devices.net".into());
    }
    let ca_out = ca_out.ok_or("--ca-out is required")?;
    Ok((config, listen, ca_out))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (config, listen, ca_out) = match parse(&args) {
        Ok(parsed) => parsed,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("dps-simulator: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let Ok(addr) = listen.parse() else {
        eprintln!("dps-simulator: --listen takes HOST:PORT with an IP address");
        return ExitCode::from(2);
    };
    let sim = match DpsSimulator::start(config, addr).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("dps-simulator: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(&ca_out, sim.ca_pem()) {
        eprintln!("dps-simulator: cannot write {ca_out}: {e}");
        return ExitCode::FAILURE;
    }
    println!("listening on {}", sim.addr());
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
