//! `provisioning-admin`: see the crate's README and `--help`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use provisioning_admin::cli::{Cli, Command};
use provisioning_admin::{call_limits, run, run_ca, AdminError, Progress};
use shared::aws::loader;
use shared::registry::DynamoRegistry;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(&AdminError::Output(e)),
    };
    match runtime.block_on(execute(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

async fn execute(cli: &Cli) -> Result<(), AdminError> {
    let mut config = loader(&call_limits());
    if let Some(region) = &cli.region {
        config = config.region(aws_config::Region::new(region.clone()));
    }
    let config = config.load().await;
    if config.region().is_none() {
        return Err(AdminError::Usage(
            "no AWS region: give --region or set AWS_REGION".into(),
        ));
    }
    let mut stdout = std::io::stdout().lock();
    if let Command::Ca(ca) = &cli.command {
        run_ca(ca, aws_sdk_kms::Client::new(&config), &mut stdout).await?;
        stdout.flush()?;
        return Ok(());
    }
    let table = cli
        .table
        .as_deref()
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| {
            AdminError::Usage("no device table: give --table or set DEVICES_TABLE".into())
        })?;
    let registry = DynamoRegistry::new(aws_sdk_dynamodb::Client::new(&config), table);
    let mut stderr = std::io::stderr();
    let bar: Option<&mut dyn Write> = if !cli.quiet && stderr.is_terminal() {
        Some(&mut stderr)
    } else {
        None
    };
    run(
        &cli.command,
        &registry,
        &mut stdout,
        &mut Progress::new(bar),
    )
    .await?;
    stdout.flush()?;
    Ok(())
}

fn fail(error: &AdminError) -> ExitCode {
    eprintln!("provisioning-admin: {}", error.report());
    ExitCode::from(error.exit_code())
}
