//! Scenario 7: pushed changes. One holder, two connected agents with default settings: one
//! watching the holder (`GET /v1/watch`, the default), one with `watchHolder: false` (the
//! interval sync, 30 s, as before pushed changes). Entries are created on the holder one by
//! one, each assigned to both nodes; measured per entry and agent: creation (the `entry create`
//! command returned) → the SVID on disk (the mtime of the entry's `..data` symlink).

use std::time::{Duration, SystemTime};

use crate::figures::{Samples, Table, ms};
use crate::process::{AgentProc, Bins, EntrySpec, Holder, link_time};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Entries created, one after the other.
    pub entries: usize,
    /// Pause between two creations.
    pub gap: Duration,
}

fn created(holder: &Holder, i: usize) -> anyhow::Result<SystemTime> {
    let uid = nix::unistd::geteuid().as_raw();
    let id = format!("push-{i}");
    let out = holder.ctl(&[
        "entry",
        "create",
        "--id",
        &id,
        "--spiffe-id",
        &format!("spiffe://mesh-a.test/bench/{id}"),
        "--node",
        "node-push",
        "--node",
        "node-poll",
        "--selector",
        &format!("unix:uid:{uid}"),
        "--dir",
        &id,
    ])?;
    anyhow::ensure!(
        out.status.success(),
        "entry create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(SystemTime::now())
}

/// Waits for every entry's files on `agent`; the latency of each from its creation.
fn latencies(agent: &mut AgentProc, made: &[SystemTime]) -> anyhow::Result<Samples> {
    let mut samples = Samples::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let mut pending: Vec<usize> = (0..made.len()).collect();
    while !pending.is_empty() {
        pending.retain(|&i| {
            match link_time(&agent.volume_dir().join(format!("push-{i}")).join("..data")) {
                Ok(at) => {
                    samples.push(at.duration_since(made[i]).unwrap_or_default());
                    false
                }
                Err(_) => true,
            }
        });
        agent.check_alive()?;
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} entries not on disk; log tail:\n{}",
            pending.len(),
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(samples)
}

/// Runs the scenario and prints the table.
pub fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let seed = [
        EntrySpec::for_node("seed-push", "node-push", "1h"),
        EntrySpec::for_node("seed-poll", "node-poll", "1h"),
    ];
    let holder = Holder::start(bins, &seed, "")?;
    let mut push = AgentProc::start(bins, &holder, "node-push", "", "info")?;
    let mut poll = AgentProc::start(bins, &holder, "node-poll", "watchHolder: false\n", "info")?;
    push.wait_all_installed(&["seed-push".to_owned()], Duration::from_secs(120))?;
    poll.wait_all_installed(&["seed-poll".to_owned()], Duration::from_secs(120))?;
    eprintln!(
        "push: creating {} entries, {:?} apart",
        opts.entries, opts.gap
    );
    let mut made = Vec::new();
    for i in 0..opts.entries {
        made.push(created(&holder, i)?);
        std::thread::sleep(opts.gap);
    }
    let pushed = latencies(&mut push, &made)?;
    let polled = latencies(&mut poll, &made)?;
    let mut table = Table::new(
        "Pushed changes: entry created on the holder → SVID on disk on a connected node (default settings)",
        &["agent", "entries", "p50 ms", "p99 ms", "max ms"],
    );
    for (name, s) in [
        ("watching the holder (default)", &pushed),
        (
            "interval sync only (watchHolder: false, syncInterval 30 s)",
            &polled,
        ),
    ] {
        table.row(vec![
            name.to_owned(),
            s.len().to_string(),
            ms(s.percentile(50.0)),
            ms(s.percentile(99.0)),
            ms(s.max()),
        ]);
    }
    table.note(
        "Both agents run at once against one holder; each entry is assigned to both nodes. Creation is the moment \
         `meshcert-ca entry create` returned; on disk is the mtime of the entry's `..data` symlink. The watching agent syncs \
         as soon as the holder's long poll answers, then signs the entry (key generation, CSR, one signing round, atomic \
         write); the other waits for its next sync, up to `syncInterval`.",
    );
    table.note(bins.volume_note());
    table.print();
    Ok(())
}
