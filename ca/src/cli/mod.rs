//! The `meshcert-ca` subcommands: the arguments (clap), the dispatch (one line per
//! subcommand), and how a failure maps to an exit code. Each subcommand is one function in
//! [`commands`], over the typed admin client ([`meshcert_ca::admin::Client`]); the tables of
//! lists are in [`tables`], the status table beside the status document.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use meshcert_ca::admin::{AdminError, Client};
use meshcert_ca::config::DEFAULT_ADMIN_SOCKET;
use meshcert_daemon::exit;
use meshcert_daemon::logging::LogFormat;

mod commands;
mod tables;

/// The root CA holder of a meshcert virtual mesh.
#[derive(Parser)]
#[command(
    name = "meshcert-ca",
    version,
    about = "The root CA holder of a meshcert virtual mesh"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Args)]
pub struct AdminArgs {
    /// The holder's admin socket.
    #[arg(long, env = "MESHCERT_CA_ADMIN_SOCKET", default_value = DEFAULT_ADMIN_SOCKET)]
    pub admin_socket: PathBuf,
}

impl AdminArgs {
    /// The admin client for this socket.
    fn client(&self) -> Client {
        Client::new(&self.admin_socket)
    }
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the holder.
    Run(RunArgs),
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
pub enum TokenCommand {
    /// Create a one-time join token; prints only the token.
    Create(TokenArgs),
}

#[derive(Subcommand)]
pub enum NodeCommand {
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
pub enum EntryCommand {
    /// Create an entry; prints its id.
    Create(EntryArgs),
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

/// `meshcert-ca run`.
#[derive(Args)]
pub struct RunArgs {
    /// The VirtualMesh configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Overrides `holder.stateDir`.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Overrides `holder.listen` (`127.0.0.1:0` picks a free port).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Overrides `holder.adminSocket`.
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
}

/// `meshcert-ca token create`.
#[derive(Args)]
pub struct TokenArgs {
    /// The node name the token binds.
    #[arg(long)]
    pub node: String,
    /// The mesh the node joins.
    #[arg(long)]
    pub mesh: String,
    /// Lifetime.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub ttl: Duration,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `meshcert-ca entry create`.
#[derive(Args)]
pub struct EntryArgs {
    /// The SPIFFE ID to issue.
    #[arg(long)]
    pub spiffe_id: String,
    /// A node the entry is assigned to (repeatable).
    #[arg(long, required_unless_present = "mesh")]
    pub node: Vec<String>,
    /// A mesh whose every node gets the entry.
    #[arg(long, conflicts_with = "node")]
    pub mesh: Option<String>,
    /// A workload selector such as unix:uid:1000 (repeatable).
    #[arg(long)]
    pub selector: Vec<String>,
    /// SVID lifetime.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Folder of the shared volume (default: the last path segment of the ID).
    #[arg(long)]
    pub dir: Option<String>,
    /// Owner of the files, UID:GID.
    #[arg(long)]
    pub owner: Option<String>,
    /// Mark the entry as a gateway.
    #[arg(long)]
    pub gateway: bool,
    /// Entry id (default: derived from the ID and its assignment).
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    meshcert_protocol::duration::parse(s).map_err(|e| e.to_string())
}

/// Runs one subcommand.
pub async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run(args) => commands::run(args).await,
        Command::Validate { config } => commands::validate(&config),
        Command::Token(TokenCommand::Create(args)) => commands::create_token(args).await,
        Command::Node(NodeCommand::List { output, admin }) => {
            commands::list_nodes(&admin.client(), output).await
        }
        Command::Node(NodeCommand::Ban { name, admin }) => {
            commands::ban_node(&admin.client(), &name).await
        }
        Command::Entry(EntryCommand::Create(args)) => commands::create_entry(args).await,
        Command::Entry(EntryCommand::List { output, admin }) => {
            commands::list_entries(&admin.client(), output).await
        }
        Command::Entry(EntryCommand::Delete { id, admin }) => {
            commands::delete_entry(&admin.client(), &id).await
        }
        Command::Bundle { mesh, admin } => commands::bundle(&admin.client(), mesh.as_deref()).await,
        Command::Root(c) => {
            print!("{}", c.run().await?);
            Ok(())
        }
        Command::Status { output, admin } => commands::status(&admin.client(), output).await,
        Command::Issuances { output, admin } => commands::issuances(&admin.client(), output).await,
    }
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// What to print (nothing when the command printed it already).
    pub message: String,
}

impl Failure {
    fn runtime(e: impl std::fmt::Display) -> Self {
        Self {
            code: exit::RUNTIME,
            message: e.to_string(),
        }
    }

    fn usage(e: impl std::fmt::Display) -> Self {
        Self {
            code: exit::USAGE,
            message: e.to_string(),
        }
    }

    fn config(message: String) -> Self {
        Self {
            code: exit::CONFIG,
            message,
        }
    }
}

impl From<AdminError> for Failure {
    fn from(e: AdminError) -> Self {
        let code = match &e {
            AdminError::Api(api) if api.code.http_status() == 400 => exit::USAGE,
            _ => exit::RUNTIME,
        };
        Self {
            code,
            message: e.to_string(),
        }
    }
}

/// Prints `value` as a table (made by `table`), JSON or YAML.
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
