//! The one HTTP/1 accept loop both programs use, for every listener (TLS API, admin sockets,
//! metrics). Each connection is, in this order:
//!
//! 1. checked: the peer check (kernel credentials of a Unix-socket peer, say) runs at accept,
//!    before the connection takes a slot, so a refused peer never holds an allowed one's slot;
//! 2. admitted into its pool (allowed, or the small pool of refused peers that get their 403)
//!    or closed at once when the pool is full (clients retry with backoff);
//! 3. served by the caller's handler (a TLS handshake, say) which hands the stream to
//!    [`Limits::serve_http1`]: a header-read timeout and a lifetime for the whole connection;
//!    or, when the handshake chose HTTP/2 (ALPN `h2`), to [`Limits::serve_http2`]: bounded
//!    streams, an idle limit instead of the header-read timeout, and the lifetime ending in a
//!    graceful GOAWAY (see [`Http2Limits`]).
//!
//! The loop tracks its connections; at shutdown it stops accepting and lets the ones in flight
//! finish on their own (each is bounded by its lifetime).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// How long the loop waits after a failed accept (out of file descriptors, say).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The bounds of one pool of connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// How long a request's headers may take to arrive.
    pub header_read_timeout: Duration,
    /// How long a connection may live in all (slow or idle clients are cut off).
    pub lifetime: Duration,
    /// Whether a connection may carry more than one request.
    pub keep_alive: bool,
}

impl Limits {
    /// Serves HTTP/1 on `io` with these limits; the outcome is logged at DEBUG under `listener`.
    pub async fn serve_http1<I, S, B>(&self, listener: &'static str, io: I, service: S)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::HttpService<Incoming, ResBody = B>,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout)
            .keep_alive(self.keep_alive);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        match tokio::time::timeout(self.lifetime, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(listener, %error, "connection ended with an error"),
            Err(_) => tracing::debug!(listener, "connection closed after its maximum lifetime"),
        }
    }
}

/// The HTTP/2 rules of one connection, on top of its pool's [`Limits`] (whose header-read
/// timeout does not apply: a stream's headers come in one HEADERS frame, bounded in size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Limits {
    /// Streams open at once on the connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_streams: u32,
    /// The largest header list a request may send (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_size: u32,
    /// How long the connection may stay without an open stream before a GOAWAY closes it
    /// (from the end of the handshake too: a peer that never sends a request is cut off).
    pub idle: Duration,
    /// Once its lifetime is over (GOAWAY sent), how long its streams in flight may still take
    /// (after an idle GOAWAY: no longer than `idle`).
    pub drain: Duration,
}

/// The streams a connection's service is running, for the idle rule of [`Http2Limits`].
#[derive(Default)]
struct Activity {
    /// Streams whose handler is running.
    open: AtomicUsize,
    /// Streams begun so far (so that a stream begun and ended during a wait is seen).
    begun: AtomicU64,
    changed: Notify,
}

impl Activity {
    /// Counts a stream open until the guard drops.
    fn begin(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        self.begun.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
        StreamGuard(Arc::clone(self))
    }

    /// Returns once the connection has had no open stream for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.open.load(Ordering::SeqCst) > 0 {
                changed.await;
                continue;
            }
            let begun = self.begun.load(Ordering::SeqCst);
            tokio::select! {
                () = tokio::time::sleep(idle) => {
                    if self.open.load(Ordering::SeqCst) == 0
                        && self.begun.load(Ordering::SeqCst) == begun
                    {
                        return;
                    }
                }
                () = &mut changed => {}
            }
        }
    }
}

/// One open stream of an [`Activity`].
struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// A service whose calls are counted as open streams.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

type BoxedFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B> hyper::service::Service<http::Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = BoxedFuture<Result<http::Response<B>, S::Error>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let guard = self.activity.begin();
        let call = self.inner.call(req);
        Box::pin(async move {
            let answer = call.await;
            drop(guard);
            answer
        })
    }
}

impl Limits {
    /// Serves HTTP/2 on `io` with these limits and `h2`'s: at most `h2.max_streams` streams at
    /// once, h2's limits on reset streams (rapid reset), a GOAWAY once the connection has been
    /// without a stream for `h2.idle` or has lived its lifetime, after which its streams in
    /// flight have `h2.drain` to finish. Logged at DEBUG under `listener`.
    pub async fn serve_http2<I, S, B>(
        &self,
        listener: &'static str,
        io: I,
        service: S,
        h2: Http2Limits,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>
            + Send
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let activity = Arc::new(Activity::default());
        let service = Tracked {
            inner: service,
            activity: Arc::clone(&activity),
        };
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(h2.max_streams)
            .max_header_list_size(h2.max_header_list_size)
            // Rapid reset (CVE-2023-44487): streams the peer resets before they are served.
            .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
            // Streams this side had to reset for the peer's errors (CVE-2025-8671).
            .max_local_error_reset_streams(MAX_ERROR_RESETS);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        // An idle connection has no stream to drain, only the GOAWAY to flush (and a stream
        // its peer sent as it came): it gets no longer than its idle limit for that, so a
        // peer that never reads cannot hold its slot for a whole drain.
        let (why, drain) = tokio::select! {
            ended = connection.as_mut() => {
                if let Err(error) = ended {
                    tracing::debug!(listener, %error, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep(self.lifetime) => ("its maximum lifetime", h2.drain),
            () = activity.idle_for(h2.idle) => ("idle", h2.idle.min(h2.drain)),
        };
        tracing::debug!(listener, why, "closing the connection (GOAWAY)");
        connection.as_mut().graceful_shutdown();
        match tokio::time::timeout(drain, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(listener, %error, "connection ended with an error"),
            Err(_) => tracing::debug!(listener, "streams still open after the drain; closed"),
        }
    }
}

/// Streams a peer may reset before they are served, at once (h2's own default, pinned).
const MAX_PENDING_RESETS: usize = 20;
/// Streams this side may reset for a peer's protocol errors before it ends the connection.
const MAX_ERROR_RESETS: usize = 64;

/// Who may connect: the pool for peers the check allows and, optionally, a separate small pool
/// for refused peers (to answer them 403); without one, a refused peer is closed at once.
#[derive(Debug, Clone, Copy)]
pub struct Pools {
    /// The allowed peers' pool.
    pub allowed: Limits,
    /// The refused peers' pool.
    pub refused: Option<Limits>,
}

impl Pools {
    /// One pool, for listeners without a peer check.
    pub fn single(limits: Limits) -> Self {
        Self {
            allowed: limits,
            refused: None,
        }
    }
}

/// An accepted connection, admitted into a pool, handed to the handler.
#[derive(Debug)]
pub struct Connection<I, A> {
    /// The stream.
    pub io: I,
    /// The peer's address.
    pub peer: A,
    /// Whether the peer check allowed the peer.
    pub allowed: bool,
    /// The limits of the pool it was admitted into.
    pub limits: Limits,
}

/// A listening socket the loop can accept from.
pub trait Listener: Send {
    /// The accepted stream.
    type Io: Send + 'static;
    /// The peer's address.
    type Addr: Send + 'static;
    /// Accepts one connection.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Addr)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Addr)>> + Send {
        tokio::net::TcpListener::accept(self)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Io, Self::Addr)>> + Send {
        tokio::net::UnixListener::accept(self)
    }
}

/// A pool's slots, and how many connections it closed for want of one.
struct Pool {
    limits: Limits,
    slots: Arc<Semaphore>,
    closed: u64,
}

impl Pool {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            closed: 0,
        }
    }

    /// A slot, or `None` (logged at every power of two, so a flood cannot flood the log).
    fn admit(&mut self, listener: &'static str, allowed: bool) -> Option<OwnedSemaphorePermit> {
        let slot = Arc::clone(&self.slots).try_acquire_owned().ok();
        if slot.is_none() {
            self.closed += 1;
            let (cap, closed) = (self.limits.max_connections, self.closed);
            if allowed && closed.is_power_of_two() {
                tracing::warn!(
                    listener,
                    cap,
                    closed,
                    "connection cap reached; closing new connections"
                );
            } else {
                tracing::debug!(
                    listener,
                    allowed,
                    cap,
                    closed,
                    "connection cap reached; closing a new connection"
                );
            }
        }
        slot
    }
}

/// Accepts on `listener` until `shutdown` resolves. `check` runs on each accepted stream
/// before it takes a slot; `handle` serves an admitted connection (typically ending in
/// [`Limits::serve_http1`]) while its slot is held.
pub async fn serve<L, C, H, F>(
    listener_name: &'static str,
    listener: L,
    pools: Pools,
    check: C,
    handle: H,
    shutdown: impl Future<Output = ()>,
) where
    L: Listener,
    C: Fn(&L::Io) -> bool,
    H: Fn(Connection<L::Io, L::Addr>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut allowed_pool = Pool::new(pools.allowed);
    let mut refused_pool = pools.refused.map(Pool::new);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (io, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(listener = listener_name, %error, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let allowed = check(&io);
        let pool = match (allowed, refused_pool.as_mut()) {
            (true, _) => &mut allowed_pool,
            (false, Some(pool)) => pool,
            (false, None) => continue,
        };
        let Some(slot) = pool.admit(listener_name, allowed) else {
            continue;
        };
        let connection = Connection {
            io,
            peer,
            allowed,
            limits: pool.limits,
        };
        let served = handle(connection);
        connections.spawn(async move {
            let _slot = slot;
            served.await;
        });
    }
    connections.detach_all();
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{UnixListener, UnixStream};

    use super::*;

    const LIMITS: Limits = Limits {
        max_connections: 1,
        header_read_timeout: Duration::from_secs(30),
        lifetime: Duration::from_secs(60),
        keep_alive: false,
    };

    /// Serves `200 ok` (allowed) or `403` (refused) on a Unix socket, counting peer checks;
    /// `allow` decides, in order, what each check answers.
    fn start(
        pools: Pools,
        allow: Vec<bool>,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        Arc<AtomicUsize>,
        tokio::sync::oneshot::Sender<()>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let checks = Arc::new(AtomicUsize::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counter = Arc::clone(&checks);
        tokio::spawn(serve(
            "test",
            listener,
            pools,
            move |_: &UnixStream| {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                allow.get(n).copied().unwrap_or(true)
            },
            |c: Connection<UnixStream, _>| async move {
                let allowed = c.allowed;
                let service = hyper::service::service_fn(move |_req| async move {
                    let status = if allowed { 200 } else { 403 };
                    let mut r = http::Response::new(Full::new(Bytes::from_static(b"ok")));
                    *r.status_mut() = http::StatusCode::from_u16(status).expect("status");
                    Ok::<_, Infallible>(r)
                });
                c.limits.serve_http1("test", c.io, service).await;
            },
            async move {
                let _ = stopped.await;
            },
        ));
        (dir, path, checks, stop)
    }

    /// Sends one request and returns the status line, or "" when the server closed at once.
    async fn status_line(stream: &mut UnixStream) -> String {
        let _ = stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    }

    async fn wait_for_checks(checks: &AtomicUsize, n: usize) {
        while checks.load(Ordering::SeqCst) < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn the_cap_closes_the_next_connection_after_its_peer_check() {
        let (_dir, path, checks, _stop) = start(Pools::single(LIMITS), vec![]);
        // The first connection holds the only slot (no request sent yet).
        let mut first = UnixStream::connect(&path).await.expect("connect");
        wait_for_checks(&checks, 1).await;
        let mut second = UnixStream::connect(&path).await.expect("connect");
        assert_eq!(
            status_line(&mut second).await,
            "",
            "the second connection was served"
        );
        assert_eq!(
            checks.load(Ordering::SeqCst),
            2,
            "the peer check ran for the refused one"
        );
        assert_eq!(status_line(&mut first).await, "HTTP/1.1 200 OK");
        // The slot is free again.
        let mut third = UnixStream::connect(&path).await.expect("connect");
        assert_eq!(status_line(&mut third).await, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn refused_peers_use_their_own_pool_and_never_an_allowed_slot() {
        let pools = Pools {
            allowed: LIMITS,
            refused: Some(LIMITS),
        };
        let (_dir, path, checks, _stop) = start(pools, vec![false, false, true]);
        // A refused peer holds the refusal pool's only slot; a second refused peer is closed.
        let mut refused = UnixStream::connect(&path).await.expect("connect");
        wait_for_checks(&checks, 1).await;
        let mut flood = UnixStream::connect(&path).await.expect("connect");
        assert_eq!(status_line(&mut flood).await, "");
        // An allowed peer still gets served.
        let mut allowed = UnixStream::connect(&path).await.expect("connect");
        assert_eq!(status_line(&mut allowed).await, "HTTP/1.1 200 OK");
        assert_eq!(status_line(&mut refused).await, "HTTP/1.1 403 Forbidden");
    }

    #[tokio::test]
    async fn without_a_refusal_pool_a_refused_peer_is_closed() {
        let (_dir, path, _checks, _stop) = start(Pools::single(LIMITS), vec![false]);
        let mut refused = UnixStream::connect(&path).await.expect("connect");
        assert_eq!(status_line(&mut refused).await, "");
        let mut allowed = UnixStream::connect(&path).await.expect("connect");
        assert_eq!(status_line(&mut allowed).await, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn a_connection_is_cut_at_the_end_of_its_lifetime() {
        let short = Limits {
            lifetime: Duration::from_millis(200),
            ..LIMITS
        };
        let (_dir, path, _checks, _stop) = start(Pools::single(short), vec![]);
        let mut idle = UnixStream::connect(&path).await.expect("connect");
        let mut buf = Vec::new();
        // Never sends a request: the server closes it (read_to_end returns at EOF).
        let read = tokio::time::timeout(Duration::from_secs(20), idle.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "the idle connection was not closed");
        assert!(buf.is_empty());
    }

    const H2: Http2Limits = Http2Limits {
        max_streams: 8,
        max_header_list_size: 16 * 1024,
        idle: Duration::from_millis(200),
        drain: Duration::from_secs(30),
    };

    /// Serves HTTP/2 with `limits` and [`H2`] on one accepted Unix connection: `/slow` answers
    /// after a second, anything else at once. Returns a client's sender and a flag set once
    /// the client's connection ended.
    async fn h2_pair(
        limits: Limits,
    ) -> (
        hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        Arc<std::sync::atomic::AtomicBool>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h2.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (io, _) = listener.accept().await.expect("accept");
            let service = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                if req.uri().path() == "/slow" {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            limits.serve_http2("test", io, service, H2).await;
        });
        let io = UnixStream::connect(&path).await.expect("connect");
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .expect("h2 handshake");
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&ended);
        tokio::spawn(async move {
            let _ = connection.await;
            flag.store(true, Ordering::SeqCst);
        });
        (sender, ended, dir)
    }

    async fn get(
        sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        path: &str,
    ) -> Result<u16, hyper::Error> {
        let req = http::Request::builder()
            .uri(format!("http://x{path}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        sender.ready().await?;
        Ok(sender.send_request(req).await?.status().as_u16())
    }

    async fn until_ended(ended: &std::sync::atomic::AtomicBool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !ended.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ended.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn an_http2_connection_without_a_stream_is_closed_after_its_idle_limit() {
        let (_sender, ended, _dir) = h2_pair(LIMITS).await;
        assert!(
            until_ended(&ended).await,
            "the idle connection is still open"
        );
    }

    #[tokio::test]
    async fn an_http2_stream_open_past_the_idle_limit_keeps_its_connection() {
        let (mut sender, ended, _dir) = h2_pair(LIMITS).await;
        // Open five times the idle limit, then the connection carries the next call too.
        assert_eq!(get(&mut sender, "/slow").await.expect("slow call"), 200);
        assert_eq!(get(&mut sender, "/").await.expect("next call"), 200);
        // Idle again: closed.
        assert!(
            until_ended(&ended).await,
            "the idle connection is still open"
        );
    }

    #[tokio::test]
    async fn at_the_end_of_its_lifetime_an_http2_connection_lets_its_streams_finish() {
        let short = Limits {
            lifetime: Duration::from_millis(300),
            ..LIMITS
        };
        let (mut sender, ended, _dir) = h2_pair(short).await;
        // In flight when the lifetime ends (GOAWAY): answered all the same.
        assert_eq!(get(&mut sender, "/slow").await.expect("slow call"), 200);
        assert!(
            until_ended(&ended).await,
            "the connection outlived its drain"
        );
        assert!(
            get(&mut sender, "/").await.is_err(),
            "a new stream was served"
        );
    }
}
