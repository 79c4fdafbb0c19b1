//! Scenario 6: recovery after a holder outage. Agents get their entries (short TTL), the
//! holder is killed with -9 and stays down until every SVID has expired, then comes back on
//! the same state and address. Measured: the time from the holder's return (it answers again)
//! to fresh SVIDs on disk for every entry, beside a baseline from the same run: the first
//! issuance of the same entries by the same agents with the holder up.
//!
//! An entry's files are fresh when its `..data` symlink is swapped in after the return; the
//! symlink's own modification time says when, so no polling resolution enters the figures.

use std::time::{Duration, SystemTime};

use crate::figures::{Samples, Table, ms};
use crate::process::{AgentProc, Bins, EntrySpec, Holder, link_time, logged_installs};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Entries on one agent, one run each.
    pub entries: Vec<usize>,
    /// Agents of the fleet run (all recovering at once).
    pub fleet_agents: usize,
    /// Entries per agent in the fleet run.
    pub fleet_entries: usize,
    /// The entries' TTL (humantime): every SVID expires this long after its issue.
    pub ttl: String,
    /// How long the holder stays down after the last SVID expired.
    pub extra_outage: Duration,
}

/// The figures of one run.
struct Run {
    agents: usize,
    entries: usize,
    baseline_last: Duration,
    outage: Duration,
    fresh: Samples,
}

fn ids(agent: usize, entries: usize) -> Vec<String> {
    (0..entries).map(|e| format!("a{agent}-e{e}")).collect()
}

/// One run: `agents` agents with `entries` entries each.
fn run(bins: &Bins, opts: &Options, agents: usize, entries: usize) -> anyhow::Result<Run> {
    eprintln!(
        "recovery: {agents} agent(s) × {entries} entries, TTL {}",
        opts.ttl
    );
    let mut specs = Vec::new();
    for a in 0..agents {
        for id in ids(a, entries) {
            specs.push(EntrySpec::for_node(&id, &format!("node-{a}"), &opts.ttl));
        }
    }
    let mut holder = Holder::start(bins, &specs, "")?;
    let mut procs = Vec::new();
    for a in 0..agents {
        procs.push(AgentProc::start(
            bins,
            &holder,
            &format!("node-{a}"),
            "",
            "info",
        )?);
    }
    // Baseline: the first issuance, from each agent's start to its last entry on disk.
    let mut baseline_last = Duration::ZERO;
    for (a, p) in procs.iter_mut().enumerate() {
        let list = ids(a, entries);
        p.wait_all_installed(&list, Duration::from_secs(600))?;
        for id in &list {
            let at = link_time(&p.volume_dir().join(id).join("..data"))?;
            baseline_last = baseline_last.max(at.duration_since(p.started).unwrap_or_default());
        }
    }

    holder.kill9();
    let down_at = SystemTime::now();
    // Down until the last SVID issued has expired, and a little more.
    let last_not_after = procs
        .iter()
        .flat_map(|p| logged_installs(&p.log()))
        .map(|i| i.not_after)
        .max()
        .unwrap_or(0);
    let expired_at = SystemTime::UNIX_EPOCH + Duration::from_secs(last_not_after + 1);
    let up_at = expired_at + opts.extra_outage;
    if let Ok(wait) = up_at.duration_since(SystemTime::now()) {
        std::thread::sleep(wait);
    }
    for p in &mut procs {
        p.check_alive()?;
    }
    let restarted_at = SystemTime::now();
    let back = holder.restart()?;
    let outage = back.duration_since(down_at).unwrap_or_default();

    let mut fresh = Samples::new();
    for (a, p) in procs.iter_mut().enumerate() {
        let list = ids(a, entries);
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        let mut pending = list.clone();
        while !pending.is_empty() {
            pending.retain(
                |id| match link_time(&p.volume_dir().join(id).join("..data")) {
                    Ok(at) if at > restarted_at => {
                        fresh.push(at.duration_since(back).unwrap_or_default());
                        false
                    }
                    _ => true,
                },
            );
            p.check_alive()?;
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{} entries of node-{a} not fresh after the holder's return; log tail:\n{}",
                pending.len(),
                p.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Run {
        agents,
        entries,
        baseline_last,
        outage,
        fresh,
    })
}

/// Runs every size and prints the table.
pub fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for &n in &opts.entries {
        runs.push(run(bins, opts, 1, n)?);
    }
    if opts.fleet_agents > 0 {
        runs.push(run(bins, opts, opts.fleet_agents, opts.fleet_entries)?);
    }
    let mut table = Table::new(
        &format!(
            "Recovery after a holder outage: holder return → fresh SVIDs on disk (TTL {}, every SVID expired during the outage)",
            opts.ttl
        ),
        &[
            "agents × entries",
            "outage s",
            "first fresh ms",
            "p50 ms",
            "all fresh ms",
            "baseline: first issuance, all on disk ms",
        ],
    );
    for r in &runs {
        let first = r.fresh.percentile(0.0);
        table.row(vec![
            format!("{} × {}", r.agents, r.entries),
            format!("{:.0}", r.outage.as_secs_f64()),
            ms(first),
            ms(r.fresh.percentile(50.0)),
            ms(r.fresh.max()),
            ms(r.baseline_last),
        ]);
    }
    table.note(
        "The holder is killed with -9 once every entry is issued, stays down until every SVID has expired, and comes back on \
         the same state and port; \"return\" is the moment its API port accepts a connection again. Each entry's time is the mtime of its \
         `..data` symlink minus that moment. While the holder is down an agent with something due probes it every 2 to 4 s \
         (jittered), so the first fresh SVID comes on average about 3 s after the return; the rest is signing. Baseline: \
         from the agent's start (join included) to its last entry on disk, in the same run with the holder up.",
    );
    table.note(bins.volume_note());
    table.print();
    Ok(())
}
