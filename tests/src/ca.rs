//! Harness for a running CA holder: the real `meshcert-ca` binary with its config, state folder
//! and admin socket in a fresh temporary folder, listening on a free loopback port.
//!
//! ```no_run
//! use meshcert_tests::ca::{CaHolder, EXAMPLE_CONFIG};
//! let ca = CaHolder::start(EXAMPLE_CONFIG)?;
//! let token = ca.token("node-1", "mesh-a")?;
//! // give the agent ca.addr(), ca.bundle_pem_path() and the token
//! # anyhow::Ok(())
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A one-mesh configuration: mesh `mesh-a` with trust domain `mesh-a.test`, a builtin RSA-2048
/// root, shared trust, ENABLED enforcement, and entry `web` (`spiffe://mesh-a.test/web`, uid
/// 1000, folder `web`) on node `node-1`. Edit it as text before [`CaHolder::start`].
pub const EXAMPLE_CONFIG: &str = r#"apiVersion: networking.smh.solo.io/v1alpha1
kind: VirtualMesh
metadata:
  name: test-mesh
spec:
  displayName: Test virtual mesh
  meshes:
    - name: mesh-a
      trustDomain: mesh-a.test
      type: generic
  certificateAuthority:
    builtin:
      ttlDays: 30
      rsaKeySizeBytes: 2048
      orgName: meshcert-tests
  shared: {}
  enforceAccessControl: ENABLED
holder:
  serverNames: [localhost]
  heartbeat: 30s
entries:
  - id: web
    spiffeId: spiffe://mesh-a.test/web
    nodes: [node-1]
    selectors: ["unix:uid:1000"]
    ttl: 1h
    dir: web
"#;

/// How long the holder may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// `meshcert-ca run --config CONFIG` with its state folder and admin socket in `dir` and a free
/// loopback port, for tests that watch the process itself (systemd notifications, exit codes)
/// rather than go through [`CaHolder`].
pub fn run_command(config: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new(crate::bin_path("meshcert-ca"));
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null());
    cmd
}

/// A running `meshcert-ca run`; dropping it kills the process.
pub struct CaHolder {
    dir: tempfile::TempDir,
    child: Option<Child>,
    addr: SocketAddr,
    env: Vec<(String, String)>,
}

/// The preloaded library that fakes the wall clock (Debian package `faketime`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

impl CaHolder {
    /// Writes `config_yaml` into a fresh temporary folder with `holder.stateDir`,
    /// `holder.adminSocket` and `holder.listen: 127.0.0.1:0` overridden, starts the holder and
    /// waits until its admin socket answers and its listen address is known.
    pub fn start(config_yaml: &str) -> anyhow::Result<CaHolder> {
        Self::start_with_env(config_yaml, &[])
    }

    /// [`CaHolder::start`] with extra environment variables for the holder process (kept on
    /// restarts).
    pub fn start_with_env(config_yaml: &str, env: &[(&str, String)]) -> anyhow::Result<CaHolder> {
        let dir = tempfile::tempdir()?;
        let text = with_test_paths(config_yaml, dir.path())?;
        std::fs::write(dir.path().join("config.yaml"), text)?;
        let mut ca = CaHolder {
            dir,
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        };
        ca.spawn(None)?;
        Ok(ca)
    }

    /// [`CaHolder::start`] with the holder's wall clock (only its own) faked by libfaketime
    /// and offset by [`CaHolder::set_clock_offset`]; its monotonic clock stays real.
    pub fn start_with_fake_clock(config_yaml: &str) -> anyhow::Result<CaHolder> {
        if !Path::new(LIBFAKETIME).exists() {
            bail!("{LIBFAKETIME} is missing (apt-get install faketime)");
        }
        let offsets = tempfile::tempdir()?.keep();
        let file = offsets.join("offset");
        std::fs::write(&file, "+0\n")?;
        Self::start_with_env(
            config_yaml,
            &[
                ("LD_PRELOAD", LIBFAKETIME.to_owned()),
                ("FAKETIME_TIMESTAMP_FILE", file.display().to_string()),
                ("FAKETIME_NO_CACHE", "1".to_owned()),
                ("DONT_FAKE_MONOTONIC", "1".to_owned()),
            ],
        )
    }

    /// Moves the wall clock of a holder started by [`CaHolder::start_with_fake_clock`]
    /// `seconds` ahead of the real one.
    pub fn set_clock_offset(&self, seconds: u64) -> anyhow::Result<()> {
        let file = self
            .env
            .iter()
            .find(|(k, _)| k == "FAKETIME_TIMESTAMP_FILE")
            .map(|(_, v)| PathBuf::from(v))
            .context("the holder's clock is not faked")?;
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, format!("+{seconds}\n"))?;
        std::fs::rename(&tmp, &file)?;
        Ok(())
    }

    /// The holder's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Replaces the running holder's configuration file (atomically, by rename), with the same
    /// test paths as [`CaHolder::start`]; the holder sees the change and reloads.
    pub fn write_config(&self, config_yaml: &str) -> anyhow::Result<()> {
        let text = with_test_paths(config_yaml, self.dir.path())?;
        let tmp = self.dir.path().join(".config.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// Writes text into the configuration file as is (for files that are not even YAML).
    pub fn write_raw_config(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join(".config.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// Sends SIGHUP (reload).
    pub fn sighup(&self) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("not running")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP)?;
        Ok(())
    }

    /// The status document (`meshcert-ca status -o json`).
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let out = self.ctl(&["status", "-o", "json"])?;
        if !out.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Polls the status until `done` holds (at most 60 s, then fails with the last status and
    /// the log). Not a timing assertion: a bound on waiting for something that must happen.
    pub fn wait_for_status(
        &self,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let status = self.status()?;
            if done(&status) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "waited in vain for {what}; status:\n{status:#}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn spawn(&mut self, listen: Option<SocketAddr>) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(crate::bin_path("meshcert-ca"));
        cmd.arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(addr) = listen {
            cmd.arg("--listen").arg(addr.to_string());
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().context("cannot start meshcert-ca")?);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "meshcert-ca exited with {status} while starting; log:\n{}",
                    self.log()
                );
            }
            if let Ok(out) = self.ctl(&["status", "-o", "json"])
                && out.status.success()
            {
                let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                if let Some(addr) = status["listenAddress"].as_str()
                    && let Ok(addr) = addr.parse()
                {
                    self.addr = addr;
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("meshcert-ca did not answer in time; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The HTTPS API address (loopback, the port the holder picked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The root certificate (PEM): the bundle an agent trusts the holder with.
    pub fn bundle_pem_path(&self) -> PathBuf {
        self.state_dir().join("root.pem")
    }

    /// The holder's state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// The configuration file the holder runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("meshcert-ca.log")
    }

    /// The holder's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A join token for `node` in `mesh` (`meshcert-ca token create`).
    pub fn token(&self, node: &str, mesh: &str) -> anyhow::Result<String> {
        let out = self.ctl(&["token", "create", "--node", node, "--mesh", mesh])?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Runs `meshcert-ca ARGS...` against this holder's admin socket.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(crate::output_within(
            Command::new(crate::bin_path("meshcert-ca"))
                .args(args)
                .env("MESHCERT_CA_ADMIN_SOCKET", self.admin_socket())
                .env_remove("RUST_LOG")
                .stdin(Stdio::null()),
            crate::COMMAND_TIMEOUT,
        )?)
    }

    /// Kills the holder with SIGKILL and waits for it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the holder again with the same state folder and the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        let addr = self.addr;
        self.spawn(Some(addr))?;
        if self.addr != addr {
            bail!("restarted on {} instead of {addr}", self.addr);
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(child.wait()?)
    }

    /// One HTTPS request to the holder's API over real TLS, optionally with a client identity;
    /// `body` is sent as JSON when present.
    pub fn https(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        identity: Option<&ClientIdentity>,
    ) -> anyhow::Result<HttpAnswer> {
        self.https_at(method, path, body, identity, Duration::ZERO)
    }

    /// Sends raw request bytes over TLS (for malformed or oversized requests) and reads the
    /// answer until the server closes.
    pub fn https_raw(
        &self,
        request: &[u8],
        identity: Option<&ClientIdentity>,
    ) -> anyhow::Result<HttpAnswer> {
        self.https_raw_at(request, identity, Duration::ZERO)
    }

    /// [`CaHolder::https`] from a client whose clock is `clock_offset` ahead of the real one
    /// (the server certificate is verified at that time): an agent living at a holder's faked
    /// time.
    pub fn https_at(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        identity: Option<&ClientIdentity>,
        clock_offset: Duration,
    ) -> anyhow::Result<HttpAnswer> {
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n")
                .into_bytes();
        if let Some(b) = body {
            req.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    b.len()
                )
                .as_bytes(),
            );
        }
        req.extend_from_slice(b"\r\n");
        if let Some(b) = body {
            req.extend_from_slice(b);
        }
        self.https_raw_at(&req, identity, clock_offset)
    }

    fn https_raw_at(
        &self,
        request: &[u8],
        identity: Option<&ClientIdentity>,
        clock_offset: Duration,
    ) -> anyhow::Result<HttpAnswer> {
        let roots = read_pem_certs(&self.bundle_pem_path())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // Connect, handshake and answer together: a holder that accepts and never answers
        // fails the call rather than hanging the test.
        rt.block_on(async {
            tokio::time::timeout(
                crate::COMMAND_TIMEOUT,
                https_exchange(self.addr, roots, request, identity, clock_offset),
            )
            .await
            .map_err(|_| anyhow::anyhow!("no HTTPS exchange within {:?}", crate::COMMAND_TIMEOUT))?
        })
    }
}

/// `config_yaml` with `holder.stateDir`, `holder.adminSocket` inside `dir` and
/// `holder.listen: 127.0.0.1:0`.
fn with_test_paths(config_yaml: &str, dir: &Path) -> anyhow::Result<String> {
    let mut doc: serde_norway::Value =
        serde_norway::from_str(config_yaml).context("the test config is not YAML")?;
    let map = doc
        .as_mapping_mut()
        .context("the test config is not a mapping")?;
    let holder = map
        .entry("holder".into())
        .or_insert_with(|| serde_norway::Value::Mapping(Default::default()));
    if holder.is_null() {
        *holder = serde_norway::Value::Mapping(Default::default());
    }
    let holder = holder
        .as_mapping_mut()
        .context("`holder` is not a mapping")?;
    let state = dir.join("state");
    let socket = dir.join("admin.sock");
    holder.insert("stateDir".into(), state.display().to_string().into());
    holder.insert("adminSocket".into(), socket.display().to_string().into());
    holder.insert("listen".into(), "127.0.0.1:0".into());
    Ok(serde_norway::to_string(&doc)?)
}

impl Drop for CaHolder {
    fn drop(&mut self) {
        self.kill9();
        // The folder of a faked clock's offset file (made by `start_with_fake_clock`).
        if let Some((_, file)) = self
            .env
            .iter()
            .find(|(k, _)| k == "FAKETIME_TIMESTAMP_FILE")
            && let Some(dir) = Path::new(file).parent()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A client certificate chain (leaf first) and its PKCS#8 key, for mTLS calls.
#[derive(Clone)]
pub struct ClientIdentity {
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key.
    pub key_pkcs8: Vec<u8>,
}

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// Body (de-chunked).
    pub body: Vec<u8>,
    /// The server certificate the holder presented (DER).
    pub server_cert: Vec<u8>,
}

impl HttpAnswer {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "HTTP {} body is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads every certificate of a PEM file as DER.
pub fn read_pem_certs(path: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
        let pem = pem.with_context(|| format!("{} is not PEM", path.display()))?;
        if pem.label == "CERTIFICATE" {
            out.push(pem.contents);
        }
    }
    Ok(out)
}

/// rustls' WebPKI server verification at the real time plus an offset, remembering the
/// certificate the server presented.
#[derive(Debug)]
struct ShiftedVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    offset: Duration,
    seen: std::sync::Mutex<Vec<u8>>,
}

impl rustls::client::danger::ServerCertVerifier for ShiftedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = end_entity.to_vec();
        }
        let shifted = rustls::pki_types::UnixTime::since_unix_epoch(Duration::from_secs(
            now.as_secs() + self.offset.as_secs(),
        ));
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, shifted)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

async fn https_exchange(
    addr: SocketAddr,
    roots: Vec<Vec<u8>>,
    request: &[u8],
    identity: Option<&ClientIdentity>,
    clock_offset: Duration,
) -> anyhow::Result<HttpAnswer> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(CertificateDer::from(r))?;
    }
    let verifier = Arc::new(ShiftedVerifier {
        inner: rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(store),
            Arc::clone(&provider),
        )
        .build()?,
        offset: clock_offset,
        seen: std::sync::Mutex::new(Vec::new()),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&verifier) as _);
    let config = match identity {
        Some(id) => builder.with_client_auth_cert(
            id.chain.iter().cloned().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_pkcs8.clone())),
        )?,
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    // The server may answer (e.g. 413) and close before reading everything: ignore write errors.
    let _ = tls.write_all(request).await;
    let _ = tls.flush().await;
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Ok(Err(e)) if !raw.is_empty() => {
                let _ = e;
                break;
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => bail!("no answer within 30 s"),
        }
    }
    let mut answer = parse_http(&raw)?;
    answer.server_cert = verifier.seen.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(answer)
}

fn parse_http(raw: &[u8]) -> anyhow::Result<HttpAnswer> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let line_end = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .context("bad chunk")?;
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end])?.trim(), 16)?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        body = out;
    }
    Ok(HttpAnswer {
        status,
        body,
        server_cert: Vec::new(),
    })
}
