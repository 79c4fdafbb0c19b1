//! meshcert benchmarks: each scenario drives real `meshcert-ca` and `meshcert-agent` processes
//! (or, for the Workload API, the agent's own server code on a real socket) and prints its
//! figures as a table on stdout. Nothing is asserted: these are measurements.
//!
//! ```text
//! cargo run --release -p meshcert-bench -- all
//! cargo run --release -p meshcert-bench -- signing --agents 1,8,64 --certs 65536
//! ```
//!
//! # Layout
//!
//! - `process`: the real processes, their CPU time and peak RSS.
//! - `figures`: percentiles and tables.
//! - `signing`, `issuance`, `memory`, `workload`, `storm`, `recovery`, `push`, `fleet`,
//!   `watchers`: one scenario each.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod figures;
mod fleet;
mod issuance;
mod memory;
mod node;
mod process;
mod push;
mod recovery;
mod signing;
mod storm;
mod watchers;
mod workload;

/// Benchmarks of meshcert: figures printed, never asserted.
#[derive(Debug, Parser)]
#[command(name = "meshcert-bench", version)]
struct Cli {
    /// Use the `meshcert-ca` and `meshcert-agent` binaries already built beside this one
    /// instead of building them first (with the same profile) through cargo.
    #[arg(long, global = true)]
    no_build: bool,
    /// Where agents' shared volumes go. The default is a tmpfs, as the agent's default volume
    /// `/run/meshcert/svids` is; give a disk folder to include disk fsyncs in the figures.
    #[arg(long, global = true, default_value = "/dev/shm")]
    volume_base: std::path::PathBuf,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Every scenario at its default size.
    All,
    /// 1. Holder signing throughput over mTLS vs the in-process ceiling.
    Signing(SigningArgs),
    /// 2. Issuance latency from agent start to files on disk.
    Issuance(IssuanceArgs),
    /// 3. Agent peak RSS after many rotations.
    Memory(MemoryArgs),
    /// 4. Workload API first-message and rotation latency.
    Workload(WorkloadArgs),
    /// 5. Rotation storm: many agents, many entries, short TTL, one holder.
    Storm(StormArgs),
    /// 6. Recovery: holder return → fresh SVIDs after an outage that outlived them.
    Recovery(RecoveryArgs),
    /// 7. Pushed changes: entry created on the holder → SVID on disk, watching vs interval sync.
    Push(PushArgs),
    /// 8. Fleet: simulated nodes (real mTLS clients) at an agent's intervals, one holder.
    Fleet(FleetArgs),
    /// 9. Idle watchers: many long polls held by one holder, then one change wakes them all.
    Watchers(WatchersArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct WatchersArgs {
    /// Long polls held open at once (10000 for the full figure).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Node identities the connections are spread over.
    #[arg(long, default_value_t = 20)]
    identities: usize,
    /// How long the connections idle while the holder's CPU is measured (at least 55 s to
    /// include one round of re-polls).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// TLS handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 32)]
    connect_concurrency: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct PushArgs {
    /// Entries created, one after the other.
    #[arg(long, default_value_t = 40)]
    entries: usize,
    /// Pause between two creations.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    gap: Duration,
}

#[derive(Debug, Clone, clap::Args)]
struct FleetArgs {
    /// Simulated nodes (10000 for the full fleet).
    #[arg(long, default_value_t = 200)]
    nodes: usize,
    /// Identities per node.
    #[arg(long, default_value_t = 10)]
    identities: usize,
    /// The identities' TTL.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Sync interval and heartbeat (the agent's defaults).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Time compression factor: intervals and the TTL the nodes reckon with are divided by it.
    #[arg(long, default_value_t = 60.0)]
    compress: f64,
    /// How long the fleet runs (real time).
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// 1: one holder on SQLite; 2: two replicas on a throwaway PostgreSQL, the first killed
    /// halfway through.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct SigningArgs {
    /// Concurrent agents, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 64])]
    agents: Vec<usize>,
    /// Certificates signed per run.
    #[arg(long, default_value_t = 16384)]
    certs: usize,
    /// CSRs per `/v1/sign` request (at most 256).
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Datastores to measure (`sqlite`, `postgres`), each with group commit off and on.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "sqlite")]
    datastore: Vec<signing::Datastore>,
}

#[derive(Debug, Clone, clap::Args)]
struct IssuanceArgs {
    /// Entries on the agent, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 100, 1000])]
    entries: Vec<usize>,
}

#[derive(Debug, Clone, clap::Args)]
struct MemoryArgs {
    /// Entries on the agent, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 100, 1000])]
    entries: Vec<usize>,
    /// Rotations per entry to reach (60: an hour of 1-minute rotations).
    #[arg(long, default_value_t = 60)]
    rotations: u64,
    /// Longest run per size.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    max_time: Duration,
    /// The entries' TTL (under 10 s: every SVID is due at once, rotations back to back).
    #[arg(long, default_value = "3s")]
    ttl: String,
}

#[derive(Debug, Clone, clap::Args)]
struct WorkloadArgs {
    /// Concurrent clients, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 64])]
    clients: Vec<usize>,
    /// First-message samples per run.
    #[arg(long, default_value_t = 640)]
    fetches: usize,
    /// Mean time between one client's new connections in the paced runs (each client waits
    /// a random, exponentially distributed time before each connect).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Rotations published per stream run.
    #[arg(long, default_value_t = 50)]
    rotations: usize,
    /// Rotations of a real agent's short-lived SVID watched on an open stream.
    #[arg(long, default_value_t = 10)]
    real_rotations: usize,
}

#[derive(Debug, Clone, clap::Args)]
struct StormArgs {
    /// Agents.
    #[arg(long, default_value_t = 10)]
    agents: usize,
    /// Entries per agent (1000 for the full storm).
    #[arg(long, default_value_t = 100)]
    entries: usize,
    /// The entries' TTL: 30 s lives 40 s (the holder backdates 10 s), rotated every ~20 s.
    #[arg(long, default_value = "30s")]
    ttl: String,
    /// How long the storm runs.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
}

#[derive(Debug, Clone, clap::Args)]
struct RecoveryArgs {
    /// Entries on one agent, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 100, 1000])]
    entries: Vec<usize>,
    /// Agents recovering at once in the fleet run (0: no fleet run).
    #[arg(long, default_value_t = 10)]
    fleet_agents: usize,
    /// Entries per agent in the fleet run.
    #[arg(long, default_value_t = 100)]
    fleet_entries: usize,
    /// The entries' TTL (20 s: rotated about 5 s after each issue, expired 20 s after it).
    #[arg(long, default_value = "20s")]
    ttl: String,
    /// How long the holder stays down after the last SVID expired.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    extra_outage: Duration,
}

fn defaults<T: clap::Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults"));
    let matches = cmd.get_matches_from(["defaults"]);
    T::from_arg_matches(&matches).expect("every argument has a default")
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut bins = process::Bins::locate(cli.no_build)?;
    bins.volume_base = Some(cli.volume_base.clone());
    let all = matches!(cli.scenario, Scenario::All);
    let signing_args = match &cli.scenario {
        Scenario::Signing(a) => Some(a.clone()),
        Scenario::All => Some(defaults::<SigningArgs>()),
        _ => None,
    };
    if let Some(a) = signing_args {
        signing::bench(
            &bins,
            &signing::Options {
                agents: a.agents,
                certs: a.certs,
                batch: a.batch.clamp(1, meshcert_protocol::api::MAX_BATCH),
                datastores: a.datastore,
            },
        )
        .await?;
    }
    let issuance_args = match &cli.scenario {
        Scenario::Issuance(a) => Some(a.clone()),
        _ if all => Some(defaults::<IssuanceArgs>()),
        _ => None,
    };
    if let Some(a) = issuance_args {
        let bins = bins.clone();
        tokio::task::spawn_blocking(move || issuance::bench(&bins, &a.entries)).await??;
    }
    let memory_args = match &cli.scenario {
        Scenario::Memory(a) => Some(a.clone()),
        _ if all => Some(defaults::<MemoryArgs>()),
        _ => None,
    };
    if let Some(a) = memory_args {
        let bins = bins.clone();
        let opts = memory::Options {
            sizes: a.entries,
            rotations: a.rotations,
            max_time: a.max_time,
            ttl: a.ttl,
        };
        tokio::task::spawn_blocking(move || memory::bench(&bins, &opts)).await??;
    }
    let workload_args = match &cli.scenario {
        Scenario::Workload(a) => Some(a.clone()),
        _ if all => Some(defaults::<WorkloadArgs>()),
        _ => None,
    };
    if let Some(a) = workload_args {
        workload::bench(
            &bins,
            &workload::Options {
                clients: a.clients,
                fetches: a.fetches,
                interval: a.interval,
                rotations: a.rotations,
                real_rotations: a.real_rotations,
            },
        )
        .await?;
    }
    let storm_args = match &cli.scenario {
        Scenario::Storm(a) => Some(a.clone()),
        _ if all => Some(defaults::<StormArgs>()),
        _ => None,
    };
    if let Some(a) = storm_args {
        storm::bench(
            &bins,
            &storm::Options {
                agents: a.agents,
                entries: a.entries,
                ttl: a.ttl,
                duration: a.duration,
            },
        )
        .await?;
    }
    if let Scenario::Fleet(a) = &cli.scenario {
        fleet::bench(
            &bins,
            &fleet::Options {
                nodes: a.nodes,
                identities: a.identities,
                ttl: a.ttl,
                interval: a.interval,
                compress: a.compress.max(1.0),
                duration: a.duration,
                replicas: a.replicas.clamp(1, 2),
            },
        )
        .await?;
    }
    if let Scenario::Watchers(a) = &cli.scenario {
        watchers::bench(
            &bins,
            &watchers::Options {
                connections: a.connections,
                identities: a.identities,
                idle: a.idle,
                connect_concurrency: a.connect_concurrency,
            },
        )
        .await?;
    }
    let recovery_args = match &cli.scenario {
        Scenario::Recovery(a) => Some(a.clone()),
        _ if all => Some(defaults::<RecoveryArgs>()),
        _ => None,
    };
    if let Some(a) = recovery_args {
        let bins = bins.clone();
        let opts = recovery::Options {
            entries: a.entries,
            fleet_agents: a.fleet_agents,
            fleet_entries: a.fleet_entries,
            ttl: a.ttl,
            extra_outage: a.extra_outage,
        };
        tokio::task::spawn_blocking(move || recovery::bench(&bins, &opts)).await??;
    }
    let push_args = match &cli.scenario {
        Scenario::Push(a) => Some(a.clone()),
        _ if all => Some(defaults::<PushArgs>()),
        _ => None,
    };
    if let Some(a) = push_args {
        let bins = bins.clone();
        let opts = push::Options {
            entries: a.entries,
            gap: a.gap,
        };
        tokio::task::spawn_blocking(move || push::bench(&bins, &opts)).await??;
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
