//! The real processes a benchmark drives: `meshcert-ca` and `meshcert-agent` started from the
//! same target folder as this binary, in temporary folders on loopback, plus what the kernel
//! says about them (`/proc/<pid>/stat` CPU time, `/proc/<pid>/status` peak RSS).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};

/// `/proc/<pid>/stat` counts CPU time in clock ticks; Linux fixes USER_HZ at 100 for that ABI.
const TICKS_PER_SECOND: u64 = 100;
/// How long a process may take to come up.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Where the `meshcert-ca` and `meshcert-agent` binaries are, and where agents' shared
/// volumes go.
#[derive(Debug, Clone)]
pub struct Bins {
    dir: PathBuf,
    /// The folder agents' volumes are created in (a tmpfs such as `/dev/shm`, as the default
    /// `/run/meshcert/svids` is); `None`: beside the agent's state, on the temp folder's disk.
    pub volume_base: Option<PathBuf>,
    /// Extra environment for the holders started (e.g. `MESHCERT_CA_GROUP_COMMIT=off`).
    pub holder_env: Vec<(String, String)>,
}

impl Bins {
    /// The table note that says where agents' volumes were.
    pub fn volume_note(&self) -> String {
        format!(
            "Agent volumes in {}.",
            self.volume_base
                .as_ref()
                .map_or("the agent's temporary folder".to_owned(), |p| p
                    .display()
                    .to_string())
        )
    }

    /// The binaries beside this one (`target/<profile>/`). When run through `cargo run` (and
    /// unless `no_build`), builds them first with the same profile so the figures never come
    /// from stale binaries.
    pub fn locate(no_build: bool) -> anyhow::Result<Bins> {
        let exe = std::env::current_exe().context("this binary's path")?;
        let dir = exe
            .parent()
            .context("this binary lives in a folder")?
            .to_owned();
        let release = dir.file_name().is_some_and(|n| n == "release");
        if !release {
            tracing_note(
                "this is not a release build: the figures will be far below the real ones",
            );
        }
        if !no_build && let Some(cargo) = std::env::var_os("CARGO") {
            let mut cmd = Command::new(cargo);
            cmd.args([
                "build",
                "--bins",
                "-p",
                "meshcert-ca",
                "-p",
                "meshcert-agent",
            ]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().context("cannot run cargo")?;
            if !status.success() {
                bail!("building meshcert-ca and meshcert-agent failed");
            }
        }
        for name in ["meshcert-ca", "meshcert-agent"] {
            if !dir.join(name).exists() {
                bail!(
                    "{} is missing: run `cargo build{} --bins -p meshcert-ca -p meshcert-agent`",
                    dir.join(name).display(),
                    if release { " --release" } else { "" }
                );
            }
        }
        Ok(Bins {
            holder_env: Vec::new(),
            dir,
            volume_base: None,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A note on stderr (the figures go to stdout).
pub fn tracing_note(text: &str) {
    eprintln!("note: {text}");
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // The command name may hold spaces: the fields we want follow the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state(3) ppid(4) ... utime is field 14, stime 15 (1-based over the line).
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    let ticks = utime + stime;
    Ok(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
}

/// What the kernel says about a process's memory, in KiB, and its threads.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// Peak resident set (`VmHWM`).
    pub peak: u64,
    /// Resident set now (`VmRSS`).
    pub rss: u64,
    /// Of which anonymous (heap, stacks): `RssAnon`.
    pub anon: u64,
    /// Of which file-backed (the binary's and libraries' mapped pages): `RssFile`.
    pub file: u64,
    /// Threads.
    pub threads: u64,
}

/// Reads `/proc/<pid>/status`.
pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name}"))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("no value")?
            .parse()?)
    };
    Ok(Memory {
        peak: field("VmHWM:")?,
        rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
        threads: field("Threads:")?,
    })
}

/// A running `meshcert-ca run` in its own temporary folder; killed when dropped.
pub struct Holder {
    bins: Bins,
    dir: tempfile::TempDir,
    child: Child,
    addr: SocketAddr,
}

/// One holder entry for the config.
#[derive(Debug, Clone)]
pub struct EntrySpec {
    /// Entry id (also its volume folder).
    pub id: String,
    /// SPIFFE ID path below `spiffe://mesh-a.test`.
    pub path: String,
    /// Nodes it is assigned to; empty = every node of `mesh-a`.
    pub nodes: Vec<String>,
    /// Lifetime, humantime (`30s`).
    pub ttl: String,
}

impl EntrySpec {
    /// An entry `id` for `node` with `ttl`, selected by this process's uid.
    pub fn for_node(id: &str, node: &str, ttl: &str) -> EntrySpec {
        EntrySpec {
            id: id.to_owned(),
            path: format!("/bench/{id}"),
            nodes: vec![node.to_owned()],
            ttl: ttl.to_owned(),
        }
    }
}

fn config_yaml(dir: &Path, entries: &[EntrySpec], holder_extra: &str) -> String {
    let uid = nix::unistd::geteuid().as_raw();
    let mut text = format!(
        "apiVersion: networking.smh.solo.io/v1alpha1\nkind: VirtualMesh\nmetadata:\n  name: bench\n\
         spec:\n  displayName: meshcert bench\n  meshes:\n    - name: mesh-a\n      trustDomain: mesh-a.test\n      type: generic\n\
         \x20 certificateAuthority:\n    builtin:\n      ttlDays: 30\n      rsaKeySizeBytes: 2048\n      orgName: meshcert-bench\n\
         \x20 shared: {{}}\n  enforceAccessControl: ENABLED\n\
         holder:\n  listen: 127.0.0.1:0\n  serverNames: [localhost]\n  heartbeat: 30s\n  stateDir: {state}\n  adminSocket: {admin}\n{holder_extra}",
        state = dir.join("state").display(),
        admin = dir.join("admin.sock").display(),
    );
    text.push_str("entries:\n");
    for e in entries {
        let assign = if e.nodes.is_empty() {
            "    mesh: mesh-a\n".to_owned()
        } else {
            format!("    nodes: [{}]\n", e.nodes.join(", "))
        };
        text.push_str(&format!(
            "  - id: {id}\n    spiffeId: spiffe://mesh-a.test{path}\n{assign}    selectors: [\"unix:uid:{uid}\"]\n    ttl: {ttl}\n    dir: {id}\n",
            id = e.id,
            path = e.path,
            ttl = e.ttl,
        ));
    }
    text
}

impl Holder {
    /// Starts a holder with `entries` (`holder_extra`: more `holder:` settings, each line
    /// indented by two spaces) and waits until it answers.
    pub fn start(bins: &Bins, entries: &[EntrySpec], holder_extra: &str) -> anyhow::Result<Holder> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config.yaml");
        std::fs::write(&config, config_yaml(dir.path(), entries, holder_extra))?;
        let child = Self::spawn(bins, dir.path(), None)?;
        let mut holder = Holder {
            bins: bins.clone(),
            dir,
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        holder.wait_up()?;
        Ok(holder)
    }

    fn spawn(bins: &Bins, dir: &Path, listen: Option<SocketAddr>) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("meshcert-ca.log"))?;
        let mut cmd = Command::new(bins.path("meshcert-ca"));
        cmd.arg("run")
            .arg("--config")
            .arg(dir.join("config.yaml"))
            .env("RUST_LOG", "warn")
            .envs(bins.holder_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(addr) = listen {
            cmd.arg("--listen").arg(addr.to_string());
        }
        cmd.spawn().context("cannot start meshcert-ca")
    }

    /// Waits until the holder answers on its admin socket and says where it listens.
    fn wait_up(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("meshcert-ca exited with {status}; log:\n{}", self.log());
            }
            if let Ok(status) = self.status()
                && let Some(addr) = status["listenAddress"].as_str()
                && let Ok(addr) = addr.parse()
            {
                self.addr = addr;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("meshcert-ca did not come up; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the holder with SIGKILL (an outage) and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the holder again on the same state folder and address; returns once it answers,
    /// with the moment its API port first accepted a connection (when agents can reach it).
    pub fn restart(&mut self) -> anyhow::Result<SystemTime> {
        self.kill9();
        let addr = self.addr;
        self.child = Self::spawn(&self.bins, self.dir.path(), Some(addr))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let back = loop {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                break SystemTime::now();
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("meshcert-ca exited with {status}; log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("meshcert-ca did not listen again; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        self.wait_up()?;
        if self.addr != addr {
            bail!("the holder came back on {} instead of {addr}", self.addr);
        }
        Ok(back)
    }

    /// The holder's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("meshcert-ca.log")).unwrap_or_default()
    }

    /// The API address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The root certificate the agents trust the holder with.
    pub fn bundle_path(&self) -> PathBuf {
        self.dir.path().join("state/root.pem")
    }

    /// The roots as DER.
    pub fn roots(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        meshcert_tests::ca::read_pem_certs(&self.bundle_path())
    }

    /// Runs `meshcert-ca ARGS` against the admin socket.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new(self.bins.path("meshcert-ca"))
            .args(args)
            .env(
                "MESHCERT_CA_ADMIN_SOCKET",
                self.dir.path().join("admin.sock"),
            )
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()?)
    }

    /// `meshcert-ca status -o json`.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.ctl(&["status", "-o", "json"])?;
        if !out.status.success() {
            bail!("status: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// How many SVIDs the holder has signed.
    pub fn issued(&self) -> anyhow::Result<u64> {
        self.status()?["certificateStatus"]["svidsIssued"]
            .as_u64()
            .context("no svidsIssued in the status")
    }

    /// A join token for `node` in `mesh-a`.
    pub fn token(&self, node: &str) -> anyhow::Result<String> {
        let out = self.ctl(&["token", "create", "--node", node, "--mesh", "mesh-a"])?;
        if !out.status.success() {
            bail!("token create: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `meshcert-agent run` joined to a [`Holder`]; killed when dropped.
pub struct AgentProc {
    dir: tempfile::TempDir,
    volume: tempfile::TempDir,
    child: Child,
    /// Wall-clock time just before the process was started.
    pub started: SystemTime,
}

impl AgentProc {
    /// Starts an agent for `node` with a fresh token, JSON logs at `log_level`, and
    /// `extra_yaml` appended to its config. Does not wait.
    pub fn start(
        bins: &Bins,
        holder: &Holder,
        node: &str,
        extra_yaml: &str,
        log_level: &str,
    ) -> anyhow::Result<AgentProc> {
        let token = holder.token(node)?;
        let dir = tempfile::tempdir()?;
        let volume = match &bins.volume_base {
            Some(base) => tempfile::tempdir_in(base)?,
            None => tempfile::tempdir_in(dir.path())?,
        };
        let root = dir.path();
        let config = format!(
            "caAddress: {addr}\ncaServerName: localhost\ntrustBundle: {bundle}\nnodeName: {node}\nmesh: mesh-a\n\
             stateDir: {state}\nvolumeDir: {volume}\nworkloadSocket: {workload}\nadminSocket: {admin}\n{extra_yaml}\n",
            addr = holder.addr(),
            bundle = holder.bundle_path().display(),
            state = root.join("state").display(),
            volume = volume.path().join("svids").display(),
            workload = root.join("workload.sock").display(),
            admin = root.join("admin.sock").display(),
        );
        std::fs::write(root.join("agent.yaml"), config)?;
        let log = std::fs::File::create(root.join("agent.log"))?;
        let started = SystemTime::now();
        // MESHCERT_BENCH_AGENT_WRAPPER (e.g. `valgrind --tool=massif`) runs the agent under a
        // profiler; the memory figures are then the wrapper's, its own output is what counts.
        let wrapper = std::env::var("MESHCERT_BENCH_AGENT_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut cmd = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(bins.path("meshcert-agent"));
                c
            }
            None => Command::new(bins.path("meshcert-agent")),
        };
        // Its own process group: a wrapper script (heaptrack) does not pass signals on, so
        // the whole group is signalled when the agent is dropped.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .arg("run")
            .arg("--log-format")
            .arg("json")
            .arg("--config")
            .arg(root.join("agent.yaml"))
            .env("RUST_LOG", log_level)
            .env_remove("NOTIFY_SOCKET")
            // In the environment: a command line is readable by every local user.
            .env("MESHCERT_JOIN_TOKEN", &token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("cannot start meshcert-agent")?;
        Ok(AgentProc {
            dir,
            volume,
            child,
            started,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the log when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "meshcert-agent exited with {status}; log tail:\n{}",
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The shared volume.
    pub fn volume_dir(&self) -> PathBuf {
        self.volume.path().join("svids")
    }

    /// The state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The Workload API socket.
    pub fn workload_socket(&self) -> PathBuf {
        self.dir.path().join("workload.sock")
    }

    /// The agent's log (JSON lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits until every entry folder in `ids` has its `..data`; an error after `timeout`.
    pub fn wait_all_installed(&mut self, ids: &[String], timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let volume = self.volume_dir();
        let mut pending: Vec<&String> = ids.iter().collect();
        loop {
            pending.retain(|id| std::fs::symlink_metadata(volume.join(id).join("..data")).is_err());
            if pending.is_empty() {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} of {} entries not installed after {timeout:?}; log tail:\n{}",
                    pending.len(),
                    ids.len(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProc {
    /// SIGTERM to the agent's process group first (a profiler wrapper writes its output on
    /// exit), SIGKILL to the group after 10 s.
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, killpg};
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let group = nix::unistd::Pid::from_raw(pid);
            let _ = killpg(group, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    // The wrapper is gone; whatever it left in the group goes too.
                    let _ = killpg(group, Signal::SIGKILL);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = killpg(group, Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `SVID installed` event of an agent's JSON log (logged once the files are on disk,
/// before the SVID is published to the Workload API).
#[derive(Debug, Clone)]
pub struct LoggedInstall {
    /// The entry.
    pub entry_id: String,
    /// The new SVID's serial, lowercase hex.
    pub serial: String,
    /// The log line's timestamp (µs).
    pub at: SystemTime,
    /// The SVID's not-after, Unix seconds.
    pub not_after: u64,
}

/// Every `SVID installed` event of an agent's JSON log, in order.
pub fn logged_installs(log: &str) -> Vec<LoggedInstall> {
    log.lines()
        .filter_map(|line| {
            let v = serde_json::from_str::<serde_json::Value>(line).ok()?;
            let fields = &v["fields"];
            if fields["message"] != "SVID installed" {
                return None;
            }
            Some(LoggedInstall {
                entry_id: fields["entry_id"].as_str()?.to_owned(),
                serial: fields["serial"].as_str()?.to_owned(),
                at: humantime::parse_rfc3339_weak(v["timestamp"].as_str()?).ok()?,
                not_after: fields["not_after"].as_u64()?,
            })
        })
        .collect()
}

/// When a symlink (such as `..data`) was last replaced: its own modification time.
pub fn link_time(path: &Path) -> anyhow::Result<SystemTime> {
    Ok(std::fs::symlink_metadata(path)
        .with_context(|| format!("{}", path.display()))?
        .modified()?)
}
