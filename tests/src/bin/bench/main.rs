//! `make bench`: cold start, warm latency, peak memory, bundle size and throughput of the
//! functions on the local emulators, next to the original write-up's Node.js Lambda (seed 000,
//! the official Azure IoT SDKs) on the same DPS simulator, written to bench/results.md.
//!
//! Every function runs as its release binary under a minimal Lambda Runtime API
//! (`local_emulators::runtime_api`); the baseline runs under a minimal Node.js runtime loop
//! (bench/node/bootstrap.js) against the same API. Figures are per run; the report gives
//! min / median / max over the runs.
//!
//! `--storm` (`make bench-storm`) runs the reboot storm instead (see `storm`), written to
//! bench/storm.md.

mod report;
mod runs;
mod setup;
mod storm;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use setup::Bench;

/// Benchmarks the functions against the original write-up's Node.js Lambda under one DPS
/// simulator and writes the results as Markdown.
#[derive(Debug, clap::Parser)]
#[command(name = "bench")]
pub(crate) struct Settings {
    /// Cold-start runs per function
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = positive)]
    pub(crate) runs: usize,
    /// Warm invocations per run
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = positive)]
    pub(crate) warm: usize,
    /// Warm invocations through the delaying proxy
    #[arg(long, value_name = "N", default_value_t = 5, value_parser = positive)]
    pub(crate) delayed_warm: usize,
    /// Throughput runs
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = positive)]
    pub(crate) throughput_runs: usize,
    /// Where to write the results (default bench/results.md, with --storm bench/storm.md)
    #[arg(long, value_name = "FILE")]
    pub(crate) out: Option<PathBuf>,
    /// Run the reboot storm instead: distinct SIMs calling at boot, retrying as told
    #[arg(long)]
    pub(crate) storm: bool,
    /// SIMs in the storm
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = positive)]
    pub(crate) storm_sims: usize,
    /// Concurrent invocations in the storm
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = positive)]
    pub(crate) storm_concurrency: usize,
}

fn positive(value: &str) -> Result<usize, String> {
    value
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| "takes a positive number".to_owned())
}

pub(crate) fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub(crate) fn release_bin(name: &str) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
        .join("release")
        .join(name)
}

/// Figures of one run, by name.
pub(crate) type Run = BTreeMap<&'static str, f64>;

/// Checks what `make bench` prepares, starts the stand-ins, measures, and renders the report.
async fn bench(settings: &Settings) -> Result<String, String> {
    setup::check_prerequisites()?;
    eprintln!("==> starting the local AWS endpoint and DPS simulators");
    let b = Bench::start().await?;
    let measured = runs::measure_all(settings, &b).await?;
    Ok(report::report(settings, &report::rows(&measured)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let settings = <Settings as clap::Parser>::parse();
    let (result, default_out) = if settings.storm {
        let storm = storm::Storm {
            sims: settings.storm_sims,
            concurrency: settings.storm_concurrency,
        };
        (storm::run(&storm).await, "bench/storm.md")
    } else {
        (bench(&settings).await, "bench/results.md")
    };
    let out = settings
        .out
        .clone()
        .unwrap_or_else(|| root().join(default_out));
    match result {
        Ok(markdown) => {
            if let Err(e) = std::fs::write(&out, &markdown) {
                eprintln!("bench: cannot write {}: {e}", out.display());
                return ExitCode::FAILURE;
            }
            println!("{markdown}");
            eprintln!("bench: wrote {}", out.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
