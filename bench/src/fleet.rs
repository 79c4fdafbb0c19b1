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
) -> u64 {
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
            }
            let t = Instant::now();
            let report = NodeReport {
                bundle_version: 1,
                enforcement: None,
                identities: Arc::from(Vec::new()),
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
    let holder = Holder::start(bins, &[entry], "")?;
    let roots = holder.roots()?;
    let id = SpiffeId::new("spiffe://mesh-a.test/fleet")?;
    eprintln!("fleet: attesting {} nodes", opts.nodes);
    let mut nodes = Vec::with_capacity(opts.nodes);
    for i in 0..opts.nodes {
        let name = format!("fleet-{i}");
        let issuer = HttpsIssuer::new(&holder.addr().to_string(), "localhost", &roots)?;
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
    let cpu_before = cpu_time(holder.pid())?;
    let started = Instant::now();
    let until = started + opts.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for node in nodes {
        tasks.spawn(node_loop(
            node,
            id.clone(),
            opts.clone(),
            lat.clone(),
            until,
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
                peak_rss = peak_rss.max(memory(holder.pid())?.rss);
            }
        }
    }
    let wall = started.elapsed();
    let cpu = cpu_time(holder.pid())?.saturating_sub(cpu_before);
    let mut table = Table::new(
        &format!(
            "Fleet: {} nodes × {} identities, TTL {:?}, sync/heartbeat {:?}, time compressed ×{}",
            opts.nodes, opts.identities, opts.ttl, opts.interval, opts.compress
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
        "Holder CPU: {:.3} cores over {:.0} s; holder RSS peak {} (sampled each second); \
         SVIDs expired: {expired}.",
        cpu.as_secs_f64() / wall.as_secs_f64(),
        wall.as_secs_f64(),
        mb(peak_rss)
    ));
    table.note(
        "Every node is a real agent HTTPS client with its own node SVID (mTLS, connections reused as the agent does) in this \
         one process; the CSR key generation is the load generator's, not the holder's. With compression ×k, intervals and the \
         TTL the nodes reckon with are divided by k: the holder sees k times the real call rate, so its CPU divided by k is the \
         real-time figure.",
    );
    table.print();
    Ok(())
}
