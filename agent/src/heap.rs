//! The C allocator's settings for a small, long-lived daemon.
//!
//! glibc gives every thread that allocates its own arena (up to 8 per core) and keeps freed
//! memory in each of them. The agent's work hops between its runtime threads, so each arena
//! ends up holding a copy of the agent's peak working set: at 1000 entries that was about
//! 10 MB of the resident set for no gain. The agent runs a handful of threads that mostly
//! wait, so it uses one arena, and hands freed pages back to the kernel after its bursts
//! (a batch of rotations) instead of keeping them until the next one.
//!
//! Each thread also keeps up to 7 freed blocks of every small size (glibc's tcache) for
//! itself. Those blocks count as in use: they cannot be merged with their neighbours nor
//! returned, and with 7 threads they held about 1.2 MB at 1000 entries. glibc reads that
//! setting only at start (`GLIBC_TUNABLES`), so `meshcert-agent run` starts its own program
//! again in place with [`TUNABLES`] ([`crate::restart`]).
//!
//! Other C libraries (musl) have none of these knobs; there these functions do nothing.

use std::time::{Duration, Instant};

/// The environment variable with which an operator chooses the number of arenas; when set,
/// the agent leaves the choice to it.
pub const ARENA_ENV: &str = "MALLOC_ARENA_MAX";

/// The environment variable from which glibc reads its tunables when a program starts.
pub const TUNABLES_ENV: &str = "GLIBC_TUNABLES";

/// The tunables the agent runs with unless [`TUNABLES_ENV`] is set: no per-thread cache of
/// freed blocks.
pub const TUNABLES: &str = "glibc.malloc.tcache_count=0";

/// Whether this C library reads [`TUNABLES_ENV`] (glibc): only then does the agent restart
/// in place to set [`TUNABLES`] (see [`crate::restart`]).
pub const HAS_TUNABLES: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Uses a single malloc arena, unless [`ARENA_ENV`] says otherwise. Call it first thing in
/// `main`, before any thread starts. Returns whether the setting was applied.
pub fn use_one_arena() -> bool {
    if std::env::var_os(ARENA_ENV).is_some() {
        return false;
    }
    set_arena_max(1)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_arena_max(arenas: i32) -> bool {
    // SAFETY: `mallopt` only changes a tunable of glibc's allocator; it takes two integers,
    // touches no memory of ours and is safe to call at any time (here before any thread).
    unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, arenas) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: i32) -> bool {
    false
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: `malloc_trim` returns free pages of glibc's heaps to the kernel; it takes the
    // allocator's own locks and touches no memory that is in use.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Returns freed memory to the kernel after bursts of work, at most once per `every`.
#[derive(Debug)]
pub struct Trimmer {
    every: Duration,
    last: Option<Instant>,
}

impl Trimmer {
    /// A trimmer that releases memory at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// Called after a burst of work: releases the heap's free pages unless that was done
    /// less than `every` ago. Returns whether it did.
    pub fn after_burst(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            return false;
        }
        self.last = Some(now);
        trim();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_at_most_once_per_period() {
        let mut trimmer = Trimmer::new(Duration::from_secs(1));
        let start = Instant::now();
        assert!(trimmer.after_burst(start));
        assert!(!trimmer.after_burst(start + Duration::from_millis(500)));
        assert!(trimmer.after_burst(start + Duration::from_millis(1000)));
        assert!(!trimmer.after_burst(start + Duration::from_millis(1999)));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_goes_back_to_the_kernel() {
        fn rss_kb() -> u64 {
            let status = std::fs::read_to_string("/proc/self/status").expect("status");
            status
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .expect("RssAnon")
        }
        // Many small blocks (below the mmap threshold, so they live in the heap), touched,
        // then freed but for the last one, which pins the top of the heap: only a trim can
        // give the pages below it back.
        let mut blocks: Vec<Vec<u8>> = (0..4096).map(|_| vec![1u8; 8 * 1024]).collect();
        let pin = blocks.pop();
        let before = rss_kb();
        drop(blocks);
        let mut trimmer = Trimmer::new(Duration::from_secs(1));
        assert!(trimmer.after_burst(Instant::now()));
        let after = rss_kb();
        drop(pin);
        // 32 MB were freed; other test threads allocate meanwhile, so ask for half of it.
        assert!(
            before.saturating_sub(after) > 16 * 1024,
            "RssAnon {before} kB before the trim, {after} kB after"
        );
    }
}
