//! The volume's worker thread: every file operation on the shared volume runs there, and its
//! caller waits at most a timeout. A hung filesystem (or anything else that blocks a file
//! operation) in one entry folder then costs the rotator one timeout, not its loop: the thread
//! that hangs is left behind, the folder is skipped ([`WorkerError::Busy`]) until that
//! operation returns, and the next operation gets a fresh thread. At most [`MAX_STUCK`] threads
//! are ever left behind; past that, volume operations fail at once until one returns.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long a volume operation may take before its caller stops waiting for it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Threads left behind on operations that did not return, at most.
pub const MAX_STUCK: usize = 4;

/// Why an operation did not run or did not answer in time.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The operation did not finish within the timeout; it goes on in its thread and the
    /// folder is skipped until it returns.
    #[error("{key}: no answer within {timeout:?} (a hung filesystem?); skipped until it answers")]
    TimedOut {
        /// The folder.
        key: String,
        /// The timeout.
        timeout: Duration,
    },
    /// An earlier operation on the same folder has not returned yet.
    #[error("{key}: an earlier operation on this folder has not returned yet")]
    Busy {
        /// The folder.
        key: String,
    },
    /// Too many operations have not returned: nothing more is started until one does.
    #[error("{0} volume operations have not returned; none is started until one does")]
    Stuck(usize),
    /// The worker thread could not be started.
    #[error("cannot start the volume worker thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The operation panicked (a bug); the worker goes on.
    #[error("the volume operation panicked")]
    Panicked,
}

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug, Default)]
struct Shared {
    /// Folders with an operation that did not return in time.
    busy: HashSet<String>,
}

/// Where one operation is: its caller and its thread both look, under one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    Done,
    Abandoned,
}

/// Runs volume operations on its thread with a timeout; see the module documentation.
#[derive(Debug)]
pub struct Worker {
    timeout: Duration,
    sender: Mutex<Option<mpsc::Sender<Job>>>,
    shared: Arc<Mutex<Shared>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Worker {
    /// A worker whose callers wait at most `timeout`; its thread starts with the first job.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            sender: Mutex::new(None),
            shared: Arc::new(Mutex::new(Shared::default())),
        }
    }

    /// Runs `job` (an operation on folder `key`) on the worker thread and waits for its
    /// result, at most the timeout.
    pub fn run<R: Send + 'static>(
        &self,
        key: &str,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, WorkerError> {
        {
            let shared = lock(&self.shared);
            if shared.busy.contains(key) {
                return Err(WorkerError::Busy {
                    key: key.to_owned(),
                });
            }
            if shared.busy.len() >= MAX_STUCK {
                return Err(WorkerError::Stuck(shared.busy.len()));
            }
        }
        let (result_tx, result_rx) = mpsc::sync_channel(1);
        let phase = Arc::new(Mutex::new(Phase::Running));
        let job: Job = {
            let phase = phase.clone();
            let shared = self.shared.clone();
            let key = key.to_owned();
            Box::new(move || {
                let result = std::panic::catch_unwind(AssertUnwindSafe(job));
                let mut phase = lock(&phase);
                if *phase == Phase::Abandoned {
                    tracing::info!(dir = %key, "a volume operation that had timed out returned");
                    lock(&shared).busy.remove(&key);
                }
                *phase = Phase::Done;
                let _ = result_tx.send(result);
            })
        };
        self.send(job)?;
        match result_rx.recv_timeout(self.timeout) {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) | Err(RecvTimeoutError::Disconnected) => Err(WorkerError::Panicked),
            Err(RecvTimeoutError::Timeout) => {
                let mut phase = lock(&phase);
                if *phase == Phase::Done {
                    // It returned just now.
                    drop(phase);
                    return match result_rx.recv() {
                        Ok(Ok(result)) => Ok(result),
                        _ => Err(WorkerError::Panicked),
                    };
                }
                *phase = Phase::Abandoned;
                lock(&self.shared).busy.insert(key.to_owned());
                // The thread is left to its operation (it ends after it); the next job gets
                // a new one.
                *lock(&self.sender) = None;
                tracing::warn!(dir = %key, timeout = ?self.timeout, "a volume operation did not return in time (a hung filesystem?); this folder is skipped until it does");
                Err(WorkerError::TimedOut {
                    key: key.to_owned(),
                    timeout: self.timeout,
                })
            }
        }
    }

    /// Hands `job` to the worker thread, starting one when there is none (or it is gone).
    fn send(&self, job: Job) -> Result<(), WorkerError> {
        let mut sender = lock(&self.sender);
        let job = match sender.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("meshcert-volume".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .map_err(WorkerError::Spawn)?;
        // The receiver lives in the thread just started: this send cannot fail.
        let _ = tx.send(job);
        *sender = Some(tx);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    #[test]
    fn a_hung_operation_costs_one_timeout_and_blocks_only_its_folder() {
        // Long enough for an operation that returns at once to answer on a loaded machine (a
        // new thread is started for it); only the hung one waits it out.
        let worker = Worker::new(Duration::from_secs(2));
        assert_eq!(worker.run("a", || 1).expect("runs"), 1);
        let (release, hold) = channel::<()>();
        let hung = worker.run("stuck", move || {
            let _ = hold.recv();
        });
        assert!(
            matches!(hung, Err(WorkerError::TimedOut { .. })),
            "{hung:?}"
        );
        // Other folders go on, on a new thread; the hung one is skipped at once.
        assert_eq!(worker.run("b", || 2).expect("runs"), 2);
        assert!(matches!(
            worker.run("stuck", || ()),
            Err(WorkerError::Busy { .. })
        ));
        // Once it returns, the folder is usable again.
        release.send(()).expect("release");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match worker.run("stuck", || 3) {
                Ok(n) => {
                    assert_eq!(n, 3);
                    break;
                }
                Err(WorkerError::Busy { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn too_many_hung_operations_stop_new_ones_and_a_panic_is_an_error() {
        let worker = Worker::new(Duration::from_millis(50));
        let mut releases = Vec::new();
        for n in 0..MAX_STUCK {
            let (release, hold) = channel::<()>();
            releases.push(release);
            let hung = worker.run(&format!("d{n}"), move || {
                let _ = hold.recv();
            });
            assert!(matches!(hung, Err(WorkerError::TimedOut { .. })));
        }
        assert!(matches!(
            worker.run("other", || ()),
            Err(WorkerError::Stuck(_))
        ));
        drop(releases);
        let worker = Worker::new(Duration::from_secs(5));
        let panicked = worker.run("p", || -> () { panic!("a bug") });
        assert!(matches!(panicked, Err(WorkerError::Panicked)));
        assert_eq!(worker.run("p", || 4).expect("goes on"), 4);
    }
}
