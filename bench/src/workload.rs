//! Scenario 4: the Workload API. Time to the first `FetchX509SVID` message for a new client
//! (connect included) with 1 and 64 concurrent clients, and the time from a published rotation
//! to the update on open streams (`FetchX509SVID`, and Envoy's SDS `StreamSecrets`).
//!
//! The server is the agent's own Workload API (`meshcert_agent::workload::serve`) on a real
//! Unix socket in this process, fed by the agent's [`CacheWriter`] with SVIDs made here; the
//! clients are the upstream `spiffe` crate. The per-uid rate limit is raised for the run (every
//! client here has the same uid); everything else is the agent's default.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use meshcert_agent::cache::{CacheWriter, Snapshot};
use meshcert_agent::workload::{self, WorkloadConfig};
use meshcert_protocol::Selector;
use meshcert_tests::pki::TestPki;
use spiffe::WorkloadApiClient;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::StreamExt as _;

use crate::figures::{Samples, Table, ms};
use crate::process::{AgentProc, Bins, EntrySpec, Holder, logged_installs};

/// How long any single wait may take.
const PATIENCE: Duration = Duration::from_secs(30);

/// Sizes of the Workload API scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// Concurrent clients, one run each.
    pub clients: Vec<usize>,
    /// First-message samples per run (spread over the clients).
    pub fetches: usize,
    /// Mean time between one client's connects in the paced runs.
    pub interval: Duration,
    /// Rotations published per stream run.
    pub rotations: usize,
    /// Rotations of the real agent watched on one stream.
    pub real_rotations: usize,
}

/// The snapshot of bundle `version`: a fresh SVID for `spiffe://bench.test/web`, served to
/// this process's uid (every client here).
fn snapshot(pki: &TestPki, version: u64) -> anyhow::Result<Snapshot> {
    let me = Selector::Uid(nix::unistd::geteuid().as_raw());
    let web = pki.svid("spiffe://bench.test/web", &[me], "")?;
    Ok(Snapshot {
        bundle_version: version,
        ..pki.snapshot(&[&web])
    })
}

/// How the clients of a first-message run start their connections.
#[derive(Debug, Clone, Copy)]
enum Pacing {
    /// All clients start at the same instant and connect again as soon as they have their
    /// answer: they are always queued behind each other.
    AllAtOnce,
    /// Each client pauses a random time (exponential, this mean) before each connection, so
    /// clients overlap the way independent workloads do.
    Random(Duration),
}

/// `per_client` new clients in a row on each of `clients` tasks, started as `pacing` says: the
/// time from connecting to the first message, each.
async fn first_messages(
    endpoint: &str,
    clients: usize,
    per_client: usize,
    pacing: Pacing,
) -> anyhow::Result<Samples> {
    let barrier = Arc::new(tokio::sync::Barrier::new(clients));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let endpoint = endpoint.to_owned();
        let barrier = barrier.clone();
        tasks.spawn(async move {
            let mut rng = fastrand::Rng::new();
            let mut samples = Samples::new();
            barrier.wait().await;
            for _ in 0..per_client {
                if let Pacing::Random(mean) = pacing {
                    // 1 - U lies in (0, 1]: its logarithm is finite.
                    let pause = -(1.0 - rng.f64()).ln() * mean.as_secs_f64();
                    tokio::time::sleep(Duration::from_secs_f64(pause)).await;
                }
                let started = Instant::now();
                let client = WorkloadApiClient::connect_to(&endpoint).await?;
                client.fetch_x509_svid().await?;
                samples.push(started.elapsed());
            }
            anyhow::Ok(samples)
        });
    }
    let mut all = Samples::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done??);
    }
    Ok(all)
}

/// `streams` open streams; `rotations` snapshots published one after another: the time from
/// each publish to its arrival on each stream.
async fn rotation_updates(
    endpoint: &str,
    writer: &CacheWriter,
    pki: &TestPki,
    streams: usize,
    rotations: usize,
) -> anyhow::Result<Samples> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let endpoint = endpoint.to_owned();
        let tx = tx.clone();
        let ready = ready_tx.clone();
        tasks.spawn(async move {
            let client = WorkloadApiClient::connect_to(&endpoint).await?;
            let mut stream = client.stream_x509_svids().await?;
            // The first message is the current SVID.
            stream.next().await.context("stream ended")??;
            let _ = ready.send(());
            while let Some(update) = stream.next().await {
                update?;
                if tx.send(Instant::now()).is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        });
    }
    drop(tx);
    let rotations = Rotations {
        streams,
        count: rotations,
        first_version: 2,
    };
    let samples = rotations
        .time(writer, pki, &mut ready_rx, &mut rx, "X.509")
        .await;
    tasks.abort_all();
    samples
}

/// `streams` open SDS streams (Envoy's client and messages, resource `default`), ACKing every
/// response; `rotations` snapshots published one after another: the time from each publish to
/// the new version's arrival on each stream.
async fn sds_rotation_updates(
    endpoint: &str,
    writer: &CacheWriter,
    pki: &TestPki,
    streams: usize,
    rotations: usize,
) -> anyhow::Result<Samples> {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let endpoint = spiffe::transport::Endpoint::parse(endpoint)?;
        let (tx, ready) = (tx.clone(), ready_tx.clone());
        tasks.spawn(async move {
            let channel = spiffe::transport::connect(&endpoint).await?;
            let mut client = SecretDiscoveryServiceClient::new(channel);
            let (requests, outgoing) = tokio::sync::mpsc::unbounded_channel();
            let ask = |version: String, nonce: String| DiscoveryRequest {
                version_info: version,
                resource_names: vec!["default".into()],
                response_nonce: nonce,
                ..Default::default()
            };
            requests.send(ask(String::new(), String::new()))?;
            let outgoing = tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing);
            let mut responses = client.stream_secrets(outgoing).await?.into_inner();
            let mut first = true;
            while let Some(response) = responses.message().await? {
                let arrived = Instant::now();
                requests.send(ask(response.version_info, response.nonce))?;
                if first {
                    first = false;
                    let _ = ready.send(());
                } else if tx.send(arrived).is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        });
    }
    drop(tx);
    let rotations = Rotations {
        streams,
        count: rotations,
        first_version: 1000,
    };
    let samples = rotations
        .time(writer, pki, &mut ready_rx, &mut rx, "SDS")
        .await;
    tasks.abort_all();
    samples
}

/// Rotations published to `streams` open streams, one after another, from `first_version`.
struct Rotations {
    streams: usize,
    count: usize,
    first_version: u64,
}

impl Rotations {
    /// Once every stream said it is open (`ready`), publishes each rotation and takes the time
    /// from the publish to its arrival on each stream (`arrivals`, one per stream and rotation).
    async fn time(
        &self,
        writer: &CacheWriter,
        pki: &TestPki,
        ready: &mut UnboundedReceiver<()>,
        arrivals: &mut UnboundedReceiver<Instant>,
        kind: &str,
    ) -> anyhow::Result<Samples> {
        for _ in 0..self.streams {
            tokio::time::timeout(PATIENCE, ready.recv())
                .await
                .with_context(|| format!("an {kind} stream did not open"))?;
        }
        let mut samples = Samples::new();
        for version in 0..self.count {
            let snapshot = snapshot(pki, version as u64 + self.first_version)?;
            let published = Instant::now();
            writer.publish(snapshot);
            for _ in 0..self.streams {
                let arrived = tokio::time::timeout(PATIENCE, arrivals.recv())
                    .await
                    .with_context(|| format!("an {kind} update did not arrive"))?
                    .with_context(|| format!("an {kind} stream ended"))?;
                samples.push(arrived.saturating_duration_since(published));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(samples)
    }
}

/// Against a real agent process (default limits): `fetches` new clients one after another,
/// then `rotations` rotations of a short-lived SVID watched on one open stream, each timed from
/// the agent's log line of its install (files on disk, `..data` swapped) to its arrival on the
/// stream.
async fn real_agent(
    bins: &Bins,
    fetches: usize,
    rotations: usize,
) -> anyhow::Result<(Samples, Samples)> {
    // 14 s lives 24 s (backdated 10 s): rotated about every 2 s.
    let holder = Holder::start(bins, &[EntrySpec::for_node("web", "node-1", "14s")], "")?;
    // `info`: the `SVID installed` lines time the installs.
    let mut agent = AgentProc::start(bins, &holder, "node-1", "", "info")?;
    agent.wait_all_installed(&["web".to_owned()], PATIENCE)?;
    let endpoint = format!("unix://{}", agent.workload_socket().display());
    let first = first_messages(&endpoint, 1, fetches, Pacing::AllAtOnce).await?;
    let client = WorkloadApiClient::connect_to(&endpoint).await?;
    let mut stream = client.stream_x509_svids().await?;
    stream.next().await.context("stream ended")??;
    let mut arrivals = Vec::new();
    while arrivals.len() < rotations {
        agent.check_alive()?;
        let next = tokio::time::timeout(PATIENCE, stream.next())
            .await
            .context("no rotation reached the stream")?
            .context("the stream ended")??;
        let arrived = SystemTime::now();
        let serial = meshcert_agent::svid::leaf_info(next.leaf().as_bytes())?.serial;
        arrivals.push((serial, arrived));
    }
    // Timed from the agent's own log line, written once the files are on disk: the `..data`
    // symlink's mtime would do, but tmpfs timestamps come from a coarse clock and lag by up
    // to a few ms here.
    let installs = logged_installs(&agent.log());
    let mut updates = Samples::new();
    for (serial, arrived) in arrivals {
        if let Some(install) = installs.iter().find(|i| *i.serial == *serial) {
            updates.push(arrived.duration_since(install.at).unwrap_or_default());
        }
    }
    Ok((first, updates))
}

/// Runs the scenario and prints its table.
pub async fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let pki = TestPki::new("bench.test")?;
    let writer = CacheWriter::new();
    writer.publish(snapshot(&pki, 1)?);
    let dir = tempfile::tempdir()?;
    let config = WorkloadConfig {
        socket: dir.path().join("workload.sock"),
        rate_per_uid: 1e9,
        burst_per_uid: u32::MAX,
        ..WorkloadConfig::default()
    };
    let listener = workload::bind(&config)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(workload::serve(
        listener,
        config.clone(),
        writer.reader(),
        async {
            let _ = stopped.await;
        },
    ));
    let endpoint = format!("unix://{}", config.socket.display());

    // Warm up (first connection, lazy statics).
    first_messages(&endpoint, 1, 5, Pacing::AllAtOnce).await?;

    let mut table = Table::new(
        "Workload API: new client → first FetchX509SVID message, and published rotation → update on open streams (target p99 < 1 ms)",
        &["what", "clients", "samples", "p50 ms", "p99 ms", "max ms"],
    );
    for &clients in &opts.clients {
        eprintln!("workload: {clients} clients, first message");
        let per_client = opts.fetches.div_ceil(clients).max(1);
        let paced = first_messages(
            &endpoint,
            clients,
            per_client,
            Pacing::Random(opts.interval),
        )
        .await?;
        let rate = clients as f64 / opts.interval.as_secs_f64();
        let burst = first_messages(&endpoint, clients, per_client, Pacing::AllAtOnce).await?;
        for (what, s) in [
            (
                format!(
                    "first message, each client every ~{} ({rate:.0} connects/s)",
                    humantime::format_duration(opts.interval)
                ),
                paced,
            ),
            (
                "first message, all clients at once, back to back".to_owned(),
                burst,
            ),
        ] {
            table.row(vec![
                what,
                clients.to_string(),
                s.len().to_string(),
                ms(s.percentile(50.0)),
                ms(s.percentile(99.0)),
                ms(s.max()),
            ]);
        }
    }
    for &clients in &opts.clients {
        eprintln!("workload: {clients} open streams, rotations");
        let s = rotation_updates(&endpoint, &writer, &pki, clients, opts.rotations).await?;
        table.row(vec![
            "rotation → stream".into(),
            clients.to_string(),
            s.len().to_string(),
            ms(s.percentile(50.0)),
            ms(s.percentile(99.0)),
            ms(s.max()),
        ]);
        eprintln!("workload: {clients} open SDS streams, rotations");
        let s = sds_rotation_updates(&endpoint, &writer, &pki, clients, opts.rotations).await?;
        table.row(vec![
            "rotation → SDS stream (new version)".into(),
            clients.to_string(),
            s.len().to_string(),
            ms(s.percentile(50.0)),
            ms(s.percentile(99.0)),
            ms(s.max()),
        ]);
    }
    eprintln!("workload: real agent");
    let (first, updates) = real_agent(bins, opts.fetches.min(90), opts.real_rotations).await?;
    for (what, s) in [
        ("first message, real agent", first),
        ("installed rotation → stream, real agent", updates),
    ] {
        table.row(vec![
            what.into(),
            "1".into(),
            s.len().to_string(),
            ms(s.percentile(50.0)),
            ms(s.percentile(99.0)),
            ms(s.max()),
        ]);
    }
    table.note(
        "\"first message\" = connect (new gRPC channel over the Unix socket, kernel peer attestation) + FetchX509SVID until the \
         first response is parsed by the upstream `spiffe` client. Clients and server share this process and its 2 cores. \
         \"every ~T\": each client pauses a random time (exponential, mean T) before each new connection, so clients overlap as \
         independent workloads do. \"all at once, back to back\": every client starts at the same instant and connects again as \
         soon as it has its answer, so the clients are always queued behind each other: p50 ≈ clients × the CPU time of one \
         connect (client + server) / cores. \
         \"rotation → stream\" = CacheWriter::publish (what the rotator calls once an install is on disk) until the new SVID is parsed \
         on each open stream; \"SDS stream\": the same until Envoy's client has the new version of `default` (each response ACKed). \"real agent\" rows: a meshcert-agent process with its default limits (20 calls/s per uid, burst 100, \
         so at most 90 sequential clients); the rotation is timed from the agent's `SVID installed` log line (written once the files are on disk) to the \
         moment the new SVID is parsed on the open stream.",
    );
    table.print();
    let _ = stop.send(());
    let _ = tokio::time::timeout(PATIENCE, server).await;
    Ok(())
}
