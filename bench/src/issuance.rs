//! Scenario 2: issuance latency, from the agent's start to each entry's files on disk, for
//! several numbers of entries on one agent. An entry's files are on disk when its `..data`
//! symlink is swapped in; the symlink's own modification time says when that happened, so no
//! polling resolution enters the figures.

use std::time::Duration;

use crate::figures::{Samples, Table, ms};
use crate::process::{AgentProc, Bins, EntrySpec, Holder, link_time};

/// Runs the scenario for each size and prints its table.
pub fn bench(bins: &Bins, sizes: &[usize]) -> anyhow::Result<()> {
    let mut table = Table::new(
        "Issuance latency: agent start → files on disk (one agent, ECDSA P-256, default rotation settings)",
        &[
            "entries",
            "joined ms",
            "p50 ms",
            "p99 ms",
            "last ms",
            "SVIDs/s (first to last)",
        ],
    );
    for &n in sizes {
        eprintln!("issuance: {n} entries");
        let ids: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
        let entries: Vec<EntrySpec> = ids
            .iter()
            .map(|id| EntrySpec::for_node(id, "node-1", "1h"))
            .collect();
        let holder = Holder::start(bins, &entries, "")?;
        let mut agent = AgentProc::start(bins, &holder, "node-1", "", "warn")?;
        agent.wait_all_installed(&ids, Duration::from_secs(600))?;
        let joined = link_time(&agent.state_dir().join("node.pem"))
            .ok()
            .and_then(|t| t.duration_since(agent.started).ok())
            .unwrap_or_default();
        let mut samples = Samples::new();
        let mut first = Duration::MAX;
        for id in &ids {
            let at = link_time(&agent.volume_dir().join(id).join("..data"))?;
            let d = at.duration_since(agent.started).unwrap_or_default();
            first = first.min(d);
            samples.push(d);
        }
        let last = samples.max();
        let spread = last.saturating_sub(first);
        let throughput = if spread.is_zero() {
            "-".to_owned()
        } else {
            format!("{:.0}", (n.saturating_sub(1)) as f64 / spread.as_secs_f64())
        };
        table.row(vec![
            n.to_string(),
            ms(joined),
            ms(samples.percentile(50.0)),
            ms(samples.percentile(99.0)),
            ms(last),
            throughput,
        ]);
    }
    table.note(
        "\"joined\": node.pem written (process start, join token attestation included). Each entry's time is the mtime of its \
         `..data` symlink minus the moment just before the process was spawned; p50/p99 are over the entries.",
    );
    table.note(bins.volume_note());
    table.print();
    Ok(())
}
