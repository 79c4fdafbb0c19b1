//! Scenario 9: idle watchers. One holder holds many agents' long polls (`GET /v1/watch`,
//! each on its own mTLS connection, as every watching agent keeps one open); then one entry is
//! created and every watcher must be woken.
//!
//! Printed: the holder's RSS before and with the connections open (and so per connection), its
//! CPU while they idle (the re-polls every `WATCH_MAX_WAIT_SECS` included when the idle window
//! is at least that long), and the wake-up latency to every watcher after one change: from the
//! moment `meshcert-ca entry create` starts to each long poll's answer.
//!
//! The watchers share a few node identities (`--identities`): what a connection costs the
//! holder does not depend on which node holds it, and attesting 10,000 nodes would only make
//! the setup longer. The load generator is this process: a hyper client per connection,
//! offering HTTP/2 and HTTP/1.1 by ALPN as an agent does (each watcher holds its own
//! connection: the connection an agent keeps open, whichever protocol the holder chose).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshcert_protocol::api::{PATH_WATCH, WATCH_MAX_WAIT_SECS, WatchResponse};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::sync::{Semaphore, mpsc};

use crate::figures::{Samples, Table, mb, ms};
use crate::process::{Bins, EntrySpec, Holder, cpu_time, memory};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Long polls held open at once.
    pub connections: usize,
    /// Node identities the connections are spread over.
    pub identities: usize,
    /// How long the connections idle while the holder's CPU is measured.
    pub idle: Duration,
    /// TLS handshakes in flight at once while connecting.
    pub connect_concurrency: usize,
}

/// What a watcher tells the bench.
enum Event {
    /// Its first long poll is waiting (it holds the version it answered).
    Watching,
    /// Its long poll answered a new version at this instant.
    Woken(Instant),
    /// Its connection failed and was opened again.
    Reconnected,
}

/// One node identity's client TLS configuration.
async fn identity(
    holder: &Holder,
    roots: &[Vec<u8>],
    name: &str,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let (_, chain, key) =
        crate::node::attest(&holder.addr().to_string(), roots, holder.token(name)?)
            .await
            .with_context(|| format!("attesting {name}; holder log:\n{}", holder.log()))?;
    let chain: Vec<CertificateDer<'static>> = chain.into_iter().map(CertificateDer::from).collect();
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(CertificateDer::from(r.clone()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(store)
    .with_client_auth_cert(
        chain,
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec())),
    )?;
    let mut config = config;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One watcher's connection, in the protocol the holder chose.
enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    async fn send(
        &mut self,
        request: http::Request<Empty<Bytes>>,
    ) -> hyper::Result<http::Response<hyper::body::Incoming>> {
        match self {
            Self::Http1(s) => {
                s.ready().await?;
                s.send_request(request).await
            }
            Self::Http2(s) => {
                s.ready().await?;
                s.send_request(request).await
            }
        }
    }
}

/// Whether the last connection opened negotiated HTTP/2 (for the table).
static NEGOTIATED_H2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Opens one mTLS connection to the holder, driven by a task of its own.
async fn connect(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<Sender> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost")?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        NEGOTIATED_H2.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(connection);
        return Ok(Sender::Http2(sender));
    }
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(Sender::Http1(sender))
}

/// One long poll: the version the holder answered.
async fn watch(sender: &mut Sender, version: Option<u64>) -> anyhow::Result<u64> {
    let query = match version {
        Some(v) => format!("?version={v}&wait={WATCH_MAX_WAIT_SECS}"),
        None => String::new(),
    };
    let request = http::Request::get(format!("{PATH_WATCH}{query}"))
        .header(http::header::HOST, "localhost")
        .body(Empty::new())?;
    let response = sender.send(request).await?;
    anyhow::ensure!(response.status().is_success(), "HTTP {}", response.status());
    let body = response.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice::<WatchResponse>(&body)?.version)
}

/// A watcher for the whole run: connects (at most `slots` handshakes at once), then watches,
/// reporting each new version; reconnects when its connection ends.
async fn watcher(
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    slots: Arc<Semaphore>,
    events: mpsc::UnboundedSender<Event>,
) {
    let mut version = None;
    let mut first = true;
    loop {
        let opened = {
            let _slot = slots.acquire().await;
            connect(addr, Arc::clone(&tls)).await
        };
        let Ok(mut sender) = opened else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let _ = events.send(Event::Reconnected);
            continue;
        };
        loop {
            if version.is_some() && std::mem::take(&mut first) {
                let _ = events.send(Event::Watching);
            }
            match watch(&mut sender, version).await {
                Ok(v) => {
                    if version.is_some_and(|known| known != v) {
                        let _ = events.send(Event::Woken(Instant::now()));
                    }
                    version = Some(v);
                }
                Err(_) => break,
            }
        }
        let _ = events.send(Event::Reconnected);
    }
}

/// Raises this process's soft limit of open files to its hard limit (each watcher is a
/// socket here too).
fn raise_open_files() -> anyhow::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Runs the scenario and prints its table.
pub async fn bench(bins: &Bins, opts: &Options) -> anyhow::Result<()> {
    let limit = raise_open_files()?;
    anyhow::ensure!(
        limit > opts.connections as u64 + 256,
        "this process may open {limit} files: too few for {} connections (raise `ulimit -Hn`)",
        opts.connections
    );
    let mut entry = EntrySpec::for_node("seed", "watcher-0", "1h");
    entry.path = "/seed".into();
    let holder = Holder::start(bins, std::slice::from_ref(&entry), "")?;
    let roots = holder.roots()?;
    eprintln!("watchers: attesting {} identities", opts.identities);
    let mut identities = Vec::new();
    for i in 0..opts.identities.max(1) {
        identities.push(identity(&holder, &roots, &format!("watcher-{i}")).await?);
    }
    let pid = holder.pid();
    let before = memory(pid)?;
    eprintln!("watchers: opening {} long polls", opts.connections);
    let opening = Instant::now();
    let slots = Arc::new(Semaphore::new(opts.connect_concurrency.max(1)));
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..opts.connections {
        let tls = Arc::clone(&identities[i % identities.len()]);
        tasks.spawn(watcher(holder.addr(), tls, Arc::clone(&slots), tx.clone()));
    }
    let mut reconnects = 0u64;
    let mut watching = 0;
    let deadline = Instant::now() + Duration::from_secs(1800);
    while watching < opts.connections {
        let event = tokio::time::timeout_at(deadline.into(), events.recv())
            .await
            .with_context(|| format!("only {watching} watchers after 30 min"))?;
        match event {
            Some(Event::Watching) => watching += 1,
            Some(Event::Reconnected) => reconnects += 1,
            Some(Event::Woken(_)) | None => {}
        }
    }
    let opened_in = opening.elapsed();
    eprintln!(
        "watchers: {watching} watching after {opened_in:?}; idling {:?}",
        opts.idle
    );
    // Let the last handshakes' buffers settle, then measure the idle holder.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = cpu_time(pid)?;
    let idle_started = Instant::now();
    let mut idle_rss = 0;
    while idle_started.elapsed() < opts.idle {
        tokio::time::sleep(Duration::from_secs(1)).await;
        idle_rss = idle_rss.max(memory(pid)?.rss);
        while let Ok(e) = events.try_recv() {
            if let Event::Reconnected = e {
                reconnects += 1;
            }
        }
    }
    let idle_cpu = cpu_time(pid)?.saturating_sub(cpu_before);
    let idle_wall = idle_started.elapsed();

    eprintln!("watchers: one change");
    let uid = nix::unistd::geteuid().as_raw();
    let cpu_before = cpu_time(pid)?;
    let changed = Instant::now();
    let out = holder.ctl(&[
        "entry",
        "create",
        "--id",
        "wake",
        "--spiffe-id",
        "spiffe://mesh-a.test/wake",
        "--node",
        "watcher-0",
        "--selector",
        &format!("unix:uid:{uid}"),
        "--dir",
        "wake",
    ])?;
    let command = changed.elapsed();
    anyhow::ensure!(
        out.status.success(),
        "entry create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut woken = Samples::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    while woken.len() < opts.connections {
        match tokio::time::timeout_at(deadline.into(), events.recv()).await {
            Ok(Some(Event::Woken(at))) => woken.push(at.saturating_duration_since(changed)),
            Ok(Some(Event::Reconnected)) => reconnects += 1,
            Ok(Some(Event::Watching)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let wake_cpu = cpu_time(pid)?.saturating_sub(cpu_before);
    let after = memory(pid)?;
    tasks.abort_all();

    let per = idle_rss.saturating_sub(before.rss) as f64 / opts.connections.max(1) as f64;
    let mut table = Table::new(
        &format!(
            "Idle watchers: {} long polls (`GET /v1/watch`, mTLS, one {} connection each) on one holder, then one change",
            opts.connections,
            if NEGOTIATED_H2.load(std::sync::atomic::Ordering::Relaxed) {
                "HTTP/2"
            } else {
                "HTTP/1.1"
            }
        ),
        &["figure", "value"],
    );
    for (name, value) in [
        ("holder RSS before the connections", mb(before.rss)),
        ("holder RSS with them open (peak while idle)", mb(idle_rss)),
        ("per connection", format!("{per:.1} KiB")),
        (
            "holder CPU while idle",
            format!(
                "{:.4} cores over {:.0} s",
                idle_cpu.as_secs_f64() / idle_wall.as_secs_f64(),
                idle_wall.as_secs_f64()
            ),
        ),
        (
            "woken after one change",
            format!("{} of {}", woken.len(), opts.connections),
        ),
        ("wake-up p50", format!("{} ms", ms(woken.percentile(50.0)))),
        ("wake-up p99", format!("{} ms", ms(woken.percentile(99.0)))),
        ("wake-up last", format!("{} ms", ms(woken.max()))),
        ("holder CPU for the wake-up", format!("{} ms", ms(wake_cpu))),
        ("holder peak RSS (whole run)", mb(after.peak)),
        (
            "time to open every long poll",
            format!("{:.1} s", opened_in.as_secs_f64()),
        ),
        ("reconnections", reconnects.to_string()),
    ] {
        table.row(vec![name.to_owned(), value]);
    }
    table.note(format!(
        "Wake-up is measured from the start of `meshcert-ca entry create` (a process of its own, over the admin socket; it \
         took {} ms here) to each long poll's answer in this process; each woken agent would then sync, which is not \
         measured here. The connections share {} node identities; the holder's CPU while idle includes the re-polls every \
         {WATCH_MAX_WAIT_SECS} s when the idle window is that long.",
        ms(command),
        opts.identities
    ));
    table.print();
    Ok(())
}
