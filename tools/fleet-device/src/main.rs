//! `fleet-device`: provision this device through AWS IoT fleet provisioning by claim.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fleet_device::{provision, Format, Options, CLAIM_CLIENT_PREFIX};

/// Provisions this device with AWS IoT fleet provisioning by claim: connects with the claim
/// certificate, gets a permanent certificate (CreateKeysAndCertificate, or with --csr
/// CreateCertificateFromCsr for a key made here that never leaves the device), registers the
/// thing with the provisioning template (RegisterThing, which runs the template's
/// pre-provisioning hook), and writes certificate.pem.crt, private.pem.key (mode 0600) and
/// thing.json to DIR (mode 0700). Prints the thing name on stdout; progress goes to stderr.
///
/// Exit status: 0 provisioned, 2 bad arguments or local files, 3 refused by the service
/// (rejected, expired or unknown certificate), 4 timeout or connection failure (retry later).
#[derive(Debug, Parser)]
#[command(name = "fleet-device", version)]
struct Args {
    /// AWS IoT data endpoint (xxxx-ats.iot.REGION.amazonaws.com; port 8883, or 443 with ALPN)
    /// or the local simulator (localhost:PORT)
    #[arg(long, value_name = "HOST[:PORT]", value_parser = endpoint)]
    endpoint: (String, u16),
    /// CA to trust for the server (default: the system roots, which include Amazon Root CA 1)
    #[arg(long = "ca", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The claim certificate (PEM) from claim-issuer
    #[arg(long, value_name = "FILE")]
    claim_cert: PathBuf,
    /// Its private key (PEM)
    #[arg(long, value_name = "FILE")]
    claim_key: PathBuf,
    /// The fleet provisioning template
    #[arg(long, value_name = "NAME")]
    template: String,
    /// A template parameter (repeatable), e.g. --param SerialNumber=SN-0001
    #[arg(long = "param", value_name = "NAME=VALUE", value_parser = parameter)]
    params: Vec<(String, String)>,
    /// Make the key here and send a CSR
    #[arg(long)]
    csr: bool,
    /// MQTT client id for the claim connection (default: claim.SERIAL for the SerialNumber
    /// parameter, or claim.fleet-device; the claim policy admits ids starting 'claim.', which no
    /// thing name can take)
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
    /// Where to keep the new identity (refuses to replace one without --force)
    #[arg(long = "out", value_name = "DIR")]
    out_dir: PathBuf,
    /// Replace an identity already in DIR
    #[arg(long)]
    force: bool,
    /// Bound on the whole run, 1 to 3600 seconds
    #[arg(long, value_name = "SECONDS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Afterwards, connect once with the new certificate as the thing
    #[arg(long)]
    verify: bool,
    /// Payload encoding: the .../json topics, or the .../cbor ones (as constrained firmware)
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

fn endpoint(value: &str) -> Result<(String, u16), String> {
    match value.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.to_owned(),
            port.parse()
                .map_err(|_| format!("'{port}' is not a port"))?,
        )),
        None => Ok((value.to_owned(), 8883)),
    }
}

fn parameter(value: &str) -> Result<(String, String), String> {
    value
        .split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .ok_or_else(|| "takes NAME=VALUE".to_owned())
}

impl Args {
    fn options(self) -> Options {
        let parameters: BTreeMap<String, String> = self.params.into_iter().collect();
        let client_id = self.client_id.unwrap_or_else(|| {
            let name = parameters
                .get("SerialNumber")
                .map_or("fleet-device", String::as_str);
            format!("{CLAIM_CLIENT_PREFIX}{name}")
        });
        Options {
            host: self.endpoint.0,
            port: self.endpoint.1,
            ca_file: self.ca_file,
            claim_certificate: self.claim_cert,
            claim_key: self.claim_key,
            template: self.template,
            parameters,
            csr: self.csr,
            client_id,
            out_dir: self.out_dir,
            force: self.force,
            timeout: Duration::from_secs(self.timeout),
            verify: self.verify,
            format: self.format,
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Usage errors exit 2, --help and --version 0: what the documented exit codes promise.
    let options = Args::parse().options();
    match provision(&options, |line| eprintln!("fleet-device: {line}")).await {
        Ok(provisioned) => {
            eprintln!(
                "fleet-device: identity written to {} and {}{}",
                provisioned.certificate_file.display(),
                provisioned.private_key_file.display(),
                if provisioned.verified {
                    "; the new certificate connects"
                } else {
                    ""
                }
            );
            println!("{}", provisioned.thing_name);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fleet-device: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Options, clap::Error> {
        let argv = std::iter::once("fleet-device").chain(s.split_whitespace());
        Args::try_parse_from(argv).map(Args::options)
    }

    #[test]
    fn parses_a_full_command_line() {
        let o = parse(
            "--endpoint localhost:18883 --claim-cert c.pem --claim-key k.pem --template t \
             --param SerialNumber=SN-1 --param Location=a=b --out d --csr --timeout 5",
        )
        .unwrap();
        assert_eq!((o.host.as_str(), o.port), ("localhost", 18883));
        assert_eq!(o.client_id, "claim.SN-1");
        assert_eq!(o.parameters["Location"], "a=b");
        assert!(o.csr && !o.verify && !o.force);
        assert_eq!(o.timeout, Duration::from_secs(5));
    }

    #[test]
    fn names_what_is_wrong_and_exits_2() {
        let base = "--claim-cert c --claim-key k --template t --out d";
        let cases = [
            (base.to_owned(), "--endpoint"),
            (format!("--endpoint h:x {base}"), "not a port"),
            (format!("--endpoint h {base} --param =x"), "NAME=VALUE"),
            (format!("--endpoint h {base} --timeout 0"), "--timeout"),
            ("--bogus 1".to_owned(), "--bogus"),
        ];
        for (line, named) in cases {
            let err = parse(&line).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{line}");
            assert!(err.to_string().contains(named), "{line}: {err}");
        }
        assert_eq!(parse(&format!("--endpoint h {base}")).unwrap().port, 8883);
    }
}
