//! The reboot storm: `sims` distinct SIMs boot at once and call azure-dps-register as devices
//! do at boot, at most `concurrency` invocations at a time (the function's reserved
//! concurrency), each device retrying after the `retryAfter` it is given, against a DPS
//! simulator held to DPS's own quotas (1,000 registrations a minute) that takes 1 s to assign.
//! The function is its real handler in this process, with its real AWS SDK clients on the
//! local AWS endpoint and its real DPS client over TLS: what differs from Lambda is only that
//! one process plays all the instances.
//!
//! Three ways: (a) the first boot of a new fleet, (b) the reboot of that registered fleet,
//! (c) the same reboot with `REREGISTER_AFTER_SECONDS=0` and no limits of ours (every call a
//! DPS registration, as before the record path and as the seed's Node.js handler does). And
//! (a) and (b) once more with the device table and the limits in memory (a′, b′): the local
//! AWS endpoint is one Python process, whose queue is most of (b)'s latency at this
//! concurrency, and which loses some of (a)'s record writes to timeouts; without it, what is
//! left is the function's own cost.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use azure_dps_register::config::Config;
use azure_dps_register::handler::handle;
use azure_dps_register::ports::{DeviceKeys, Dps, DpsLimits as Limiting};
use azure_dps_register::state::{
    fleet_windows, ConfiguredKeys, Limits, MqttDps, State, SIM_WINDOW_SECS,
};
use lambda_runtime::Context;
use local_emulators::bench::{millis, percentile};
use local_emulators::dps_sim::{DpsLimits, DpsSimConfig, DpsSimulator};
use local_emulators::stack::{LocalStack, ID_SCOPE};
use serde_json::json;
use shared::memory::{MemoryBudget, MemoryQuota, MemoryTable};
use shared::registry::SimRegistry;
use tokio::sync::Semaphore;

/// The storm's size.
pub(crate) struct Storm {
    pub(crate) sims: usize,
    pub(crate) concurrency: usize,
}

/// What one way of rebooting the fleet gave.
struct Outcome {
    label: &'static str,
    /// Until every SIM had its 200.
    wall: Duration,
    dps_registrations: usize,
    /// Answers by status and code (`200 dps`, `503 dps-budget`, ...).
    answers: BTreeMap<String, u64>,
    /// Each invocation's own time, ms.
    invocations: Vec<f64>,
    /// Each device's time from its first call to its 200, s.
    devices: Vec<f64>,
    /// Refusals that came without `retryAfter`.
    without_retry: u64,
    /// Requests DPS refused for exceeding its quota.
    over_quota: u64,
}

/// A Funk invocation's context for `imsi`, with Lambda's 10 s deadline from now.
fn funk(imsi: &str) -> Context {
    let deadline = std::time::SystemTime::now() + Duration::from_secs(10);
    let deadline_ms = deadline
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let client_context = json!({"custom": {
        "imsi": imsi, "operatorId": "OP0012345678",
        "srn": format!("srn:soracom:OP0012345678:jp:Subscriber:{imsi}"),
    }});
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        ("lambda-runtime-deadline-ms", deadline_ms.to_string()),
        ("lambda-runtime-client-context", client_context.to_string()),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    Context::new("storm", Default::default(), &headers).unwrap_or_default()
}

/// One device: calls until it has its 200, waiting what each refusal says. Each call takes
/// one of the `instances` (Lambda's concurrency) for its duration; a device waiting to come
/// back holds none.
async fn device<R: SimRegistry, K: DeviceKeys, D: Dps, L: Limiting>(
    imsi: &str,
    state: &State<R, K, D, L>,
    instances: &Semaphore,
    tally: &Mutex<Tally>,
) {
    let first = Instant::now();
    loop {
        let answer = {
            let _instance = instances.acquire().await;
            let started = Instant::now();
            let answer = handle(json!({}), &funk(imsi), state).await;
            (answer, millis(started.elapsed()))
        };
        let (answer, took) = answer;
        let kind = format!(
            "{} {}",
            answer.status_code,
            answer
                .error
                .or(answer.source.map(|s| s.as_str()))
                .unwrap_or("-")
        );
        let wait = answer.retry_after;
        {
            let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
            *t.answers.entry(kind).or_insert(0) += 1;
            t.invocations.push(took);
            if answer.status_code == 200 {
                t.devices.push(first.elapsed().as_secs_f64());
                return;
            }
            if wait.is_none() {
                t.without_retry += 1;
            }
        }
        // A device that was not told when to come back waits a second (the firmware's own
        // back-off); one that was told waits that long.
        tokio::time::sleep(Duration::from_secs(wait.unwrap_or(1))).await;
    }
}

#[derive(Default)]
struct Tally {
    answers: BTreeMap<String, u64>,
    invocations: Vec<f64>,
    devices: Vec<f64>,
    without_retry: u64,
}

/// All SIMs through `state`, `concurrency` devices at a time.
async fn reboot<R: SimRegistry, K: DeviceKeys, D: Dps, L: Limiting>(
    label: &'static str,
    state: &State<R, K, D, L>,
    sims: &[String],
    concurrency: usize,
    dps: &DpsSimulator,
) -> Outcome {
    eprintln!(
        "==> storm ({label}): {} SIMs boot at once, {concurrency} invocations at a time",
        sims.len()
    );
    let before = dps.assigned().len();
    let quota_before = dps.stats().over_quota.load(Ordering::Relaxed);
    let tally = Mutex::new(Tally::default());
    let instances = Semaphore::new(concurrency);
    let started = Instant::now();
    let devices = sims
        .iter()
        .map(|imsi| device(imsi, state, &instances, &tally));
    // Progress every 30 s: how many SIMs have their 200, and the answers so far.
    let progress = async {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let t = tally.lock().unwrap_or_else(|p| p.into_inner());
            eprintln!(
                "    {:>5.0} s: {} of {} SIMs answered 200; {}",
                started.elapsed().as_secs_f64(),
                t.devices.len(),
                sims.len(),
                t.answers
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    };
    tokio::select! {
        _ = futures::future::join_all(devices) => {}
        _ = progress => {}
    }
    let tally = tally.into_inner().unwrap_or_else(|p| p.into_inner());
    Outcome {
        label,
        wall: started.elapsed(),
        dps_registrations: dps.assigned().len() - before,
        answers: tally.answers,
        invocations: tally.invocations,
        devices: tally.devices,
        without_retry: tally.without_retry,
        over_quota: dps.stats().over_quota.load(Ordering::Relaxed) - quota_before,
    }
}

/// The function's state on the local stack and `dps`, with `extra` settings.
async fn state(
    stack: &LocalStack,
    dps: &DpsSimulator,
    extra: &[(&str, &str)],
) -> Result<State, String> {
    let ca = stack.dir().join("storm-dps-ca.pem");
    std::fs::write(&ca, dps.ca_pem()).map_err(|e| e.to_string())?;
    let mut env: BTreeMap<String, String> = stack.env().into_iter().collect();
    env.insert(
        "DPS_ENDPOINT".into(),
        format!("127.0.0.1:{}", dps.addr().port()),
    );
    env.insert("DPS_TRUSTED_CA_FILE".into(), ca.display().to_string());
    for (k, v) in extra {
        env.insert((*k).into(), (*v).into());
    }
    let env: std::collections::HashMap<String, String> = env.into_iter().collect();
    let config = Config::from_env(&env).map_err(|e| e.to_string())?;
    State::new(config, &stack.aws.sdk_config().await).map_err(|e| e.to_string())
}

pub(crate) async fn run(storm: &Storm) -> Result<String, String> {
    let stack = LocalStack::start().await.map_err(|e| e.to_string())?;
    let mut config = DpsSimConfig::new(ID_SCOPE);
    config.group_keys.push(stack.group_key.clone());
    config.retry_after = 1;
    config.limits = DpsLimits::DPS;
    config.assignment_delay = Duration::from_secs(1);
    let dps = DpsSimulator::start(config, ([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| e.to_string())?;
    let sims: Vec<String> = (0..storm.sims)
        .map(|n| format!("{}", 440_109_000_000_000u64 + n as u64))
        .collect();
    let normal = state(&stack, &dps, &[]).await?;
    let first = reboot("a: first boot", &normal, &sims, storm.concurrency, &dps).await;
    let again = reboot("b: reboot", &normal, &sims, storm.concurrency, &dps).await;
    let in_memory = in_memory(&stack, &dps, &sims).await?;
    let first_in_memory = reboot(
        "a′: first boot, table in memory",
        &in_memory,
        &sims,
        storm.concurrency,
        &dps,
    )
    .await;
    let again_in_memory = reboot(
        "b′: reboot, table in memory",
        &in_memory,
        &sims,
        storm.concurrency,
        &dps,
    )
    .await;
    // Today's behaviour before the record and the limits, and the seed's: every call a DPS
    // registration, nothing held back but by DPS itself.
    let always = state(
        &stack,
        &dps,
        &[
            ("REREGISTER_AFTER_SECONDS", "0"),
            ("DPS_REGISTRATIONS_PER_MINUTE", "1000000"),
            ("DPS_PER_SIM_PER_HOUR", "1000"),
        ],
    )
    .await?;
    let dps_always = reboot(
        "c: reboot, always DPS",
        &always,
        &sims,
        storm.concurrency,
        &dps,
    )
    .await;
    Ok(report(
        storm,
        &[first, again, first_in_memory, again_in_memory, dps_always],
    ))
}

/// The function's state with a new, empty device table in memory, and the limits (defaults)
/// in memory too.
async fn in_memory(
    stack: &LocalStack,
    dps: &DpsSimulator,
    sims: &[String],
) -> Result<State<MemoryTable, ConfiguredKeys, MqttDps, Limits<MemoryQuota, MemoryBudget>>, String>
{
    let memory = MemoryTable::new();
    let state = state(stack, dps, &[]).await?;
    let (limit, window) = fleet_windows(state.config.dps_registrations_per_minute);
    let limits = Limits::new(
        MemoryQuota::new(state.config.dps_per_sim_per_hour, SIM_WINDOW_SECS),
        MemoryBudget::new(limit, window),
        window,
    );
    // Warm, as (b)'s state is from (a): the group key in its cache. (Lambda instances handle
    // one call at a time, so each reads it once; here one process plays them all at once.)
    if let Some(imsi) = sims.first() {
        let _ = state.keys.device_key(imsi, imsi).await;
    }
    Ok(state.with_stores(memory, limits))
}

fn report(storm: &Storm, outcomes: &[Outcome]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Reboot storm\n\nWritten by `make bench-storm`: {} distinct SIMs, {} concurrent \
         invocations of azure-dps-register's handler (real SDK clients on moto, real DPS \
         client over TLS), against the DPS simulator held to 1,000 registrations a minute with \
         a 1 s assignment delay; the function's defaults (`DPS_REGISTRATIONS_PER_MINUTE` 900, \
         `DPS_PER_SIM_PER_HOUR` 6) except in (c), which has `REREGISTER_AFTER_SECONDS=0` and \
         no limits of its own (the behaviour before the record path, and the seed's), and in \
         (a′) and (b′), the first boot and the reboot again with a new device table and the \
         limits in memory: moto is one Python process, and at this concurrency its queue is \
         most of (b)'s latency and loses some of (a)'s record writes to timeouts (those SIMs \
         go to DPS again in (b)). Devices retry after the `retryAfter` they are given.\n",
        storm.sims, storm.concurrency
    );
    let _ = writeln!(
        md,
        "| | {} |",
        outcomes
            .iter()
            .map(|o| o.label)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(outcomes.len()));
    let row = |md: &mut String, name: &str, cell: &dyn Fn(&Outcome) -> String| {
        let cells: Vec<String> = outcomes.iter().map(cell).collect();
        let _ = writeln!(md, "| {name} | {} |", cells.join(" | "));
    };
    let pct = |v: &[f64], p: f64, digits: usize| {
        percentile(v, p).map_or("n/a".into(), |x| format!("{x:.digits$}"))
    };
    row(&mut md, "time until every SIM had a 200, s", &|o| {
        format!("{:.1}", o.wall.as_secs_f64())
    });
    row(&mut md, "SIMs with a 200", &|o| o.devices.len().to_string());
    row(&mut md, "DPS registrations made", &|o| {
        o.dps_registrations.to_string()
    });
    row(&mut md, "DPS quota refusals (must be 0)", &|o| {
        o.over_quota.to_string()
    });
    row(&mut md, "refusals without retryAfter (must be 0)", &|o| {
        o.without_retry.to_string()
    });
    row(&mut md, "answers by status", &|o| {
        o.answers
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("<br>")
    });
    row(&mut md, "invocation p50 / p99, ms", &|o| {
        format!(
            "{} / {}",
            pct(&o.invocations, 50.0, 2),
            pct(&o.invocations, 99.0, 2)
        )
    });
    row(&mut md, "device time to its 200, p50 / p99, s", &|o| {
        format!(
            "{} / {}",
            pct(&o.devices, 50.0, 1),
            pct(&o.devices, 99.0, 1)
        )
    });
    md.push_str(&scaling(storm, outcomes));
    md
}

/// The same fleet at 100,000 SIMs, from the measured figures.
fn scaling(storm: &Storm, outcomes: &[Outcome]) -> String {
    let per_minute = |o: &Outcome| o.dps_registrations as f64 / (o.wall.as_secs_f64() / 60.0);
    let mut text = String::from("\n## At 100,000 SIMs, on paper\n\n");
    for o in outcomes {
        let rate = o.devices.len() as f64 / o.wall.as_secs_f64().max(0.001);
        let _ = writeln!(
            text,
            "- {}: {:.0} SIMs answered per second here ({:.0} DPS registrations a minute); \
             100,000 SIMs take about {:.0} minutes at that rate.",
            o.label,
            rate,
            per_minute(o),
            100_000.0 / rate / 60.0
        );
    }
    let _ = writeln!(
        text,
        "\nWhere DPS is asked, the fleet budget bounds the time: 100,000 / 900 a minute ≈ 111 \
         minutes, whatever the concurrency; answered from the record, the bound is the device \
         table (here moto, one Python process; DynamoDB on-demand serves thousands of reads a \
         second, which (b′) stands in for) and the reserved concurrency ({} here, 100 \
         deployed).",
        storm.concurrency
    );
    text
}
