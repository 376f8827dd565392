//! `iot-simulator`: the strict AWS IoT fleet provisioning MQTT stand-in as a program.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use local_emulators::iot_mqtt::{Hook, IotMqttConfig, IotMqttSimulator, Template};
use local_emulators::provisioning_template::TemplateBody;

/// A TLS MQTT server that behaves like AWS IoT Core's fleet provisioning MQTT API: devices
/// connect with a claim certificate signed by the --claim-ca (and unexpired) and a client id
/// starting 'claim.', then use $aws/certificates/create/json or
/// $aws/certificates/create-from-csr/json and $aws/provisioning-templates/NAME/provision/json,
/// with /accepted and /rejected replies. RegisterThing calls the pre-provisioning hook (deny on
/// error or after the hook timeout) and creates the thing PREFIX + SerialNumber. Certificates it
/// creates may connect once registered. When ready it prints one line: listening on HOST:PORT.
/// Stop it with Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "iot-simulator")]
struct Args {
    /// CA certificate (PEM) that signs claim certificates
    #[arg(long, value_name = "FILE")]
    claim_ca: PathBuf,
    /// A provisioning template and its thing-name prefix (repeatable)
    #[arg(
        long,
        value_name = "NAME[=PREFIX]",
        required_unless_present = "template_body"
    )]
    template: Vec<String>,
    /// The pre-provisioning hook's Lambda Invoke URL, e.g. cargo lambda watch's
    /// http://127.0.0.1:9000/2015-03-31/functions/fleet-prehook/invocations (without it every
    /// valid RegisterThing is provisioned)
    #[arg(long, value_name = "URL")]
    hook_url: Option<String>,
    /// The parameter the thing name is built from
    #[arg(long, value_name = "NAME", default_value = "SerialNumber")]
    serial_parameter: String,
    /// A template applied from its body, the JSON of the stack's TemplateBody: thing name,
    /// attributes, thing type, thing groups, DeviceConfiguration (repeatable)
    #[arg(long = "template-body", value_name = "NAME=FILE")]
    template_body: Vec<String>,
    /// RegisterThing calls allowed per second, as an account's fleet provisioning quota throttles
    /// them (default: unthrottled)
    #[arg(long, value_name = "N")]
    register_things_per_second: Option<u32>,
    /// How long to wait for the hook (AWS IoT: 5 s)
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    hook_timeout_ms: u64,
    /// Address to listen on (port 0: any free one)
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8884")]
    listen: SocketAddr,
    /// Write the server's CA certificate (PEM) here; devices trust it
    #[arg(long, value_name = "FILE")]
    ca_out: PathBuf,
    /// Write the CA that signs the certificates it creates
    #[arg(long, value_name = "FILE")]
    device_ca_out: Option<PathBuf>,
}

impl Args {
    fn config(&self) -> Result<IotMqttConfig, String> {
        let claim_ca = std::fs::read_to_string(&self.claim_ca)
            .map_err(|e| format!("--claim-ca {}: {e}", self.claim_ca.display()))?;
        let hook = self
            .hook_url
            .clone()
            .map(Hook::Lambda)
            .unwrap_or(Hook::None);
        let mut templates: Vec<Template> = self
            .template
            .iter()
            .map(|t| {
                let (name, prefix) = t.split_once('=').unwrap_or((t, ""));
                let body = TemplateBody::named(prefix, &self.serial_parameter);
                Template::with_body(name, body, hook.clone())
            })
            .collect();
        for t in &self.template_body {
            let (name, file) = t
                .split_once('=')
                .ok_or_else(|| format!("--template-body {t}: takes NAME=FILE"))?;
            let json = std::fs::read_to_string(file)
                .map_err(|e| format!("--template-body {file}: {e}"))?;
            let body =
                TemplateBody::parse(&json).map_err(|e| format!("--template-body {file}: {e}"))?;
            templates.push(Template::with_body(name, body, hook.clone()));
        }
        let mut config = IotMqttConfig::new(&claim_ca, templates);
        config.hook_timeout = Duration::from_millis(self.hook_timeout_ms);
        config.register_thing_limit = self
            .register_things_per_second
            .map(|n| (n, Duration::from_secs(1)));
        Ok(config)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match args.config() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("iot-simulator: {message}");
            return ExitCode::from(2);
        }
    };
    let sim = match IotMqttSimulator::start(config, args.listen).await {
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
                eprintln!("iot-simulator: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    println!("listening on {}", sim.addr());
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
