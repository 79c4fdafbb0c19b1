//! A Workload API client the end-to-end tests run as another user (`Command::uid`), so the
//! agent sees a caller with different kernel credentials.
//!
//! `workload-probe svids <endpoint>` fetches every X.509-SVID the caller is entitled to with
//! the upstream `spiffe` crate and prints one line per SVID, `svid <spiffe id>`, default first;
//! on failure it prints `error <kind>` and exits 2.
//!
//! `workload-probe churn <endpoint> <n>` opens a connection and asks for its SVID, `n` times
//! in a row, and prints `served <count> refused <count>` (refused: rate limited).
//!
//! `workload-probe admin <socket path> <http path>` sends a bare HTTP GET over the admin
//! socket and prints the status line it gets back.

use std::io::{Read, Write};
use std::process::ExitCode;

use spiffe::{WorkloadApiClient, WorkloadApiError};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["svids", endpoint] => svids(endpoint),
        ["churn", endpoint, n] => match n.parse() {
            Ok(n) => churn(endpoint, n),
            Err(_) => ExitCode::from(64),
        },
        ["admin", socket, path] => admin(socket, path),
        _ => {
            eprintln!("usage: workload-probe svids <endpoint> | admin <socket> <path>");
            ExitCode::from(64)
        }
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

fn churn(endpoint: &str, n: u32) -> ExitCode {
    let Ok(runtime) = runtime() else {
        return ExitCode::from(1);
    };
    let result = runtime.block_on(async {
        let (mut served, mut refused) = (0_u32, 0_u32);
        for _ in 0..n {
            let client = WorkloadApiClient::connect_to(endpoint).await?;
            match client.fetch_x509_svid().await {
                Ok(_) => served += 1,
                Err(e) if format!("{e:?}").contains("ResourceExhausted") => refused += 1,
                Err(e) => return Err(e),
            }
        }
        Ok((served, refused))
    });
    match result {
        Ok((served, refused)) => {
            println!("served {served} refused {refused}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error other: {e:?}");
            ExitCode::from(2)
        }
    }
}

fn svids(endpoint: &str) -> ExitCode {
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            println!("error runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        let client = WorkloadApiClient::connect_to(endpoint).await?;
        client.fetch_all_x509_svids().await
    });
    match result {
        Ok(svids) => {
            for svid in svids {
                println!("svid {}", svid.spiffe_id());
            }
            ExitCode::SUCCESS
        }
        Err(WorkloadApiError::NoIdentityIssued) => {
            println!("error NoIdentityIssued");
            ExitCode::from(2)
        }
        Err(e) => {
            println!("error other: {e:?}");
            ExitCode::from(2)
        }
    }
}

fn admin(socket: &str, path: &str) -> ExitCode {
    let exchange = || -> std::io::Result<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer.lines().next().unwrap_or_default().to_owned())
    };
    match exchange() {
        Ok(status_line) => {
            println!("{status_line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error io: {e}");
            ExitCode::from(2)
        }
    }
}
