//! HTTP/2 between agents and the real holder: one connection per node carries every call and
//! the watch; HTTP/1.1 clients are still answered; an idle connection without a client
//! certificate is closed while a node's watch keeps its own; a ban applies to every call on a
//! connection already open; a restarted holder gets the watch re-armed on a new connection; a
//! client resetting streams as fast as it opens them (rapid reset) is sent away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use meshcert_agent::issuer::{HttpsIssuer, Issuer as _, IssuerError};
use meshcert_agent::keys::{KeyAlgorithm, PrivateKey};
use meshcert_protocol::api::{AttestRequest, CsrRequest, Der, ErrorCode, SignOutcome, SignRequest};
use meshcert_protocol::{NodeReport, SpiffeId};
use meshcert_tests::ca::{CaHolder, EXAMPLE_CONFIG, read_pem_certs};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A node's credentials: its SVID chain (leaf first) and key.
struct NodeIdentity {
    chain: Vec<Vec<u8>>,
    key: PrivateKey,
}

/// Joins `name` through a client of its own (dropped, so its connection closes) and returns
/// the node's identity.
async fn join(ca: &CaHolder, name: &str) -> NodeIdentity {
    let roots = read_pem_certs(&ca.bundle_pem_path()).expect("roots");
    let token = ca.token(name, "mesh-a").expect("token");
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
    let csr = meshcert_agent::csr::build(&key, None).expect("csr");
    let joining = HttpsIssuer::new(&ca.addr().to_string(), "localhost", &roots).expect("issuer");
    let answer = joining
        .attest(AttestRequest {
            token,
            csr: Der(csr),
        })
        .await
        .expect("attest");
    NodeIdentity {
        chain: answer.svid.chain.into_iter().map(|d| d.0).collect(),
        key,
    }
}

/// The agent's client of the holder, as node `identity`.
fn agent_client(ca: &CaHolder, identity: &NodeIdentity) -> Arc<HttpsIssuer> {
    let roots = read_pem_certs(&ca.bundle_pem_path()).expect("roots");
    let issuer = HttpsIssuer::new(&ca.addr().to_string(), "localhost", &roots).expect("issuer");
    issuer
        .set_identity(&identity.chain, &identity.key)
        .expect("identity");
    Arc::new(issuer)
}

/// One established TCP socket of this network namespace, from `/proc/net/tcp{,6}`.
struct Established {
    local_port: u16,
    remote_port: u16,
    inode: String,
}

/// Every established TCP socket of this network namespace (whichever process holds it).
fn established() -> Vec<Established> {
    let port = |address: Option<&&str>| {
        address
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| u16::from_str_radix(p, 16).ok())
    };
    let mut sockets = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) != Some(&"01") {
                continue;
            }
            if let (Some(local_port), Some(remote_port), Some(inode)) =
                (port(fields.get(1)), port(fields.get(2)), fields.get(9))
            {
                sockets.push(Established {
                    local_port,
                    remote_port,
                    inode: (*inode).to_owned(),
                });
            }
        }
    }
    sockets
}

/// The TCP connections the holder has open (established, on its port), as `ss` shows them.
fn holder_connections(port: u16) -> usize {
    established()
        .iter()
        .filter(|s| s.local_port == port)
        .count()
}

/// This process's established TCP connections to the holder's `port`: its own sockets (by
/// inode, from `/proc/self/fd`) whose remote port is `port`. Unlike [`holder_connections`],
/// it cannot count another test's sockets, whatever ports they were given.
fn own_connections_to(port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .collect();
    established()
        .iter()
        .filter(|s| s.remote_port == port && inodes.contains(&s.inode))
        .count()
}

async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Signs a workload SVID for entry `web` (assigned to node-1 in the example configuration).
async fn sign_web(issuer: &HttpsIssuer) {
    let key = PrivateKey::generate(KeyAlgorithm::EcdsaP256).expect("key");
    let id = SpiffeId::new("spiffe://mesh-a.test/web").expect("id");
    let csr = meshcert_agent::csr::build(&key, Some(&id)).expect("csr");
    let answer = issuer
        .sign(SignRequest {
            csrs: vec![CsrRequest {
                entry_id: "web".into(),
                csr: Der(csr),
                local: None,
            }],
        })
        .await
        .expect("sign");
    assert!(
        matches!(
            answer.results.first().map(|r| &r.outcome),
            Some(SignOutcome::Issued { .. })
        ),
        "the signing was not issued"
    );
}

fn empty_report() -> NodeReport {
    NodeReport {
        bundle_version: 1,
        enforcement: None,
        identities: Arc::from(Vec::new()),
        node_svid: None,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn an_agents_calls_and_its_watch_share_one_connection_and_a_ban_applies_on_it() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    let port = ca.addr().port();
    runtime().block_on(async {
        let identity = join(&ca, "node-1").await;
        until("the join's connection closed", || {
            holder_connections(port) == 0
        })
        .await;
        let issuer = agent_client(&ca, &identity);
        let version = issuer
            .watch(None, Duration::from_secs(1))
            .await
            .expect("first watch")
            .version;
        let watching = Arc::clone(&issuer);
        let watch =
            tokio::spawn(
                async move { watching.watch(Some(version), Duration::from_secs(50)).await },
            );
        issuer.sync().await.expect("sync");
        issuer.report(empty_report()).await.expect("report");
        sign_web(&issuer).await;
        issuer.sync().await.expect("second sync");
        assert!(!watch.is_finished(), "the watch is still in flight");
        assert_eq!(
            own_connections_to(port),
            1,
            "the watch, sync, report and signing share one connection"
        );
        // Banned: every call on the open connection is refused, the watch reports the change.
        let out = ca.ctl(&["node", "ban", "node-1"]).expect("ctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        match issuer.sync().await {
            Err(IssuerError::Api(e)) => assert_eq!(e.code, ErrorCode::NodeBanned, "{}", e.message),
            other => panic!("a banned node's sync: {other:?}"),
        }
        let changed = watch.await.expect("task").expect("watch answered");
        assert_ne!(changed.version, version, "the ban did not reach the watch");
        assert_eq!(own_connections_to(port), 1);
    });
}

#[test]
fn a_restarted_holder_gets_the_watch_re_armed_on_a_new_connection() {
    let mut ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    let port = ca.addr().port();
    let rt = runtime();
    let identity = rt.block_on(join(&ca, "node-1"));
    let issuer = agent_client(&ca, &identity);
    let version = rt
        .block_on(issuer.watch(None, Duration::from_secs(1)))
        .expect("first watch")
        .version;
    let watching = Arc::clone(&issuer);
    let watch =
        rt.spawn(async move { watching.watch(Some(version), Duration::from_secs(50)).await });
    ca.restart().expect("restart");
    rt.block_on(async {
        // The watch in flight ends with the old connection (an error, or the new version).
        let _ = watch.await.expect("task");
        // Re-armed with the version it knew: the change (a restart moves the version) is seen.
        let deadline = Instant::now() + Duration::from_secs(60);
        let answer = loop {
            match issuer.watch(Some(version), Duration::from_secs(50)).await {
                Ok(answer) => break answer,
                Err(e) => {
                    assert!(Instant::now() < deadline, "the watch never re-armed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_ne!(answer.version, version, "the change was lost");
        issuer.sync().await.expect("sync after the restart");
        assert_eq!(own_connections_to(port), 1);
    });
}

/// A TLS connection to the holder offering `alpn`, with a client certificate when given.
async fn tls_to(
    ca: &CaHolder,
    alpn: &[&[u8]],
    identity: Option<&NodeIdentity>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in read_pem_certs(&ca.bundle_pem_path()).expect("roots") {
        roots.add(CertificateDer::from(der)).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                id.chain.iter().cloned().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key.pkcs8_der().to_vec())),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(ca.addr())
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake")
}

type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// An HTTP/2 connection over `tls`; the flag is set once the connection ended.
async fn h2_over(
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (H2Sender, Arc<std::sync::atomic::AtomicBool>) {
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = Arc::clone(&ended);
    tokio::spawn(async move {
        let _ = connection.await;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    (sender, ended)
}

async fn h2_get(sender: &mut H2Sender, path: &str) -> (u16, serde_json::Value) {
    sender.ready().await.expect("connection ready");
    let req = http::Request::builder()
        .uri(format!("https://localhost{path}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let answer = sender.send_request(req).await.expect("answer");
    let status = answer.status().as_u16();
    let body = answer.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

#[test]
fn http1_clients_are_answered_and_agents_get_http2() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    runtime().block_on(async {
        let mut tls = tls_to(&ca, &[b"http/1.1"], None).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        tls.write_all(b"GET /v1/bundle HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

        let tls = tls_to(&ca, &[b"h2", b"http/1.1"], None).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut sender, _) = h2_over(tls).await;
        assert_eq!(h2_get(&mut sender, "/v1/bundle").await.0, 200);
    });
    // And a client that offers no protocol at all (HTTP/1.1, the test harness's own).
    let answer = ca.https("GET", "/v1/bundle", None, None).expect("bundle");
    assert_eq!(answer.status, 200);
}

#[test]
fn an_idle_anonymous_http2_connection_is_closed_and_a_nodes_long_watch_is_not() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    runtime().block_on(async {
        let identity = join(&ca, "node-1").await;
        // No client certificate, no stream: closed after the idle limit (10 s).
        let (_idle, idle_ended) = h2_over(tls_to(&ca, &[b"h2"], None).await).await;
        // A node's connection: a watch of 15 s, past that limit, then another call.
        let (mut node, node_ended) = h2_over(tls_to(&ca, &[b"h2"], Some(&identity)).await).await;
        let (status, first) = h2_get(&mut node, "/v1/watch").await;
        assert_eq!(status, 200);
        let version = first["version"].as_u64().expect("version");
        let (status, _) = h2_get(&mut node, &format!("/v1/watch?version={version}&wait=15")).await;
        assert_eq!(status, 200, "the long watch was answered");
        assert!(!node_ended.load(std::sync::atomic::Ordering::SeqCst));
        until("the anonymous connection without a stream closed", || {
            idle_ended.load(std::sync::atomic::Ordering::SeqCst)
        })
        .await;
        assert_eq!(h2_get(&mut node, "/v1/sync").await.0, 200);
    });
}

#[test]
fn a_client_resetting_streams_rapidly_is_sent_away_and_others_are_still_served() {
    let ca = CaHolder::start(EXAMPLE_CONFIG).expect("holder");
    runtime().block_on(async {
        let tls = tls_to(&ca, &[b"h2"], None).await;
        let (mut client, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
        let connection = tokio::spawn(connection);
        let mut opened = 0u32;
        // Each stream opened and reset at once (CVE-2023-44487), until the holder stops it.
        while opened < 100_000 {
            let Ok(ready) = client.clone().ready().await else {
                break;
            };
            client = ready;
            let request = http::Request::get("https://localhost/v1/bundle")
                .body(())
                .expect("request");
            let Ok((_answer, mut stream)) = client.send_request(request, true) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            opened += 1;
        }
        let ended = tokio::time::timeout(Duration::from_secs(60), connection)
            .await
            .expect("the holder kept serving a client resetting every stream")
            .expect("task");
        // Sent away: GOAWAY with ENHANCE_YOUR_CALM, or the connection closed under the
        // client's next write (broken pipe) before it read that GOAWAY.
        let error = ended.expect_err("the connection ended without an error");
        assert!(
            error.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || error.is_io(),
            "after {opened} streams: {error}"
        );
        assert!(opened < 100_000, "every stream was served: {opened}");
        // Another client is still served.
        let (mut other, _) = h2_over(tls_to(&ca, &[b"h2"], None).await).await;
        assert_eq!(h2_get(&mut other, "/v1/bundle").await.0, 200);
    });
}
