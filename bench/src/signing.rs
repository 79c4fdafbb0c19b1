//! Scenario 1: the holder's signing throughput through the real mTLS API with batching, at
//! several numbers of concurrent agents, against the in-process ceiling (CSR verification and
//! signing through the `meshcert_ca` library only) measured in the same run.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use meshcert_agent::issuer::{HttpsIssuer, Issuer as _};
use meshcert_agent::keys::{KeyAlgorithm, PrivateKey};
use meshcert_ca::authority::Authority;
use meshcert_ca::config::{Mesh, MeshType, RootSource};
use meshcert_protocol::api::{CsrRequest, Der, SignOutcome, SignRequest};
use meshcert_protocol::{SpiffeId, TrustDomain};

use crate::figures::{Table, rate, us};
use crate::process::{Bins, EntrySpec, Holder, cpu_time};

/// The entry every benchmark node may sign for (assigned to the whole mesh).
const ENTRY: &str = "bench";

/// Sizes of the signing scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// Concurrent agents, one run each.
    pub agents: Vec<usize>,
    /// Certificates signed per run.
    pub certs: usize,
    /// CSRs per `/v1/sign` request.
    pub batch: usize,
    /// The datastores to measure, each with group commit off (the baseline) and on.
    pub datastores: Vec<Datastore>,
}

/// A holder datastore to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Datastore {
    /// SQLite in the holder's state folder (the default).
    Sqlite,
    /// A throwaway PostgreSQL cluster started by the benchmark (Unix socket, fsync on).
    Postgres,
}

/// Where the holders of one run keep their data.
pub(crate) struct Backend {
    cluster: Option<meshcert_tests::postgres::Cluster>,
    keys: tempfile::TempDir,
    databases: usize,
}

impl Backend {
    pub(crate) fn new(datastores: &[Datastore]) -> anyhow::Result<Self> {
        let keys = tempfile::tempdir()?;
        meshcert_tests::postgres::write_kek(&keys.path().join("kek"))?;
        let cluster = datastores
            .contains(&Datastore::Postgres)
            .then(meshcert_tests::postgres::Cluster::start);
        Ok(Self {
            cluster,
            keys,
            databases: 0,
        })
    }

    /// The `holder:` lines for a fresh datastore of this kind.
    pub(crate) fn holder_yaml(&mut self, datastore: Datastore) -> anyhow::Result<String> {
        let Some(cluster) = self
            .cluster
            .as_ref()
            .filter(|_| datastore == Datastore::Postgres)
        else {
            return Ok(String::new());
        };
        self.databases += 1;
        let url = cluster.create_database(&format!("bench{}", self.databases));
        Ok(format!(
            "  datastore: \"{url}\"\n  keyEncryptionKeyFile: {}\n",
            self.keys.path().join("kek").display()
        ))
    }
}

/// CSRs made before any timing: the agents' key generation is not the holder's cost.
fn make_csrs(n: usize, id: &SpiffeId) -> anyhow::Result<Vec<Vec<u8>>> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let count = per.min(n.saturating_sub(t * per));
                s.spawn(move || -> anyhow::Result<Vec<Vec<u8>>> {
                    (0..count)
                        .map(|_| {
                            let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256)?;
                            Ok(meshcert_agent::csr::build(&key, Some(id))?)
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(n);
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("CSR thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// CSR verification + leaf signing with the holder's own code, on `threads` threads.
fn ceiling(csrs: &[Vec<u8>], id: &SpiffeId, threads: usize) -> anyhow::Result<(f64, Duration)> {
    let dir = tempfile::tempdir()?;
    let now = SystemTime::now();
    let meshes = [Mesh {
        name: "mesh-a".into(),
        trust_domain: TrustDomain::new("mesh-a.test")?,
        mesh_type: MeshType::Generic,
    }];
    let source = RootSource::Builtin {
        ttl_days: 30,
        rsa_bits: 2048,
        org_name: "meshcert-bench".into(),
    };
    let authority = Authority::open(&source, "meshcert bench", &meshes, dir.path(), now)?;
    let ttl = Duration::from_secs(3600);
    let per = csrs.len().div_ceil(threads);
    let started = Instant::now();
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = csrs
            .chunks(per)
            .map(|chunk| {
                let authority = &authority;
                s.spawn(move || -> anyhow::Result<()> {
                    for der in chunk {
                        let checked = meshcert_ca::policy::check_csr(der)
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        authority.sign_leaf("mesh-a", &checked.key, id, ttl, ttl, now)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("signing thread panicked"))??;
        }
        Ok(())
    })?;
    let elapsed = started.elapsed();
    Ok((rate(csrs.len() as u64, elapsed), elapsed))
}

/// A benchmark node: a real agent's HTTPS client, attested with a join token.
async fn node(holder: &Holder, name: &str, roots: &[Vec<u8>]) -> anyhow::Result<HttpsIssuer> {
    let (issuer, ..) =
        crate::node::attest(&holder.addr().to_string(), roots, holder.token(name)?).await?;
    Ok(issuer)
}

/// One run: `agents` nodes signing `csrs` in batches at once. Returns (signed, refused, wall).
async fn run(
    nodes: &[Arc<HttpsIssuer>],
    csrs: &Arc<Vec<Vec<u8>>>,
    batch: usize,
) -> anyhow::Result<(u64, u64, Duration)> {
    let batches: Vec<(usize, usize)> = (0..csrs.len())
        .step_by(batch)
        .map(|start| (start, (start + batch).min(csrs.len())))
        .collect();
    let mut per_node: Vec<Vec<(usize, usize)>> = vec![Vec::new(); nodes.len()];
    for (i, b) in batches.into_iter().enumerate() {
        per_node[i % nodes.len()].push(b);
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (node, work) in nodes.iter().zip(per_node) {
        let node = node.clone();
        let csrs = csrs.clone();
        tasks.spawn(async move {
            let (mut ok, mut refused) = (0u64, 0u64);
            for (start, end) in work {
                let request = SignRequest {
                    csrs: csrs[start..end]
                        .iter()
                        .map(|c| CsrRequest {
                            entry_id: ENTRY.into(),
                            csr: Der(c.clone()),
                            local: None,
                        })
                        .collect(),
                };
                let answer = node.sign(request).await?;
                for r in answer.results {
                    match r.outcome {
                        SignOutcome::Issued { .. } => ok += 1,
                        SignOutcome::Refused { .. } => refused += 1,
                    }
                }
            }
            anyhow::Ok((ok, refused))
        });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        let (o, r) = done??;
        ok += o;
        refused += r;
    }
    Ok((ok, refused, started.elapsed()))
}

/// Runs the scenario and prints its table.
pub async fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let id = SpiffeId::new(&format!("spiffe://mesh-a.test/{ENTRY}"))?;
    eprintln!("signing: generating {} CSRs", opts.certs);
    let csrs = Arc::new(make_csrs(opts.certs, &id)?);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!("signing: in-process ceiling");
    let (ceiling_1, _) = ceiling(&csrs, &id, 1)?;
    let (ceiling_n, _) = ceiling(&csrs, &id, threads)?;

    let mut table = Table::new(
        &format!(
            "Holder signing throughput over mTLS (batches of {}, {} ECDSA P-256 CSRs per run)",
            opts.batch, opts.certs
        ),
        &[
            "datastore",
            "group commit",
            "agents",
            "signed",
            "refused",
            "wall s",
            "SVIDs/s",
            "holder CPU µs/SVID",
            "holder cores busy",
            "vs ceiling",
        ],
    );
    let mut backend = Backend::new(&opts.datastores)?;
    for &datastore in &opts.datastores {
        for group in [false, true] {
            let mut bins = bins.clone();
            if !group {
                bins.holder_env.push((
                    meshcert_ca::store::GROUP_COMMIT_ENV.to_owned(),
                    "off".to_owned(),
                ));
            }
            let label = [
                format!("{datastore:?}").to_lowercase(),
                if group { "on" } else { "off (baseline)" }.to_owned(),
            ];
            let yaml = backend.holder_yaml(datastore)?;
            measure(&bins, &yaml, opts, &csrs, ceiling_n, &label, &mut table).await?;
        }
    }
    table.note(format!(
        "In-process ceiling (meshcert_ca::policy::check_csr + Authority::sign_leaf, no TLS, no HTTP, no JSON, no datastore): \
         {ceiling_1:.0} SVIDs/s on 1 thread, {ceiling_n:.0} SVIDs/s on {threads} threads; \"vs ceiling\" divides by the {threads}-thread figure."
    ));
    table.note(
        "Each agent is a real node: attested with a join token, then `/v1/sign` over mTLS with the agent's own HTTPS client \
         (connections kept alive and reused, as the agent does). The load generator runs on the same machine and its CPU is not counted \
         in \"holder CPU\". Group commit off (the baseline): one transaction and one durable commit per request; on: concurrent \
         requests share them. PostgreSQL: a throwaway local cluster on a Unix socket, fsync and synchronous_commit on.",
    );
    table.print();
    Ok(())
}

/// One holder, every agent count: rows of `table` starting with `label`.
async fn measure(
    bins: &Bins,
    holder_yaml: &str,
    opts: &Options,
    csrs: &Arc<Vec<Vec<u8>>>,
    ceiling_n: f64,
    label: &[String; 2],
    table: &mut Table,
) -> anyhow::Result<()> {
    let mut entry = EntrySpec::for_node(ENTRY, "unused", "1h");
    entry.path = format!("/{ENTRY}");
    entry.nodes.clear();
    let holder = Holder::start(bins, &[entry], holder_yaml)?;
    let roots = holder.roots()?;
    let mut joined: Vec<Arc<HttpsIssuer>> = Vec::new();
    for &agents in &opts.agents {
        while joined.len() < agents {
            let name = format!("bench-{}", joined.len());
            joined.push(Arc::new(node(&holder, &name, &roots).await.with_context(
                || format!("attesting {name}; holder log:\n{}", holder.log()),
            )?));
        }
        eprintln!(
            "signing: {} group commit {}: {agents} agents",
            label[0], label[1]
        );
        let cpu_before = cpu_time(holder.pid())?;
        let (ok, refused, wall) = run(&joined[..agents], csrs, opts.batch).await?;
        let cpu = cpu_time(holder.pid())?.saturating_sub(cpu_before);
        if ok == 0 {
            bail!("nothing was signed; holder log:\n{}", holder.log());
        }
        let per_sec = rate(ok, wall);
        table.row(vec![
            label[0].clone(),
            label[1].clone(),
            agents.to_string(),
            ok.to_string(),
            refused.to_string(),
            format!("{:.2}", wall.as_secs_f64()),
            format!("{per_sec:.0}"),
            us(cpu / u32::try_from(ok).unwrap_or(u32::MAX)),
            format!("{:.2}", cpu.as_secs_f64() / wall.as_secs_f64()),
            format!("{:.2}", per_sec / ceiling_n),
        ]);
    }
    Ok(())
}
