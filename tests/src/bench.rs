//! Measuring helpers for `make bench`: function processes under the minimal Runtime API,
//! their peak memory, and the statistics the report prints.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::{Child, Command};

use crate::runtime_api::RuntimeApi;

/// min, median and max of a set of figures (median of an even count: the mean of the middle two).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Spread {
        min: v[0],
        median,
        max: v[n - 1],
    })
}

/// The nearest-rank percentile `p` (0 < p ≤ 100) of `values`.
pub fn percentile(values: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v.get(rank.min(v.len()) - 1).copied()
}

pub fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The peak resident set size of a live process, in MiB (`VmHWM` in /proc/PID/status).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// One function process polling its own Runtime API.
pub struct FunctionProcess {
    pub api: RuntimeApi,
    child: Child,
    pub started: Instant,
}

impl FunctionProcess {
    /// Starts `program` (a function's bootstrap) with `env` and `AWS_LAMBDA_RUNTIME_API` set to
    /// a fresh Runtime API. Its output is discarded, as nothing reads CloudWatch here.
    pub async fn spawn(
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
    ) -> Result<Self, String> {
        let api = RuntimeApi::start().await.map_err(|e| e.to_string())?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("AWS_LAMBDA_RUNTIME_API", api.address())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let started = Instant::now();
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        Ok(Self {
            api,
            child,
            started,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// One invocation: the answer's JSON, how long the function took with it, and how long
    /// since the process started (for the first invocation: the cold start).
    pub async fn invoke(
        &self,
        event: &Value,
        client_context: Option<&Value>,
    ) -> Result<(Value, Duration, Duration), String> {
        let answer = self
            .api
            .invoke(event, client_context, Duration::from_secs(30))
            .await?;
        let body = answer.body?;
        Ok((
            body,
            answer.answered - answer.handed_out,
            answer.answered - self.started,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_percentiles() {
        let s = spread(&[3.0, 1.0, 2.0, 10.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.5, 10.0));
        assert_eq!(spread(&[4.0]).unwrap().median, 4.0);
        assert!(spread(&[]).is_none());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
    }

    #[test]
    fn reads_its_own_peak_memory() {
        let mib = peak_rss_mib(std::process::id()).unwrap();
        assert!(mib > 0.5 && mib < 10_000.0, "{mib}");
    }
}
