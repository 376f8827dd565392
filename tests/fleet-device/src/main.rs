//! `fleet-device`: provision this device through AWS IoT fleet provisioning by claim.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use fleet_device::{provision, Options, CLAIM_CLIENT_PREFIX};

const USAGE: &str = "\
usage: fleet-device --endpoint HOST[:PORT] --claim-cert FILE --claim-key FILE --template NAME
                    --param NAME=VALUE... --out DIR [--ca FILE] [--csr] [--client-id ID]
                    [--timeout SECONDS] [--verify] [--force]

Provisions this device with AWS IoT fleet provisioning by claim: connects with the claim
certificate, gets a permanent certificate (CreateKeysAndCertificate, or with --csr
CreateCertificateFromCsr for a key made here that never leaves the device), registers the thing
with the provisioning template (RegisterThing, which runs the template's pre-provisioning hook),
and writes certificate.pem.crt, private.pem.key (mode 0600) and thing.json to DIR (mode 0700).
Prints the thing name on stdout; progress goes to stderr.

  --endpoint HOST[:PORT]  AWS IoT data endpoint (xxxx-ats.iot.REGION.amazonaws.com; port 8883,
                          or 443 with ALPN) or the local simulator (localhost:PORT)
  --ca FILE               CA to trust for the server (default: the system roots, which
                          include Amazon Root CA 1)
  --claim-cert FILE       the claim certificate (PEM) from claim-issuer
  --claim-key FILE        its private key (PEM)
  --template NAME         the fleet provisioning template
  --param NAME=VALUE      a template parameter (repeatable), e.g. --param SerialNumber=SN-0001
  --csr                   make the key here and send a CSR
  --client-id ID          MQTT client id for the claim connection (default: claim.SERIAL for
                          the SerialNumber parameter, or claim.fleet-device; the claim policy
                          admits ids starting 'claim.', which no thing name can take)
  --out DIR               where to keep the new identity (refuses to replace one without --force)
  --timeout SECONDS       bound on the whole run (default 30)
  --verify                afterwards, connect once with the new certificate as the thing

Exit status: 0 provisioned, 2 bad arguments or local files, 3 refused by the service
(rejected, expired or unknown certificate), 4 timeout or connection failure (retry later).";

fn parse(args: &[String]) -> Result<Options, String> {
    let (mut endpoint, mut ca_file, mut cert, mut key, mut template, mut out) =
        (None, None, None, None, None, None);
    let mut parameters = BTreeMap::new();
    let (mut csr, mut verify, mut force, mut client_id) = (false, false, false, None);
    let mut timeout = Duration::from_secs(30);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--help" | "-h" => return Err(String::new()),
            "--csr" => csr = true,
            "--verify" => verify = true,
            "--force" => force = true,
            _ => {
                let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
                match flag.as_str() {
                    "--endpoint" => endpoint = Some(value.clone()),
                    "--ca" => ca_file = Some(PathBuf::from(value)),
                    "--claim-cert" => cert = Some(PathBuf::from(value)),
                    "--claim-key" => key = Some(PathBuf::from(value)),
                    "--template" => template = Some(value.clone()),
                    "--out" => out = Some(PathBuf::from(value)),
                    "--client-id" => client_id = Some(value.clone()),
                    "--param" => {
                        let (name, v) = value
                            .split_once('=')
                            .filter(|(n, _)| !n.is_empty())
                            .ok_or("--param takes NAME=VALUE")?;
                        parameters.insert(name.to_owned(), v.to_owned());
                    }
                    "--timeout" => {
                        let seconds: u64 = value
                            .parse()
                            .ok()
                            .filter(|s| (1..=3600).contains(s))
                            .ok_or("--timeout takes 1 to 3600 seconds")?;
                        timeout = Duration::from_secs(seconds);
                    }
                    other => return Err(format!("unknown flag {other}")),
                }
            }
        }
    }
    let endpoint = endpoint.ok_or("--endpoint is required")?;
    let (host, port) = match endpoint.rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            p.parse()
                .map_err(|_| format!("--endpoint: '{p}' is not a port"))?,
        ),
        None => (endpoint, 8883),
    };
    let client_id = client_id.unwrap_or_else(|| {
        let name = parameters
            .get("SerialNumber")
            .map_or("fleet-device", String::as_str);
        format!("{CLAIM_CLIENT_PREFIX}{name}")
    });
    Ok(Options {
        host,
        port,
        ca_file,
        claim_certificate: cert.ok_or("--claim-cert is required")?,
        claim_key: key.ok_or("--claim-key is required")?,
        template: template.ok_or("--template is required")?,
        parameters,
        csr,
        client_id,
        out_dir: out.ok_or("--out is required")?,
        force,
        timeout,
        verify,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&args) {
        Ok(options) => options,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("fleet-device: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
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

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn parses_a_full_command_line() {
        let o = parse(&args(
            "--endpoint localhost:18883 --claim-cert c.pem --claim-key k.pem --template t \
             --param SerialNumber=SN-1 --param Location=a=b --out d --csr --timeout 5",
        ))
        .unwrap();
        assert_eq!((o.host.as_str(), o.port), ("localhost", 18883));
        assert_eq!(o.client_id, "claim.SN-1");
        assert_eq!(o.parameters["Location"], "a=b");
        assert!(o.csr && !o.verify && !o.force);
        assert_eq!(o.timeout, Duration::from_secs(5));
    }

    #[test]
    fn names_what_is_wrong() {
        let base = "--claim-cert c --claim-key k --template t --out d";
        assert!(parse(&args(base)).unwrap_err().contains("--endpoint"));
        let bad_port = format!("--endpoint h:x {base}");
        assert!(parse(&args(&bad_port)).unwrap_err().contains("not a port"));
        let bad_param = format!("--endpoint h {base} --param =x");
        assert!(parse(&args(&bad_param)).unwrap_err().contains("NAME=VALUE"));
        assert!(parse(&args("--bogus 1"))
            .unwrap_err()
            .contains("unknown flag"));
        assert_eq!(
            parse(&args(&format!("--endpoint h {base}"))).unwrap().port,
            8883
        );
    }
}
