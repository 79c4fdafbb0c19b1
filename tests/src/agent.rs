//! Harness for a running node agent: the real `meshcert-agent` binary with its own temporary
//! folder for state, shared volume and sockets, joined to a [`CaHolder`] with a fresh token.
//!
//! ```no_run
//! use meshcert_tests::agent::Agent;
//! use meshcert_tests::ca::{CaHolder, EXAMPLE_CONFIG};
//! let ca = CaHolder::start(EXAMPLE_CONFIG)?;
//! let agent = Agent::start(&ca, "node-1", "mesh-a", "")?;
//! agent.wait_for_file(&agent.volume_dir().join("web/svid.pem"))?;
//! # anyhow::Ok(())
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::ca::CaHolder;

/// How long [`Agent::wait_for_file`] and the start-up wait may take before giving up.
pub const WAIT: Duration = Duration::from_secs(60);

/// Polls `read` until it gives a value; an error after [`WAIT`].
fn wait_some<T>(what: &str, mut read: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let mut value = None;
    wait_until(what, WAIT, || {
        value = read();
        value.is_some()
    })?;
    value.ok_or_else(|| anyhow::anyhow!("{what}: no value"))
}

/// Polls `check` until it returns true; an error naming `what` after `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running `meshcert-agent run`; dropping it kills the process.
pub struct Agent {
    dir: tempfile::TempDir,
    child: Option<Child>,
    node: String,
    env: Vec<(String, String)>,
    umask: Option<u32>,
}

impl Agent {
    /// Writes a config for `node` in `mesh` against `ca` (plus `extra_yaml`, appended as is),
    /// starts the agent with a fresh join token and waits until it has joined (its node SVID is
    /// in the state folder).
    pub fn start(ca: &CaHolder, node: &str, mesh: &str, extra_yaml: &str) -> anyhow::Result<Agent> {
        let token = ca.token(node, mesh)?;
        let mut agent = Self::spawn(ca, node, mesh, extra_yaml, Some(&token))?;
        agent.wait_joined()?;
        Ok(agent)
    }

    /// Writes the config and starts the agent with `token` (or none) without waiting for
    /// anything: for scenarios where the start is expected to fail.
    pub fn spawn(
        ca: &CaHolder,
        node: &str,
        mesh: &str,
        extra_yaml: &str,
        token: Option<&str>,
    ) -> anyhow::Result<Agent> {
        Self::spawn_with_env(ca, node, mesh, extra_yaml, token, &[])
    }

    /// [`Agent::spawn`] with extra environment variables (kept across restarts), e.g.
    /// `NOTIFY_SOCKET`.
    pub fn spawn_with_env(
        ca: &CaHolder,
        node: &str,
        mesh: &str,
        extra_yaml: &str,
        token: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Agent> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let config = format!(
            "caAddress: {addr}\ncaServerName: localhost\ntrustBundle: {bundle}\nnodeName: {node}\nmesh: {mesh}\n\
             stateDir: {state}\nvolumeDir: {volume}\nworkloadSocket: {workload}\nadminSocket: {admin}\n{extra_yaml}\n",
            addr = ca.addr(),
            bundle = ca.bundle_pem_path().display(),
            state = root.join("state").display(),
            volume = root.join("svids").display(),
            workload = root.join("workload.sock").display(),
            admin = root.join("admin.sock").display(),
        );
        std::fs::write(root.join("agent.yaml"), config)?;
        let mut agent = Agent {
            dir,
            child: None,
            node: node.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            umask: None,
        };
        agent.launch(token)?;
        Ok(agent)
    }

    /// Kills the agent and starts it again with `umask` (as `sh -c 'umask ...; exec agent'`,
    /// same process id), `token` or none, without waiting; later restarts keep the umask.
    pub fn relaunch_with_umask(&mut self, umask: u32, token: Option<&str>) -> anyhow::Result<()> {
        self.kill9();
        self.umask = Some(umask);
        self.launch(token)
    }

    fn launch(&mut self, token: Option<&str>) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = match self.umask {
            None => Command::new(crate::bin_path("meshcert-agent")),
            Some(umask) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("umask {umask:03o} && exec \"$0\" \"$@\""))
                    .arg(crate::bin_path("meshcert-agent"));
                sh
            }
        };
        cmd.arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info,meshcert_agent=debug")
            .env_remove("MESHCERT_JOIN_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("GLIBC_TUNABLES")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some(token) = token {
            // `=` keeps a token that starts with `-` a value.
            cmd.arg(format!("--join-token={token}"));
        }
        self.child = Some(cmd.spawn().context("cannot start meshcert-agent")?);
        Ok(())
    }

    /// Waits until the agent has joined (its node SVID is in the state folder); an error with
    /// the log if it exits first or after [`WAIT`].
    pub fn wait_joined(&mut self) -> anyhow::Result<()> {
        let pem = self.state_dir().join("node.pem");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.try_exit()? {
                bail!(
                    "meshcert-agent exited with {status} while starting; log:\n{}",
                    self.log()
                );
            }
            if pem.exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("meshcert-agent did not join in time; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The agent's config file (edit it to test reloads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.yaml")
    }

    /// The state folder (node key, node SVID, last sync).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The shared volume.
    pub fn volume_dir(&self) -> PathBuf {
        self.dir.path().join("svids")
    }

    /// The Workload API socket.
    pub fn workload_socket(&self) -> PathBuf {
        self.dir.path().join("workload.sock")
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// The agent's log (stderr) so far, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has exited.
    pub fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?),
            None => Ok(None),
        }
    }

    /// Waits for the process to exit on its own; an error after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("meshcert-agent did not exit; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a signal to the running agent.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.pid().context("the agent is not running")?;
        let pid = i32::try_from(pid)?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)?;
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        let status = self.wait_exit(WAIT)?;
        self.child = None;
        Ok(status)
    }

    /// Kills the agent with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the agent again with the same folders and no token (it reuses its identity).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.launch(None)?;
        self.wait_joined()
    }

    /// Kills the agent and starts it again with `token` (or none) without waiting for anything.
    pub fn relaunch(&mut self, token: Option<&str>) -> anyhow::Result<()> {
        self.kill9();
        self.launch(token)
    }

    /// Waits until `path` exists; an error (with the agent's log) after [`WAIT`].
    pub fn wait_for_file(&self, path: &Path) -> anyhow::Result<()> {
        wait_until(&format!("{}", path.display()), WAIT, || path.exists())
            .with_context(|| format!("agent log:\n{}", self.log()))
    }

    /// Waits until `dir`'s folder holds an SVID and the Workload API serves that SVID: the agent
    /// writes every folder of a signing answer before it publishes the answer to the Workload
    /// API, so a file alone does not mean the API serves it yet. Waits for the file, reads its
    /// leaf's serial, then polls the agent's status (published with the Workload API's
    /// snapshot) until an identity is served with that serial. The folder's path.
    pub fn wait_for_served(&self, dir: &str) -> anyhow::Result<PathBuf> {
        let folder = self.volume_dir().join(dir);
        let pem = folder.join("svid.pem");
        self.wait_for_file(&pem)?;
        let serial = wait_some(&format!("a parsable {}", pem.display()), || {
            let bytes = std::fs::read(&pem).ok()?;
            let block = x509_parser::pem::Pem::iter_from_buffer(&bytes)
                .next()?
                .ok()?;
            crate::oracle::serial_hex(&block.contents).ok()
        })?;
        wait_until(&format!("{dir}'s SVID {serial} served"), WAIT, || {
            self.status_json().is_ok_and(|s| {
                s["identities"].as_array().is_some_and(|ids| {
                    ids.iter()
                        .any(|i| i["serial"].as_str() == Some(serial.as_str()))
                })
            })
        })
        .with_context(|| format!("agent log:\n{}", self.log()))?;
        Ok(folder)
    }

    /// Waits until the log holds an event of `target` with exactly `message` (see
    /// [`crate::log_has_event`]); an error with the log after [`WAIT`].
    pub fn wait_for_event(&self, target: &str, message: &str) -> anyhow::Result<()> {
        wait_until(&format!("{target}: {message}"), WAIT, || {
            crate::log_has_event(&self.log(), target, message)
        })
        .with_context(|| format!("agent log:\n{}", self.log()))
    }

    /// The agent's status as JSON (`meshcert-agent status -o json`).
    pub fn status_json(&self) -> anyhow::Result<serde_json::Value> {
        let out = crate::output_within(
            Command::new(crate::bin_path("meshcert-agent"))
                .args(["status", "-o", "json", "--admin-socket"])
                .arg(self.admin_socket())
                .stdin(Stdio::null()),
            crate::COMMAND_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "meshcert-agent status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}
