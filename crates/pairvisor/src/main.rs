//! `pairvisor`: the PM daemon (`pairvisor serve`) and the command line
//! (`pairvisor vm list`, ...). Kept thin: the work is in the component crates.

mod daemon;

use clap::Parser;
use pairvisor_cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Serve(args) => match rt.block_on(daemon::serve(args)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        },
        Command::Witness(args) => match rt.block_on(daemon::witness(args)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        },
        _ => std::process::ExitCode::from(rt.block_on(pairvisor_cli::run(cli)) as u8),
    }
}
