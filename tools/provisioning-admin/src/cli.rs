//! The command line. Every command acts on the device table the stack created (its
//! `DevicesTable` output), through the standard AWS credential chain; `AWS_ENDPOINT_URL`
//! points it at a local endpoint.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use shared::registry::DEFAULT_SERIAL_PATTERN;

use crate::output::Format;

#[derive(Debug, Parser)]
#[command(
    name = "provisioning-admin",
    version,
    about = "List, block and import the SIMs and serials that may provision; report claims and registrations",
    after_help = "Exit codes: 0 done; 1 the table or AWS failed (nothing more was written than \
                  the message says); 2 usage; 3 not found; 4 input file rejected (nothing \
                  written); 5 import stopped part way, or entries changed meanwhile were left \
                  as they are (the message says how far and which; run it again to finish)."
)]
pub struct Cli {
    /// The device table (the stack's DevicesTable output).
    #[arg(long, env = "DEVICES_TABLE", global = true, required = false)]
    pub table: Option<String>,
    /// AWS region (else the standard chain: AWS_REGION, the profile).
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// No progress bar on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// SORACOM SIMs, for azure-dps-register (by IMSI, or by SIM card with --card).
    #[command(subcommand)]
    Sims(Sims),
    /// Fleet device serials, for fleet-prehook.
    #[command(subcommand)]
    Serials(Serials),
    /// Claim certificates claim-issuer issued (kept until the audit retention ends).
    #[command(subcommand)]
    Claims(Claims),
    /// Azure DPS registrations the SIMs made.
    #[command(subcommand)]
    Registrations(Registrations),
    /// X.509 device certificates azure-dps-register issued that have not yet expired.
    #[command(subcommand)]
    Certificates(Certificates),
    /// The X.509 device CA whose key is in AWS KMS.
    #[command(subcommand)]
    Ca(Ca),
}

#[derive(Debug, Subcommand)]
pub enum Ca {
    /// Print a certificate request (PEM) for the device CA, signed by the KMS key, for your
    /// root CA to sign (as a CA, path length 0).
    Request {
        /// The KMS key (ECC_NIST_P256, SIGN_VERIFY): id, ARN or alias.
        #[arg(long, value_name = "KEY")]
        kms_key_id: String,
        /// The device CA's name.
        #[arg(
            long,
            value_name = "NAME",
            default_value = "SORACOM provisioning device CA"
        )]
        common_name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum Sims {
    /// Allow SIMs to register (keeps what was recorded about them).
    Allow {
        #[arg(required = true, value_name = "IMSI")]
        ids: Vec<String>,
        #[command(flatten)]
        card: Card,
        /// The entry ends at this time (YYYY-MM-DD, RFC 3339 or Unix seconds); none by default.
        #[arg(long, value_name = "WHEN")]
        valid_until: Option<String>,
    },
    /// Refuse SIMs from now on (their IoT Hub identities are not touched).
    Block {
        #[arg(required = true, value_name = "IMSI")]
        ids: Vec<String>,
        #[command(flatten)]
        card: Card,
    },
    /// One SIM's entry and last registration.
    Show {
        #[arg(value_name = "IMSI")]
        id: String,
        #[command(flatten)]
        card: Card,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Every SIM and SIM card entry.
    List(ListArgs),
    /// Import a CSV (imsi[,simId][,valid_until]) or the JSON `soracom subscribers list` prints.
    Import {
        file: PathBuf,
        #[command(flatten)]
        import: ImportArgs,
        /// Also list each row's SIM card (simId), so every IMSI of a multi-IMSI SIM registers.
        #[arg(long)]
        cards: bool,
    },
}

#[derive(Debug, Args)]
pub struct Card {
    /// The identifiers are SORACOM SIM IDs (the card, all its IMSIs), not IMSIs.
    #[arg(long)]
    pub card: bool,
}

#[derive(Debug, Subcommand)]
pub enum Serials {
    /// Allow serials to be provisioned (keeps their recorded certificates).
    Allow {
        #[arg(required = true, value_name = "SERIAL")]
        serials: Vec<String>,
        #[arg(long, value_name = "WHEN")]
        valid_until: Option<String>,
        /// One new certificate may replace the recorded one (spent by that provisioning).
        #[arg(long)]
        reprovision: bool,
        #[command(flatten)]
        pattern: Pattern,
    },
    /// Refuse serials from now on (their things and certificates are not touched).
    Block {
        #[arg(required = true, value_name = "SERIAL")]
        serials: Vec<String>,
        #[command(flatten)]
        pattern: Pattern,
    },
    /// One serial's entry and certificate.
    Show {
        serial: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[command(flatten)]
        pattern: Pattern,
    },
    /// Every serial entry.
    List(ListArgs),
    /// Import a CSV of serial[,valid_until].
    Import {
        file: PathBuf,
        #[command(flatten)]
        import: ImportArgs,
        #[command(flatten)]
        pattern: Pattern,
    },
}

#[derive(Debug, Args)]
pub struct Pattern {
    /// Serials as fleet-prehook accepts them (its SERIAL_PATTERN).
    #[arg(long, env = "SERIAL_PATTERN", default_value = DEFAULT_SERIAL_PATTERN)]
    pub serial_pattern: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long, value_enum)]
    pub status: Option<Status>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Check the file and say what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The status of rows that do not say (a `status` column, or SORACOM's status).
    #[arg(long, value_enum, default_value = "allowed")]
    pub status: ListedStatus,
    /// Let the file allow entries the table blocks (by an operator or SORACOM's event);
    /// without it they stay blocked and are counted (an export older than the block would
    /// otherwise lift it).
    #[arg(long)]
    pub unblock: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Status {
    Allowed,
    Blocked,
    /// Items only the functions wrote (a SIM registered while the allowlist was off).
    Unlisted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ListedStatus {
    Allowed,
    Blocked,
}

#[derive(Debug, Subcommand)]
pub enum Claims {
    /// Claims, oldest first.
    List {
        /// Only those issued to this installer (their Cognito `sub`).
        #[arg(long, value_name = "SUB")]
        installer: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum Certificates {
    /// Every certificate still valid, by IMSI and issue time: IoT Hub accepts each one the CA
    /// signed for a device until it expires, so a device may hold more than its last.
    List {
        /// Only this SIM's.
        #[arg(long)]
        imsi: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum Registrations {
    /// Which SIM registered when, as which device, to which hub; oldest first.
    Report {
        /// Only registrations at or after this time.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        #[arg(long, value_enum, default_value = "csv")]
        format: Format,
    },
}
