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
        Command::Serve(args) => match rt.block_on(daemon::serve(*args)) {
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
        Command::Watchdog { data_dir } => match daemon::watchdog(&data_dir) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::from(1)
            }
        },
        Command::Lab { dir, cmd } => match rt.block_on(lab(dir, cmd)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::from(1)
            }
        },
        _ => std::process::ExitCode::from(rt.block_on(pairvisor_cli::run(cli)) as u8),
    }
}

/// `pairvisor lab ...`.
async fn lab(
    dir: std::path::PathBuf,
    cmd: pairvisor_cli::LabCmd,
) -> Result<(), pairvisor_lab::LabError> {
    use pairvisor_cli::LabCmd;
    match cmd {
        LabCmd::Up {
            guest_dir,
            prefix,
            net,
            no_witness,
        } => {
            let bin =
                std::env::current_exe().map_err(|e| pairvisor_lab::LabError::Io(e.to_string()))?;
            let st = pairvisor_lab::lab::up_with(
                pairvisor_lab::UpOptions {
                    dir: dir.clone(),
                    bin,
                    prefix,
                    net,
                    guest_dir,
                },
                !no_witness,
            )
            .await?;
            println!("lab up in {}", dir.display());
            for m in &st.members {
                match &m.api {
                    Some(api) => println!("  {:8} pid {:7} API {api}", m.name, m.pid),
                    None => println!("  {:8} pid {:7}", m.name, m.pid),
                }
            }
            println!("  admin password: {}", st.password_file.display());
            println!(
                "  HTTPS: trust {} (both PMs' API CAs: PAIRVISOR_CA_CERT, browser import)",
                dir.join("api-ca.pem").display()
            );
            println!(
                "  network: {}",
                if st.topology.is_some() {
                    "own namespaces (lab cut/heal work)"
                } else {
                    "loopback"
                }
            );
            println!(
                "try: pairvisor lab status | lab cut private | lab kill pm-b | lab heal | lab down"
            );
        }
        LabCmd::Status => {
            let v = pairvisor_lab::lab::status(&dir).await?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        LabCmd::Kill { member } => pairvisor_lab::lab::kill(&dir, &member)?,
        LabCmd::Start { member } => pairvisor_lab::lab::start(&dir, &member)?,
        LabCmd::Freeze { member } => pairvisor_lab::lab::freeze(&dir, &member, true)?,
        LabCmd::Thaw { member } => pairvisor_lab::lab::freeze(&dir, &member, false)?,
        LabCmd::Cut { link } => pairvisor_lab::lab::cut(&dir, &link, false)?,
        LabCmd::Heal { link } => pairvisor_lab::lab::cut(&dir, &link, true)?,
        LabCmd::Down => pairvisor_lab::lab::down(&dir)?,
        LabCmd::Bench {
            guest_dir,
            runs,
            prefix,
            net,
        } => {
            let bin =
                std::env::current_exe().map_err(|e| pairvisor_lab::LabError::Io(e.to_string()))?;
            let v = pairvisor_lab::bench::bench(pairvisor_lab::BenchOptions {
                bin,
                guest_dir,
                runs,
                prefix,
                net,
            })
            .await?;
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
    }
    Ok(())
}
