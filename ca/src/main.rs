//! The `meshcert-ca` command: argument parsing, logging set-up, exit codes
//! (64 bad arguments, 78 bad configuration, 1 runtime failure). The subcommands are in
//! [`cli`]; the work is in the library.

use std::process::ExitCode;

use clap::Parser as _;
use meshcert_daemon::{exit, logging};
use tracing::level_filters::LevelFilter;

mod cli;

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { exit::USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let daemon = matches!(cli.command, Command::Run(_));
    let level = if daemon {
        LevelFilter::INFO
    } else {
        LevelFilter::WARN
    };
    logging::init("meshcert-ca", cli.log_format, level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::from(exit::RUNTIME);
        }
    };
    match runtime.block_on(cli::dispatch(cli.command)) {
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
