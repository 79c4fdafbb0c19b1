//! The SPIFFE Workload API and the admin socket, end to end: the real servers run in-process on
//! temporary sockets, fed by a `CacheWriter` publishing certificates made here (a root, an
//! intermediate, leaves with one URI SAN); the clients are the upstream `spiffe` crate (in-process, and as
//! another user through the `workload-probe` binary) and a raw gRPC client without the header.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use meshcert_agent::cache::{Cache, CacheWriter};
use meshcert_agent::workload::proto::X509svidRequest;
use meshcert_agent::workload::proto::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use meshcert_agent::workload::{self, WorkloadConfig};
use meshcert_agent::{admin, cache::AgentStatus};
use meshcert_protocol::{CertState, IdentityReport, Selector, SpiffeId};
use meshcert_tests::pki::TestPki;
use spiffe::{WorkloadApiClient, X509SourceBuilder};
use tempfile::TempDir;
use tokio::sync::oneshot;

/// The user the probe runs as: anyone but us.
const OTHER_UID: u32 = 65534;
/// A bound on every wait, so a broken server fails the test instead of hanging it.
const PATIENCE: Duration = Duration::from_secs(60);

/// The Workload API server on a temporary socket; stops when dropped.
struct Server {
    dir: TempDir,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), workload::WorkloadError>>,
}

impl Server {
    async fn start(cache: &Cache, config: WorkloadConfig) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Other users must reach the socket (its own mode is 0666).
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        Self::start_in(dir, cache, config).await
    }

    async fn start_in(dir: TempDir, cache: &Cache, mut config: WorkloadConfig) -> Result<Self> {
        config.socket = dir.path().join("run/workload.sock");
        let listener = workload::bind(&config)?;
        let socket = config.socket.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(workload::serve(listener, config, cache.clone(), async {
            let _ = stopped.await;
        }));
        Ok(Self {
            dir,
            socket,
            stop: Some(stop),
            task,
        })
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Stops the server like an agent shutting down, and hands back its folder.
    async fn stop(mut self) -> Result<TempDir> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .context("the server did not stop")???;
        Ok(self.dir)
    }
}

fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Runs `workload-probe` as [`OTHER_UID`]; its stdout.
async fn probe_as_other_user(args: &[&str]) -> Result<String> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "this test starts a process as uid {OTHER_UID} and must run as root"
    );
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(meshcert_tests::bin_path("workload-probe"))
            .args(args)
            .uid(OTHER_UID)
            .gid(OTHER_UID)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("workload-probe hung")??;
    Ok(String::from_utf8(output.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_client_fetches_svids_and_bundles_and_sees_the_rotation() -> Result<()> {
    let pki = TestPki::new("example.org")?;
    let me = Selector::Uid(own_uid());
    let web = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "web")?;
    let not_mine = pki.svid(
        "spiffe://example.org/not-mine",
        &[me.clone(), Selector::Uid(OTHER_UID)],
        "",
    )?;
    let admin_id = pki.svid(
        "spiffe://example.org/admin",
        &[me.clone(), Selector::Gid(nix::unistd::getegid().as_raw())],
        "admin",
    )?;
    let writer = CacheWriter::new();
    let cache = writer.reader();
    writer.publish(pki.snapshot(&[&web, &not_mine, &admin_id]));
    let server = Server::start(&cache, WorkloadConfig::default()).await?;

    let client = WorkloadApiClient::connect_to(server.endpoint()).await?;
    let svid = client.fetch_x509_svid().await?;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(svid.leaf().as_bytes(), web.leaf.as_slice());
    assert_eq!(svid.cert_chain().len(), 2, "leaf and intermediate");
    assert_eq!(svid.private_key().as_bytes(), web.key_pkcs8.as_slice());

    // Every matching entry, the default first; an entry whose selectors do not all match is
    // not sent.
    let all: Vec<String> = client
        .fetch_all_x509_svids()
        .await?
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    assert_eq!(
        all,
        ["spiffe://example.org/web", "spiffe://example.org/admin"]
    );

    let bundles = client.fetch_x509_bundles().await?;
    let bundle = bundles
        .get(&spiffe::TrustDomain::new("example.org")?)
        .context("example.org's bundle")?;
    let authorities: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_bytes()).collect();
    assert_eq!(authorities, [pki.root_der().as_slice()]);

    // An application watching its identity sees the rotated SVID on its open stream.
    let source = X509SourceBuilder::new()
        .endpoint(server.endpoint())
        .build()
        .await?;
    assert_eq!(source.svid()?.leaf().as_bytes(), web.leaf.as_slice());
    let mut updates = source.updated();
    // The source syncs once, then opens its watching stream in the background: the first
    // rotation may reach it as that stream's first message; the second can only come as an
    // update on the open stream.
    let mut rotated = web.clone();
    for _ in 0..2 {
        rotated = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "web")?;
        writer.publish(pki.snapshot(&[&rotated, &not_mine, &admin_id]));
        tokio::time::timeout(PATIENCE, updates.changed())
            .await
            .context("no update on the open stream")??;
        assert_eq!(source.svid()?.leaf().as_bytes(), rotated.leaf.as_slice());
    }
    assert_eq!(
        source.svid()?.private_key().as_bytes(),
        rotated.key_pkcs8.as_slice()
    );
    source.shutdown().await;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_user_is_denied_an_entry_for_another_uid_and_gets_its_own() -> Result<()> {
    let pki = TestPki::new("example.org")?;
    let root_only = pki.svid(
        "spiffe://example.org/root-only",
        &[Selector::Uid(own_uid())],
        "",
    )?;
    let writer = CacheWriter::new();
    let cache = writer.reader();
    writer.publish(pki.snapshot(&[&root_only]));
    let server = Server::start(&cache, WorkloadConfig::default()).await?;
    let endpoint = server.endpoint();

    let out = probe_as_other_user(&["svids", &endpoint]).await?;
    assert_eq!(out.trim(), "error NoIdentityIssued");

    let nobody = pki.svid(
        "spiffe://example.org/nobody",
        &[Selector::Uid(OTHER_UID), Selector::User("nobody".into())],
        "",
    )?;
    writer.publish(pki.snapshot(&[&root_only, &nobody]));
    let out = probe_as_other_user(&["svids", &endpoint]).await?;
    assert_eq!(out.trim(), "svid spiffe://example.org/nobody");
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_security_header_is_invalid() -> Result<()> {
    let pki = TestPki::new("example.org")?;
    let web = pki.svid("spiffe://example.org/web", &[Selector::Uid(own_uid())], "")?;
    let writer = CacheWriter::new();
    let cache = writer.reader();
    writer.publish(pki.snapshot(&[&web]));
    let server = Server::start(&cache, WorkloadConfig::default()).await?;

    // A plain gRPC client (no interceptor adds `workload.spiffe.io: true`).
    let endpoint = spiffe::transport::Endpoint::parse(&server.endpoint())?;
    let channel = spiffe::transport::connect(&endpoint).await?;
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    let status = raw
        .fetch_x509svid(X509svidRequest {})
        .await
        .err()
        .context("a request without the header was served")?;
    assert_eq!(format!("{:?}", status.code()), "InvalidArgument");
    assert_eq!(status.message(), "security header missing from request");

    // The same caller with the header is served.
    let client = WorkloadApiClient::connect_to(server.endpoint()).await?;
    assert_eq!(
        client.fetch_x509_svid().await?.spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    server.stop().await?;
    Ok(())
}

/// One uid holding its maximum of connections (here 8, under a global cap of 1024) gets no
/// more, and another uid's fetch is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_holding_its_maximum_of_connections_does_not_stop_another_uids_fetch() -> Result<()> {
    use tokio::io::AsyncReadExt as _;
    let pki = TestPki::new("example.org")?;
    let nobody = pki.svid(
        "spiffe://example.org/nobody",
        &[Selector::Uid(OTHER_UID)],
        "",
    )?;
    let writer = CacheWriter::new();
    let cache = writer.reader();
    writer.publish(pki.snapshot(&[&nobody]));
    let config = WorkloadConfig {
        max_connections_per_uid: 8,
        ..WorkloadConfig::default()
    };
    let server = Server::start(&cache, config).await?;

    // We hold all our uid may: idle connections, kept open (no idle timeout within the test).
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::UnixStream::connect(&server.socket).await?);
    }
    // One more of ours is closed at once: end of stream, never a hang.
    let mut extra = tokio::net::UnixStream::connect(&server.socket).await?;
    let mut byte = [0_u8; 1];
    let n = tokio::time::timeout(PATIENCE, extra.read(&mut byte))
        .await
        .context("the connection over the cap was not closed")?
        .unwrap_or(0);
    assert_eq!(n, 0, "a connection over the uid's cap is closed");

    let endpoint = server.endpoint();
    let out = tokio::time::timeout(PATIENCE, probe_as_other_user(&["svids", &endpoint]))
        .await
        .context("the other uid's fetch hung")??;
    assert_eq!(out.trim(), "svid spiffe://example.org/nobody");

    // Our held connections stay open (the server's HTTP/2 greeting, or nothing yet; not an
    // end of stream).
    let open = match held[0].try_read(&mut byte) {
        Ok(n) => n > 0,
        Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
    };
    assert!(open, "a held connection stays open");
    drop(held);
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_streams_stay_served_while_another_workload_churns_connections() -> Result<()> {
    let pki = TestPki::new("example.org")?;
    let me = Selector::Uid(own_uid());
    let web = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "")?;
    let noisy = pki.svid(
        "spiffe://example.org/noisy",
        &[Selector::Uid(OTHER_UID)],
        "",
    )?;
    let writer = CacheWriter::new();
    let cache = writer.reader();
    writer.publish(pki.snapshot(&[&web, &noisy]));
    let config = WorkloadConfig {
        rate_per_uid: 5.0,
        burst_per_uid: 200,
        ..WorkloadConfig::default()
    };
    let server = Server::start(&cache, config).await?;
    let endpoint = server.endpoint();

    let mut sources = Vec::new();
    for _ in 0..64 {
        sources.push(X509SourceBuilder::new().endpoint(&endpoint).build().await?);
    }
    let mut updates: Vec<_> = sources.iter().map(|s| s.updated()).collect();

    // Another workload opens a connection and asks, 400 times in a row, while we rotate.
    let churn_args = ["churn", endpoint.as_str(), "400"];
    let churn = probe_as_other_user(&churn_args);
    let rotations = async {
        // Two rotations: the first may arrive as the first message of a source's watching
        // stream (opened in the background), the second only as an update on the open stream.
        for _ in 0..2 {
            let rotated = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "")?;
            writer.publish(pki.snapshot(&[&rotated, &noisy]));
            for update in &mut updates {
                tokio::time::timeout(PATIENCE, update.changed())
                    .await
                    .context("a stream went unserved")??;
            }
            for source in &sources {
                assert_eq!(source.svid()?.leaf().as_bytes(), rotated.leaf.as_slice());
            }
        }
        anyhow::Ok(())
    };
    let (churned, rotated) =
        tokio::time::timeout(PATIENCE, async { tokio::join!(churn, rotations) })
            .await
            .context("the churning workload hung")?;
    rotated?;
    let churned = churned?;
    // The noisy workload was served, then told to slow down, and never hung.
    let counts: Vec<u32> = churned
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let [served, refused] = counts[..] else {
        anyhow::bail!("unexpected churn output: {churned}");
    };
    assert!(served > 0, "{churned}");
    assert!(refused > 0, "{churned}");
    assert_eq!(served + refused, 400, "{churned}");
    for source in sources {
        source.shutdown().await;
    }
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reconnect_after_a_restart_and_get_the_same_svid() -> Result<()> {
    let pki = TestPki::new("example.org")?;
    let me = Selector::Uid(own_uid());
    let web = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "")?;
    let writer = CacheWriter::new();
    let cache = writer.reader();
    writer.publish(pki.snapshot(&[&web]));
    let server = Server::start(&cache, WorkloadConfig::default()).await?;
    let endpoint = server.endpoint();
    let source = X509SourceBuilder::new().endpoint(&endpoint).build().await?;
    let mut updates = source.updated();

    // The agent stops; its socket file stays behind, and the next agent replaces it.
    let dir = server.stop().await?;
    let server = Server::start_in(dir, &cache, WorkloadConfig::default()).await?;
    assert_eq!(server.endpoint(), endpoint);
    let client = WorkloadApiClient::connect_to(&endpoint).await?;
    assert_eq!(
        client.fetch_x509_svid().await?.leaf().as_bytes(),
        web.leaf.as_slice()
    );

    // The watching application reconnected: it receives the next rotation.
    let rotated = pki.svid("spiffe://example.org/web", &[me], "")?;
    writer.publish(pki.snapshot(&[&rotated]));
    let svid = tokio::time::timeout(PATIENCE, async {
        loop {
            updates.changed().await?;
            let svid = source.svid()?;
            if svid.leaf().as_bytes() == rotated.leaf.as_slice() {
                return anyhow::Ok(svid);
            }
        }
    })
    .await
    .context("the source never reconnected")??;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    source.shutdown().await;
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_socket_answers_status_and_readiness_to_its_user_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let socket = dir.path().join("admin.sock");
    let listener = admin::bind(&socket)?;
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let writer = CacheWriter::new();
    let cache = writer.reader();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(admin::serve(listener, cache.clone(), async {
        let _ = stopped.await;
    }));

    let get = |path: &'static str| {
        let socket = socket.clone();
        async move { http_get(&socket, path).await }
    };
    assert_eq!(get("/healthz").await?.0, 200);
    let (code, body) = get("/readyz").await?;
    assert_eq!(code, 503);
    assert!(body.contains("not joined"), "{body}");

    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_secs();
    writer.update_status(|s: &mut AgentStatus| {
        s.node = Some("node-1".into());
        s.node_svid_not_after = Some(now + 3600);
        s.identities = vec![IdentityReport {
            entry_id: "web".into(),
            spiffe_id: SpiffeId::new("spiffe://example.org/web").expect("valid id"),
            state: CertState::Issued,
            serial: Some("0a1b".into()),
            not_after: Some(now + 3600),
            next_rotation: Some(now + 1800),
            last_error: None,
            attempts: 0,
        }]
        .into();
    });
    assert_eq!(get("/readyz").await?.0, 200);
    let (code, body) = get("/v1/status").await?;
    assert_eq!(code, 200);
    let json: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(json["node"], "node-1");
    assert_eq!(
        json["identities"][0]["spiffeId"],
        "spiffe://example.org/web"
    );
    assert_eq!(json["identities"][0]["state"], "ISSUED");

    // Even with a careless file mode, another user is refused by its kernel credentials.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let socket_arg = socket.display().to_string();
    let out = probe_as_other_user(&["admin", &socket_arg, "/v1/status"]).await?;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");

    let _ = stop.send(());
    tokio::time::timeout(PATIENCE, task).await???;
    Ok(())
}

/// A bare HTTP/1.1 GET over a Unix socket: the status code and the body.
async fn http_get(socket: &std::path::Path, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
        .await
        .context("no answer in time")??;
    let code = answer
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_client_follows_a_real_agent_through_rotations() -> Result<()> {
    use meshcert_tests::agent::Agent;
    use meshcert_tests::ca::{CaHolder, EXAMPLE_CONFIG};

    // The example entry `web`, selected by our own uid, with a short TTL so it rotates soon.
    let config = EXAMPLE_CONFIG.replace(
        "selectors: [\"unix:uid:1000\"]\n    ttl: 1h",
        &format!("selectors: [\"unix:uid:{}\"]\n    ttl: 4s", own_uid()),
    );
    ensure!(config != EXAMPLE_CONFIG, "the example config changed shape");
    let (ca, agent) = tokio::task::spawn_blocking(move || -> Result<_> {
        let ca = CaHolder::start(&config)?;
        let agent = Agent::start(&ca, "node-1", "mesh-a", "")?;
        Ok((ca, agent))
    })
    .await??;
    let endpoint = format!("unix://{}", agent.workload_socket().display());

    // The source waits (retrying `no identity issued`) until the agent has issued `web`.
    let source = tokio::time::timeout(
        PATIENCE,
        X509SourceBuilder::new().endpoint(&endpoint).build(),
    )
    .await
    .context("the agent never served web")??;
    let first = source.svid()?;
    assert_eq!(first.spiffe_id().to_string(), "spiffe://mesh-a.test/web");
    let client = WorkloadApiClient::connect_to(&endpoint).await?;
    let bundles = client.fetch_x509_bundles().await?;
    let bundle = bundles
        .get(&spiffe::TrustDomain::new("mesh-a.test")?)
        .context("mesh-a.test's bundle")?;
    ensure!(!bundle.authorities().is_empty(), "empty bundle");

    // Two rotations later the source holds a third SVID; at least the second rotation came
    // over the stream the source keeps open.
    let mut updates = source.updated();
    let mut seen = vec![first.leaf().as_bytes().to_vec()];
    tokio::time::timeout(PATIENCE * 2, async {
        while seen.len() < 3 {
            updates.changed().await?;
            let svid = source.svid()?;
            assert_eq!(svid.spiffe_id().to_string(), "spiffe://mesh-a.test/web");
            let leaf = svid.leaf().as_bytes().to_vec();
            if !seen.contains(&leaf) {
                seen.push(leaf);
            }
        }
        anyhow::Ok(())
    })
    .await
    .with_context(|| {
        format!(
            "no rotation reached the client; agent log:\n{}",
            agent.log()
        )
    })??;
    source.shutdown().await;

    // `meshcert-agent status` reads the admin socket: JSON, and a table for people.
    let json = agent.status_json()?;
    assert_eq!(json["node"], "node-1", "{json}");
    assert_eq!(
        json["identities"][0]["spiffeId"], "spiffe://mesh-a.test/web",
        "{json}"
    );
    let table = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new(meshcert_tests::bin_path("meshcert-agent"))
            .arg("status")
            .arg("--admin-socket")
            .arg(agent.admin_socket())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("meshcert-agent status hung")??;
    ensure!(table.status.success(), "status failed: {table:?}");
    let table = String::from_utf8(table.stdout)?;
    let web_line = table
        .lines()
        .find(|l| l.starts_with("spiffe://mesh-a.test/web"))
        .with_context(|| format!("no line for web:\n{table}"))?;
    // `web` rotates every couple of seconds: issued, or a renewal in flight.
    assert!(
        web_line.contains("ISSUED") || web_line.contains("REQUESTED"),
        "{table}"
    );
    assert!(table.contains("node-1"), "{table}");
    tokio::task::spawn_blocking(move || drop((agent, ca))).await?;
    Ok(())
}

/// The Python Workload API clients (`tests/python/workload_client.py`): the official `spiffe`
/// library and plain grpcio, installed by `.ci/run`. Their stdout, or their output as an error.
async fn python_client(args: &[&str]) -> Result<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/workload_client.py");
    let output = tokio::time::timeout(
        PATIENCE,
        tokio::process::Command::new("python3")
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the Python client hung")?
    .context("python3 must be installed (with `pip install spiffe grpcio`, see .ci/run)")?;
    let stdout = String::from_utf8(output.stdout)?;
    ensure!(
        output.status.success(),
        "python3 {args:?} failed ({}):\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_spiffe_library_fetches_svids_and_bundles() -> Result<()> {
    let pki = TestPki::new("example.org")?;
    let me = Selector::Uid(own_uid());
    let web = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "")?;
    let admin_id = pki.svid("spiffe://example.org/admin", &[me], "")?;
    let writer = CacheWriter::new();
    let cache = writer.reader();
    writer.publish(pki.snapshot(&[&web, &admin_id]));
    let server = Server::start(&cache, WorkloadConfig::default()).await?;
    let socket = server.socket.display().to_string();

    // py-spiffe runs on gRPC C-core, which sends the percent-encoded socket path as :authority.
    let out = python_client(&["spiffe-x509", &socket]).await?;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "default spiffe://example.org/web 2",
            "svid spiffe://example.org/web",
            "svid spiffe://example.org/admin",
            "bundle example.org 1",
        ],
        "{out}"
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_clients_are_served_whatever_authority_they_send() -> Result<()> {
    let pki = TestPki::new("example.org")?;
    let web = pki.svid("spiffe://example.org/web", &[Selector::Uid(own_uid())], "")?;
    let writer = CacheWriter::new();
    let cache = writer.reader();
    writer.publish(pki.snapshot(&[&web]));
    let server = Server::start(&cache, WorkloadConfig::default()).await?;
    let socket = server.socket.display().to_string();

    // Plain grpcio with the authority it picks itself (the percent-encoded path), then with
    // the raw socket path as grpc-java sends it.
    for client in ["grpc-default", "grpc-raw-authority"] {
        let out = python_client(&[client, &socket]).await?;
        assert_eq!(out.trim(), "svid spiffe://example.org/web", "{client}");
    }
    server.stop().await?;
    Ok(())
}

/// A real holder (the example config, `web` for our uid, plus `holder_yaml` under `holder:`)
/// and agent, once the agent serves `web`.
async fn jwt_agent(
    holder_yaml: &str,
) -> Result<(meshcert_tests::ca::CaHolder, meshcert_tests::agent::Agent)> {
    use meshcert_tests::agent::Agent;
    use meshcert_tests::ca::{CaHolder, EXAMPLE_CONFIG};

    let config = EXAMPLE_CONFIG
        .replace(
            "selectors: [\"unix:uid:1000\"]",
            &format!("selectors: [\"unix:uid:{}\"]", own_uid()),
        )
        .replace("holder:\n", &format!("holder:\n{holder_yaml}"));
    ensure!(
        config.contains(&own_uid().to_string()),
        "the example config changed shape"
    );
    let (ca, agent) = tokio::task::spawn_blocking(move || -> Result<_> {
        let ca = CaHolder::start(&config)?;
        let agent = Agent::start(&ca, "node-1", "mesh-a", "")?;
        Ok((ca, agent))
    })
    .await??;
    let endpoint = format!("unix://{}", agent.workload_socket().display());
    // Wait until the agent serves `web` (X.509 first: a JWT-SVID needs a held identity).
    tokio::time::timeout(
        PATIENCE,
        X509SourceBuilder::new().endpoint(&endpoint).build(),
    )
    .await
    .context("the agent never served web")??
    .shutdown()
    .await;
    Ok((ca, agent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_jwt_svids_verify_with_pyjwt() -> Result<()> {
    let (ca, agent) = jwt_agent("  jwtAlgorithm: RS256\n").await?;
    let socket = agent.workload_socket().display().to_string();
    let out = python_client(&["spiffe-jwt", &socket, "db"]).await?;
    assert!(
        out.contains("verified spiffe://mesh-a.test/web True"),
        "{out}"
    );
    assert!(out.contains("validated spiffe://mesh-a.test/web"), "{out}");
    let state = std::fs::read_to_string(ca.state_dir().join("jwt/mesh-a.test.json"))?;
    assert!(state.contains("\"alg\":\"RS256\""), "RS256 key expected");
    tokio::task::spawn_blocking(move || drop((agent, ca))).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_from_a_real_agent_verify_with_an_independent_jose_library() -> Result<()> {
    use meshcert_agent::workload::proto::{JwtsvidRequest, ValidateJwtsvidRequest};

    let (ca, agent) = jwt_agent("").await?;
    let socket = agent.workload_socket().display().to_string();
    let endpoint = format!("unix://{socket}");

    // py-spiffe fetches a token and the JWKS; PyJWT verifies the token against them; the
    // agent validates it for its audience and refuses another audience and a tampered one.
    let out = python_client(&["spiffe-jwt", &socket, "db"]).await?;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "jwt spiffe://mesh-a.test/web ['db']",
            "jwt-bundle mesh-a.test 1",
            "verified spiffe://mesh-a.test/web True",
            "validated spiffe://mesh-a.test/web",
            "other-audience refused True",
            "tampered refused True",
        ],
        "{out}\nagent log:\n{}",
        agent.log()
    );

    // The spec's refusals, seen by a plain gRPC client.
    let channel =
        spiffe::transport::connect(&spiffe::transport::Endpoint::parse(&endpoint)?).await?;
    let mut raw = SpiffeWorkloadApiClient::new(channel);
    fn with_header<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("workload.spiffe.io", "true".parse().expect("ascii"));
        request
    }
    let status = raw
        .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
        .await
        .err()
        .context("a request without audience was served")?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "audience must be specified");
    let status = raw
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: "spiffe://mesh-a.test/not-mine".into(),
        }))
        .await
        .err()
        .context("an identity the caller does not hold was signed")?;
    assert_eq!(status.code(), tonic::Code::PermissionDenied);
    assert_eq!(status.message(), "no identity issued", "{status:?}");
    // Two calls, one token: cached per identity and audience set.
    let request = || {
        with_header(JwtsvidRequest {
            audience: vec!["db".into(), "cache".into()],
            spiffe_id: String::new(),
        })
    };
    let first = raw.fetch_jwtsvid(request()).await?.into_inner();
    let second = raw.fetch_jwtsvid(request()).await?.into_inner();
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].svid, second.svids[0].svid);
    let status = raw
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "db".into(),
            svid: String::new(),
        }))
        .await
        .err()
        .context("an empty token validated")?;
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(status.message(), "svid must be specified", "{status:?}");

    // The calls and refusals are counted per API.
    let (code, metrics) = http_get(&agent.admin_socket(), "/metrics").await?;
    assert_eq!(code, 200);
    for line in [
        r#"meshcert_agent_workload_calls_total{api="jwt",rpc="FetchJWTSVID"} 5"#,
        r#"meshcert_agent_workload_refusals_total{api="jwt",rpc="FetchJWTSVID",code="InvalidArgument"} 1"#,
        r#"meshcert_agent_workload_refusals_total{api="jwt",rpc="FetchJWTSVID",code="PermissionDenied"} 1"#,
        r#"meshcert_agent_workload_open_streams{api="x509"} 0"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    tokio::task::spawn_blocking(move || drop((agent, ca))).await?;
    Ok(())
}

/// SDS, as Envoy speaks it: the client and messages of Envoy's own protobuf definitions.
mod sds {
    use std::time::Instant;

    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use prost::Message as _;

    use super::*;

    const SECRET_TYPE: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

    fn request(names: &[&str], version: &str, nonce: &str, nack: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: SECRET_TYPE.into(),
            response_nonce: nonce.into(),
            error_detail: nack.then(|| RpcStatus {
                code: 3,
                message: "rejected by the test".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// One secret of a response: its name, its certificate chain or trusted CAs, and its key
    /// (empty for a validation context), PEM blocks decoded to DER.
    type Found = (String, Vec<Vec<u8>>, Vec<u8>);

    /// The secrets of a response, in order.
    fn secrets(response: &DiscoveryResponse) -> Result<Vec<Found>> {
        let inline = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| {
            use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
            match d.as_ref().and_then(|d| d.specifier.clone()) {
                Some(Specifier::InlineBytes(b)) => b,
                _ => Vec::new(),
            }
        };
        let ders = |pem_bytes: Vec<u8>| -> Result<Vec<Vec<u8>>> {
            Ok(pem::parse_many(pem_bytes)?
                .into_iter()
                .map(|p| p.contents().to_vec())
                .collect())
        };
        let mut out = Vec::new();
        for any in &response.resources {
            ensure!(
                any.type_url == SECRET_TYPE,
                "resource type {}",
                any.type_url
            );
            let secret = Secret::decode(any.value.as_slice())?;
            match secret.r#type {
                Some(secret::Type::TlsCertificate(tls)) => {
                    let key = ders(inline(&tls.private_key))?.concat();
                    out.push((secret.name, ders(inline(&tls.certificate_chain))?, key));
                }
                Some(secret::Type::ValidationContext(v)) => {
                    out.push((secret.name, ders(inline(&v.trusted_ca))?, Vec::new()));
                }
                other => anyhow::bail!("unexpected secret {other:?}"),
            }
        }
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn envoy_fetches_its_certificate_and_root_ca_over_sds() -> Result<()> {
        let pki = TestPki::new("example.org")?;
        let web = pki.svid("spiffe://example.org/web", &[Selector::Uid(own_uid())], "")?;
        let writer = CacheWriter::new();
        let cache = writer.reader();
        writer.publish(pki.snapshot(&[&web]));
        let server = Server::start(&cache, WorkloadConfig::default()).await?;
        let channel =
            spiffe::transport::connect(&spiffe::transport::Endpoint::parse(&server.endpoint())?)
                .await?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        // No `workload.spiffe.io` header: Envoy does not send one.
        let names = ["default", "ROOTCA", "spiffe://example.org/web", "unknown"];
        let response = client
            .fetch_secrets(request(&names, "", "", false))
            .await?
            .into_inner();
        let found = secrets(&response)?;
        let by_name: Vec<&str> = found.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(by_name, ["default", "ROOTCA", "spiffe://example.org/web"]);
        assert_eq!(found[0].1, [web.leaf.clone(), pki.intermediate_der()]);
        assert_eq!(found[0].2, web.key_pkcs8.as_slice());
        assert_eq!(found[1].1, [pki.root_der()]);
        assert!(!response.version_info.is_empty());
        server.stop().await?;
        Ok(())
    }

    async fn next(
        responses: &mut tonic::Streaming<DiscoveryResponse>,
    ) -> Result<DiscoveryResponse> {
        tokio::time::timeout(PATIENCE, responses.message())
            .await
            .context("no SDS response")??
            .context("the stream ended")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rotation_reaches_an_open_sds_stream_and_a_nack_does_not_loop() -> Result<()> {
        let pki = TestPki::new("example.org")?;
        let me = Selector::Uid(own_uid());
        let web = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "")?;
        let writer = CacheWriter::new();
        let cache = writer.reader();
        writer.publish(pki.snapshot(&[&web]));
        let server = Server::start(&cache, WorkloadConfig::default()).await?;
        let channel =
            spiffe::transport::connect(&spiffe::transport::Endpoint::parse(&server.endpoint())?)
                .await?;
        let mut client = SecretDiscoveryServiceClient::new(channel);
        let (requests, rx) = tokio::sync::mpsc::channel(4);
        let mut responses = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        requests.send(request(&["default"], "", "", false)).await?;
        let first = next(&mut responses).await?;
        assert_eq!(secrets(&first)?[0].1[0], web.leaf);
        // ACK.
        requests
            .send(request(
                &["default"],
                &first.version_info,
                &first.nonce,
                false,
            ))
            .await?;

        // A rotation reaches the open stream as a new version.
        let rotated = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "")?;
        let published = Instant::now();
        writer.publish(pki.snapshot(&[&rotated]));
        let second = next(&mut responses).await?;
        println!("SDS push after a rotation: {:?}", published.elapsed());
        assert_ne!(second.version_info, first.version_info);
        assert_ne!(second.nonce, first.nonce);
        assert_eq!(secrets(&second)?[0].1[0], rotated.leaf);

        // NACK it: the same version is not sent again; the next message is the next rotation.
        requests
            .send(request(
                &["default"],
                &first.version_info,
                &second.nonce,
                true,
            ))
            .await?;
        let third_svid = pki.svid("spiffe://example.org/web", std::slice::from_ref(&me), "")?;
        writer.publish(pki.snapshot(&[&third_svid]));
        let third = next(&mut responses).await?;
        assert_eq!(
            secrets(&third)?[0].1[0],
            third_svid.leaf,
            "the NACKed version came back"
        );
        assert_ne!(third.version_info, second.version_info);

        // New names on the stream are answered at once.
        requests
            .send(request(
                &["default", "ROOTCA"],
                &third.version_info,
                &third.nonce,
                false,
            ))
            .await?;
        let fourth = next(&mut responses).await?;
        assert_eq!(secrets(&fourth)?.len(), 2);
        drop(requests);
        server.stop().await?;
        Ok(())
    }
}
