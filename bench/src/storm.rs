//! Scenario 5: a rotation storm. Several agents with many entries each and a short TTL against
//! one holder: the holder's CPU, the longest wait for a signature, and whether any SVID expired.
//!
//! Every `SVID installed` event of every agent (JSON log: time, entry, serial, not-after) is
//! read back after the run; an SVID expired if its not-after came before the moment the next
//! one for the same entry was installed (or before the end of the run for the last one). The
//! wait for a signature is measured by a canary node of this benchmark that asks for one SVID
//! every 100 ms during the storm, through the same API as the agents.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use meshcert_agent::issuer::Issuer as _;
use meshcert_agent::keys::{KeyAlgorithm, PrivateKey};
use meshcert_protocol::SpiffeId;
use meshcert_protocol::api::{CsrRequest, Der, SignOutcome, SignRequest};

use crate::figures::{Samples, Table, ms};
use crate::process::{AgentProc, Bins, EntrySpec, Holder, cpu_time, logged_installs};

/// Sizes of the storm.
#[derive(Debug, Clone)]
pub struct Options {
    /// Agents (nodes).
    pub agents: usize,
    /// Entries per agent.
    pub entries: usize,
    /// The entries' TTL (humantime).
    pub ttl: String,
    /// How long the storm runs.
    pub duration: Duration,
}

/// One install read from an agent's log.
#[derive(Debug, Clone)]
struct Install {
    at: f64,
    not_after: f64,
}

fn installs(log: &str) -> BTreeMap<String, Vec<Install>> {
    let mut out: BTreeMap<String, Vec<Install>> = BTreeMap::new();
    for logged in logged_installs(log) {
        out.entry(logged.entry_id).or_default().push(Install {
            at: logged
                .at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            not_after: logged.not_after as f64,
        });
    }
    out
}

async fn canary(
    holder: &Holder,
    roots: &[Vec<u8>],
    stop: Arc<AtomicBool>,
) -> anyhow::Result<(Samples, u64)> {
    let (issuer, ..) =
        crate::node::attest(&holder.addr().to_string(), roots, holder.token("canary")?).await?;
    let id = SpiffeId::new("spiffe://mesh-a.test/bench/canary")?;
    let csr =
        meshcert_agent::csr::build(&PrivateKey::generate(KeyAlgorithm::EcdsaP256)?, Some(&id))?;
    let mut samples = Samples::new();
    let mut failures = 0;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = issuer
            .sign(SignRequest {
                csrs: vec![CsrRequest {
                    entry_id: "canary".into(),
                    csr: Der(csr.clone()),
                    local: None,
                }],
            })
            .await;
        match result {
            Ok(r)
                if matches!(
                    r.results.first().map(|r| &r.outcome),
                    Some(SignOutcome::Issued { .. })
                ) =>
            {
                samples.push(started.elapsed());
            }
            _ => failures += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((samples, failures))
}

/// Runs the storm and prints its table.
pub async fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let mut entries = vec![EntrySpec::for_node("canary", "canary", "1h")];
    for a in 0..opts.agents {
        for e in 0..opts.entries {
            let mut spec =
                EntrySpec::for_node(&format!("a{a}-e{e}"), &format!("node-{a}"), &opts.ttl);
            spec.path = format!("/bench/a{a}/e{e}");
            entries.push(spec);
        }
    }
    eprintln!(
        "storm: {} agents × {} entries, TTL {}, {:?}",
        opts.agents, opts.entries, opts.ttl, opts.duration
    );
    let holder = Holder::start(bins, &entries, "")?;
    let roots = holder.roots()?;
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = cpu_time(holder.pid())?;
    let issued_before = holder.issued()?;
    let started = Instant::now();
    let mut agents = Vec::new();
    for a in 0..opts.agents {
        agents.push(AgentProc::start(
            bins,
            &holder,
            &format!("node-{a}"),
            "",
            "info",
        )?);
    }
    let canary_task = {
        let stop = stop.clone();
        let holder_ref = &holder;
        let roots = roots.clone();
        async move { canary(holder_ref, &roots, stop).await }
    };
    let watch = async {
        let deadline = Instant::now() + opts.duration;
        while Instant::now() < deadline {
            for a in agents.iter_mut() {
                a.check_alive()?;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        stop.store(true, Ordering::Relaxed);
        anyhow::Ok(())
    };
    let (canary_result, watched) = tokio::join!(canary_task, watch);
    watched?;
    let mut agents_cpu = Duration::ZERO;
    for a in &agents {
        agents_cpu += cpu_time(a.pid())?;
    }
    let (waits, canary_failures) = canary_result.context("the canary node")?;
    let wall = started.elapsed();
    let cpu = cpu_time(holder.pid())?.saturating_sub(cpu_before);
    let signed = holder.issued()?.saturating_sub(issued_before);
    let end = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);

    let (mut rotations, mut expired, mut never) = (0u64, 0u64, 0u64);
    let mut min_margin = f64::INFINITY;
    for (a, agent) in agents.iter().enumerate() {
        let by_entry = installs(&agent.log());
        for e in 0..opts.entries {
            let id = format!("a{a}-e{e}");
            let Some(list) = by_entry.get(&id) else {
                never += 1;
                continue;
            };
            rotations += list.len().saturating_sub(1) as u64;
            for (i, install) in list.iter().enumerate() {
                let replaced_at = list.get(i + 1).map_or(end, |next| next.at);
                let margin = install.not_after - replaced_at;
                min_margin = min_margin.min(margin);
                if margin < 0.0 {
                    expired += 1;
                }
            }
        }
    }

    let mut table = Table::new(
        &format!(
            "Rotation storm: {} agents × {} entries, TTL {}, {:.0} s (target: no SVID expires)",
            opts.agents,
            opts.entries,
            opts.ttl,
            wall.as_secs_f64()
        ),
        &["figure", "value"],
    );
    table.row(vec![
        "SVIDs signed by the holder".into(),
        signed.to_string(),
    ]);
    table.row(vec![
        "rotations installed (after the first issue)".into(),
        rotations.to_string(),
    ]);
    table.row(vec![
        "holder CPU (s, and cores busy on average)".into(),
        format!(
            "{:.2} s, {:.2} cores",
            cpu.as_secs_f64(),
            cpu.as_secs_f64() / wall.as_secs_f64()
        ),
    ]);
    table.row(vec![
        format!(
            "agents' CPU, all {} (s, and cores busy on average)",
            opts.agents
        ),
        format!(
            "{:.2} s, {:.2} cores",
            agents_cpu.as_secs_f64(),
            agents_cpu.as_secs_f64() / wall.as_secs_f64()
        ),
    ]);
    table.row(vec![
        "holder CPU per SVID µs".into(),
        format!("{:.1}", cpu.as_secs_f64() * 1e6 / signed.max(1) as f64),
    ]);
    table.row(vec![
        "canary wait for a signature p50 / p99 / max ms".into(),
        format!(
            "{} / {} / {}",
            ms(waits.percentile(50.0)),
            ms(waits.percentile(99.0)),
            ms(waits.max())
        ),
    ]);
    table.row(vec![
        "canary requests failed".into(),
        canary_failures.to_string(),
    ]);
    table.row(vec!["entries never issued".into(), never.to_string()]);
    table.row(vec![
        "SVIDs expired before replacement".into(),
        expired.to_string(),
    ]);
    table.row(vec![
        "smallest margin before expiry s".into(),
        if min_margin.is_finite() {
            format!("{min_margin:.1}")
        } else {
            "-".into()
        },
    ]);
    table.note(
        "The storm includes the first issue of every entry (all agents start at once). Installs come from the agents' JSON logs \
         (`SVID installed`, log timestamps in µs, not-after in whole seconds).",
    );
    table.print();
    Ok(())
}
