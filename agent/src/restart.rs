//! The agent's restart in place at start (same process id, so systemd and the container
//! runtime see nothing), for two things that can only be set before a program starts:
//!
//! - the allocator's tunables (`GLIBC_TUNABLES`, see [`crate::heap`]);
//! - the join token out of the arguments: `/proc/<pid>/cmdline` is readable by every local
//!   user for the agent's whole life (while it retries against an unreachable holder, too),
//!   so a `--join-token` given on the command line moves to the environment
//!   (`MESHCERT_JOIN_TOKEN`, readable only by the agent's user and root).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt as _;

use crate::heap;

/// The environment variable the join token is read from.
pub const JOIN_TOKEN_ENV: &str = "MESHCERT_JOIN_TOKEN";

const JOIN_TOKEN_FLAG: &str = "--join-token";

/// `args` without `--join-token <token>` / `--join-token=<token>`, and the (last) token.
pub fn without_join_token(args: Vec<OsString>) -> (Vec<OsString>, Option<OsString>) {
    let mut kept = Vec::with_capacity(args.len());
    let mut token = None;
    let mut args = args.into_iter();
    let prefix = format!("{JOIN_TOKEN_FLAG}=");
    while let Some(arg) = args.next() {
        if arg == OsStr::new(JOIN_TOKEN_FLAG) {
            token = args.next().or(token);
        } else if let Some(value) = arg.as_bytes().strip_prefix(prefix.as_bytes()) {
            token = Some(OsStr::from_bytes(value).to_owned());
        } else {
            kept.push(arg);
        }
    }
    (kept, token)
}

/// What the restart changes: the tunables to set (when glibc's are not chosen yet) and the
/// join token to move out of the arguments.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    args: Vec<OsString>,
    tunables: bool,
    token: Option<OsString>,
}

fn plan(args: Vec<OsString>, tunables_set: bool) -> Option<Plan> {
    let (args, token) = without_join_token(args);
    let tunables = heap::HAS_TUNABLES && !tunables_set;
    (tunables || token.is_some()).then_some(Plan {
        args,
        tunables,
        token,
    })
}

/// Replaces the process image with the same program, its arguments without the join token
/// (moved to [`JOIN_TOKEN_ENV`]), and [`heap::TUNABLES`] unless `GLIBC_TUNABLES` is already set
/// (by the operator, who then chooses, or by this same step before). Call it first thing in
/// `main`, before any thread starts. Returns only when it did not replace the process: `Ok`
/// when there was nothing to do, the error when the program could not be started again.
pub fn restart_in_place() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let tunables_set = std::env::var_os(heap::TUNABLES_ENV).is_some();
    let Some(plan) = plan(std::env::args_os().collect(), tunables_set) else {
        return Ok(());
    };
    let mut args = plan.args.into_iter();
    let Some(arg0) = args.next() else {
        return Ok(());
    };
    // `/proc/self/exe` is the running program even when its file was replaced meanwhile.
    let mut command = std::process::Command::new("/proc/self/exe");
    command.arg0(arg0).args(args);
    if plan.tunables {
        command.env(heap::TUNABLES_ENV, heap::TUNABLES);
    }
    if let Some(token) = plan.token {
        command.env(JOIN_TOKEN_ENV, token);
    }
    Err(command.exec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_join_token_leaves_the_arguments_in_both_spellings() {
        for (args, token) in [
            (
                &["agent", "run", "--join-token", "-abc", "--config", "c"][..],
                Some("-abc"),
            ),
            (
                &["agent", "run", "--join-token=s3cr3t", "--config", "c"][..],
                Some("s3cr3t"),
            ),
            (&["agent", "run", "--config", "c"][..], None),
        ] {
            let (kept, found) = without_join_token(os(args));
            assert_eq!(kept, os(&["agent", "run", "--config", "c"]), "{args:?}");
            assert_eq!(found, token.map(OsString::from), "{args:?}");
        }
    }

    #[test]
    fn a_restart_happens_only_when_something_changes() {
        let plain = os(&["agent", "run"]);
        assert_eq!(plan(plain.clone(), true), None);
        let with_token = plan(os(&["agent", "run", "--join-token=t"]), true).expect("restart");
        assert_eq!(with_token.args, plain);
        assert_eq!(with_token.token, Some(OsString::from("t")));
        assert!(!with_token.tunables, "the operator's tunables stay");
        if heap::HAS_TUNABLES {
            assert!(plan(plain, false).expect("restart").tunables);
        }
    }
}
