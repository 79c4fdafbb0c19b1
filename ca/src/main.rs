//! The `meshcert-ca` command: argument parsing, logging set-up, exit codes
//! (64 bad arguments, 78 bad configuration, 1 runtime failure). The work is in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use http::Method;
use meshcert_ca::admin::{AdminError, Client, TokenRequest, TokenResponse};
use meshcert_ca::config::{self, ConfigError, DEFAULT_ADMIN_SOCKET, derived_entry_id};
use meshcert_ca::status::{ConfigStatus, Status};
use meshcert_ca::store::{Issuance, NodeRecord};
use meshcert_protocol::{Entry, Owner, Selector, SpiffeId};

const EXIT_USAGE: u8 = 64;
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "meshcert-ca",
    version,
    about = "The root CA holder of a meshcert virtual mesh"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Args)]
struct AdminArgs {
    /// The holder's admin socket.
    #[arg(long, env = "MESHCERT_CA_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the holder.
    Run {
        /// The VirtualMesh configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Overrides `holder.stateDir`.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Overrides `holder.listen` (`127.0.0.1:0` picks a free port).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Overrides `holder.adminSocket`.
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Validate a configuration file and print its configStatus (exit 78 when invalid).
    Validate {
        /// The VirtualMesh configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Registration entries.
    #[command(subcommand)]
    Entry(EntryCommand),
    /// Print the trust bundle (PEM).
    Bundle {
        /// The mesh whose bundle to print.
        #[arg(long)]
        mesh: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Root rotation: rotate, status, abort.
    #[command(subcommand)]
    Root(meshcert_ca::rotation_admin::RootCommand),
    /// Print the VirtualMesh status.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the recorded issuances.
    Issuances {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a one-time join token; prints only the token.
    Create {
        /// The node name the token binds.
        #[arg(long)]
        node: String,
        /// The mesh the node joins.
        #[arg(long)]
        mesh: String,
        /// Lifetime.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// List nodes.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Ban a node: its later calls fail at once.
    Ban {
        /// The node name.
        name: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum EntryCommand {
    /// Create an entry; prints its id.
    Create {
        /// The SPIFFE ID to issue.
        #[arg(long)]
        spiffe_id: String,
        /// A node the entry is assigned to (repeatable).
        #[arg(long, required_unless_present = "mesh")]
        node: Vec<String>,
        /// A mesh whose every node gets the entry.
        #[arg(long, conflicts_with = "node")]
        mesh: Option<String>,
        /// A workload selector such as unix:uid:1000 (repeatable).
        #[arg(long)]
        selector: Vec<String>,
        /// SVID lifetime.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// Folder of the shared volume (default: the last path segment of the ID).
        #[arg(long)]
        dir: Option<String>,
        /// Owner of the files, UID:GID.
        #[arg(long)]
        owner: Option<String>,
        /// Mark the entry as a gateway.
        #[arg(long)]
        gateway: bool,
        /// Entry id (default: derived from the ID and its assignment).
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List entries.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete an entry created with `entry create`.
    Delete {
        /// The entry id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    meshcert_protocol::duration::parse(s).map_err(|e| e.to_string())
}

/// A failure with its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn runtime(e: impl std::fmt::Display) -> Self {
        Self {
            code: 1,
            message: e.to_string(),
        }
    }
    fn usage(e: impl std::fmt::Display) -> Self {
        Self {
            code: EXIT_USAGE,
            message: e.to_string(),
        }
    }
}

impl From<AdminError> for Failure {
    fn from(e: AdminError) -> Self {
        let code = match &e {
            AdminError::Api(api) if api.code.http_status() == 400 => EXIT_USAGE,
            _ => 1,
        };
        Self {
            code,
            message: e.to_string(),
        }
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
    let daemon = matches!(cli.command, Command::Run { .. });
    init_tracing(cli.log_format, daemon);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if !f.message.is_empty() {
                if daemon {
                    // The daemon's last word goes where its logs go, in their format.
                    tracing::error!(code = f.code, "{}", f.message);
                } else {
                    eprintln!("meshcert-ca: {}", f.message);
                }
            }
            ExitCode::from(f.code)
        }
    }
}

fn init_tracing(format: LogFormat, daemon: bool) {
    use tracing::level_filters::LevelFilter;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let default = if daemon {
        LevelFilter::INFO
    } else {
        LevelFilter::WARN
    };
    let fallback = || tracing_subscriber::filter::Targets::new().with_default(default);
    // `RUST_LOG` as `target=level` directives (`info,meshcert_ca=debug`).
    let filter = match std::env::var("RUST_LOG") {
        Ok(text) if !text.trim().is_empty() => text.parse().unwrap_or_else(|e| {
            eprintln!("meshcert-ca: RUST_LOG ignored ({e}); logging at {default}");
            fallback()
        }),
        _ => fallback(),
    };
    let builder = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.finish().with(filter).init(),
        LogFormat::Json => builder.json().finish().with(filter).init(),
    }
}

fn render<T: serde::Serialize>(
    value: &T,
    output: Output,
    table: impl FnOnce() -> String,
) -> Result<(), Failure> {
    let text = match output {
        Output::Table => table(),
        Output::Json => serde_json::to_string_pretty(value).map_err(Failure::runtime)? + "\n",
        Output::Yaml => serde_norway::to_string(value).map_err(Failure::runtime)?,
    };
    print!("{text}");
    Ok(())
}

async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run {
            config,
            state_dir,
            listen,
            admin_socket,
        } => {
            let source = meshcert_ca::daemon::ConfigSource {
                path: config.clone(),
                overrides: meshcert_ca::daemon::Overrides {
                    state_dir,
                    listen,
                    admin_socket,
                },
            };
            let mut cfg = match config::load(&config) {
                Ok(c) => c,
                Err(e @ ConfigError::Read { .. }) => {
                    return Err(Failure {
                        code: EXIT_CONFIG,
                        message: e.to_string(),
                    });
                }
                Err(ConfigError::Invalid { problems }) => {
                    for p in &problems {
                        tracing::error!(problem = %p, "invalid configuration");
                    }
                    return Err(Failure {
                        code: EXIT_CONFIG,
                        message: format!(
                            "{} is invalid; nothing was started or written:\n  {}",
                            config.display(),
                            problems.join("\n  ")
                        ),
                    });
                }
            };
            source.overrides.apply(&mut cfg);
            meshcert_ca::daemon::run(cfg, source).await.map_err(|e| {
                tracing::error!(error = %e, "meshcert-ca stopped");
                Failure::runtime(e)
            })
        }
        Command::Validate { config } => {
            let status = match config::load(&config) {
                Ok(_) => ConfigStatus::accepted(),
                Err(ConfigError::Invalid { problems }) => ConfigStatus::invalid(problems),
                Err(e) => ConfigStatus::invalid(vec![e.to_string()]),
            };
            let text = serde_norway::to_string(&serde_json::json!({ "configStatus": status }))
                .map_err(Failure::runtime)?;
            print!("{text}");
            if status.messages.is_empty() {
                Ok(())
            } else {
                Err(Failure {
                    code: EXIT_CONFIG,
                    message: String::new(),
                })
            }
        }
        Command::Token(TokenCommand::Create {
            node,
            mesh,
            ttl,
            admin,
        }) => {
            let req = TokenRequest {
                node,
                mesh,
                ttl: Some(ttl),
            };
            let resp: TokenResponse = Client::new(admin.admin_socket)
                .json(Method::POST, "/v1/tokens", Some(&req))
                .await?;
            println!("{}", resp.token);
            Ok(())
        }
        Command::Node(NodeCommand::List { output, admin }) => {
            let nodes: Vec<NodeRecord> = Client::new(admin.admin_socket)
                .json(Method::GET, "/v1/nodes", None::<&()>)
                .await?;
            render(&nodes, output, || {
                let mut t = format!(
                    "{:<24} {:<12} {:<12} {:<8} SPIFFE ID\n",
                    "NAME", "MESH", "CLUSTER", "BANNED"
                );
                for n in &nodes {
                    t += &format!(
                        "{:<24} {:<12} {:<12} {:<8} {}\n",
                        n.name,
                        n.mesh,
                        n.cluster.as_deref().unwrap_or("-"),
                        n.banned,
                        n.spiffe_id
                    );
                }
                t
            })
        }
        Command::Node(NodeCommand::Ban { name, admin }) => {
            Client::new(admin.admin_socket)
                .request(
                    Method::POST,
                    &format!("/v1/nodes/{name}/ban"),
                    Some(Vec::new()),
                )
                .await?;
            eprintln!("node {name} banned");
            Ok(())
        }
        Command::Entry(EntryCommand::Create {
            spiffe_id,
            node,
            mesh,
            selector,
            ttl,
            dir,
            owner,
            gateway,
            id,
            admin,
        }) => {
            let sid = SpiffeId::new_leaf(&spiffe_id).map_err(Failure::usage)?;
            let selectors = selector
                .iter()
                .map(|s| s.parse::<Selector>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(Failure::usage)?;
            let owner = owner
                .map(|o| o.parse::<Owner>())
                .transpose()
                .map_err(Failure::usage)?;
            let dir =
                dir.unwrap_or_else(|| sid.path().rsplit('/').next().unwrap_or("svid").to_owned());
            let id = id.unwrap_or_else(|| derived_entry_id(&spiffe_id, &node, mesh.as_deref()));
            let entry = Entry {
                id,
                spiffe_id: sid,
                nodes: node,
                mesh,
                selectors,
                ttl,
                dir,
                owner,
                hook: None,
                gateway,
            };
            let created: Entry = Client::new(admin.admin_socket)
                .json(Method::POST, "/v1/entries", Some(&entry))
                .await?;
            println!("{}", created.id);
            Ok(())
        }
        Command::Entry(EntryCommand::List { output, admin }) => {
            let entries: Vec<Entry> = Client::new(admin.admin_socket)
                .json(Method::GET, "/v1/entries", None::<&()>)
                .await?;
            render(&entries, output, || {
                let mut t = format!(
                    "{:<18} {:<40} {:<24} {:<12} TTL\n",
                    "ID", "SPIFFE ID", "ASSIGNED TO", "DIR"
                );
                for e in &entries {
                    let to = e
                        .mesh
                        .as_ref()
                        .map(|m| format!("mesh {m}"))
                        .unwrap_or_else(|| e.nodes.join(","));
                    t += &format!(
                        "{:<18} {:<40} {:<24} {:<12} {}\n",
                        e.id,
                        e.spiffe_id.to_string(),
                        to,
                        e.dir,
                        humantime::format_duration(e.ttl)
                    );
                }
                t
            })
        }
        Command::Entry(EntryCommand::Delete { id, admin }) => {
            Client::new(admin.admin_socket)
                .request(Method::DELETE, &format!("/v1/entries/{id}"), None)
                .await?;
            Ok(())
        }
        Command::Bundle { mesh, admin } => {
            let path = match mesh {
                Some(m) => format!("/v1/bundle?mesh={m}"),
                None => "/v1/bundle".to_owned(),
            };
            let pem = Client::new(admin.admin_socket)
                .request(Method::GET, &path, None)
                .await?;
            print!("{}", String::from_utf8_lossy(&pem));
            Ok(())
        }
        Command::Root(c) => {
            print!("{}", c.run().await?);
            Ok(())
        }
        Command::Status { output, admin } => {
            let status: Status = Client::new(admin.admin_socket)
                .json(Method::GET, "/v1/status", None::<&()>)
                .await?;
            render(&status, output, || status.table())
        }
        Command::Issuances { output, admin } => {
            let list: Vec<Issuance> = Client::new(admin.admin_socket)
                .json(Method::GET, "/v1/issuances", None::<&()>)
                .await?;
            render(&list, output, || {
                let mut t = format!(
                    "{:<34} {:<20} {:<12} SPIFFE ID\n",
                    "SERIAL", "NOT AFTER", "NODE"
                );
                for i in &list {
                    t += &format!(
                        "{:<34} {:<20} {:<12} {}\n",
                        i.serial, i.not_after, i.node, i.spiffe_id
                    );
                }
                t
            })
        }
    }
}
