//! The measurements: one fresh process per run, cold start first, then warm invocations; and
//! the throughput loads.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use local_emulators::bench::{millis, peak_rss_mib, percentile, spread, FunctionProcess, Spread};
use local_emulators::dps_sim::{DpsSimConfig, DpsSimulator, Fault};
use local_emulators::latency_proxy::LatencyProxy;
use local_emulators::stack::ID_SCOPE;
use serde_json::{json, Value};
use shared::config::HostPort;
use shared::keys::SymmetricKey;
use shared::registry::{DeviceId, DeviceRecord, DynamoRegistry};

use crate::setup::Bench;
use crate::{release_bin, root, Run, Settings};

/// The runs of one comparison: ours and the baseline's.
pub(crate) struct Sides {
    pub(crate) rust: Vec<Run>,
    pub(crate) node: Vec<Run>,
}

impl Sides {
    /// One figure's spread over the runs, on each side.
    pub(crate) fn figure(&self, name: &str) -> (Option<Spread>, Option<Spread>) {
        (figure(&self.rust, name), figure(&self.node, name))
    }

    /// The same runs with `amount` taken off one figure (a wait the simulator imposes).
    pub(crate) fn minus(&self, name: &str, amount: f64) -> Sides {
        let less = |runs: &[Run]| -> Vec<Run> {
            runs.iter()
                .map(|r| {
                    let mut r = r.clone();
                    if let Some(v) = r.get_mut(name) {
                        *v -= amount;
                    }
                    r
                })
                .collect()
        };
        Sides {
            rust: less(&self.rust),
            node: less(&self.node),
        }
    }
}

pub(crate) fn figure(runs: &[Run], name: &str) -> Option<Spread> {
    let values: Vec<f64> = runs.iter().filter_map(|r| r.get(name).copied()).collect();
    spread(&values)
}

/// Everything `make bench` measures.
pub(crate) struct Measured {
    /// azure-dps-register and the baseline, simulator assigning at once.
    pub(crate) dps: Sides,
    /// The same with retry-after 1 s.
    pub(crate) delayed: Sides,
    pub(crate) hook: Vec<Run>,
    pub(crate) issuer: Vec<Run>,
    /// THROUGHPUT_TOTAL registrations, THROUGHPUT_CONCURRENCY at once, 20% throttled.
    pub(crate) throughput: Sides,
    /// The DPS client libraries alone: ALONE sequential registrations.
    pub(crate) alone: Sides,
    /// Round trips to DPS per registration: a new SIM, and (`rust` only) a device asking for
    /// DPS (`REREGISTER_AFTER_SECONDS=0`, the connection opened while the table is read).
    pub(crate) round_trips: Sides,
    pub(crate) round_trips_asked: Vec<Run>,
    /// azure-dps-register with `ATTESTATION=x509` (KMS signs each certificate; the X.509
    /// simulator assigns at once): no baseline.
    pub(crate) x509: Vec<Run>,
}

pub(crate) async fn measure_all(settings: &Settings, b: &Bench) -> Result<Measured, String> {
    eprintln!("==> azure-dps-register vs the Node.js baseline, simulator assigning at once");
    let dps = dps_sides(b, &b.immediate, settings.runs, settings.warm).await?;
    eprintln!("==> the same with retry-after: 1 s");
    let delayed = dps_sides(b, &b.stack.dps, settings.runs, settings.delayed_warm).await?;
    eprintln!("==> fleet-prehook decisions");
    let hook = runs("hook", settings.runs, |i| hook_run(b, i, 200)).await?;
    eprintln!("==> claim-issuer");
    let issuer = runs("claim-issuer", settings.runs, |_| issuer_run(b, 20)).await?;
    eprintln!(
        "==> throughput: {THROUGHPUT_TOTAL} registrations, {THROUGHPUT_CONCURRENCY} concurrent, \
         20% answered 429"
    );
    let throttling = throttling_sim(b).await?;
    let load = (THROUGHPUT_TOTAL, THROUGHPUT_CONCURRENCY);
    let throughput = load_sides(b, &throttling, settings.throughput_runs, load).await?;
    eprintln!("==> the DPS client alone: {ALONE} sequential registrations, assigning at once");
    let alone = load_sides(b, &b.immediate, settings.runs, (ALONE, 1)).await?;
    eprintln!(
        "==> round trips to DPS: {RTT_WARM} registrations through a proxy adding {} ms RTT, and without",
        RTT.as_millis()
    );
    let round_trips = Sides {
        rust: runs("rust", settings.runs, |_| {
            round_trip_run(b, Side::Rust, &[])
        })
        .await?,
        node: runs("node", settings.runs, |_| {
            round_trip_run(b, Side::Node, &[])
        })
        .await?,
    };
    let asked = [("REREGISTER_AFTER_SECONDS", "0")];
    let round_trips_asked = runs("rust, DPS asked for", settings.runs, |_| {
        round_trip_run(b, Side::Rust, &asked)
    })
    .await?;
    eprintln!("==> azure-dps-register with X.509 attestation (KMS-signed certificates)");
    let x509 = runs("rust, x509", settings.runs, |_| {
        dps_run_via(b, Side::Rust, &b.x509, settings.warm, &Route::X509)
    })
    .await?;
    Ok(Measured {
        x509,
        dps,
        delayed,
        hook,
        issuer,
        throughput,
        alone,
        round_trips,
        round_trips_asked,
    })
}

async fn dps_sides(b: &Bench, sim: &DpsSimulator, n: usize, warm: usize) -> Result<Sides, String> {
    Ok(Sides {
        rust: runs("rust", n, |_| dps_run(b, Side::Rust, sim, warm)).await?,
        node: runs("node", n, |_| dps_run(b, Side::Node, sim, warm)).await?,
    })
}

/// `n` runs of each side's load: (registrations, concurrent callers).
async fn load_sides(
    b: &Bench,
    sim: &DpsSimulator,
    n: usize,
    (total, concurrency): (usize, usize),
) -> Result<Sides, String> {
    Ok(Sides {
        rust: runs("rust", n, |_| rust_load(b, sim, total, concurrency)).await?,
        node: runs("node", n, |_| node_load(b, sim, total, concurrency)).await?,
    })
}

async fn runs<F, Fut>(label: &str, n: usize, mut f: F) -> Result<Vec<Run>, String>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Run, String>>,
{
    let mut all = Vec::new();
    for i in 0..n {
        let run = f(i)
            .await
            .map_err(|e| format!("{label}, run {}: {e}", i + 1))?;
        eprintln!(
            "    {label} run {}: {}",
            i + 1,
            run.iter()
                .map(|(k, v)| format!("{k}={v:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        all.push(run);
    }
    Ok(all)
}

fn client_context(imsi: &str) -> Value {
    json!({"custom": {"imsi": imsi, "operatorId": "OP0012345678",
        "srn": format!("srn:soracom:OP0012345678:jp:Subscriber:{imsi}"),
        "resourceType": "Subscriber", "resourceId": imsi, "sourceProtocol": "http"}})
}

fn registered(answer: &Value) -> Result<(), String> {
    if answer["statusCode"] == 200 {
        Ok(())
    } else {
        Err(format!("registration failed: {answer}"))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Rust,
    Node,
}

/// Invokes `process` with each event in turn (the first is its cold start), checking each
/// answer; the run's cold start, warm p50/p99 and peak RSS.
async fn measure(
    process: &FunctionProcess,
    invocations: Vec<(Value, Option<Value>)>,
    check: impl Fn(&Value) -> Result<(), String>,
) -> Result<Run, String> {
    let mut run = Run::new();
    let mut latencies = Vec::new();
    for (i, (event, context)) in invocations.iter().enumerate() {
        let (answer, took, since_start) = process.invoke(event, context.as_ref()).await?;
        check(&answer)?;
        if i == 0 {
            run.insert("cold", millis(since_start));
        } else {
            latencies.push(millis(took));
        }
    }
    if let Some(rss) = process.pid().and_then(peak_rss_mib) {
        run.insert("rss", rss);
    }
    for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
        if let Some(value) = percentile(&latencies, p) {
            run.insert(name, value);
        }
    }
    Ok(run)
}

/// One cold start and `warm` warm registrations in one fresh process; the run's figures.
async fn dps_run(b: &Bench, side: Side, sim: &DpsSimulator, warm: usize) -> Result<Run, String> {
    dps_run_via(b, side, sim, warm, &Route::Direct).await
}

/// How a run reaches the simulator.
enum Route<'a> {
    Direct,
    /// Through a proxy on this port, with these variables added to the function's environment.
    Proxy(u16, &'a [(&'a str, &'a str)]),
    /// Directly, with X.509 attestation (`Bench::x509_env`).
    X509,
}

async fn dps_run_via(
    b: &Bench,
    side: Side,
    sim: &DpsSimulator,
    warm: usize,
    route: &Route<'_>,
) -> Result<Run, String> {
    let imsis: Vec<String> = (0..=warm).map(|_| b.next_imsi()).collect();
    let (program, args, mut env) = match side {
        Side::Rust if matches!(route, Route::X509) => {
            (release_bin("azure-dps-register"), vec![], b.x509_env())
        }
        Side::Rust => (
            release_bin("azure-dps-register"),
            vec![],
            b.rust_env("azure-dps-register", sim),
        ),
        Side::Node => (
            "node".into(),
            vec![root().join("bench/node/bootstrap.js").display().to_string()],
            b.node_env(sim, &imsis),
        ),
    };
    if let Route::Proxy(port, extra) = route {
        for (name, value) in &mut env {
            match name.as_str() {
                "DPS_ENDPOINT" => *value = format!("127.0.0.1:{port}"),
                "PROVISIONING_HOST" => *value = format!("localhost:{port}"),
                _ => {}
            }
        }
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let process = FunctionProcess::spawn(Path::new(&program), &args, &env).await?;
    let invocations = imsis
        .iter()
        .map(|imsi| (json!({}), Some(client_context(imsi))))
        .collect();
    measure(&process, invocations, registered).await
}

/// The round-trip time the latency proxy puts between the functions and DPS.
pub(crate) const RTT: Duration = Duration::from_millis(50);
/// Warm registrations per run through the latency proxy.
const RTT_WARM: usize = 10;

/// Round trips to DPS per registration, as seen from outside: each run's warm p50 through
/// the latency proxy with `RTT` less the same without delay, in units of `RTT`. The simulator
/// assigns at once, so what remains is the conversation's own round trips.
async fn round_trip_run(b: &Bench, side: Side, extra: &[(&str, &str)]) -> Result<Run, String> {
    let mut p50 = Vec::new();
    for rtt in [Duration::ZERO, RTT] {
        let proxy = LatencyProxy::start(b.immediate.addr(), rtt)
            .await
            .map_err(|e| e.to_string())?;
        let route = Route::Proxy(proxy.addr().port(), extra);
        let run = dps_run_via(b, side, &b.immediate, RTT_WARM, &route).await?;
        p50.push(run.get("p50").copied().ok_or("no p50")?);
    }
    let mut run = Run::new();
    run.insert("trips", (p50[1] - p50[0]) / millis(RTT));
    run.insert("p50_plain", p50[0]);
    run.insert("p50_rtt", p50[1]);
    Ok(run)
}

/// fleet-prehook: one cold decision and `warm` warm ones, each for a fresh allowed serial (the
/// full path: read, checks, conditional write).
async fn hook_run(b: &Bench, run_number: usize, warm: usize) -> Result<Run, String> {
    let serials: Vec<String> = (0..=warm)
        .map(|i| format!("SN-B{run_number:02}-{i:04}"))
        .collect();
    // A table per run: moto copies the whole table for every TransactWriteItems (to roll
    // back), so a table that grew with every run would measure moto, not the hook.
    let table = format!("hook-bench-{run_number}");
    let aws = &b.stack.aws;
    aws.create_devices_table(&table)
        .await
        .map_err(|e| e.to_string())?;
    let registry = DynamoRegistry::new(aws.dynamodb().await, &table);
    for serial in &serials {
        registry
            .put(&DeviceRecord::allowed(DeviceId::Serial(serial.clone())))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut env = b.rust_env("fleet-prehook", &b.immediate);
    for (name, value) in &mut env {
        if name == "DEVICES_TABLE" {
            value.clone_from(&table);
        }
    }
    let process = FunctionProcess::spawn(&release_bin("fleet-prehook"), &[], &env).await?;
    let event = |serial: &str| {
        json!({"certificateId": format!("cert-{serial}"), "claimCertificateId": "claim-bench",
            "templateArn": "arn:aws:iot:us-east-1:123456789012:provisioningtemplate/fleet-template",
            "clientId": serial, "parameters": {"SerialNumber": serial}})
    };
    let allowed = |v: &Value| {
        if v["allowProvisioning"] == true {
            Ok(())
        } else {
            Err(format!("hook denied: {v}"))
        }
    };
    let invocations = serials.iter().map(|serial| (event(serial), None)).collect();
    measure(&process, invocations, allowed).await
}

/// claim-issuer: one cold claim and `warm` warm ones.
async fn issuer_run(b: &Bench, warm: usize) -> Result<Run, String> {
    let event: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("events/claim-issuer/issue.json"))
            .map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let process = FunctionProcess::spawn(
        &release_bin("claim-issuer"),
        &[],
        &b.rust_env("claim-issuer", &b.immediate),
    )
    .await?;
    let issued = |v: &Value| {
        if v["statusCode"] == 200 {
            Ok(())
        } else {
            Err(format!("claim refused: {}", v["statusCode"]))
        }
    };
    let invocations = (0..=warm).map(|_| (event.clone(), None)).collect();
    measure(&process, invocations, issued).await
}

pub(crate) const THROUGHPUT_TOTAL: usize = 1000;
pub(crate) const THROUGHPUT_CONCURRENCY: usize = 100;
/// Sequential registrations per run for the client-alone comparison.
pub(crate) const ALONE: usize = 50;

/// A simulator answering 20% of register and poll requests with 429 (retry-after 1 s).
async fn throttling_sim(b: &Bench) -> Result<DpsSimulator, String> {
    let mut config = DpsSimConfig::new(ID_SCOPE);
    config.group_keys.push(b.stack.group_key.clone());
    config.retry_after = 1;
    config.faults.push(Fault::ThrottlePercent(20));
    DpsSimulator::start(config, ([127, 0, 0, 1], 0).into())
        .await
        .map_err(|e| e.to_string())
}

fn throughput_figures(total: usize, successes: usize, latencies: &[f64], wall: f64) -> Run {
    let mut run = Run::new();
    run.insert("successes", successes as f64);
    run.insert("failures", total.saturating_sub(successes) as f64);
    run.insert("p50", percentile(latencies, 50.0).unwrap_or(f64::NAN));
    run.insert("p99", percentile(latencies, 99.0).unwrap_or(f64::NAN));
    run.insert("wall", wall);
    run
}

/// `total` registrations by `concurrency` concurrent callers through `dps_client` (the
/// function's DPS client), each bounded by a 60 s deadline.
async fn rust_load(
    b: &Bench,
    sim: &DpsSimulator,
    total: usize,
    concurrency: usize,
) -> Result<Run, String> {
    let tls = dps_client::tls_config(Some(sim.ca_pem().as_bytes())).map_err(|e| e.to_string())?;
    let endpoint = Arc::new(HostPort {
        host: "127.0.0.1".into(),
        port: sim.addr().port(),
    });
    let group_key = b.stack.group_key.clone();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (tls, endpoint, group_key, next) = (
            tls.clone(),
            Arc::clone(&endpoint),
            group_key.clone(),
            Arc::clone(&next),
        );
        workers.push(tokio::spawn(rust_worker(
            tls, endpoint, group_key, next, total,
        )));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.map_err(|e| e.to_string())?);
    }
    let wall = millis(started.elapsed());
    let latencies: Vec<f64> = all.iter().filter(|r| r.0).map(|r| r.1).collect();
    Ok(throughput_figures(total, latencies.len(), &latencies, wall))
}

/// One of `rust_load`'s callers: registers the next device until `total` are taken; each
/// registration's success and latency.
async fn rust_worker(
    tls: Arc<rustls::ClientConfig>,
    endpoint: Arc<HostPort>,
    group_key: SymmetricKey,
    next: Arc<AtomicUsize>,
    total: usize,
) -> Vec<(bool, f64)> {
    let mut results = Vec::new();
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= total {
            return results;
        }
        let id = format!("bench-rust-{i}");
        let key = group_key.derive_device_key(&id);
        let request = dps_client::RegistrationRequest {
            endpoint: &endpoint,
            id_scope: ID_SCOPE,
            registration_id: &id,
            attestation: dps_client::Attestation::SymmetricKey(&key),
            payload: None,
            tls: tls.clone(),
        };
        let t = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let ok = dps_client::register(&request, deadline).await.is_ok();
        results.push((ok, millis(t.elapsed())));
    }
}

/// The same load with the official Node.js SDK (bench/node/throughput.js).
async fn node_load(
    b: &Bench,
    sim: &DpsSimulator,
    total: usize,
    concurrency: usize,
) -> Result<Run, String> {
    let out = tokio::process::Command::new("node")
        .arg(root().join("bench/node/throughput.js"))
        .args(["--host", &format!("localhost:{}", sim.addr().port())])
        .args(["--scope", ID_SCOPE])
        .args(["--group-key", &b.stack.group_key.to_base64()])
        .args(["--count", &total.to_string()])
        .args(["--concurrency", &concurrency.to_string()])
        .env("NODE_EXTRA_CA_CERTS", b.ca_file(sim))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(900), out)
        .await
        .map_err(|_| "node throughput: no result within 15 min".to_owned())?
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "node throughput printed no result ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let latencies: Vec<f64> = v["latencies_ms"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let successes = v["successes"].as_u64().unwrap_or(0) as usize;
    let run = throughput_figures(
        total,
        successes,
        &latencies,
        v["wall_ms"].as_f64().unwrap_or(f64::NAN),
    );
    if let Some(errors) = v["errors"].as_object().filter(|e| !e.is_empty()) {
        eprintln!(
            "    node throughput errors: {}",
            Value::Object(errors.clone())
        );
    }
    Ok(run)
}
