//! `meshcert-agent`: parses the command line, sets up logging, and calls the library.
//!
//! Exit codes: 0 success, 64 bad arguments, 78 bad configuration, 1 runtime failure.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshcert_agent::admin;
use meshcert_agent::config::{self, Overrides};
use meshcert_agent::daemon::{self, RunOptions};
use meshcert_agent::heap;
use meshcert_agent::restart;
use meshcert_daemon::exit;
use meshcert_daemon::logging::{self, LogFormat};
use tracing::level_filters::LevelFilter;

mod math;

/// The meshcert node agent: keeps every SVID on this node fresh.
#[derive(Debug, Parser)]
#[command(name = "meshcert-agent", version)]
struct Cli {
    /// Log format on stderr: `text` for people, `json` (one object per line) for collectors.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent (join once with a token, then keep the node's SVIDs fresh).
    Run(RunArgs),
    /// Check a config file and print the resolved settings; exit 78 when invalid.
    CheckConfig(ConfigArgs),
    /// Show the running agent's status (from its admin socket).
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// The agent's YAML config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// The CA holder's address (host:port).
    #[arg(long)]
    ca_address: Option<String>,
    /// PEM file of the root(s) the CA holder's certificate chains to.
    #[arg(long, value_name = "FILE")]
    trust_bundle: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long)]
    node_name: Option<String>,
    /// The mesh this node joins.
    #[arg(long)]
    mesh: Option<String>,
    /// Where the node identity is kept.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The shared volume the SVIDs are written to.
    #[arg(long, value_name = "DIR")]
    volume_dir: Option<PathBuf>,
    /// The Workload API socket.
    #[arg(long, value_name = "PATH")]
    workload_socket: Option<PathBuf>,
    /// The admin socket.
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Serve Prometheus metrics in plaintext at http://ADDRESS/metrics (e.g. 0.0.0.0:9090;
    /// port 0 picks a free port). Off by default; `GET /metrics` on the admin socket always works.
    #[arg(long, value_name = "ADDRESS")]
    metrics_listen: Option<SocketAddr>,
}

impl ConfigArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            ca_address: self.ca_address.clone(),
            trust_bundle: self.trust_bundle.clone(),
            node_name: self.node_name.clone(),
            mesh: self.mesh.clone(),
            state_dir: self.state_dir.clone(),
            volume_dir: self.volume_dir.clone(),
            workload_socket: self.workload_socket.clone(),
            admin_socket: self.admin_socket.clone(),
            metrics_listen: self.metrics_listen,
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// One-time join token (needed only for the first start). Tokens may start with `-`.
    /// Prefer --join-token-file or MESHCERT_JOIN_TOKEN: a command line is readable by every
    /// local user (the agent moves the token to its environment at once, restarting in place).
    #[arg(
        long,
        env = "MESHCERT_JOIN_TOKEN",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    join_token: Option<String>,
    /// File holding the join token (a missing file is fine once the node has joined);
    /// --join-token wins when both are given.
    #[arg(long, env = "MESHCERT_JOIN_TOKEN_FILE", value_name = "FILE")]
    join_token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Check {
    /// The agent answers (liveness).
    Healthz,
    /// The node SVID is valid and every entry holds an issued SVID (readiness).
    Readyz,
}

impl From<Check> for admin::Check {
    fn from(check: Check) -> Self {
        match check {
            Check::Healthz => Self::Healthz,
            Check::Readyz => Self::Readyz,
        }
    }
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// Output format: `json` for the raw status.
    #[arg(short = 'o', long = "output", value_name = "FORMAT")]
    output: Option<String>,
    /// Only probe health or readiness (for Kubernetes probes): exit 0 when it holds, else 1.
    #[arg(long, value_enum, conflicts_with = "output")]
    check: Option<Check>,
    /// The admin socket.
    #[arg(long, value_name = "PATH", default_value = config::DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

/// Runtime worker threads: the agent's work is mostly waiting (holder, sockets, timers).
const WORKER_THREADS: usize = 2;
/// Runtime blocking threads: key generation, volume installs (`block_in_place`), caller
/// identification, hook files. All are short; more of them only cost memory.
const BLOCKING_THREADS: usize = 2;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // Before any thread exists: the daemon runs with its allocator tunables (this may start
    // the program again, in place) and one malloc arena (see `heap`).
    let tunables = match cli.command {
        Command::Run(_) => restart::restart_in_place(),
        _ => Ok(()),
    };
    heap::use_one_arena();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshcert-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            logging::init("meshcert-agent", cli.log_format, LevelFilter::INFO);
            if let Err(e) = tunables {
                tracing::warn!(error = %e, tunables = heap::TUNABLES, "cannot start again in place (allocator tunables, join token out of the arguments); going on as started");
            }
            run(&runtime, args)
        }
        Command::CheckConfig(args) => check_config(&args),
        Command::Status(args) => status(&runtime, &args),
    }
}

/// A small, fixed runtime: every thread that allocates gets its own glibc arena, and a default
/// runtime (one worker per core, up to 512 blocking threads) multiplied them with the entries
/// (42 threads and 69 MB anonymous at 1000 entries).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .max_blocking_threads(BLOCKING_THREADS)
        .thread_keep_alive(std::time::Duration::from_secs(10))
        .enable_all()
        .build()
}

/// `meshcert-agent run`.
fn run(runtime: &tokio::runtime::Runtime, args: RunArgs) -> ExitCode {
    let join_token = match join_token(&args) {
        Ok(token) => token,
        Err(code) => return code,
    };
    let options = RunOptions {
        config_path: args.config.config.clone(),
        overrides: args.config.overrides(),
        join_token: join_token.filter(|t| !t.is_empty()),
    };
    match runtime.block_on(daemon::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The join token from `--join-token`, else from `--join-token-file` (a missing file is fine:
/// deleted after the join, the node identity in the state folder is used).
fn join_token(args: &RunArgs) -> Result<Option<String>, ExitCode> {
    match (&args.join_token, &args.join_token_file) {
        (Some(t), _) => Ok(Some(t.trim().to_owned())),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(t) => Ok(Some(t.trim().to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read the join token file");
                Err(ExitCode::from(exit::USAGE))
            }
        },
        (None, None) => Ok(None),
    }
}

/// `meshcert-agent check-config`.
fn check_config(args: &ConfigArgs) -> ExitCode {
    match config::load_with_listeners(&args.config, &args.overrides()) {
        Ok((c, listeners)) => {
            println!("config OK");
            println!(
                "caAddress: {} (TLS name {})",
                c.ca_address, c.ca_server_name
            );
            println!("nodeName: {}", c.node_name);
            println!("mesh: {}", c.mesh);
            println!("stateDir: {}", c.state_dir.display());
            println!("volumeDir: {}", c.volume_dir.display());
            println!("workloadSocket: {}", c.workload_socket.display());
            println!("adminSocket: {}", c.admin_socket.display());
            println!(
                "metricsListen: {}",
                listeners
                    .metrics_listen
                    .map_or_else(|| "off".to_owned(), |a| a.to_string())
            );
            println!("keyAlgorithm: {}", c.key_algorithm);
            println!("local entries: {}", c.entries.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("meshcert-agent: {e}");
            ExitCode::from(exit::CONFIG)
        }
    }
}

/// `meshcert-agent status`: the status table or JSON, or one probe.
fn status(runtime: &tokio::runtime::Runtime, args: &StatusArgs) -> ExitCode {
    if let Some(check) = args.check {
        return match runtime.block_on(admin::probe(&args.admin_socket, check.into())) {
            Ok(answer) => {
                print!("{}", answer.body);
                if answer.ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("meshcert-agent: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let json = match args.output.as_deref() {
        None | Some("table") | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            eprintln!("meshcert-agent: unknown output format `{other}` (use json)");
            return ExitCode::from(exit::USAGE);
        }
    };
    match runtime.block_on(admin::print_status(&args.admin_socket, json)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshcert-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize as _;

    use super::*;

    /// The documents of the shipped Kubernetes manifest of the agent.
    fn manifest() -> Vec<serde_json::Value> {
        let text = include_str!("../../deploy/kubernetes/agent.yaml");
        serde_norway::Deserializer::from_str(text)
            .map(|doc| serde_json::Value::deserialize(doc).expect("a YAML document"))
            .collect()
    }

    fn of_kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
        docs.iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in the manifest"))
    }

    fn strings(value: &serde_json::Value) -> Vec<String> {
        value
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().expect("a string").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn the_daemonset_command_and_probes_are_real_flags() {
        let docs = manifest();
        let container = &of_kind(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
        let mut run = strings(&container["command"]);
        run.extend(strings(&container["args"]));
        let run: Vec<String> = run
            .into_iter()
            .map(|a| a.replace("$(MESHCERT_NODE_NAME)", "node-1"))
            .collect();
        let cli = Cli::try_parse_from(&run).unwrap_or_else(|e| panic!("{run:?}: {e}"));
        assert!(matches!(cli.log_format, LogFormat::Json));
        let Command::Run(args) = cli.command else {
            panic!("{run:?} is not `run`");
        };
        assert_eq!(args.config.node_name.as_deref(), Some("cluster-a.node-1"));
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let argv = strings(&container[probe]["exec"]["command"]);
            let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{probe}: {e}"));
            assert!(
                matches!(
                    cli.command,
                    Command::Status(StatusArgs { check: Some(_), .. })
                ),
                "{probe}: {argv:?}"
            );
        }
    }

    #[test]
    fn the_daemonset_joins_with_a_projected_token_and_shares_no_secret() {
        let docs = manifest();
        let text = of_kind(&docs, "ConfigMap")["data"]["agent.yaml"]
            .as_str()
            .expect("agent.yaml in the ConfigMap");
        let file = config::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let k8s = file.kubernetes.expect("a kubernetes section");
        let token_file = k8s.token_file.expect("tokenFile");
        let pod = &of_kind(&docs, "DaemonSet")["spec"]["template"]["spec"];
        let volumes = pod["volumes"].as_array().expect("volumes");
        assert!(
            volumes.iter().all(|v| v.get("secret").is_none()),
            "no Secret volume: {volumes:?}"
        );
        let projected = volumes
            .iter()
            .find(|v| v["name"] == "meshcert-token")
            .expect("the token volume");
        let source = &projected["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(source["audience"], "meshcert");
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == "meshcert-token")
            .expect("the token mount");
        let path = std::path::Path::new(mount["mountPath"].as_str().expect("path"))
            .join(source["path"].as_str().expect("token path"));
        assert_eq!(path, token_file);
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert_eq!(
            of_kind(&docs, "ClusterRole")["rules"],
            serde_json::json!([{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]),
            "the agent may only read its kubelet's pod list"
        );
        let caps = &pod["containers"][0]["securityContext"]["capabilities"];
        assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
        assert_eq!(caps["add"], serde_json::json!(["CHOWN", "DAC_READ_SEARCH"]));
    }

    #[test]
    fn the_configmap_config_is_valid_and_its_metrics_port_is_exposed() {
        let docs = manifest();
        let text = of_kind(&docs, "ConfigMap")["data"]["agent.yaml"]
            .as_str()
            .expect("agent.yaml in the ConfigMap");
        let file = config::parse(text).unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("bundle.pem");
        let root = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.self_signed(&rcgen::KeyPair::generate()?))
            .expect("a test root");
        std::fs::write(&bundle, root.pem()).expect("write");
        let overrides = Overrides {
            trust_bundle: Some(bundle),
            node_name: Some("node-1".into()),
            ..Overrides::default()
        };
        let (_, listeners) =
            config::resolve_with_listeners(file, &overrides).unwrap_or_else(|e| panic!("{e}"));
        let port = listeners
            .metrics_listen
            .expect("metricsListen is set")
            .port();
        let template = &of_kind(&docs, "DaemonSet")["spec"]["template"];
        let ports = &template["spec"]["containers"][0]["ports"];
        assert!(
            ports
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["containerPort"] == port)),
            "port {port} not in {ports}"
        );
        let annotations = &template["metadata"]["annotations"];
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], port.to_string());
    }
}
