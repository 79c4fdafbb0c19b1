//! Scenario 7: a fleet of simulated nodes against one holder, in one process. Each node is a
//! real agent HTTPS client (`HttpsIssuer`, mTLS with its own node SVID) doing what an agent does
//! at its intervals: sync every sync interval, sign each identity at half its TTL (one CSR per
//! request), report every heartbeat, and hold the watch long-poll (`GET /v1/watch`, answered
//! after 55 s when nothing changed, then asked again) as every agent does. Time can be compressed: every interval and the TTL the
//! nodes reckon with are divided by `--compress` (the holder still signs real certificates of
//! the configured TTL), so an hour of a fleet fits in a minute.
//!
//! The run samples the steady state, not a cold start: every node's sync falls at a random point
//! of its interval and every identity starts with an SVID of a random age below half its TTL
//! (issued before the run; the holder signs its successor at half-life), so the calls the holder
//! sees per second are those of a fleet that has been running for hours. The holder gets
//! `holder.maxConnections` above the fleet's size, and nodes are attested a few at a time.
//!
//! Printed: holder CPU (cores), RSS, p50/p99 per call, and the identities that went past their
//! (compressed) TTL without a fresh SVID: "expired", which must be 0.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use meshcert_agent::issuer::{HttpsIssuer, Issuer as _};
use meshcert_agent::keys::{KeyAlgorithm, PrivateKey};
use meshcert_protocol::api::{CsrRequest, Der, SignOutcome, SignRequest};
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
    /// A node's call begun at `began` succeeded: for its first success after the kill, the time
    /// from the kill or from the start of its first call after the kill, whichever is later
    /// (a node that had nothing to ask meanwhile is not waiting for a replica).
    fn ok(&self, first_after_kill: &mut Option<Instant>, began: Instant, recorded: &mut bool) {
        let Some(at) = self.killed.get() else {
            return;
        };
        if *recorded {
            return;
        }
        let from = first_after_kill.get_or_insert(began.max(*at));
        *recorded = true;
        self.times
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(from.elapsed());
    }

    /// A node's call begun at `began` failed: remembered if it is its first since the kill.
    fn failed(&self, first_after_kill: &mut Option<Instant>, began: Instant) {
        if let Some(at) = self.killed.get()
            && first_after_kill.is_none()
        {
            *first_after_kill = Some(began.max(*at));
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

/// One node's calls since the kill of the first replica, for its fail-over time.
#[derive(Default)]
struct NodeFailover {
    first_after_kill: Option<Instant>,
    recorded: bool,
}

impl NodeFailover {
    fn outcome(&mut self, failover: &Failover, began: Instant, ok: bool) {
        if ok {
            failover.ok(&mut self.first_after_kill, began, &mut self.recorded);
        } else {
            failover.failed(&mut self.first_after_kill, began);
        }
    }
}

/// Each identity's SVID at the start: issued before the run at a random age below half the
/// TTL, as in a fleet that has been running for a while (valid until then).
fn steady_state_svids(identities: usize, ttl: Duration, now: Instant) -> Vec<Option<Instant>> {
    (0..identities)
        .map(|_| Some(now + ttl - (ttl / 2).mul_f64(fastrand::f64())))
        .collect()
}

/// One sign call for one identity (one CSR, as an agent's rotation of one entry sends).
async fn sign_one(node: &HttpsIssuer, id: &SpiffeId) -> Option<bool> {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).ok()?;
    let csr = meshcert_agent::csr::build(&key, Some(id)).ok()?;
    let request = SignRequest {
        csrs: vec![CsrRequest {
            entry_id: "fleet".into(),
            csr: Der(csr),
            local: None,
        }],
    };
    Some(node.sign(request).await.is_ok_and(|answer| {
        matches!(
            answer.results.first().map(|r| &r.outcome),
            Some(SignOutcome::Issued { .. })
        )
    }))
}

/// A node's sync, then its report (the heartbeat), as an agent sends them each interval.
async fn sync_and_report(
    node: &HttpsIssuer,
    lat: &Latencies,
    failover: &Failover,
    fo: &mut NodeFailover,
) {
    let t = Instant::now();
    let ok = node.sync().await.is_ok();
    if ok {
        record(lat, "sync", t.elapsed());
    }
    fo.outcome(failover, t, ok);
    let t = Instant::now();
    let report = NodeReport {
        bundle_version: 1,
        enforcement: None,
        identities: Arc::from(Vec::new()),
        node_svid: None,
    };
    let ok = node.report(report).await.is_ok();
    if ok {
        record(lat, "report", t.elapsed());
    }
    fo.outcome(failover, t, ok);
}

/// One node's watch long-poll until `until`, as the agent's push task holds it: asked again
/// at once after each answer, a second after a failure.
async fn watch_loop(node: Arc<HttpsIssuer>, until: Instant) {
    let wait = Duration::from_secs(meshcert_protocol::api::WATCH_MAX_WAIT_SECS);
    let mut version = None;
    let deadline = tokio::time::sleep_until(until.into());
    tokio::pin!(deadline);
    loop {
        let answer = tokio::select! {
            () = &mut deadline => return,
            answer = node.watch(version, wait) => answer,
        };
        match answer {
            Ok(r) => version = Some(r.version),
            Err(_) => tokio::select! {
                () = &mut deadline => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            },
        }
    }
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
    let mut fo = NodeFailover::default();
    let watch = tokio::spawn(watch_loop(Arc::clone(&node), until));
    let ttl = opts.ttl.div_f64(opts.compress);
    let interval = opts.interval.div_f64(opts.compress);
    // Each identity's SVID valid until (steady state: see the module documentation).
    let mut fresh_until = steady_state_svids(opts.identities, ttl, Instant::now());
    let mut expired = 0u64;
    // Spread the fleet's syncs over one interval, as agents started at different times are.
    let mut next_sync = Instant::now() + interval.mul_f64(fastrand::f64());
    loop {
        let now = Instant::now();
        if now >= until {
            break;
        }
        if now >= next_sync {
            sync_and_report(&node, &lat, &failover, &mut fo).await;
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
            let t = Instant::now();
            let Some(ok) = sign_one(&node, &id).await else {
                continue;
            };
            if ok {
                record(&lat, "sign", t.elapsed());
                *slot = Some(Instant::now() + ttl);
            }
            fo.outcome(&failover, t, ok);
        }
        // Asleep until the next sync or the next identity due, at most a second (a refused
        // signing is tried again then).
        let next_due = fresh_until
            .iter()
            .flatten()
            .map(|s| s.checked_sub(ttl / 2).unwrap_or(now))
            .min()
            .unwrap_or(next_sync);
        let wake = next_sync
            .min(next_due)
            .min(until)
            .min(Instant::now() + Duration::from_secs(1))
            .max(Instant::now() + Duration::from_millis(50));
        tokio::time::sleep_until(wake.into()).await;
    }
    let _ = watch.await;
    let end = Instant::now();
    expired
        + fresh_until
            .iter()
            .filter(|s| s.is_some_and(|s| s < end))
            .count() as u64
}

/// Joins `n` nodes, a few at a time: their tokens (`meshcert-ca token create`, a process
/// each) on threads, then their attestations at once.
async fn attest_all(
    holder: &Holder,
    addresses: &str,
    roots: &[Vec<u8>],
    n: usize,
) -> anyhow::Result<Vec<Arc<HttpsIssuer>>> {
    const AT_ONCE: usize = 16;
    let roots: Arc<[Vec<u8>]> = Arc::from(roots);
    let mut nodes = Vec::with_capacity(n);
    for start in (0..n).step_by(AT_ONCE) {
        let names: Vec<String> = (start..(start + AT_ONCE).min(n))
            .map(|i| format!("fleet-{i}"))
            .collect();
        let tokens = std::thread::scope(|s| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| s.spawn(move || holder.token(name)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("token thread panicked"))?
                })
                .collect::<anyhow::Result<Vec<String>>>()
        })?;
        let mut joins = tokio::task::JoinSet::new();
        for (name, token) in names.into_iter().zip(tokens) {
            let (addresses, roots) = (addresses.to_owned(), roots.clone());
            joins.spawn(async move {
                attest_one(&addresses, &roots, token)
                    .await
                    .with_context(|| format!("attesting {name}"))
            });
        }
        while let Some(node) = joins.join_next().await {
            match node? {
                Ok(node) => nodes.push(Arc::new(node)),
                Err(e) => anyhow::bail!("{e:#}; holder log:\n{}", holder.log()),
            }
        }
        if nodes.len() % 1000 < AT_ONCE {
            eprintln!("fleet: {} nodes attested", nodes.len());
        }
    }
    Ok(nodes)
}

/// One node joined with `token`.
async fn attest_one(
    addresses: &str,
    roots: &[Vec<u8>],
    token: String,
) -> anyhow::Result<HttpsIssuer> {
    let (issuer, ..) = crate::node::attest(addresses, roots, token).await?;
    Ok(issuer)
}

/// Runs the scenario and prints its table.
pub async fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let mut entry = EntrySpec::for_node("fleet", "unused", &format!("{}s", opts.ttl.as_secs()));
    entry.path = "/fleet".into();
    entry.nodes.clear();
    // A PostgreSQL cluster only for replicas (one holder keeps the default SQLite).
    let datastores: &[crate::signing::Datastore] = if opts.replicas > 1 {
        &[crate::signing::Datastore::Postgres]
    } else {
        &[]
    };
    let mut backend = crate::signing::Backend::new(datastores)?;
    let mut yaml = if opts.replicas > 1 {
        backend.holder_yaml(crate::signing::Datastore::Postgres)?
    } else {
        String::new()
    };
    // Every node may hold a connection at once, and a new one while the holder has not yet
    // seen the old one close: the default cap is for a holder of a few thousand nodes.
    yaml.push_str(&format!("  maxConnections: {}\n", 2 * opts.nodes + 1024));
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
    let nodes = attest_all(holder, &addresses, &roots, opts.nodes).await?;
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
            "Fail-over: per node, from the kill (or from its first call after it, when later) to its first successful call: \
             p50 {} ms, p99 {} ms, last {} ms ({} of {} nodes called after it).",
            ms(times.percentile(50.0)),
            ms(times.percentile(99.0)),
            ms(times.max()),
            times.len(),
            opts.nodes
        ));
    }
    table.note(
        "Every node is a real agent HTTPS client with its own node SVID (mTLS, connections reused as the agent does) in this \
         one process, holding the watch long-poll as an agent does; the CSR key generation is the load generator's, not the holder's. Steady state, not a cold start: each \
         node's sync falls at a random point of its interval and each identity starts with an SVID of a random age below half \
         its TTL, so the holder sees the calls per second of a fleet that has been running for hours (one signing per \
         identity per half TTL, one sync and one report per node per interval). With compression ×k, intervals and the TTL the \
         nodes reckon with are divided by k: the holder sees k times the real call rate, so its CPU divided by k is the \
         real-time figure.",
    );
    table.print();
    Ok(())
}
