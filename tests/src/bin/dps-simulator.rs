//! `dps-simulator`: the strict Azure DPS stand-in as a program, for real devices and SDKs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use local_emulators::dps_sim::{DpsLimits, DpsSimConfig, DpsSimulator, Fault};
use shared::keys::SymmetricKey;

/// A TLS MQTT server that behaves like the Azure DPS device registration API (api-version
/// 2019-03-31). It verifies each device's SAS token against its group keys (device key =
/// HMAC-SHA256(group key, registration id)) or its individual keys, or its TLS client
/// certificate against its X.509 enrollment groups (registration id = the certificate's CN), answers register with 202
/// and polling with 200 assigned, assigning one of its hubs. When ready it prints one line:
/// listening on HOST:PORT. Stop it with Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "dps-simulator")]
struct Args {
    /// Address to listen on (port 0: any free one)
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8883")]
    listen: SocketAddr,
    /// The DPS id scope devices must present
    #[arg(long, value_name = "SCOPE")]
    id_scope: String,
    /// An enrollment-group key (repeatable)
    #[arg(long, value_name = "BASE64", value_parser = key)]
    group_key: Vec<SymmetricKey>,
    /// An individual enrollment (repeatable)
    #[arg(long, value_name = "REGID=BASE64", value_parser = device_key)]
    device_key: Vec<(String, SymmetricKey)>,
    /// An IoT hub host name to assign (repeatable; default one simulated hub)
    #[arg(long, value_name = "NAME")]
    hub: Vec<String>,
    /// Inject a fault (repeatable): throttle-register[:N], throttle-poll[:N],
    /// throttle-percent:P, status:CODE, disabled, drop-after-connack, slow:MS, never-assign,
    /// connack-unavailable[:N], reset-handshake[:N], fail-server-error[:N], expire-operation[:N]
    #[arg(long, value_name = "KIND")]
    fault: Vec<Fault>,
    /// retry-after sent with 202 and 429, in seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 1)]
    retry_after: u64,
    /// Polls answered 'assigning' before 'assigned'
    #[arg(long, value_name = "N", default_value_t = 0)]
    polls_before_assign: u32,
    /// Milliseconds from a register request until its operation is assigned (DPS: about
    /// 1,000-3,000)
    #[arg(long, value_name = "MS", default_value_t = 0)]
    assignment_delay_ms: u64,
    /// Registrations accepted per minute over all devices, as DPS's quota (0: unlimited)
    #[arg(long, value_name = "N", default_value_t = 1000)]
    registrations_per_minute: u32,
    /// Polls accepted per device per 10 seconds, as DPS's quota (0: unlimited)
    #[arg(long, value_name = "N", default_value_t = 5)]
    polls_per_device: u32,
    /// An X.509 enrollment group: the PEM file of the enrolled root or intermediate CA
    /// (repeatable). Devices present their certificate (chain up to it) in the TLS handshake
    /// and register as its CN, without a SAS token.
    #[arg(long, value_name = "FILE")]
    x509_ca: Vec<PathBuf>,
    /// Write the simulator's CA certificate (PEM) here; trust it on clients
    #[arg(long, value_name = "PATH")]
    ca_out: PathBuf,
}

fn key(value: &str) -> Result<SymmetricKey, String> {
    SymmetricKey::from_base64(value).map_err(|e| e.to_string())
}

fn device_key(value: &str) -> Result<(String, SymmetricKey), String> {
    let (id, k) = value.split_once('=').ok_or("takes REGID=BASE64")?;
    Ok((id.to_owned(), key(k)?))
}

impl Args {
    fn config(self) -> Result<(DpsSimConfig, SocketAddr, PathBuf), String> {
        if self.group_key.is_empty() && self.device_key.is_empty() && self.x509_ca.is_empty() {
            return Err("give at least one --group-key, --device-key or --x509-ca".into());
        }
        let mut config = DpsSimConfig::new(&self.id_scope);
        for path in &self.x509_ca {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --x509-ca {}: {e}", path.display()))?;
            config.x509_cas.push(pem);
        }
        config.group_keys = self.group_key;
        config.device_keys = self.device_key.into_iter().collect();
        if !self.hub.is_empty() {
            config.hubs = self.hub;
        }
        config.faults = self.fault;
        config.retry_after = self.retry_after;
        config.polls_before_assign = self.polls_before_assign;
        config.assignment_delay = std::time::Duration::from_millis(self.assignment_delay_ms);
        let enforced = |n: u32| (n > 0).then_some(n);
        config.limits = DpsLimits {
            registrations_per_minute: enforced(self.registrations_per_minute),
            polls_per_device_per_10s: enforced(self.polls_per_device),
        };
        Ok((config, self.listen, self.ca_out))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let (config, listen, ca_out) = match Args::parse().config() {
        Ok(parsed) => parsed,
        Err(message) => {
            eprintln!("dps-simulator: {message}");
            return ExitCode::from(2);
        }
    };
    let sim = match DpsSimulator::start(config, listen).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("dps-simulator: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = std::fs::write(&ca_out, sim.ca_pem()) {
        eprintln!("dps-simulator: cannot write {}: {e}", ca_out.display());
        return ExitCode::FAILURE;
    }
    println!("listening on {}", sim.addr());
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
