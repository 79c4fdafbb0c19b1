//! The CA holder as the agent sees it: the [`Issuer`] trait (attest, renew, sync, sign, report)
//! and [`HttpsIssuer`], its implementation over HTTPS (hyper 1 on tokio-rustls). Calls after the
//! join authenticate with the node SVID as client certificate; the holder is trusted through
//! the configured trust bundle and the roots of the last synced bundles ([`crate::trust`]).
//!
//! Calls as the node share one HTTP/2 connection (ALPN `h2`): sync, report, sign, renew, the
//! JWT calls and the watch long-poll are streams on it, so the holder pays one TCP and mTLS
//! handshake per node every [`MAX_AGE`] instead of one per call. The connection belongs to the
//! TLS settings it was opened with: a new node SVID retires it (its calls in flight finish,
//! new ones go to a new connection), as do its age, [`H2_IDLE_FOR`] without a stream, the
//! holder closing it (GOAWAY) and a holder-down answer or timeout on it. A holder that offers
//! only HTTP/1.1 (an older one) gets a small pool of idle HTTP/1.1 connections instead, as do
//! the anonymous calls (the join, once per node: not worth a connection kept open).
//!
//! The holder may have several replicas (`caAddress` as a list, or a DNS name with several
//! addresses). A new connection goes to the next replica in turn; one that cannot be reached
//! (TCP, TLS, or no answer within [`CONNECT_TIMEOUT`]) sends the call to the next at once and
//! is tried last for [`REPLICA_COOLDOWN`]; the call fails only once every replica failed.
//!
//! One file past 600 lines on purpose: the connection pool, the choice of replica and every
//! call share one piece of state (which connection belongs to which TLS settings and replica).

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshcert_protocol::NodeReport;
use meshcert_protocol::api::{
    self, ApiError, AttestRequest, KubernetesAttestRequest, NodeSvidResponse, RenewRequest,
    SignRequest, SignResponse, SyncResponse,
};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::keys::PrivateKey;

/// How long one call to the holder may take, connection included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// How long one replica (or one of the addresses its name resolves to) may take to accept a
/// TCP connection and finish the TLS handshake before the next one is tried. A holder with a
/// single address has the whole [`CALL_TIMEOUT`]: there is nothing else to try.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a replica that failed is tried only after the others.
pub const REPLICA_COOLDOWN: Duration = Duration::from_secs(10);

/// Idle connections kept for reuse (as many as the default signing concurrency).
const MAX_IDLE: usize = 4;
/// How long a connection may stay idle before it is dropped: under the holder's 10 s limit
/// for the next request's headers, so the holder never closes one as we start using it.
const IDLE_FOR: Duration = Duration::from_secs(5);
/// How long a connection is used at most: well under the holder's 600 s connection lifetime,
/// so it is not cut in the middle of a call.
pub const MAX_AGE: Duration = Duration::from_secs(300);
/// How long the HTTP/2 connection may stay without a stream and still be used: under the
/// holder's limit for a node's connection (90 s), so the holder never closes it as we use it.
pub const H2_IDLE_FOR: Duration = Duration::from_secs(60);

/// The most a connection's read buffer holds (hyper's minimum is 8 KiB).
const READ_BUFFER: usize = 16 * 1024;

/// Why a call to the holder failed.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// No TCP connection.
    #[error("cannot connect to the CA holder at {address}: {source}")]
    Connect {
        /// `host:port`.
        address: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (wrong trust bundle, or the holder refused our certificate).
    #[error("TLS handshake with the CA holder at {address} failed: {source}")]
    Tls {
        /// `host:port`.
        address: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP exchange with the CA holder failed: {0}")]
    Http(String),
    /// The call took longer than [`CALL_TIMEOUT`].
    #[error("the CA holder at {address} did not answer within {timeout:?}")]
    Timeout {
        /// `host:port`.
        address: String,
        /// The limit.
        timeout: Duration,
    },
    /// The holder answered with an API error.
    #[error("the CA holder refused: {0}")]
    Api(#[from] ApiError),
    /// The holder answered with a status and a body that is not an API error.
    #[error("the CA holder answered HTTP {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },
    /// The answer is not the JSON we expect.
    #[error("cannot read the CA holder's answer: {0}")]
    Decode(String),
    /// An mTLS call was made before the node had an identity.
    #[error("the node has no identity yet (join first)")]
    NoIdentity,
    /// The TLS settings could not be built.
    #[error("cannot set up TLS to the CA holder: {0}")]
    Setup(String),
    /// The agent's own task for the call failed (it panicked: a bug); tried again later.
    #[error("the agent's task for this call failed: {0}")]
    Internal(String),
}

impl IssuerError {
    /// Whether the same call may succeed later without any change on our side.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Tls { .. }
            | Self::Http(_)
            | Self::Timeout { .. }
            | Self::Decode(_)
            | Self::Internal(_) => true,
            Self::Api(e) => e.code.is_retryable(),
            Self::Status { status, .. } => *status >= 500,
            Self::NoIdentity | Self::Setup(_) => false,
        }
    }

    /// Whether the holder could be reached at all (an API refusal still means it is up).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Tls { .. } | Self::Http(_) | Self::Timeout { .. }
        )
    }

    /// Whether the holder as a whole could not serve the call: unreachable, or answering that
    /// it cannot serve anything now (HTTP 5xx, `unavailable`, `internal`). Nothing about the
    /// identities in the call is wrong, so the agent waits for the holder's return instead of
    /// backing each of them off; every other failure is about the call itself.
    pub fn is_holder_down(&self) -> bool {
        match self {
            Self::Api(e) => e.code.is_retryable(),
            Self::Status { status, .. } => *status >= 500,
            other => other.is_unreachable(),
        }
    }
}

/// The CA holder's API, as a seam: [`HttpsIssuer`] in production, a fake in tests.
pub trait Issuer: Send + Sync + 'static {
    /// Joins with a token (no client certificate).
    fn attest(
        &self,
        request: AttestRequest,
    ) -> impl Future<Output = Result<NodeSvidResponse, IssuerError>> + Send;
    /// Joins with the pod's Kubernetes service-account token (no client certificate).
    fn attest_kubernetes(
        &self,
        request: KubernetesAttestRequest,
    ) -> impl Future<Output = Result<NodeSvidResponse, IssuerError>> + Send {
        let _ = request;
        async {
            Err(IssuerError::Setup(
                "this issuer does not attest with Kubernetes tokens".to_owned(),
            ))
        }
    }
    /// Renews the node SVID.
    fn renew(
        &self,
        request: RenewRequest,
    ) -> impl Future<Output = Result<NodeSvidResponse, IssuerError>> + Send;
    /// Fetches the node's entries and the bundles.
    fn sync(&self) -> impl Future<Output = Result<SyncResponse, IssuerError>> + Send;
    /// Signs a batch of workload CSRs.
    fn sign(
        &self,
        request: SignRequest,
    ) -> impl Future<Output = Result<SignResponse, IssuerError>> + Send;
    /// Sends the node's state.
    fn report(&self, report: NodeReport) -> impl Future<Output = Result<(), IssuerError>> + Send;
    /// Asks whether the holder answers at all, as cheaply as it can (`GET /v1/bundle`).
    fn probe(&self) -> impl Future<Output = Result<(), IssuerError>> + Send;
    /// Uses this node SVID (chain, leaf first) and key for every later call.
    fn set_identity(&self, chain: &[Vec<u8>], key: &PrivateKey) -> Result<(), IssuerError>;
}

/// The CA holder over HTTPS.
#[derive(Debug)]
pub struct HttpsIssuer {
    replicas: Vec<Replica>,
    /// The replica the next new connection tries first (round robin).
    next_replica: AtomicUsize,
    server_name: ServerName<'static>,
    anonymous: Arc<ClientConfig>,
    roots: Arc<crate::trust::HolderTrust>,
    /// The mTLS settings with their generation (1 for the first identity; 0 is anonymous).
    mtls: RwLock<Option<(u64, Arc<ClientConfig>)>>,
    /// Idle connections, newest last.
    idle: Mutex<Vec<Idle>>,
    /// The node's HTTP/2 connection (mTLS), when the holder speaks HTTP/2.
    shared: Mutex<Option<Shared>>,
    /// Held while a new HTTP/2 connection is opened, so concurrent calls wait for it instead
    /// of opening one each.
    connecting: tokio::sync::Mutex<()>,
    /// The number of the next HTTP/2 connection (to tell a replaced one from its successor).
    next_shared: AtomicU64,
}

/// One holder address (`host:port`) and when it last failed.
#[derive(Debug)]
struct Replica {
    address: String,
    failed_at: Mutex<Option<Instant>>,
}

impl Replica {
    fn cooling_down(&self, now: Instant) -> bool {
        self.failed_at
            .lock()
            .ok()
            .and_then(|f| *f)
            .is_some_and(|at| now.duration_since(at) < REPLICA_COOLDOWN)
    }

    fn set_failed(&self, failed: bool) {
        if let Ok(mut f) = self.failed_at.lock() {
            *f = failed.then(Instant::now);
        }
    }
}

/// The order to try `n` replicas in: from `first` round, those not cooling down before those
/// that are (so a failed replica gets traffic again once its cooldown ends, and is still
/// tried when every other one fails too); pure.
fn replica_order(n: usize, first: usize, cooling: impl Fn(usize) -> bool) -> Vec<usize> {
    let round: Vec<usize> = (0..n).map(|k| (first + k) % n.max(1)).collect();
    let (mut order, later): (Vec<usize>, Vec<usize>) =
        round.into_iter().partition(|i| !cooling(*i));
    order.extend(later);
    order
}

/// One open HTTP/1.1 connection to the holder.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// The replica it is connected to.
    replica: usize,
    /// The generation of the TLS settings it was opened with.
    generation: u64,
    opened: Instant,
}

/// The node's HTTP/2 connection: every call as the node is a stream on it.
struct Shared {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    replica: usize,
    generation: u64,
    opened: Instant,
    /// Its number ([`HttpsIssuer::next_shared`]).
    id: u64,
    streams: Arc<Streams>,
}

/// The streams open on an HTTP/2 connection, and when the last one ended.
#[derive(Debug)]
struct Streams {
    open: AtomicUsize,
    last_end: Mutex<Instant>,
}

impl Streams {
    /// Whether the connection has been without a stream for `idle` at `now`.
    fn idle_for(&self, idle: Duration, now: Instant) -> bool {
        self.open.load(Ordering::SeqCst) == 0
            && self
                .last_end
                .lock()
                .map_or(true, |at| now.duration_since(*at) >= idle)
    }
}

/// One open stream of [`Streams`], until it drops.
struct StreamGuard(Arc<Streams>);

impl StreamGuard {
    fn new(streams: &Arc<Streams>) -> Self {
        streams.open.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(streams))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Ok(mut at) = self.0.last_end.lock() {
            *at = Instant::now();
        }
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// Whether a new call may use it: open, of the current settings, young and not idle long.
    fn usable(&self, generation: u64, now: Instant) -> bool {
        self.generation == generation
            && !self.sender.is_closed()
            && now.duration_since(self.opened) < MAX_AGE
            && !self.streams.idle_for(H2_IDLE_FOR, now)
    }

    fn handle(&self) -> SharedHandle {
        SharedHandle {
            sender: self.sender.clone(),
            replica: self.replica,
            id: self.id,
            streams: Arc::clone(&self.streams),
        }
    }
}

/// What a call holds of the [`Shared`] connection.
struct SharedHandle {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    replica: usize,
    id: u64,
    streams: Arc<Streams>,
}

/// A new connection, by the protocol the holder chose.
enum Opened {
    Http1(Conn),
    Http2(Shared),
}

/// The connection a call goes on, and whether it was already open (a call that was never
/// sent on an open one is tried once more on a new one).
enum Route {
    Http1(Conn, bool),
    Http2(SharedHandle, bool),
}

/// What became of a call's attempt on one connection.
enum Attempt {
    /// The answer's status and body.
    Answered(StatusCode, Bytes),
    /// Never sent on a connection found closed: try a new one.
    Again,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("id", &self.id)
            .field("replica", &self.replica)
            .field("generation", &self.generation)
            .field("opened", &self.opened)
            .finish()
    }
}

/// A connection waiting in the pool.
struct Idle {
    conn: Conn,
    since: Instant,
}

impl std::fmt::Debug for Idle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idle")
            .field("generation", &self.conn.generation)
            .field("opened", &self.conn.opened)
            .field("since", &self.since)
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl HttpsIssuer {
    /// A client of the holder at `address` (`host:port`, or several separated by commas: the
    /// replicas) whose certificate is for `server_name` and chains to one of `roots` (DER).
    pub fn new(address: &str, server_name: &str, roots: &[Vec<u8>]) -> Result<Self, IssuerError> {
        let replicas: Vec<Replica> = address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| Replica {
                address: a.to_owned(),
                failed_at: Mutex::new(None),
            })
            .collect();
        if replicas.is_empty() {
            return Err(IssuerError::Setup("no CA holder address".into()));
        }
        let roots = Arc::new(
            crate::trust::HolderTrust::new(roots, provider())
                .map_err(|e| IssuerError::Setup(e.to_string()))?,
        );
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|e| IssuerError::Setup(format!("server name `{server_name}`: {e}")))?;
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| IssuerError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(roots.clone())
            .with_no_client_auth();
        Ok(Self {
            replicas,
            next_replica: AtomicUsize::new(0),
            server_name,
            anonymous: Arc::new(anonymous),
            roots,
            mtls: RwLock::new(None),
            idle: Mutex::new(Vec::new()),
            shared: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            next_shared: AtomicU64::new(1),
        })
    }

    fn mtls_config(&self) -> Result<(u64, Arc<ClientConfig>), IssuerError> {
        self.mtls
            .read()
            .map_err(|_| IssuerError::Setup("identity lock poisoned".into()))?
            .clone()
            .ok_or(IssuerError::NoIdentity)
    }

    /// An idle connection opened with settings `generation`, still open and young enough;
    /// drops every one that is not.
    fn take_idle(&self, generation: u64) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        let now = Instant::now();
        idle.retain(|i| {
            !i.conn.sender.is_closed()
                && now.duration_since(i.since) < IDLE_FOR
                && now.duration_since(i.conn.opened) < MAX_AGE
        });
        let at = idle.iter().rposition(|i| i.conn.generation == generation)?;
        Some(idle.swap_remove(at).conn)
    }

    /// Keeps `conn` for the next call, unless it is closed, old, or of older settings.
    fn put_idle(&self, conn: Conn) {
        let current = self
            .mtls
            .read()
            .ok()
            .and_then(|m| m.as_ref().map(|(g, _)| *g))
            .unwrap_or(0);
        if conn.sender.is_closed()
            || conn.opened.elapsed() >= MAX_AGE
            || (conn.generation != 0 && conn.generation != current)
        {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() >= MAX_IDLE {
                idle.remove(0);
            }
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Opens a new connection: TCP, TLS with `config`, HTTP/2 or HTTP/1.1 as the holder chose,
    /// to the first replica that answers (see the module documentation); the last replica's
    /// error when none does.
    async fn connect(
        &self,
        generation: u64,
        config: Arc<ClientConfig>,
    ) -> Result<Opened, IssuerError> {
        let now = Instant::now();
        let first = self.next_replica.fetch_add(1, Ordering::Relaxed) % self.replicas.len();
        let order = replica_order(self.replicas.len(), first, |i| {
            self.replicas[i].cooling_down(now)
        });
        let mut last = None;
        for i in order {
            let replica = &self.replicas[i];
            let alone = self.replicas.len() == 1;
            match self
                .connect_to(&replica.address, config.clone(), alone)
                .await
            {
                Ok(tls) => {
                    replica.set_failed(false);
                    return self.handshake(tls, i, generation).await;
                }
                Err(e) => {
                    tracing::debug!(address = %replica.address, error = %e, "CA holder replica unreachable; trying the next");
                    replica.set_failed(true);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| IssuerError::Setup("no CA holder address".into())))
    }

    /// TCP and TLS to every address `address` resolves to in turn, each within
    /// [`CONNECT_TIMEOUT`] unless it is the only one there is (`alone`: the only replica).
    async fn connect_to(
        &self,
        address: &str,
        config: Arc<ClientConfig>,
        alone: bool,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, IssuerError> {
        let resolved = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host(address))
            .await
            .map_err(|_| IssuerError::Timeout {
                address: address.to_owned(),
                timeout: CONNECT_TIMEOUT,
            })?
            .map_err(|source| IssuerError::Connect {
                address: address.to_owned(),
                source,
            })?;
        let resolved: Vec<std::net::SocketAddr> = resolved.collect();
        let limit = if alone && resolved.len() == 1 {
            CALL_TIMEOUT
        } else {
            CONNECT_TIMEOUT
        };
        let mut last = None;
        for socket in resolved {
            let attempt = async {
                let tcp =
                    TcpStream::connect(socket)
                        .await
                        .map_err(|source| IssuerError::Connect {
                            address: socket.to_string(),
                            source,
                        })?;
                let _ = tcp.set_nodelay(true);
                TlsConnector::from(config.clone())
                    .connect(self.server_name.clone(), tcp)
                    .await
                    .map_err(|source| IssuerError::Tls {
                        address: socket.to_string(),
                        source,
                    })
            };
            match tokio::time::timeout(limit, attempt).await {
                Ok(Ok(tls)) => return Ok(tls),
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(IssuerError::Timeout {
                        address: socket.to_string(),
                        timeout: limit,
                    });
                }
            }
        }
        Err(last.unwrap_or_else(|| IssuerError::Connect {
            address: address.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "resolves to no address"),
        }))
    }

    /// HTTP/2 (when ALPN chose `h2`) or HTTP/1.1 over an established TLS stream to replica
    /// `replica`.
    async fn handshake(
        &self,
        tls: tokio_rustls::client::TlsStream<TcpStream>,
        replica: usize,
        generation: u64,
    ) -> Result<Opened, IssuerError> {
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, connection) =
                hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(tls))
                    .await
                    .map_err(|e| IssuerError::Http(e.to_string()))?;
            // Runs until the holder closes it, or its sender and last stream are gone.
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "HTTP/2 connection to the CA holder ended");
                }
            });
            return Ok(Opened::Http2(Shared {
                sender,
                replica,
                generation,
                opened: Instant::now(),
                id: self.next_shared.fetch_add(1, Ordering::Relaxed),
                streams: Arc::new(Streams {
                    open: AtomicUsize::new(0),
                    last_end: Mutex::new(Instant::now()),
                }),
            }));
        }
        // Signing answers are read in pieces of at most READ_BUFFER (hyper's default lets the
        // buffer of each pooled connection grow to about 400 KB and keeps it).
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(READ_BUFFER)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| IssuerError::Http(e.to_string()))?;
        // Runs until the holder closes the connection or every sender is dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection to the CA holder ended");
            }
        });
        Ok(Opened::Http1(Conn {
            sender,
            replica,
            generation,
            opened: Instant::now(),
        }))
    }

    /// Every replica's address, for messages.
    fn addresses(&self) -> String {
        self.replicas
            .iter()
            .map(|r| r.address.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        (generation, config): (u64, Arc<ClientConfig>),
    ) -> Result<R, IssuerError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| IssuerError::Decode(e.to_string()))?,
            None => Vec::new(),
        };
        let exchange = self.exchange(method, path, body, generation, config);
        let bytes = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| IssuerError::Timeout {
                address: self.addresses(),
                timeout: CALL_TIMEOUT,
            })??;
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes).map_err(|e| IssuerError::Decode(e.to_string()))
    }

    /// One call: on the node's HTTP/2 connection when there is one (opened if needed), else
    /// on an HTTP/1.1 connection (pooled, or new). A call never sent on a connection found
    /// closed is sent once more on a new one; nothing else is sent twice.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
        generation: u64,
        config: Arc<ClientConfig>,
    ) -> Result<Bytes, IssuerError> {
        let body = Bytes::from(body);
        let request = || {
            Request::builder()
                .method(method.clone())
                .uri(path)
                .header(header::HOST, self.server_name.to_str().as_ref())
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::ACCEPT, "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| IssuerError::Http(e.to_string()))
        };
        // An older holder (HTTP/1.1 only) leaves idle connections in the pool.
        let mut pooled = self.take_idle(generation);
        let mut again = false;
        loop {
            let route = match pooled.take() {
                Some(conn) => Route::Http1(conn, true),
                None if generation != 0 => self.route_as_node(generation, &config).await?,
                None => match self.connect(generation, config.clone()).await? {
                    Opened::Http1(conn) => Route::Http1(conn, false),
                    // Not offered (anonymous settings have no ALPN): closed unused.
                    Opened::Http2(_) => {
                        return Err(IssuerError::Http("unexpected HTTP/2".into()));
                    }
                },
            };
            let attempt = match route {
                Route::Http2(handle, reused) => {
                    self.attempt_http2(handle, request()?, reused, !again)
                        .await?
                }
                Route::Http1(conn, reused) => {
                    self.attempt_http1(conn, request()?, reused && !again)
                        .await?
                }
            };
            match attempt {
                Attempt::Answered(status, bytes) if status.is_success() => return Ok(bytes),
                Attempt::Answered(status, bytes) => return Err(error_of(status, &bytes)),
                Attempt::Again => again = true,
            }
        }
    }

    /// The node's HTTP/2 connection if it may carry a new call, else a new connection (which
    /// becomes the node's HTTP/2 connection, unless the holder only speaks HTTP/1.1).
    async fn route_as_node(
        &self,
        generation: u64,
        config: &Arc<ClientConfig>,
    ) -> Result<Route, IssuerError> {
        if let Some(handle) = self.current_shared(generation) {
            return Ok(Route::Http2(handle, true));
        }
        let _gate = self.connecting.lock().await;
        // Opened by a call that held the gate before this one.
        if let Some(handle) = self.current_shared(generation) {
            return Ok(Route::Http2(handle, true));
        }
        match self.connect(generation, config.clone()).await? {
            Opened::Http1(conn) => Ok(Route::Http1(conn, false)),
            Opened::Http2(shared) => {
                let handle = shared.handle();
                tracing::debug!(
                    address = %self.replicas[shared.replica].address,
                    generation,
                    "opened an HTTP/2 connection to the CA holder"
                );
                if let Ok(mut slot) = self.shared.lock() {
                    *slot = Some(shared);
                }
                Ok(Route::Http2(handle, false))
            }
        }
    }

    /// A handle on the node's HTTP/2 connection when it may carry a new call of `generation`;
    /// drops it when it may not (its calls in flight finish on their own handles).
    fn current_shared(&self, generation: u64) -> Option<SharedHandle> {
        let mut slot = self.shared.lock().ok()?;
        let usable = slot
            .as_ref()
            .is_some_and(|s| s.usable(generation, Instant::now()));
        if !usable {
            *slot = None;
            return None;
        }
        slot.as_ref().map(Shared::handle)
    }

    /// Forgets the HTTP/2 connection `id` (if it is still the node's): the next call opens one.
    fn forget_shared(&self, id: u64) {
        if let Ok(mut slot) = self.shared.lock()
            && slot.as_ref().is_some_and(|s| s.id == id)
        {
            *slot = None;
        }
    }

    /// One call as a stream on the HTTP/2 connection. A holder-down answer, or the stream
    /// failing, retires the connection and marks its replica failed. When `may_retry`, a
    /// request the holder never processed is [`Attempt::Again`]: not sent on a `reused`
    /// connection closed meanwhile, or refused by the holder's GOAWAY or REFUSED_STREAM.
    async fn attempt_http2(
        &self,
        mut handle: SharedHandle,
        request: Request<Full<Bytes>>,
        reused: bool,
        may_retry: bool,
    ) -> Result<Attempt, IssuerError> {
        let _stream = StreamGuard::new(&handle.streams);
        let retire = |error: IssuerError| {
            self.forget_shared(handle.id);
            if error.is_holder_down() {
                self.replicas[handle.replica].set_failed(true);
            }
            error
        };
        // Cancelled by the caller's time limit: this connection is not trusted again.
        let mut armed = Retire {
            issuer: self,
            id: handle.id,
            replica: handle.replica,
            armed: true,
        };
        if handle.sender.ready().await.is_err() {
            armed.armed = false;
            self.forget_shared(handle.id);
            if reused && may_retry {
                return Ok(Attempt::Again);
            }
            return Err(retire(IssuerError::Http(
                "the HTTP/2 connection closed".into(),
            )));
        }
        let response = match handle.sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut e) => {
                armed.armed = false;
                let unsent = e.take_message().is_some();
                let error = e.into_error();
                if may_retry && ((reused && unsent) || never_processed(&error)) {
                    self.forget_shared(handle.id);
                    return Ok(Attempt::Again);
                }
                return Err(retire(IssuerError::Http(error.to_string())));
            }
        };
        let status = response.status();
        let answered = Limited::new(response.into_body(), api::MAX_BODY_BYTES * 16)
            .collect()
            .await;
        armed.armed = false;
        let bytes = match answered {
            Ok(body) => body.to_bytes(),
            Err(e) => return Err(retire(IssuerError::Http(e.to_string()))),
        };
        if !status.is_success() && error_of(status, &bytes).is_holder_down() {
            self.forget_shared(handle.id);
            self.replicas[handle.replica].set_failed(true);
        }
        Ok(Attempt::Answered(status, bytes))
    }

    /// One call on an HTTP/1.1 connection, kept for the next call when it can carry one.
    async fn attempt_http1(
        &self,
        mut conn: Conn,
        request: Request<Full<Bytes>>,
        reused: bool,
    ) -> Result<Attempt, IssuerError> {
        if let Err(e) = conn.sender.ready().await {
            if reused {
                // Closed by the holder while idle: open a new one.
                return Ok(Attempt::Again);
            }
            return Err(IssuerError::Http(e.to_string()));
        }
        let response = match conn.sender.try_send_request(request).await {
            Ok(response) => response,
            Err(mut e) => {
                // Never sent (the holder had closed the connection): safe to send again.
                if reused && e.take_message().is_some() {
                    return Ok(Attempt::Again);
                }
                return Err(IssuerError::Http(e.into_error().to_string()));
            }
        };
        let (status, bytes) = read_answer(response).await?;
        if !status.is_success() && error_of(status, &bytes).is_holder_down() {
            // This replica cannot serve now: the next connection goes to another one.
            self.replicas[conn.replica].set_failed(true);
        } else {
            // The whole answer was read: the connection can carry the next call (checked
            // with `ready` when it is taken again).
            self.put_idle(conn);
        }
        Ok(Attempt::Answered(status, bytes))
    }
}

/// Retires an HTTP/2 connection when dropped armed: the call on it was cancelled (its time
/// limit), so the holder behind it did not answer in time.
struct Retire<'a> {
    issuer: &'a HttpsIssuer,
    id: u64,
    replica: usize,
    armed: bool,
}

impl Drop for Retire<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.issuer.forget_shared(self.id);
            self.issuer.replicas[self.replica].set_failed(true);
        }
    }
}

/// Whether an HTTP/2 failure says the holder never processed the stream, so that it may be
/// sent again (RFC 9113 section 8.7): refused (REFUSED_STREAM), or failed by the holder's
/// GOAWAY (a stream above its last processed one, or one opened after it).
fn never_processed(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        source = e.source();
    }
    false
}

/// The status and the whole body of an answer (bounded).
async fn read_answer(
    response: http::Response<Incoming>,
) -> Result<(StatusCode, Bytes), IssuerError> {
    let status = response.status();
    let bytes = Limited::new(response.into_body(), api::MAX_BODY_BYTES * 16)
        .collect()
        .await
        .map_err(|e| IssuerError::Http(e.to_string()))?
        .to_bytes();
    Ok((status, bytes))
}

impl HttpsIssuer {
    /// Trusts the holder through these bundles' roots too (the last sync, at start).
    pub fn follow_bundles(&self, bundles: &meshcert_protocol::api::Bundles) {
        self.roots.follow(bundles);
    }

    /// `GET /v1/watch`: waits up to `wait` for the holder's change version to differ from
    /// `version` ([`crate::push`]); the call may take `wait` plus [`CALL_TIMEOUT`].
    pub async fn watch(
        &self,
        version: Option<u64>,
        wait: Duration,
    ) -> Result<api::WatchResponse, IssuerError> {
        let (generation, config) = self.mtls_config()?;
        let path = match version {
            Some(v) => format!("{}?version={v}&wait={}", api::PATH_WATCH, wait.as_secs()),
            None => api::PATH_WATCH.to_owned(),
        };
        let exchange = self.exchange(Method::GET, &path, Vec::new(), generation, config);
        let limit = wait + CALL_TIMEOUT;
        let bytes =
            tokio::time::timeout(limit, exchange)
                .await
                .map_err(|_| IssuerError::Timeout {
                    address: self.addresses(),
                    timeout: limit,
                })??;
        serde_json::from_slice(&bytes).map_err(|e| IssuerError::Decode(e.to_string()))
    }

    /// A call over mTLS (the node SVID) outside the [`Issuer`] seam: the JWT-SVID calls of
    /// [`crate::jwt`].
    pub async fn call_as_node<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, IssuerError> {
        let config = self.mtls_config()?;
        self.call(method, path, body, config).await
    }
}

fn error_of(status: StatusCode, body: &[u8]) -> IssuerError {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => IssuerError::Api(e),
        Err(_) => IssuerError::Status {
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}

impl Issuer for HttpsIssuer {
    async fn attest(&self, request: AttestRequest) -> Result<NodeSvidResponse, IssuerError> {
        self.call(
            Method::POST,
            api::PATH_ATTEST,
            Some(&request),
            (0, self.anonymous.clone()),
        )
        .await
    }

    async fn attest_kubernetes(
        &self,
        request: KubernetesAttestRequest,
    ) -> Result<NodeSvidResponse, IssuerError> {
        self.call(
            Method::POST,
            api::PATH_ATTEST_KUBERNETES,
            Some(&request),
            (0, self.anonymous.clone()),
        )
        .await
    }

    async fn renew(&self, request: RenewRequest) -> Result<NodeSvidResponse, IssuerError> {
        let config = self.mtls_config()?;
        self.call(Method::POST, api::PATH_RENEW, Some(&request), config)
            .await
    }

    async fn sync(&self) -> Result<SyncResponse, IssuerError> {
        let config = self.mtls_config()?;
        let response: SyncResponse = self
            .call::<(), _>(Method::GET, api::PATH_SYNC, None, config)
            .await?;
        self.roots.follow(&response.bundles);
        Ok(response)
    }

    async fn sign(&self, request: SignRequest) -> Result<SignResponse, IssuerError> {
        let config = self.mtls_config()?;
        self.call(Method::POST, api::PATH_SIGN, Some(&request), config)
            .await
    }

    async fn report(&self, report: NodeReport) -> Result<(), IssuerError> {
        let config = self.mtls_config()?;
        let _: serde_json::Value = self
            .call(Method::POST, api::PATH_REPORT, Some(&report), config)
            .await?;
        Ok(())
    }

    async fn probe(&self) -> Result<(), IssuerError> {
        // Over the node's own TLS settings when it has them, so that a pooled connection is
        // reused and the next call finds one open.
        let config = self
            .mtls_config()
            .unwrap_or_else(|_| (0, self.anonymous.clone()));
        let _: serde::de::IgnoredAny = self
            .call::<(), _>(Method::GET, api::PATH_BUNDLE, None, config)
            .await?;
        Ok(())
    }

    fn set_identity(&self, chain: &[Vec<u8>], key: &PrivateKey) -> Result<(), IssuerError> {
        let certs = chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect::<Vec<_>>();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.pkcs8_der().to_vec()));
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| IssuerError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(self.roots.clone())
            .with_client_auth_cert(certs, key)
            .map_err(|e| IssuerError::Setup(format!("node SVID: {e}")))?;
        // HTTP/2 when the holder speaks it (one connection for every call), else HTTP/1.1.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let mut mtls = self
            .mtls
            .write()
            .map_err(|_| IssuerError::Setup("identity lock poisoned".into()))?;
        let generation = mtls.as_ref().map_or(0, |(g, _)| *g) + 1;
        *mtls = Some((generation, Arc::new(config)));
        drop(mtls);
        // Connections opened with the previous node SVID are not used again (the calls in
        // flight on the HTTP/2 one finish on it).
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|i| i.conn.generation == 0);
        }
        if let Ok(mut shared) = self.shared.lock() {
            *shared = None;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshcert_protocol::api::ErrorCode;

    #[test]
    fn errors_say_whether_to_retry() {
        let api = |code| IssuerError::Api(ApiError::new(code, "x"));
        for (err, retry) in [
            (api(ErrorCode::Unavailable), true),
            (api(ErrorCode::NotAssigned), false),
            (api(ErrorCode::TokenUsed), false),
            (
                IssuerError::Status {
                    status: 502,
                    body: String::new(),
                },
                true,
            ),
            (
                IssuerError::Status {
                    status: 404,
                    body: String::new(),
                },
                false,
            ),
            (IssuerError::NoIdentity, false),
        ] {
            assert_eq!(err.is_retryable(), retry, "{err}");
        }
    }

    #[test]
    fn errors_say_whether_the_holder_is_down() {
        let api = |code| IssuerError::Api(ApiError::new(code, "x"));
        let status = |status| IssuerError::Status {
            status,
            body: String::new(),
        };
        for (err, down) in [
            (IssuerError::Http("reset".into()), true),
            (
                IssuerError::Timeout {
                    address: "a:1".into(),
                    timeout: CALL_TIMEOUT,
                },
                true,
            ),
            (status(502), true),
            (status(503), true),
            (api(ErrorCode::Unavailable), true),
            (status(404), false),
            // Refusals are about the call, not the holder.
            (api(ErrorCode::PolicyDenied), false),
            (api(ErrorCode::NotAssigned), false),
            (IssuerError::Decode("x".into()), false),
            (IssuerError::Internal("panicked".into()), false),
            (IssuerError::NoIdentity, false),
        ] {
            assert_eq!(err.is_holder_down(), down, "{err}");
        }
    }

    #[test]
    fn replicas_are_tried_in_turn_and_failed_ones_last() {
        let none = |_| false;
        assert_eq!(replica_order(3, 0, none), [0, 1, 2]);
        assert_eq!(replica_order(3, 4, none), [1, 2, 0]);
        assert_eq!(replica_order(3, 0, |i| i == 0), [1, 2, 0]);
        assert_eq!(replica_order(3, 2, |i| i != 1), [1, 2, 0]);
        assert_eq!(replica_order(1, 7, |_| true), [0]);
    }

    #[test]
    fn api_errors_are_decoded() {
        let body = br#"{"code":"token_used","message":"the join token was already used"}"#;
        match error_of(StatusCode::UNAUTHORIZED, body) {
            IssuerError::Api(e) => assert_eq!(e.code, ErrorCode::TokenUsed),
            other => panic!("unexpected {other}"),
        }
        assert!(matches!(
            error_of(StatusCode::BAD_GATEWAY, b"<html>"),
            IssuerError::Status { status: 502, .. }
        ));
    }

    #[tokio::test]
    async fn unreachable_holder_is_retryable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let ca = crate::svid::testca::TestCa::new();
        let issuer = HttpsIssuer::new(&address, "127.0.0.1", &[ca.root]).expect("issuer");
        let err = issuer
            .attest(AttestRequest {
                token: "t".into(),
                csr: vec![1].into(),
            })
            .await
            .expect_err("nobody listens");
        assert!(err.is_retryable() && err.is_unreachable(), "{err}");
        assert!(matches!(issuer.sync().await, Err(IssuerError::NoIdentity)));
    }
    /// A TLS holder stand-in on 127.0.0.1 that refuses every call with `token_used`; returns
    /// its address, its root, and the count of connections it accepted.
    async fn refusing_holder(
        keep_alive: bool,
    ) -> (String, Vec<u8>, Arc<std::sync::atomic::AtomicUsize>) {
        use hyper::service::service_fn;

        let (root, leaf, key) = rcgen_server_identity();
        let tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(leaf)], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(|_req| async {
                        let body = serde_json::to_vec(&ApiError::new(ErrorCode::TokenUsed, "used"))
                            .expect("json");
                        let mut response = http::Response::new(Full::new(Bytes::from(body)));
                        *response.status_mut() = StatusCode::UNAUTHORIZED;
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(keep_alive)
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        (address, root, accepted)
    }

    /// Attests once; the refusing holder answers `token_used`.
    async fn attest_is_refused_as_used(issuer: &HttpsIssuer, call: usize) {
        let err = issuer
            .attest(AttestRequest {
                token: "t".into(),
                csr: vec![1].into(),
            })
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, IssuerError::Api(e) if e.code == ErrorCode::TokenUsed),
            "call {call}: {err}"
        );
    }

    async fn refused_calls(keep_alive: bool, calls: usize) -> usize {
        let (address, root, accepted) = refusing_holder(keep_alive).await;
        let issuer = HttpsIssuer::new(&address, "127.0.0.1", &[root]).expect("issuer");
        for call in 0..calls {
            attest_is_refused_as_used(&issuer, call).await;
        }
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[tokio::test]
    async fn an_unreachable_replica_sends_the_call_to_the_next_at_once() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead = closed.local_addr().expect("addr").to_string();
        drop(closed);
        let (address, root, accepted) = refusing_holder(true).await;
        let issuer =
            HttpsIssuer::new(&format!("{dead}, {address}"), "127.0.0.1", &[root]).expect("issuer");
        for call in 0..3 {
            // The answer of the live replica, not the dead one's connection error.
            attest_is_refused_as_used(&issuer, call).await;
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one connection to the live replica, reused"
        );
        assert!(issuer.replicas[0].cooling_down(Instant::now()));
        assert!(!issuer.replicas[1].cooling_down(Instant::now()));
        // Both down: the call fails with a holder-down error.
        let (a, b) = (
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind"),
        );
        let both = format!(
            "{},{}",
            a.local_addr().expect("addr"),
            b.local_addr().expect("addr")
        );
        drop((a, b));
        let ca = crate::svid::testca::TestCa::new();
        let issuer = HttpsIssuer::new(&both, "127.0.0.1", &[ca.root]).expect("issuer");
        let err = issuer.probe().await.expect_err("nobody listens");
        assert!(err.is_holder_down(), "{err}");
    }

    #[tokio::test]
    async fn calls_reuse_one_connection() {
        assert_eq!(refused_calls(true, 3).await, 1);
    }

    #[tokio::test]
    async fn a_connection_the_holder_closed_is_replaced() {
        assert_eq!(refused_calls(false, 3).await, 3);
    }

    /// A TLS holder stand-in that speaks HTTP/2 (and HTTP/1.1) through the holder's own
    /// serving code: every call is refused with `token_used`, except `GET /v1/watch`, answered
    /// with version 2 once `release` is set. Counts the connections it accepted and the
    /// watches it received.
    struct H2Holder {
        address: String,
        root: Vec<u8>,
        accepted: Arc<AtomicUsize>,
        watches: Arc<AtomicUsize>,
        release: tokio::sync::watch::Sender<bool>,
    }

    async fn h2_holder(lifetime: Duration) -> H2Holder {
        use hyper::service::service_fn;
        use meshcert_daemon::serve::{Http2Limits, Limits};

        let (root, leaf, key) = rcgen_server_identity();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(leaf)], key)
            .expect("server config");
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let (accepted, watches) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (release, released) = tokio::sync::watch::channel(false);
        let (count, watched) = (accepted.clone(), watches.clone());
        let limits = Limits {
            max_connections: 16,
            header_read_timeout: Duration::from_secs(10),
            lifetime,
            keep_alive: true,
        };
        let h2 = Http2Limits {
            max_streams: 32,
            max_header_list_size: 16 * 1024,
            idle: Duration::from_secs(90),
            drain: Duration::from_secs(60),
        };
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (acceptor, watched, released) =
                    (acceptor.clone(), watched.clone(), released.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (watched, mut released) = (watched.clone(), released.clone());
                        async move {
                            let (status, body) = if req.uri().path() == api::PATH_WATCH {
                                watched.fetch_add(1, Ordering::SeqCst);
                                let _ = released.wait_for(|r| *r).await;
                                (StatusCode::OK, br#"{"version":2}"#.to_vec())
                            } else {
                                let e = ApiError::new(ErrorCode::TokenUsed, "used");
                                (
                                    StatusCode::UNAUTHORIZED,
                                    serde_json::to_vec(&e).expect("json"),
                                )
                            };
                            let mut response = http::Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    if is_h2 {
                        limits.serve_http2("test", tls, service, h2).await;
                    } else {
                        limits.serve_http1("test", tls, service).await;
                    }
                });
            }
        });
        H2Holder {
            address,
            root,
            accepted,
            watches,
            release,
        }
    }

    /// A root, and a server certificate for 127.0.0.1 with its key.
    fn rcgen_server_identity() -> (Vec<u8>, Vec<u8>, PrivateKeyDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&ca_key).expect("root");
        let issuer = rcgen::Issuer::new(params, ca_key);
        let key = KeyPair::generate().expect("key");
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("leaf");
        (
            root.der().to_vec(),
            leaf.der().to_vec(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }

    /// A client of the stand-in `holder` with a node SVID.
    fn node_of(holder: &H2Holder) -> Arc<HttpsIssuer> {
        let issuer = HttpsIssuer::new(
            &holder.address,
            "127.0.0.1",
            std::slice::from_ref(&holder.root),
        )
        .expect("issuer");
        new_identity(&issuer);
        Arc::new(issuer)
    }

    /// Gives `issuer` a fresh node SVID (of a CA the stand-in does not check).
    fn new_identity(issuer: &HttpsIssuer) {
        let ca = crate::svid::testca::TestCa::new();
        let key = PrivateKey::generate(crate::keys::KeyAlgorithm::EcdsaP256).expect("key");
        let csr = crate::csr::build(&key, None).expect("csr");
        let id = meshcert_protocol::SpiffeId::new("spiffe://t.test/node").expect("id");
        let chain = ca.sign(
            &csr,
            &id,
            std::time::SystemTime::now(),
            Duration::from_secs(3600),
        );
        issuer.set_identity(&chain, &key).expect("identity");
    }

    fn is_refused(result: Result<impl std::fmt::Debug, IssuerError>, call: &str) {
        match result {
            Err(IssuerError::Api(e)) if e.code == ErrorCode::TokenUsed => {}
            other => panic!("{call}: expected the stand-in's refusal, got {other:?}"),
        }
    }

    /// The node's sync, report and sign, each answered (refused) by the stand-in.
    async fn node_calls(issuer: &HttpsIssuer) {
        is_refused(issuer.sync().await, "sync");
        let report = NodeReport {
            bundle_version: 1,
            enforcement: None,
            identities: Arc::from(Vec::new()),
            node_svid: None,
        };
        is_refused(issuer.report(report).await, "report");
        is_refused(issuer.sign(SignRequest { csrs: Vec::new() }).await, "sign");
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn watching(
        issuer: &Arc<HttpsIssuer>,
    ) -> tokio::task::JoinHandle<Result<api::WatchResponse, IssuerError>> {
        let issuer = Arc::clone(issuer);
        tokio::spawn(async move { issuer.watch(Some(1), Duration::from_secs(50)).await })
    }

    #[tokio::test]
    async fn calls_as_the_node_share_one_connection_with_the_watch_in_flight() {
        let holder = h2_holder(Duration::from_secs(600)).await;
        let issuer = node_of(&holder);
        let watch = watching(&issuer);
        until("the watch reached the holder", || {
            holder.watches.load(Ordering::SeqCst) == 1
        })
        .await;
        node_calls(&issuer).await;
        node_calls(&issuer).await;
        assert!(!watch.is_finished(), "the watch is still in flight");
        assert_eq!(
            holder.accepted.load(Ordering::SeqCst),
            1,
            "the watch, syncs, reports and signings share one connection"
        );
        holder.release.send_replace(true);
        let answer = watch.await.expect("task").expect("watch answered");
        assert_eq!(answer.version, 2);
        assert_eq!(holder.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn at_the_holders_goaway_the_watch_finishes_and_calls_move_to_a_new_connection() {
        // The stand-in ends each connection with a GOAWAY 300 ms after it opened.
        let holder = h2_holder(Duration::from_millis(300)).await;
        let issuer = node_of(&holder);
        let watch = watching(&issuer);
        until("the watch reached the holder", || {
            holder.watches.load(Ordering::SeqCst) == 1
        })
        .await;
        // Every call is answered, before and after the GOAWAY; after it, on a new connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        while holder.accepted.load(Ordering::SeqCst) < 2 {
            assert!(
                Instant::now() < deadline,
                "the calls never moved to a new connection"
            );
            node_calls(&issuer).await;
        }
        // The watch in flight on the old connection finishes there (the holder drains it) ...
        holder.release.send_replace(true);
        assert_eq!(
            watch.await.expect("task").expect("watch answered").version,
            2
        );
        // ... and the next one is armed on a live connection: a change is not lost.
        let again = issuer
            .watch(Some(1), Duration::from_secs(50))
            .await
            .expect("watch re-armed");
        assert_eq!(again.version, 2);
    }

    #[tokio::test]
    async fn a_new_node_svid_retires_the_connection_and_its_watch_finishes_on_it() {
        let holder = h2_holder(Duration::from_secs(600)).await;
        let issuer = node_of(&holder);
        let watch = watching(&issuer);
        until("the watch reached the holder", || {
            holder.watches.load(Ordering::SeqCst) == 1
        })
        .await;
        new_identity(&issuer);
        node_calls(&issuer).await;
        assert_eq!(
            holder.accepted.load(Ordering::SeqCst),
            2,
            "calls with the new node SVID went on a new connection"
        );
        holder.release.send_replace(true);
        assert_eq!(
            watch.await.expect("task").expect("watch answered").version,
            2
        );
    }

    #[tokio::test]
    async fn a_holder_without_http2_gets_the_pool_of_http1_connections() {
        let (address, root, accepted) = refusing_holder(true).await;
        let issuer = HttpsIssuer::new(&address, "127.0.0.1", &[root]).expect("issuer");
        new_identity(&issuer);
        for _ in 0..3 {
            node_calls(&issuer).await;
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
