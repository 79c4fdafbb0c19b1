//! What keeps one misbehaving workload from starving the others or the rotation loop: a cap on
//! connections in all and a smaller one per uid (over either, a new connection is closed at
//! once, which clients see as `Unavailable`; one uid holding all it may cannot keep another
//! uid out), an idle timeout on connections with no open call (slowloris and forgotten
//! connections), a per-uid token bucket on calls, and a cap on open streams.
//!
//! tonic's `tcp_*` settings and its per-request `timeout` do not fit Unix sockets and endless
//! streams, so the idle timeout is enforced here, by the connection wrapper [`Conn`]; HTTP/2
//! keepalive pings (set in [`super::serve`]) find dead peers of long-lived streams.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::peer::{self, Credentials};

/// A per-uid token bucket: `rate` calls a second on average, bursts up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<u32, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets kept before full (idle) ones are forgotten.
const MAX_BUCKETS: usize = 4096;

impl RateLimiter {
    /// A limiter allowing `rate` calls a second per uid, with bursts of `burst`.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate: rate.max(0.0),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `uid` at `now`; false when the uid is over its rate.
    pub fn allow(&self, uid: u32, now: Instant) -> bool {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&uid) {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, rate, burst, now) < burst);
        }
        let bucket = buckets.entry(uid).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(bucket, self.rate, self.burst, now);
        bucket.at = now;
        if tokens >= 1.0 {
            bucket.tokens = tokens - 1.0;
            true
        } else {
            bucket.tokens = tokens;
            false
        }
    }
}

fn refill(bucket: &Bucket, rate: f64, burst: f64, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    (bucket.tokens + elapsed * rate).min(burst)
}

/// What the service learns about a connection: the kernel's credentials and the number of
/// calls open on it (the idle timeout only runs while none is).
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// `SO_PEERCRED`, taken at accept.
    pub cred: Option<Credentials>,
    /// Calls in progress on this connection.
    pub active: Arc<AtomicUsize>,
}

impl ConnInfo {
    /// Marks a call as open until the guard is dropped.
    pub fn call(&self) -> CallGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.active.clone())
    }
}

/// An open call on a connection; dropping it closes the call.
#[derive(Debug)]
pub struct CallGuard(Arc<AtomicUsize>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The connections each uid holds, under a cap per uid.
#[derive(Debug)]
pub struct UidSlots {
    max: usize,
    held: Mutex<HashMap<u32, usize>>,
    /// When a refusal was last logged as a warning (at most one a minute: a refused client
    /// that retries must not flood the log).
    warned: Mutex<Option<Instant>>,
}

/// How often a refusal over the per-uid cap is logged as a warning.
const WARN_EVERY: Duration = Duration::from_secs(60);

impl UidSlots {
    /// At most `max` connections per uid.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            held: Mutex::new(HashMap::new()),
            warned: Mutex::new(None),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u32, usize>> {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logs a refusal of `uid`: a warning at most once per [`WARN_EVERY`], else at debug.
    fn refused(&self, uid: u32) {
        let now = Instant::now();
        let mut warned = self
            .warned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if warned.is_none_or(|at| now.saturating_duration_since(at) >= WARN_EVERY) {
            *warned = Some(now);
            tracing::warn!(
                uid,
                max = self.max,
                "a uid holds its maximum of Workload API connections: its new connections are closed (workloadConnectionsPerUid)"
            );
        } else {
            tracing::debug!(
                uid,
                max = self.max,
                "this uid holds its maximum of workload connections; closing a new one"
            );
        }
    }

    /// A slot for `uid`, unless it holds its maximum already.
    pub fn try_take(self: &Arc<Self>, uid: u32) -> Option<UidSlot> {
        let mut held = self.held();
        let count = held.entry(uid).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            slots: self.clone(),
            uid,
        })
    }
}

/// One connection of a uid; dropping it frees the slot.
#[derive(Debug)]
pub struct UidSlot {
    slots: Arc<UidSlots>,
    uid: u32,
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held();
        if let Some(count) = held.get_mut(&self.uid) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.uid);
            }
        }
    }
}

/// The slots one connection holds: one under the global cap, one under its uid's.
#[derive(Debug)]
pub struct Slot {
    _global: OwnedSemaphorePermit,
    _uid: Option<UidSlot>,
}

/// An accepted connection holding its slots under the connection caps, closed after
/// `idle_timeout` without traffic while no call is open.
#[derive(Debug)]
pub struct Conn {
    inner: UnixStream,
    info: ConnInfo,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    _slot: Slot,
}

impl Conn {
    fn new(inner: UnixStream, slot: Slot, idle_timeout: Duration) -> Self {
        let cred = inner.peer_cred().ok().map(|c| Credentials {
            pid: c.pid().unwrap_or(0),
            uid: c.uid(),
            gid: c.gid(),
            accepted_since_boot: peer::since_boot(),
        });
        Self {
            inner,
            info: ConnInfo {
                cred,
                active: Arc::new(AtomicUsize::new(0)),
            },
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            _slot: slot,
        }
    }

    fn touch(&mut self) {
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }

    /// Polls the idle timer: an error once it fires with no call open.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.idle.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.info.active.load(Ordering::SeqCst) == 0 {
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle workload connection closed",
                ));
            }
            self.touch();
        }
    }
}

impl Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.poll_idle(cx) {
                Poll::Ready(err) => {
                    tracing::debug!("closing an idle workload connection");
                    Poll::Ready(Err(err))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The connection caps of [`incoming`].
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Connections in all.
    pub total: usize,
    /// Connections of one uid.
    pub per_uid: usize,
}

/// Takes the slots of a new connection: its uid's (checked first, so that a uid at its cap
/// takes nothing from the others) and one under the global cap.
fn take_slots(
    stream: &UnixStream,
    global: &Arc<Semaphore>,
    per_uid: &Arc<UidSlots>,
) -> Option<Slot> {
    let uid = stream.peer_cred().ok().map(|c| c.uid());
    let uid_slot = match uid {
        Some(uid) => match per_uid.try_take(uid) {
            Some(slot) => Some(slot),
            None => {
                per_uid.refused(uid);
                return None;
            }
        },
        None => None,
    };
    match global.clone().try_acquire_owned() {
        Ok(permit) => Some(Slot {
            _global: permit,
            _uid: uid_slot,
        }),
        Err(_) => {
            tracing::debug!("connection cap reached, closing a new connection");
            None
        }
    }
}

/// Accepts connections until `stop` turns true, closing at once those over the caps.
/// Accept errors (e.g. out of file descriptors) are logged and retried after a pause, so the
/// server never stops on them. The task ends, and drops the listener, once `stop` is true.
pub fn incoming(
    listener: UnixListener,
    caps: Caps,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) -> (ReceiverStream<Result<Conn, io::Error>>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(16);
    let global = Arc::new(Semaphore::new(caps.total.max(1)));
    let per_uid = UidSlots::new(caps.per_uid);
    let task = tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => break,
                _ = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let Some(slot) = take_slots(&stream, &global, &per_uid) else {
                        drop(stream);
                        continue;
                    };
                    if tx
                        .send(Ok(Conn::new(stream, slot, idle_timeout)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot accept a workload connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    (ReceiverStream::new(rx), task)
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    use super::*;

    fn conn_pair(idle: Duration) -> (Conn, UnixStream) {
        let (server, client) = UnixStream::pair().expect("socket pair");
        let slot = Slot {
            _global: Arc::new(Semaphore::new(1))
                .try_acquire_owned()
                .expect("a free slot"),
            _uid: None,
        };
        (Conn::new(server, slot, idle), client)
    }

    #[tokio::test]
    async fn an_idle_connection_without_calls_is_closed() {
        let (mut conn, _client) = conn_pair(Duration::from_millis(50));
        let mut buf = [0_u8; 8];
        let err = conn.read(&mut buf).await.expect_err("closed for idleness");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_connection_with_an_open_call_is_not_idle() {
        let (mut conn, mut client) = conn_pair(Duration::from_millis(20));
        let call = conn.connect_info().call();
        let writer = tokio::spawn(async move {
            // Well past the idle timeout: only the open call keeps the connection.
            tokio::time::sleep(Duration::from_millis(200)).await;
            client.write_all(b"ping").await.expect("write");
            client
        });
        let mut buf = [0_u8; 4];
        conn.read_exact(&mut buf).await.expect("still open");
        assert_eq!(&buf, b"ping");
        drop(call);
        let _client = writer.await.expect("writer");
        let err = conn
            .read(&mut buf)
            .await
            .expect_err("idle once the call ended");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cap.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let (_stop_tx, stop) = watch::channel(false);
        let caps = Caps {
            total: 1,
            per_uid: 8,
        };
        let (mut incoming, _task) = incoming(listener, caps, Duration::from_secs(60), stop);
        let _first = UnixStream::connect(&path).await.expect("connect");
        let held = incoming.next().await.expect("accepted").expect("ok");
        let mut second = UnixStream::connect(&path).await.expect("connect");
        let mut buf = [0_u8; 1];
        // Closed by the server: end of stream (or a reset), never a hang.
        let n = second.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0);
        // Once the first connection is gone, a new one is served.
        drop(held);
        let _third = UnixStream::connect(&path).await.expect("connect");
        assert!(incoming.next().await.is_some());
    }

    #[test]
    fn a_uid_at_its_cap_takes_nothing_from_another() {
        let slots = UidSlots::new(2);
        let first = slots.try_take(1000).expect("first");
        let _second = slots.try_take(1000).expect("second");
        assert!(slots.try_take(1000).is_none(), "over the cap");
        let _other = slots.try_take(1001).expect("another uid");
        drop(first);
        assert!(
            slots.try_take(1000).is_some(),
            "a freed slot is usable again"
        );
    }

    #[test]
    fn rate_limit_allows_a_burst_then_the_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let t0 = Instant::now();
        let allowed: Vec<bool> = (0..5).map(|_| limiter.allow(1000, t0)).collect();
        assert_eq!(allowed, [true, true, true, false, false]);
        // Another uid has its own bucket.
        assert!(limiter.allow(1001, t0));
        // Half a second later one token is back (2/s).
        let t1 = t0 + Duration::from_millis(500);
        assert!(limiter.allow(1000, t1));
        assert!(!limiter.allow(1000, t1));
        // Long idle refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        let allowed = (0..4).filter(|_| limiter.allow(1000, t2)).count();
        assert_eq!(allowed, 3);
    }
}
