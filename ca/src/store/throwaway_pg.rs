//! A throwaway PostgreSQL cluster for tests: `initdb` and `pg_ctl` in a temporary folder, as an
//! unprivileged user (PostgreSQL refuses to run as root: when the tests run as root, as in CI,
//! the cluster runs as the `postgres` user through `runuser`), listening on a Unix socket in that
//! folder only. Stopped (`-m immediate`) and removed when dropped.
//!
//! Shared, std-only, by the holder's unit tests (`ca/src/store/`) and the e2e harness
//! (`tests/src/postgres.rs` includes this file). PostgreSQL missing is a loud failure, never a
//! silent skip: `.ci/run` installs it from Debian's packages.

#![allow(dead_code)]

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The role the tests connect as (trust authentication on the socket).
pub const USER: &str = "meshcert";

/// A running throwaway cluster.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Also listening on 127.0.0.1:`port` with TLS (`server.crt`/`server.key` in the data).
    tls: bool,
}

/// Where the PostgreSQL server binaries are: `MESHCERT_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<major>/bin` (Debian's layout), else `initdb` on the PATH.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MESHCERT_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((major, bin))
        })
        .collect();
    majors.sort();
    if let Some((_, bin)) = majors.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
    })
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn check(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Cluster {
    /// Creates and starts a cluster. Panics, naming the fix, when PostgreSQL is not installed.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Starts a cluster that also listens on a loopback port with TLS, serving this
    /// certificate chain and key (PEM); [`Cluster::tcp_url`] names it.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        Self::start_with(Some((cert_pem, key_pem)))
    }

    fn start_with(tls: Option<(&str, &str)>) -> Self {
        let bin = bin_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed: the datastore tests need a real server \
                 (apt-get install postgresql, or set MESHCERT_PG_BIN to its bin folder)"
            )
        });
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("meshcert-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cluster folder");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let as_postgres = running_as_root();
        if as_postgres {
            check(
                "chown postgres",
                Command::new("chown").arg("postgres:").arg(&dir).output(),
            );
        }
        let port = if tls.is_some() {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free loopback port")
        } else {
            5432
        };
        let cluster = Self {
            bin,
            dir,
            port,
            as_postgres,
            tls: tls.is_some(),
        };
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data().display().to_string(),
                "-U",
                USER,
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        if let Some((cert, key)) = tls {
            cluster.write_owned("data/server.crt", cert, 0o644);
            cluster.write_owned("data/server.key", key, 0o600);
        }
        cluster.pg_start();
        cluster
    }

    fn write_owned(&self, name: &str, text: &str, mode: u32) {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        if self.as_postgres {
            check(
                "chown postgres",
                Command::new("chown").arg("postgres:").arg(&path).output(),
            );
        }
    }

    /// The URL of a database over TCP with TLS verified against `root_pem_file`.
    pub fn tcp_url(&self, name: &str, root_pem_file: &Path) -> String {
        format!(
            "postgres://{USER}@127.0.0.1:{}/{name}?sslmode=verify-full&sslrootcert={}",
            self.port,
            root_pem_file.display()
        )
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The folder holding the server's socket.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(args)
                .current_dir(&self.dir)
                .output()
        } else {
            Command::new(&exe)
                .args(args)
                .current_dir(&self.dir)
                .output()
        };
        check(tool, out)
    }

    fn pg_start(&self) {
        let listen = if self.tls {
            "-c listen_addresses=127.0.0.1 -c ssl=on"
        } else {
            "-c listen_addresses=''"
        };
        let opts = format!(
            "-k {} {listen} -p {} -c max_connections=200",
            self.dir.display(),
            self.port
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.join("log").display().to_string(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server at once (`-m immediate`: as a crash would), keeping its data.
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// Starts the server again on the same socket and data.
    pub fn restart(&self) {
        self.pg_start();
    }

    /// Creates a database and returns its `postgres://` URL (Unix socket).
    pub fn create_database(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// The URL of a database of this cluster.
    pub fn url(&self, name: &str) -> String {
        let host: String = self
            .dir
            .display()
            .to_string()
            .bytes()
            .map(|b| match b {
                b'/' => "%2F".to_owned(),
                _ => char::from(b).to_string(),
            })
            .collect();
        format!("postgres://{USER}@{host}:{}/{name}", self.port)
    }

    /// Runs one SQL statement with `psql` on the `postgres` database; returns its output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    /// Runs one SQL statement with `psql` on a database of the cluster.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let out = self.run(
            "psql",
            &[
                "-h",
                &self.dir.display().to_string(),
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                db,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let exe = self.bin.join("pg_ctl");
        let data = self.data();
        let args = [
            "-D",
            &data.display().to_string(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]
        .map(str::to_owned);
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&exe)
                .args(&args)
                .output()
        } else {
            Command::new(&exe).args(&args).output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
