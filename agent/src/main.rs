//! `meshcert-agent`: parses the command line, sets up logging, and calls the library.
//!
//! Exit codes: 0 success, 64 bad arguments, 78 bad configuration, 1 runtime failure.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshcert_agent::config::{self, Overrides};
use meshcert_agent::daemon::{self, RunOptions};

/// The meshcert node agent: keeps every SVID on this node fresh.
#[derive(Debug, Parser)]
#[command(name = "meshcert-agent", version)]
struct Cli {
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

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
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
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// One-time join token (needed only for the first start). Tokens may start with `-`.
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
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Check {
    /// The agent answers (liveness).
    Healthz,
    /// The node SVID is valid and every entry holds an issued SVID (readiness).
    Readyz,
}

impl Check {
    fn path(self) -> &'static str {
        match self {
            Self::Healthz => "/healthz",
            Self::Readyz => "/readyz",
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

const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshcert-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Run(args) => {
            init_logging(args.log_format);
            let join_token = match (&args.join_token, &args.join_token_file) {
                (Some(t), _) => Some(t.trim().to_owned()),
                (None, Some(path)) => match std::fs::read_to_string(path) {
                    Ok(t) => Some(t.trim().to_owned()),
                    // Deleted after the join: the node identity in the state folder is used.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "cannot read the join token file");
                        return ExitCode::from(EXIT_USAGE);
                    }
                },
                (None, None) => None,
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
                    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(1))
                }
            }
        }
        Command::CheckConfig(args) => match config::load(&args.config, &args.overrides()) {
            Ok(c) => {
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
                println!("keyAlgorithm: {}", c.key_algorithm);
                println!("local entries: {}", c.entries.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshcert-agent: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Status(args) => {
            if let Some(check) = args.check {
                return match runtime.block_on(probe(&args.admin_socket, check.path())) {
                    Ok((true, body)) => {
                        print!("{body}");
                        ExitCode::SUCCESS
                    }
                    Ok((false, body)) => {
                        print!("{body}");
                        ExitCode::FAILURE
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
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match runtime.block_on(meshcert_agent::admin::print_status(
                &args.admin_socket,
                json,
            )) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshcert-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// GETs `path` from the admin socket: whether the answer is 200, and its body.
async fn probe(socket: &std::path::Path, path: &str) -> anyhow::Result<(bool, String)> {
    use anyhow::Context as _;
    use http_body_util::{BodyExt as _, Empty};

    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to the admin socket {}", socket.display()))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<bytes::Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let ok = response.status() == http::StatusCode::OK;
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    Ok((ok, String::from_utf8_lossy(&body).into_owned()))
}
