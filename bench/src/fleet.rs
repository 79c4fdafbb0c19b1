//! Scenario 7: a fleet of simulated nodes against one holder, in one process. Each node is a
//! real agent HTTPS client (`HttpsIssuer`, mTLS with its own node SVID) doing what an agent does
//! at its intervals: sync every sync interval, sign each identity at half its TTL (one CSR per
//! request), report every heartbeat. Time can be compressed: every interval and the TTL the
//! nodes reckon with are divided by `--compress` (the holder still signs real certificates of
//! the configured TTL), so an hour of a fleet fits in a minute.
//!
//! Printed: holder CPU (cores), RSS, p50/p99 per call, and the identities that went past their
//! (compressed) TTL without a fresh SVID: "expired", which must be 0.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use meshcert_agent::issuer::{HttpsIssuer, Issuer as _};
use meshcert_agent::keys::{KeyAlgorithm, PrivateKey};
use meshcert_protocol::api::{AttestRequest, CsrRequest, Der, SignOutcome, SignRequest};
use meshcert_protocol::{NodeReport, SpiffeId};

use crate::figures::{Samples, Table, mb, ms};
use crate::process::{Bins, EntrySpec, Holder, cpu_time, memory};

/// The fleet's size and pace.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated nodes.
    pub nodes: usize,
    /// Identities per node.
    pub identities: usize,
    /// The identities' TTL (as the holder signs it).
    pub ttl: Duration,
    /// The agent's sync interval and heartbeat (real agent defaults: 30 s).
    pub interval: Duration,
    /// Time compression factor (1: real time).
    pub compress: f64,
    /// How long the fleet runs (real time).
    pub duration: Duration,
    /// 1: one holder on SQLite; 2: two replicas on a throwaway PostgreSQL, the first killed
    /// (kill -9) halfway through, every node listing both.
    pub replicas: usize,
}

/// When the first replica was killed, and how long after it each node's first successful call
/// came (its fail-over time).
#[derive(Default)]
struct Failover {
    killed: std::sync::OnceLock<Instant>,
    times: Mutex<Vec<Duration>>,
}

impl Failover {
    /// A node's call succeeded: the first success after the kill is its fail-over time.
    fn ok(&self, recorded: &mut bool) {
        if let Some(at) = self.killed.get()
            && !*recorded
        {
            *recorded = true;
            self.times
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(at.elapsed());
        }
    }
}

type Latencies = Arc<Mutex<BTreeMap<&'static str, Samples>>>;

fn record(lat: &Latencies, call: &'static str, d: Duration) {
    lat.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(call)
        .or_default()
        .push(d);
}

/// One node's life: returns how many of its identities went past their TTL unrefreshed.
async fn node_loop(
    node: Arc<HttpsIssuer>,
    id: SpiffeId,
    opts: Options,
    lat: Latencies,
    until: Instant,
    failover: Arc<Failover>,
) -> u64 {
    let mut failed_over = false;
    let ttl = opts.ttl.div_f64(opts.compress);
    let interval = opts.interval.div_f64(opts.compress);
    // Each identity's SVID valid until (None: not issued yet, the first issuance).
    let mut fresh_until: Vec<Option<Instant>> = vec![None; opts.identities];
    let mut expired = 0u64;
    // Spread the fleet over one interval, as agents started at different times are.
    tokio::time::sleep(interval.mul_f64(fastrand::f64())).await;
    let mut next_sync = Instant::now();
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        if now >= next_sync {
            let t = Instant::now();
            if node.sync().await.is_ok() {
                record(&lat, "sync", t.elapsed());
                failover.ok(&mut failed_over);
            }
            let t = Instant::now();
            let report = NodeReport {
                bundle_version: 1,
                enforcement: None,
                identities: Arc::from(Vec::new()),
                node_svid: None,
            };
            if node.report(report).await.is_ok() {
                record(&lat, "report", t.elapsed());
            }
            next_sync = now + interval;
        }
        for slot in &mut fresh_until {
            let now = Instant::now();
            // Due at half-life: refreshed when less than half the TTL is left.
            if slot.is_some_and(|s| s > now + ttl / 2) {
                continue;
            }
            if slot.is_some_and(|s| s < now) {
                // Past its TTL before it was refreshed: it expired (counted once).
                expired += 1;
            }
            let Ok(key) = PrivateKey::generate(KeyAlgorithm::EcdsaP256) else {
                continue;
            };
            let Ok(csr) = meshcert_agent::csr::build(&key, Some(&id)) else {
                continue;
            };
            let request = SignRequest {
                csrs: vec![CsrRequest {
                    entry_id: "fleet".into(),
                    csr: Der(csr),
                    local: None,
                }],
            };
            let t = Instant::now();
            if let Ok(answer) = node.sign(request).await
                && matches!(
                    answer.results.first().map(|r| &r.outcome),
                    Some(SignOutcome::Issued { .. })
                )
            {
                record(&lat, "sign", t.elapsed());
                failover.ok(&mut failed_over);
                *slot = Some(Instant::now() + ttl);
            }
        }
        tokio::time::sleep(interval.min(ttl / 8).min(Duration::from_millis(500))).await;
    }
    let end = Instant::now();
    expired
        + fresh_until
            .iter()
            .filter(|s| s.is_some_and(|s| s < end))
            .count() as u64
}

/// Runs the scenario and prints its table.
pub async fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let mut entry = EntrySpec::for_node("fleet", "unused", &format!("{}s", opts.ttl.as_secs()));
    entry.path = "/fleet".into();
    entry.nodes.clear();
    let mut backend = crate::signing::Backend::new(&[crate::signing::Datastore::Postgres])?;
    let yaml = if opts.replicas > 1 {
        backend.holder_yaml(crate::signing::Datastore::Postgres)?
    } else {
        String::new()
    };
    let mut replicas = Vec::new();
    for _ in 0..opts.replicas.max(1) {
        replicas.push(Holder::start(bins, std::slice::from_ref(&entry), &yaml)?);
    }
    let addresses: Vec<String> = replicas.iter().map(|h| h.addr().to_string()).collect();
    let addresses = addresses.join(",");
    let holder = &replicas[0];
    let roots = holder.roots()?;
    let id = SpiffeId::new("spiffe://mesh-a.test/fleet")?;
    eprintln!("fleet: attesting {} nodes", opts.nodes);
    let mut nodes = Vec::with_capacity(opts.nodes);
    for i in 0..opts.nodes {
        let name = format!("fleet-{i}");
        let issuer = HttpsIssuer::new(&addresses, "localhost", &roots)?;
        let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
        let csr = meshcert_agent::csr::build(&key, None)?;
        let token = holder.token(&name)?;
        let answer = issuer
            .attest(AttestRequest {
                token,
                csr: Der(csr),
            })
            .await
            .with_context(|| format!("attesting {name}; holder log:\n{}", holder.log()))?;
        let chain: Vec<Vec<u8>> = answer.svid.chain.into_iter().map(|d| d.0).collect();
        issuer.set_identity(&chain, &key)?;
        nodes.push(Arc::new(issuer));
    }
    eprintln!("fleet: running {:?}", opts.duration);
    let lat: Latencies = Arc::default();
    let failover = Arc::new(Failover::default());
    let pids: Vec<u32> = replicas.iter().map(Holder::pid).collect();
    let cpu_before: Vec<Duration> = pids
        .iter()
        .map(|p| cpu_time(*p))
        .collect::<Result<_, _>>()?;
    let mut cpu = Duration::ZERO;
    let started = Instant::now();
    let until = started + opts.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for node in nodes {
        let (lat, failover) = (lat.clone(), failover.clone());
        tasks.spawn(node_loop(
            node,
            id.clone(),
            opts.clone(),
            lat,
            until,
            failover,
        ));
    }
    let mut peak_rss = 0;
    let mut expired = 0;
    loop {
        tokio::select! {
            done = tasks.join_next() => match done {
                Some(n) => expired += n?,
                None => break,
            },
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let killed = failover.killed.get().is_some();
                let alive = if killed { &pids[1..] } else { &pids[..] };
                let rss = alive.iter().filter_map(|p| memory(*p).ok()).map(|m| m.rss).max();
                peak_rss = peak_rss.max(rss.unwrap_or(0));
                if pids.len() > 1 && !killed && started.elapsed() >= opts.duration / 2 {
                    cpu += cpu_time(pids[0])?.saturating_sub(cpu_before[0]);
                    replicas[0].kill9();
                    let _ = failover.killed.set(Instant::now());
                    eprintln!("fleet: replica 1 killed");
                }
            }
        }
    }
    let wall = started.elapsed();
    let last = pids.len() - 1;
    cpu += cpu_time(pids[last])?.saturating_sub(cpu_before[last]);
    let mut table = Table::new(
        &format!(
            "Fleet: {} nodes × {} identities, TTL {:?}, sync/heartbeat {:?}, time compressed ×{}, {}",
            opts.nodes,
            opts.identities,
            opts.ttl,
            opts.interval,
            opts.compress,
            if opts.replicas > 1 {
                "2 replicas on PostgreSQL, the first killed halfway"
            } else {
                "one holder on SQLite"
            }
        ),
        &["call", "calls", "p50 ms", "p99 ms"],
    );
    for (call, samples) in lat
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        table.row(vec![
            (*call).to_owned(),
            samples.len().to_string(),
            ms(samples.percentile(50.0)),
            ms(samples.percentile(99.0)),
        ]);
    }
    table.note(format!(
        "Holder CPU: {:.3} cores over {:.0} s (all replicas together); RSS peak of a holder {} (sampled each second); \
         SVIDs expired: {expired}.",
        cpu.as_secs_f64() / wall.as_secs_f64(),
        wall.as_secs_f64(),
        mb(peak_rss)
    ));
    if opts.replicas > 1 {
        let mut times = Samples::new();
        for t in failover
            .times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            times.push(*t);
        }
        table.note(format!(
            "Fail-over: the first successful call after the kill came, per node, p50 {} ms, p99 {} ms, last {} ms \
             ({} of {} nodes called after it).",
            ms(times.percentile(50.0)),
            ms(times.percentile(99.0)),
            ms(times.max()),
            times.len(),
            opts.nodes
        ));
    }
    table.note(
        "Every node is a real agent HTTPS client with its own node SVID (mTLS, connections reused as the agent does) in this \
         one process; the CSR key generation is the load generator's, not the holder's. With compression ×k, intervals and the \
         TTL the nodes reckon with are divided by k: the holder sees k times the real call rate, so its CPU divided by k is the \
         real-time figure.",
    );
    table.print();
    Ok(())
}
