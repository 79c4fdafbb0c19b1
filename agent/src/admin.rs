//! The admin socket: HTTP/JSON on a Unix socket (curl-able with `--unix-socket`), for root and
//! the agent's own user only (kernel peer credentials, else 403; the file is 0600 as well).
//!
//! - `GET /v1/status`: the [`AgentStatus`] as JSON, plus `metricsAddress` when the plaintext
//!   metrics listener is on.
//! - `GET /healthz`: 200 while the agent is alive.
//! - `GET /readyz`: 200 once the node SVID is valid and every entry holds an issued SVID, else
//!   503 with the reason.
//! - `GET /metrics`: the Prometheus metrics (see [`crate::metrics`]), for a node-local scraper
//!   that needs no port.
//!
//! [`print_status`] is the client behind `meshcert-agent status [-o json]`, [`probe`] the one
//! behind `meshcert-agent status --check healthz|readyz` (Kubernetes exec probes).

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use meshcert_daemon::serve::{Connection, Limits, Pools};
use meshcert_protocol::IdentityReport;
use serde::Deserialize;
use tokio::net::{UnixListener, UnixStream};

use crate::cache::{AgentStatus, Cache};
use crate::metrics::Metrics;
use crate::workload::socket::{self, SocketError};

/// The admin socket's mode: the agent's user only.
pub const MODE: u32 = 0o600;
/// Admin connections served at once.
const MAX_CONNECTIONS: usize = 32;
/// How long one admin connection may take in all (slow clients are cut off).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections of other users (answered 403) served at once, in a pool of their own.
const MAX_REFUSALS: usize = 4;
/// How long a refused connection may take.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a request's headers may take.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the admin socket failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket could not be bound.
    #[error("cannot bind the admin socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The socket file could not be set up (not a socket, in use, folder or mode).
    #[error("admin socket: {0}")]
    Socket(#[from] SocketError),
    /// `meshcert-agent status` could not reach the agent.
    #[error("cannot connect to the agent's admin socket {path} (is the agent running?): {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange with the agent failed.
    #[error("admin socket request failed: {0}")]
    Http(#[from] hyper::Error),
    /// The agent answered with an error.
    #[error("the agent answered {status}: {body}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The answer's body.
        body: String,
    },
    /// The agent's answer is not the expected JSON.
    #[error("the agent's status is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Binds the admin socket (0600; parent folder created, a stale socket replaced).
pub fn bind(path: &Path) -> Result<UnixListener, AdminError> {
    Ok(socket::bind(path, MODE)?)
}

/// Serves the admin API until `shutdown` completes, with metrics of its own (for callers that
/// do not keep any: `/metrics` then shows the gauges read from the status only).
pub async fn serve(
    listener: UnixListener,
    cache: Cache,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    serve_with_metrics(listener, cache, Arc::new(Metrics::new()), shutdown).await
}

/// The pool of root and the agent's user.
const ALLOWED: Limits = Limits {
    max_connections: MAX_CONNECTIONS,
    header_read_timeout: HEADER_TIMEOUT,
    lifetime: CONNECTION_TIMEOUT,
    keep_alive: true,
};
/// The pool of other users, answered 403.
const REFUSED: Limits = Limits {
    max_connections: MAX_REFUSALS,
    header_read_timeout: HEADER_TIMEOUT,
    lifetime: REFUSAL_TIMEOUT,
    keep_alive: false,
};

/// Serves the admin API until `shutdown` completes; `GET /metrics` renders `metrics`.
pub async fn serve_with_metrics(
    listener: UnixListener,
    cache: Cache,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AdminError> {
    let own_uid = nix::unistd::geteuid().as_raw();
    // The caller is checked before it takes a slot: other users get their 403 from a small
    // pool of their own, so they cannot hold the slots of root and the agent's user.
    let check = move |stream: &UnixStream| {
        let peer_uid = stream.peer_cred().ok().map(|c| c.uid());
        peer_uid.is_some_and(|uid| uid == 0 || uid == own_uid)
    };
    let handle = move |connection: Connection<UnixStream, _>| {
        let (cache, metrics) = (cache.clone(), metrics.clone());
        async move {
            let allowed = connection.allowed;
            if !allowed {
                let uid = connection.io.peer_cred().ok().map(|c| c.uid());
                tracing::info!(
                    ?uid,
                    "admin socket: caller is neither root nor the agent's user"
                );
            }
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let now = crate::cache::unix_now_secs();
                let response = respond(
                    request.method(),
                    request.uri().path(),
                    allowed,
                    &cache.status(),
                    &metrics,
                    now,
                );
                async move { Ok::<_, Infallible>(response) }
            });
            connection
                .limits
                .serve_http1("admin", connection.io, service)
                .await;
        }
    };
    let pools = Pools {
        allowed: ALLOWED,
        refused: Some(REFUSED),
    };
    meshcert_daemon::serve::serve("admin", listener, pools, check, handle, shutdown).await;
    Ok(())
}

/// The status JSON: the [`AgentStatus`], plus `metricsAddress` when the listener is on.
fn status_json(status: &AgentStatus, metrics: &Metrics) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(status)?;
    if let (Some(address), Some(object)) = (metrics.address(), value.as_object_mut()) {
        object.insert(
            "metricsAddress".to_owned(),
            serde_json::Value::String(address.to_string()),
        );
    }
    serde_json::to_vec_pretty(&value)
}

/// The answer to one admin request (pure: the status, the metrics and `now` are given).
fn respond(
    method: &Method,
    path: &str,
    allowed: bool,
    status: &AgentStatus,
    metrics: &Metrics,
    now_unix: u64,
) -> Response<Full<Bytes>> {
    if !allowed {
        return text(
            StatusCode::FORBIDDEN,
            "forbidden: the admin socket is for root and the agent's user\n",
        );
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is supported\n");
    }
    match path {
        "/v1/status" => match status_json(status, metrics) {
            Ok(body) => Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "")),
            Err(error) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot encode the status: {error}\n"),
            ),
        },
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match not_ready_reason(status, now_unix) {
            None => match outage(status) {
                None => text(StatusCode::OK, "ready\n"),
                Some(outage) => text(StatusCode::OK, &format!("ready; {outage}\n")),
            },
            Some(reason) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {reason}\n"),
            ),
        },
        "/metrics" => metrics.response(status, now_unix),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /v1/status, /healthz, /readyz or /metrics\n",
        ),
    }
}

/// Why the agent is not ready at `now_unix`, or `None` when [`AgentStatus::is_ready`].
fn not_ready_reason(status: &AgentStatus, now_unix: u64) -> Option<String> {
    if status.is_ready(now_unix) {
        return None;
    }
    if status.node_svid_not_after.is_none_or(|t| t <= now_unix) {
        return Some(match status.node_svid_not_after {
            None => "the node has no SVID yet (not joined)".to_owned(),
            Some(_) => "the node SVID has expired".to_owned(),
        });
    }
    let missing: Vec<String> = status
        .identities
        .iter()
        .filter(|i| i.not_after.is_none_or(|t| t <= now_unix))
        .map(|i| i.spiffe_id.to_string())
        .collect();
    let mut reason = format!("no valid SVID yet for {}", missing.join(", "));
    if let Some(outage) = outage(status) {
        reason.push_str("; ");
        reason.push_str(&outage);
    }
    Some(reason)
}

/// The holder's outage in words, while there is one: since when, and what expired meanwhile.
fn outage(status: &AgentStatus) -> Option<String> {
    let since = status.ca_unreachable_since?;
    let mut text = format!("the CA holder is unreachable since {}", time(Some(since)));
    if !status.expired_while_unreachable.is_empty() {
        text.push_str(&format!(
            " (expired meanwhile: {})",
            status.expired_while_unreachable.join(", ")
        ));
    }
    Some(text)
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `meshcert-agent status`: fetches the status from the admin socket and prints it, as JSON
/// (`json`) or as a table.
pub async fn print_status(socket: &Path, json: bool) -> Result<(), AdminError> {
    let body = fetch(socket, "/v1/status").await?;
    let value: serde_json::Value = serde_json::from_slice(&body)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        let view: StatusView = serde_json::from_value(value)?;
        print!("{}", render(&view, SystemTime::now()));
    }
    Ok(())
}

/// What `meshcert-agent status --check` asks the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The agent answers (liveness): `GET /healthz`.
    Healthz,
    /// The node SVID is valid and every entry holds an issued SVID: `GET /readyz`.
    Readyz,
}

impl Check {
    /// The admin path that answers it.
    pub fn path(self) -> &'static str {
        match self {
            Self::Healthz => "/healthz",
            Self::Readyz => "/readyz",
        }
    }
}

/// The agent's answer to a [`Check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether the check holds (the agent answered 200).
    pub ok: bool,
    /// What the agent said (`ok`, `ready`, or `not ready: <reason>`).
    pub body: String,
}

/// Asks the agent behind `socket` whether `check` holds: the client of Kubernetes exec probes
/// (`meshcert-agent status --check healthz|readyz`). An agent that cannot be reached is an
/// error; one that answers "not ready" is `Ok` with `ok: false`.
pub async fn probe(socket: &Path, check: Check) -> Result<ProbeResult, AdminError> {
    let (status, body) = get(socket, check.path()).await?;
    Ok(ProbeResult {
        ok: status == StatusCode::OK,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// GETs `path` from the admin socket; the body of a 200 answer.
async fn fetch(socket: &Path, path: &str) -> Result<Bytes, AdminError> {
    let (status, body) = get(socket, path).await?;
    if status != StatusCode::OK {
        return Err(AdminError::Status {
            status,
            body: String::from_utf8_lossy(&body).trim().to_owned(),
        });
    }
    Ok(body)
}

/// GETs `path` from the admin socket: the status and the body, whatever the status.
async fn get(socket: &Path, path: &str) -> Result<(StatusCode, Bytes), AdminError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| AdminError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = Request::get(path)
        .header(header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .expect("a GET with a static header is a valid request");
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((status, body))
}

/// The status as `meshcert-agent status` reads it back.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct StatusView {
    node: Option<String>,
    mesh: Option<String>,
    ca_address: String,
    ca_connected: bool,
    ca_last_error: Option<String>,
    ca_unreachable_since: Option<u64>,
    expired_while_unreachable: Vec<String>,
    node_svid_not_after: Option<u64>,
    bundle_version: u64,
    metrics_address: Option<String>,
    identities: Vec<IdentityReport>,
    #[serde(default)]
    warnings: Vec<String>,
}

/// The table a person reads at a glance: node, CA, then one line per identity.
fn render(view: &StatusView, now: SystemTime) -> String {
    let mut out = render_header(view, now);
    out.push('\n');
    if view.identities.is_empty() {
        out.push_str("No identities assigned to this node.\n");
    } else {
        out.push_str(&render_identities(&view.identities));
    }
    out
}

/// The node, its SVID, the CA, the bundle, metrics and warnings, one per line.
fn render_header(view: &StatusView, now: SystemTime) -> String {
    let now_secs = crate::cache::unix_secs(now);
    let mut out = String::new();
    let node = view.node.as_deref().unwrap_or("(not joined)");
    let mesh = view
        .mesh
        .as_deref()
        .map(|m| format!(" (mesh {m})"))
        .unwrap_or_default();
    out.push_str(&format!("Node:       {node}{mesh}\n"));
    let node_svid = match view.node_svid_not_after {
        None => "none".to_owned(),
        Some(t) if t <= now_secs => format!("EXPIRED at {}", time(Some(t))),
        Some(t) => format!("valid until {}", time(Some(t))),
    };
    out.push_str(&format!("Node SVID:  {node_svid}\n"));
    out.push_str(&format!(
        "CA:         {} ({})\n",
        view.ca_address,
        ca_state(view, now_secs)
    ));
    if !view.expired_while_unreachable.is_empty() {
        out.push_str(&format!(
            "Expired while the CA is unreachable: {}\n",
            view.expired_while_unreachable.join(", ")
        ));
    }
    out.push_str(&format!("Bundle:     version {}\n", view.bundle_version));
    let metrics = match &view.metrics_address {
        Some(address) => format!("http://{address}/metrics (and GET /metrics on the admin socket)"),
        None => "GET /metrics on the admin socket".to_owned(),
    };
    out.push_str(&format!("Metrics:    {metrics}\n"));
    for warning in &view.warnings {
        out.push_str(&format!("Warning:    {warning}\n"));
    }
    out
}

/// Whether the CA answers: connected, not contacted yet, or unreachable (since when, why).
fn ca_state(view: &StatusView, now_secs: u64) -> String {
    match (view.ca_unreachable_since, view.ca_connected) {
        (Some(since), _) => format!(
            "UNREACHABLE since {} ({} ago): {}",
            time(Some(since)),
            humantime::format_duration(Duration::from_secs(now_secs.saturating_sub(since))),
            view.ca_last_error.as_deref().unwrap_or("-")
        ),
        (None, true) => "connected".to_owned(),
        (None, false) => match &view.ca_last_error {
            Some(e) => format!("UNREACHABLE: {e}"),
            None => "not contacted yet".to_owned(),
        },
    }
}

/// One aligned line per identity, under a heading.
fn render_identities(identities: &[IdentityReport]) -> String {
    let rows: Vec<[String; 6]> = identities
        .iter()
        .map(|i| {
            [
                i.spiffe_id.to_string(),
                i.state.as_str().to_owned(),
                i.serial.as_deref().unwrap_or("-").to_owned(),
                time(i.not_after),
                time(i.next_rotation),
                i.last_error.as_deref().unwrap_or("-").to_owned(),
            ]
        })
        .collect();
    let head = [
        "SPIFFE ID",
        "STATE",
        "SERIAL",
        "NOT AFTER",
        "NEXT ROTATION",
        "LAST ERROR",
    ];
    let mut widths = head.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: &[&str]| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(&head);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        out.push_str(&line(&cells));
    }
    out
}

fn time(unix: Option<u64>) -> String {
    unix.map_or_else(
        || "-".to_owned(),
        |t| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(t)).to_string(),
    )
}

#[cfg(test)]
mod tests {
    use meshcert_protocol::{CertState, SpiffeId};

    use super::*;

    fn identity(id: &str, not_after: Option<u64>) -> IdentityReport {
        IdentityReport {
            entry_id: "e".into(),
            spiffe_id: SpiffeId::new(id).expect("valid id"),
            state: if not_after.is_some() {
                CertState::Issued
            } else {
                CertState::Failed
            },
            serial: not_after.map(|_| "0a1b".into()),
            not_after,
            next_rotation: not_after.map(|t| t - 1800),
            last_error: not_after.is_none().then(|| "ca unreachable".into()),
            attempts: 0,
        }
    }

    fn status(node_not_after: Option<u64>, identities: Vec<IdentityReport>) -> AgentStatus {
        AgentStatus {
            node: Some("web-1".into()),
            mesh: Some("a".into()),
            ca_address: "https://ca.example:8443".into(),
            ca_connected: true,
            node_svid_not_after: node_not_after,
            bundle_version: 3,
            identities: identities.into(),
            ..AgentStatus::default()
        }
    }

    #[test]
    fn routes_table() {
        let now = 1_000;
        let ready = status(
            Some(2_000),
            vec![identity("spiffe://a.org/web", Some(5_000))],
        );
        let unready = status(Some(2_000), vec![identity("spiffe://a.org/db", None)]);
        let metrics = Metrics::new();
        let cases: &[(Method, &str, bool, &AgentStatus, StatusCode)] = &[
            (Method::GET, "/healthz", true, &unready, StatusCode::OK),
            (Method::GET, "/readyz", true, &ready, StatusCode::OK),
            (
                Method::GET,
                "/readyz",
                true,
                &unready,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (Method::GET, "/v1/status", true, &ready, StatusCode::OK),
            (
                Method::GET,
                "/v1/status",
                false,
                &ready,
                StatusCode::FORBIDDEN,
            ),
            (
                Method::GET,
                "/healthz",
                false,
                &ready,
                StatusCode::FORBIDDEN,
            ),
            (
                Method::POST,
                "/v1/status",
                true,
                &ready,
                StatusCode::METHOD_NOT_ALLOWED,
            ),
            (Method::GET, "/metrics", true, &ready, StatusCode::OK),
            (
                Method::GET,
                "/metrics",
                false,
                &ready,
                StatusCode::FORBIDDEN,
            ),
            (Method::GET, "/nope", true, &ready, StatusCode::NOT_FOUND),
        ];
        for (method, path, allowed, status, want) in cases {
            let got = respond(method, path, *allowed, status, &metrics, now).status();
            assert_eq!(got, *want, "{method} {path} allowed={allowed}");
        }
    }

    #[test]
    fn the_status_names_the_metrics_address_when_there_is_one() {
        let status = status(Some(2_000_000_000), vec![]);
        let metrics = Metrics::new();
        let at = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        for (address, json_has, table_has) in [
            (None, None, "Metrics:    GET /metrics on the admin socket\n"),
            (
                Some("127.0.0.1:9090"),
                Some("127.0.0.1:9090"),
                "Metrics:    http://127.0.0.1:9090/metrics (and GET /metrics on the admin socket)\n",
            ),
        ] {
            if let Some(a) = address {
                metrics.set_address(a.parse().expect("address"));
            }
            let json = status_json(&status, &metrics).expect("encodes");
            let value: serde_json::Value = serde_json::from_slice(&json).expect("json");
            assert_eq!(value["metricsAddress"].as_str(), json_has);
            let view: StatusView = serde_json::from_value(value).expect("decodes");
            let table = render(&view, at);
            assert!(table.contains(table_has), "{table}");
        }
    }

    #[test]
    fn readiness_reasons() {
        let now = 1_000;
        assert_eq!(
            not_ready_reason(&status(None, vec![]), now).as_deref(),
            Some("the node has no SVID yet (not joined)")
        );
        assert_eq!(
            not_ready_reason(&status(Some(900), vec![]), now).as_deref(),
            Some("the node SVID has expired")
        );
        let missing = status(
            Some(2_000),
            vec![
                identity("spiffe://a.org/web", Some(5_000)),
                identity("spiffe://a.org/db", None),
            ],
        );
        assert_eq!(
            not_ready_reason(&missing, now).as_deref(),
            Some("no valid SVID yet for spiffe://a.org/db")
        );
    }

    #[test]
    fn an_outage_shows_since_when_and_what_expired_meanwhile() {
        let now = 1_000_000_000;
        let mut down = status(
            Some(2_000_000_000),
            vec![identity("spiffe://a.org/web", Some(now - 5))],
        );
        down.ca_connected = false;
        down.ca_last_error = Some("connection refused".into());
        down.ca_unreachable_since = Some(now - 60);
        down.expired_while_unreachable = vec!["spiffe://a.org/web".into()];
        let reason = not_ready_reason(&down, now).expect("not ready");
        assert!(
            reason.contains("the CA holder is unreachable since 2001-09-09T01:45:40Z")
                && reason.contains("expired meanwhile: spiffe://a.org/web"),
            "{reason}"
        );
        let metrics = Metrics::new();
        let answer = respond(&Method::GET, "/readyz", true, &down, &metrics, now);
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        let json = serde_json::to_vec(&down).expect("encodes");
        let view: StatusView = serde_json::from_slice(&json).expect("decodes");
        let table = render(&view, UNIX_EPOCH + Duration::from_secs(now));
        assert!(
            table.contains("UNREACHABLE since 2001-09-09T01:45:40Z (1m ago): connection refused"),
            "{table}"
        );
        assert!(
            table.contains("Expired while the CA is unreachable: spiffe://a.org/web"),
            "{table}"
        );
        // Still serving everything: ready, and the outage is said.
        down.identities = vec![identity("spiffe://a.org/web", Some(now + 5))].into();
        down.expired_while_unreachable.clear();
        assert_eq!(not_ready_reason(&down, now), None);
        assert_eq!(
            outage(&down).as_deref(),
            Some("the CA holder is unreachable since 2001-09-09T01:45:40Z")
        );
    }

    #[test]
    fn status_json_reads_back_into_the_table() {
        let status = status(
            Some(2_000_000_000),
            vec![
                identity("spiffe://a.org/web", Some(2_000_000_000)),
                identity("spiffe://a.org/db", None),
            ],
        );
        let json = serde_json::to_vec(&status).expect("status encodes");
        let view: StatusView = serde_json::from_slice(&json).expect("status decodes");
        let table = render(&view, UNIX_EPOCH + Duration::from_secs(1_000_000_000));
        assert!(table.contains("Node:       web-1 (mesh a)"), "{table}");
        assert!(
            table.contains("https://ca.example:8443 (connected)"),
            "{table}"
        );
        let lines: Vec<&str> = table.lines().collect();
        let header = lines
            .iter()
            .position(|l| l.starts_with("SPIFFE ID"))
            .expect("table header");
        let web = lines[header + 1];
        assert!(web.starts_with("spiffe://a.org/web"), "{table}");
        assert!(web.contains("ISSUED") && web.contains("0a1b"), "{table}");
        assert!(web.contains("2033-05-18T03:33:20Z"), "{table}");
        let db = lines[header + 2];
        assert!(
            db.contains("FAILED") && db.ends_with("ca unreachable"),
            "{table}"
        );
        // Columns line up: the STATE column starts at the same offset on every line.
        let col = lines[header].find("STATE").expect("STATE column");
        assert_eq!(web.find("ISSUED"), Some(col));
        assert_eq!(db.find("FAILED"), Some(col));
    }
}
