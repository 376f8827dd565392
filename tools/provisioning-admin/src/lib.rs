//! `provisioning-admin`: what a fleet operator does to the device table every week, without
//! writing DynamoDB JSON by hand. The binary parses the command line and builds the client;
//! [`run`] does the work, so the end-to-end tests drive it against the local AWS endpoint.

pub mod cli;
mod dates;
mod ids;
pub mod import;
mod output;
mod progress;
pub mod rows;
mod views;

use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shared::aws::CallLimits;
use shared::ca::{CaError, KmsKey};

use shared::registry::{
    DeviceId, DeviceStatus, DynamoRegistry, Kind, Listing, RegistryError, SerialRegistry,
};

use cli::{Certificates, Claims, Command, ListArgs, Registrations, Serials, Sims, Status};
use ids::SerialRule;
pub use progress::Progress;
use rows::{RowError, Subject};

/// Why a command failed; each kind has its exit code, which scripts may rely on.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Usage(String),
    #[error("{0} is not in the device table")]
    NotFound(String),
    #[error("{file}: {count} row(s) cannot be imported; nothing was written", count = .errors.len())]
    Input { file: String, errors: Vec<RowError> },
    #[error(
        "{cause}: {written} of {total} entries were written before it, in file order (new \
         entries first, then changed ones), the rest were not; the import can be run again \
         to finish (what is already so is left as it is)"
    )]
    Partial {
        written: usize,
        total: usize,
        cause: RegistryError,
    },
    /// Entries written by someone else after the import's plan read them: left as they are.
    #[error(
        "{count} entries changed in the table after the plan read it (SORACOM's event, a \
         function or another operator wrote them) and were left as they are: {shown}; \
         {written} of {total} entries were written; run the import again to plan them anew",
        count = .keys.len(),
        shown = .keys.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
    )]
    ChangedMeanwhile {
        written: usize,
        total: usize,
        keys: Vec<String>,
    },
    /// `allow`/`block` of several devices: those printed before the error were done.
    #[error("{cause}: {done} of {total} were done (printed above), the rest were not")]
    Stopped {
        done: usize,
        total: usize,
        cause: RegistryError,
    },
    #[error("{0}")]
    Table(#[from] RegistryError),
    #[error("{0}")]
    Kms(CaError),
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

impl AdminError {
    /// The process exit code (see the CLI's help).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Table(_) | Self::Stopped { .. } | Self::Kms(_) | Self::Output(_) => 1,
            Self::Usage(_) => 2,
            Self::NotFound(_) => 3,
            Self::Input { .. } => 4,
            Self::Partial { .. } | Self::ChangedMeanwhile { .. } => 5,
        }
    }

    /// The message, with each rejected row of an import on its own line (the first 50).
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        if let Self::Input { file, errors } = self {
            for e in errors.iter().take(50) {
                text.push_str(&format!("\n  {file}: {}: {}", e.at, e.message));
            }
            if errors.len() > 50 {
                text.push_str(&format!("\n  … and {} more", errors.len() - 50));
            }
        }
        text
    }
}

/// Bounds on each AWS call: an operator's commands scan pages of a whole table and write in
/// batches, so each may take longer than a function's, but none waits forever.
pub fn call_limits() -> CallLimits {
    CallLimits {
        connect: Duration::from_secs(3),
        attempt: Duration::from_secs(15),
        operation: Duration::from_secs(60),
        max_attempts: 5,
    }
}

/// Runs `command` against `registry`, writing results to `out` and progress to `progress`.
pub async fn run(
    command: &Command,
    registry: &DynamoRegistry,
    out: &mut dyn Write,
    progress: &mut Progress<'_>,
) -> Result<(), AdminError> {
    match command {
        Command::Sims(sims) => run_sims(sims, registry, out, progress).await,
        Command::Serials(serials) => run_serials(serials, registry, out, progress).await,
        Command::Claims(Claims::List { installer, format }) => {
            let claims = registry.claims().await?;
            let rows = views::claims(
                claims
                    .iter()
                    .filter(|c| installer.as_deref().is_none_or(|sub| c.issued_to == sub)),
            );
            rows.write(*format, out)?;
            Ok(())
        }
        Command::Certificates(Certificates::List { imsi, format }) => {
            let issued = registry.certificates(now()).await?;
            let rows = views::certificates(
                issued
                    .iter()
                    .filter(|c| imsi.as_deref().is_none_or(|imsi| c.imsi == imsi)),
            );
            rows.write(*format, out)?;
            Ok(())
        }
        Command::Ca(_) => Err(AdminError::Usage(
            "ca commands use KMS, not the device table: see run_ca".into(),
        )),
        Command::Registrations(Registrations::Report { since, format }) => {
            let since = since.as_deref().map(time_arg).transpose()?.unwrap_or(0);
            let sims = registry.devices(Kind::Sims).await?;
            views::registrations(&sims, since).write(*format, out)?;
            Ok(())
        }
    }
}

async fn run_sims(
    command: &Sims,
    registry: &DynamoRegistry,
    out: &mut dyn Write,
    progress: &mut Progress<'_>,
) -> Result<(), AdminError> {
    let parse = |text: &str, card: bool| {
        if card {
            ids::sim_id(text)
        } else {
            ids::imsi(text)
        }
        .map_err(AdminError::Usage)
    };
    match command {
        Sims::Allow {
            ids,
            card,
            valid_until,
        } => {
            let listing = Listing {
                status: DeviceStatus::Allowed,
                valid_until: valid_until.as_deref().map(future_arg).transpose()?,
                allow_reprovision: false,
            };
            let ids = ids
                .iter()
                .map(|t| parse(t, card.card))
                .collect::<Result<Vec<_>, _>>()?;
            set_listing(registry, &ids, &listing, out).await
        }
        Sims::Block { ids, card } => {
            let ids = ids
                .iter()
                .map(|t| parse(t, card.card))
                .collect::<Result<Vec<_>, _>>()?;
            set_listing(registry, &ids, &blocked(), out).await
        }
        Sims::Show { id, card, format } => {
            let id = parse(id, card.card)?;
            let record = registry
                .get(&id)
                .await?
                .ok_or_else(|| AdminError::NotFound(ids::display(&id)))?;
            views::sims([&record]).write_one(*format, out)?;
            Ok(())
        }
        Sims::List(ListArgs { status, format }) => {
            let records = registry.devices(Kind::Sims).await?;
            views::sims(records.iter().filter(|r| wanted(*status, r.status)))
                .write(*format, out)?;
            Ok(())
        }
        Sims::Import {
            file,
            import,
            cards,
        } => {
            let subject = Subject::Sims { cards: *cards };
            import_file(registry, file, &subject, import, out, progress).await
        }
    }
}

async fn run_serials(
    command: &Serials,
    registry: &DynamoRegistry,
    out: &mut dyn Write,
    progress: &mut Progress<'_>,
) -> Result<(), AdminError> {
    let rule = |pattern: &cli::Pattern| {
        SerialRule::new(&pattern.serial_pattern).map_err(AdminError::Usage)
    };
    let parse = |rule: &SerialRule, serials: &[String]| {
        serials
            .iter()
            .map(|s| rule.serial(s).map_err(AdminError::Usage))
            .collect::<Result<Vec<_>, _>>()
    };
    match command {
        Serials::Allow {
            serials,
            valid_until,
            reprovision,
            pattern,
        } => {
            let listing = Listing {
                status: DeviceStatus::Allowed,
                valid_until: valid_until.as_deref().map(future_arg).transpose()?,
                allow_reprovision: *reprovision,
            };
            let ids = parse(&rule(pattern)?, serials)?;
            set_listing(registry, &ids, &listing, out).await
        }
        Serials::Block { serials, pattern } => {
            let ids = parse(&rule(pattern)?, serials)?;
            set_listing(registry, &ids, &blocked(), out).await
        }
        Serials::Show {
            serial,
            format,
            pattern,
        } => {
            let id = rule(pattern)?.serial(serial).map_err(AdminError::Usage)?;
            let DeviceId::Serial(serial) = &id else {
                return Err(AdminError::Usage(format!("{serial:?} is not a serial")));
            };
            let record = registry
                .serial(serial)
                .await?
                .ok_or_else(|| AdminError::NotFound(serial.clone()))?;
            views::serials([&record]).write_one(*format, out)?;
            Ok(())
        }
        Serials::List(ListArgs { status, format }) => {
            let records = registry.devices(Kind::Serials).await?;
            views::serials(records.iter().filter(|r| wanted(*status, r.status)))
                .write(*format, out)?;
            Ok(())
        }
        Serials::Import {
            file,
            import,
            pattern,
        } => {
            let rule = rule(pattern)?;
            import_file(
                registry,
                file,
                &Subject::Serials(&rule),
                import,
                out,
                progress,
            )
            .await
        }
    }
}

/// Runs a `ca` command against KMS.
pub async fn run_ca(
    command: &cli::Ca,
    kms: aws_sdk_kms::Client,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    match command {
        cli::Ca::Request {
            kms_key_id,
            common_name,
        } => {
            let key = KmsKey::new(kms, kms_key_id).await.map_err(ca_error)?;
            let request = key
                .certificate_request(common_name)
                .await
                .map_err(ca_error)?;
            out.write_all(request.as_bytes())?;
            Ok(())
        }
    }
}

fn ca_error(e: CaError) -> AdminError {
    match e {
        CaError::Misconfigured(_) => AdminError::Usage(e.to_string()),
        other => AdminError::Kms(other),
    }
}

fn blocked() -> Listing {
    Listing {
        status: DeviceStatus::Blocked,
        valid_until: None,
        allow_reprovision: false,
    }
}

fn wanted(filter: Option<Status>, status: DeviceStatus) -> bool {
    match filter {
        None => true,
        Some(Status::Allowed) => status == DeviceStatus::Allowed,
        Some(Status::Blocked) => status == DeviceStatus::Blocked,
        Some(Status::Unlisted) => status == DeviceStatus::Unlisted,
    }
}

/// Lists each of `ids` in turn; on a failure, says which were done.
async fn set_listing(
    registry: &DynamoRegistry,
    ids: &[DeviceId],
    listing: &Listing,
    out: &mut dyn Write,
) -> Result<(), AdminError> {
    for (done, id) in ids.iter().enumerate() {
        if let Err(cause) = registry.list_device(id, listing).await {
            return Err(AdminError::Stopped {
                done,
                total: ids.len(),
                cause,
            });
        }
        writeln!(out, "{}: {}", ids::display(id), views::describe(listing))?;
    }
    Ok(())
}

async fn import_file(
    registry: &DynamoRegistry,
    file: &Path,
    subject: &Subject<'_>,
    args: &cli::ImportArgs,
    out: &mut dyn Write,
    progress: &mut Progress<'_>,
) -> Result<(), AdminError> {
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file)
        .map_err(|e| AdminError::Usage(format!("cannot read {name}: {e}")))?;
    let defaults = rows::Defaults {
        status: match args.status {
            cli::ListedStatus::Allowed => DeviceStatus::Allowed,
            cli::ListedStatus::Blocked => DeviceStatus::Blocked,
        },
        now: now(),
    };
    let entries = rows::parse(&text, subject, defaults).map_err(|errors| AdminError::Input {
        file: name.clone(),
        errors,
    })?;
    let plan = import::plan(registry, entries, args.unblock).await?;
    if args.dry_run {
        writeln!(
            out,
            "{name}: {}; dry run, nothing written",
            plan.summary(true)
        )?;
        return Ok(());
    }
    import::apply(registry, &plan, progress).await?;
    writeln!(out, "{name}: {}", plan.summary(false))?;
    Ok(())
}

fn time_arg(text: &str) -> Result<u64, AdminError> {
    dates::parse(text).map_err(AdminError::Usage)
}

/// A `--valid-until`: in the future, or the entry would refuse at once.
fn future_arg(text: &str) -> Result<u64, AdminError> {
    let until = time_arg(text)?;
    if until <= now() {
        return Err(AdminError::Usage(format!(
            "--valid-until {} is not in the future",
            dates::format(until)
        )));
    }
    Ok(until)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
