//! One function per `meshcert-ca` subcommand.

use std::path::Path;

use meshcert_ca::admin::{Client, TokenRequest};
use meshcert_ca::config::{self, ConfigError, derived_entry_id};
use meshcert_ca::daemon::{ConfigSource, Overrides};
use meshcert_ca::status::ConfigStatus;
use meshcert_protocol::{Entry, Owner, Selector, SpiffeId};

use super::{EntryArgs, Failure, Output, RunArgs, TokenArgs, render, tables};

/// `meshcert-ca run`: validates the file (nothing starts or is written when it is invalid),
/// then runs the holder until SIGTERM.
pub async fn run(args: RunArgs) -> Result<(), Failure> {
    let source = ConfigSource {
        path: args.config.clone(),
        overrides: Overrides {
            state_dir: args.state_dir,
            listen: args.listen,
            admin_socket: args.admin_socket,
        },
    };
    let mut config = match config::load(&args.config) {
        Ok(c) => c,
        Err(e @ ConfigError::Read { .. }) => return Err(Failure::config(e.to_string())),
        Err(ConfigError::Invalid { problems }) => {
            for p in &problems {
                tracing::error!(problem = %p, "invalid configuration");
            }
            return Err(Failure::config(format!(
                "{} is invalid; nothing was started or written:\n  {}",
                args.config.display(),
                problems.join("\n  ")
            )));
        }
    };
    source.overrides.apply(&mut config);
    meshcert_ca::daemon::run(config, source).await.map_err(|e| {
        tracing::error!(error = %e, "meshcert-ca stopped");
        Failure::runtime(e)
    })
}

/// `meshcert-ca validate`: prints the file's configStatus; exit 78 when invalid.
pub fn validate(path: &Path) -> Result<(), Failure> {
    let status = match config::load(path) {
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
        Err(Failure::config(String::new()))
    }
}

/// `meshcert-ca token create`: prints only the token.
pub async fn create_token(args: TokenArgs) -> Result<(), Failure> {
    let request = TokenRequest {
        node: args.node,
        mesh: args.mesh,
        ttl: Some(args.ttl),
    };
    let answer = args.admin.client().create_token(&request).await?;
    println!("{}", answer.token);
    Ok(())
}

/// `meshcert-ca node list`.
pub async fn list_nodes(client: &Client, output: Output) -> Result<(), Failure> {
    let nodes = client.nodes().await?;
    render(&nodes, output, || tables::nodes(&nodes))
}

/// `meshcert-ca node ban NAME`.
pub async fn ban_node(client: &Client, name: &str) -> Result<(), Failure> {
    client.ban_node(name).await?;
    eprintln!("node {name} banned");
    Ok(())
}

/// `meshcert-ca entry create`: prints the new entry's id.
pub async fn create_entry(args: EntryArgs) -> Result<(), Failure> {
    let client = args.admin.client();
    let entry = entry(args)?;
    let created = client.create_entry(&entry).await?;
    println!("{}", created.id);
    Ok(())
}

/// The entry `entry create` asks for; a malformed ID, selector or owner is a usage error.
fn entry(args: EntryArgs) -> Result<Entry, Failure> {
    let spiffe_id = SpiffeId::new_leaf(&args.spiffe_id).map_err(Failure::usage)?;
    let selectors = args
        .selector
        .iter()
        .map(|s| s.parse::<Selector>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::usage)?;
    let owner = args
        .owner
        .map(|o| o.parse::<Owner>())
        .transpose()
        .map_err(Failure::usage)?;
    let dir = args.dir.unwrap_or_else(|| {
        spiffe_id
            .path()
            .rsplit('/')
            .next()
            .unwrap_or("svid")
            .to_owned()
    });
    let id = args
        .id
        .unwrap_or_else(|| derived_entry_id(&args.spiffe_id, &args.node, args.mesh.as_deref()));
    Ok(Entry {
        id,
        spiffe_id,
        nodes: args.node,
        mesh: args.mesh,
        selectors,
        ttl: args.ttl,
        dir,
        owner,
        hook: None,
        gateway: args.gateway,
    })
}

/// `meshcert-ca entry list`.
pub async fn list_entries(client: &Client, output: Output) -> Result<(), Failure> {
    let entries = client.entries().await?;
    render(&entries, output, || tables::entries(&entries))
}

/// `meshcert-ca entry delete ID`.
pub async fn delete_entry(client: &Client, id: &str) -> Result<(), Failure> {
    client.delete_entry(id).await?;
    Ok(())
}

/// `meshcert-ca bundle [--mesh NAME]`: the PEM.
pub async fn bundle(client: &Client, mesh: Option<&str>) -> Result<(), Failure> {
    let pem = client.bundle(mesh).await?;
    print!("{}", String::from_utf8_lossy(&pem));
    Ok(())
}

/// `meshcert-ca status`.
pub async fn status(client: &Client, output: Output) -> Result<(), Failure> {
    let status = client.status().await?;
    render(&status, output, || status.table())
}

/// `meshcert-ca issuances`.
pub async fn issuances(client: &Client, output: Output) -> Result<(), Failure> {
    let list = client.issuances().await?;
    render(&list, output, || tables::issuances(&list))
}
