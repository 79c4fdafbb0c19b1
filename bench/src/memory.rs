//! Scenario 3: the agent's peak resident memory (`VmHWM` of the real process) with several
//! numbers of entries, after many rotations at a short TTL.
//!
//! The holder backdates every SVID by 10 s and the agent rotates at half of the lifetime, so
//! a TTL under 10 s makes every SVID due the moment it is installed: the agent rotates every
//! entry back to back, as fast as it and the holder can. The run stops once every entry has
//! been rotated `rotations` times on average (an hour of 1-minute rotations is 60) or after
//! `max_time`, and prints how many rotations were reached.

use std::time::{Duration, Instant};

use crate::figures::{Table, mb};
use crate::process::{AgentProc, Bins, EntrySpec, Holder, cpu_time, memory};

/// Sizes of the memory scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// Entries per run.
    pub sizes: Vec<usize>,
    /// Rotations per entry to reach.
    pub rotations: u64,
    /// Longest run per size.
    pub max_time: Duration,
    /// The entries' TTL (humantime).
    pub ttl: String,
}

/// Runs the scenario and prints its table.
pub fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let mut table = Table::new(
        &format!(
            "Agent peak RSS after rotations at TTL {} (target ≤ 10 MB at 100 entries, ≤ 16 MB at 1000)",
            opts.ttl
        ),
        &[
            "entries",
            "RSS after first issue MB",
            "rotations",
            "per entry",
            "run s",
            "agent CPU ms/rotation",
            "peak RSS (VmHWM) MB",
            "RSS at end MB",
            "anon MB",
            "file MB",
            "threads",
        ],
    );
    for &n in &opts.sizes {
        eprintln!("memory: {n} entries");
        let ids: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
        let entries: Vec<EntrySpec> = ids
            .iter()
            .map(|id| EntrySpec::for_node(id, "node-1", &opts.ttl))
            .collect();
        let holder = Holder::start(bins, &entries, "")?;
        let mut agent = AgentProc::start(bins, &holder, "node-1", "", "warn")?;
        agent.wait_all_installed(&ids, Duration::from_secs(600))?;
        let first = memory(agent.pid())?;
        let base = holder.issued()?;
        let cpu_before = cpu_time(agent.pid())?;
        let started = Instant::now();
        let goal = opts.rotations * n as u64;
        let mut rotations = 0;
        while started.elapsed() < opts.max_time {
            agent.check_alive()?;
            rotations = holder.issued()?.saturating_sub(base);
            if rotations >= goal {
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let run = started.elapsed();
        let end = memory(agent.pid())?;
        let cpu = cpu_time(agent.pid())?.saturating_sub(cpu_before);
        table.row(vec![
            n.to_string(),
            mb(first.rss),
            rotations.to_string(),
            format!("{:.1}", rotations as f64 / n as f64),
            format!("{:.0}", run.as_secs_f64()),
            format!(
                "{:.2}",
                cpu.as_secs_f64() * 1000.0 / rotations.max(1) as f64
            ),
            mb(end.peak),
            mb(end.rss),
            mb(end.anon),
            mb(end.file),
            end.threads.to_string(),
        ]);
    }
    table.note(
        "Rotations are counted by the holder (SVIDs it signed for the node after the first issue of every entry). \
         MB = 10^6 bytes; VmHWM is the kernel's high-water mark of the process's resident set. At the end of the run the \
         resident set splits into anonymous memory (heap, stacks: RssAnon) and file-backed pages (mostly the agent's own \
         7 MB of machine code, mapped by fault-around, shared and reclaimable: RssFile); threads = the runtime's workers plus \
         its blocking pool (key generation, volume writes).",
    );
    table.note(bins.volume_note());
    table.print();
    Ok(())
}
