//! `pairvisor serve`: opens the PM's state, re-attaches to running VMs and
//! serves the REST API until SIGTERM/SIGINT. Stopping the daemon never stops
//! VMs: QEMU runs on, and the next daemon re-attaches to it.

use anyhow::{bail, Context, Result};
use pairvisor_agent::{Agent, Paths};
use pairvisor_cli::ServeArgs;
use pairvisor_model::roles::Role;
use pairvisor_store::{Accel, Store, UserRecord};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use tracing::info;

pub async fn serve(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let paths = Paths::new(&args.data_dir);
    paths
        .create_all()
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    let store = Store::open(&paths.state_db()).context("opening the state database")?;

    if let Some(a) = &args.accel {
        let accel = match a.as_str() {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            other => bail!("--accel {other}: allowed values are kvm and tcg"),
        };
        store.write(|tx| {
            let mut s = tx.settings()?;
            s.accel = accel;
            tx.put_settings(&s)
        })?;
    }
    ensure_admin(&store, &args)?;

    let agent = Agent::open(paths, store)
        .await
        .context("starting the agent")?;
    let app = pairvisor_api::router(agent.clone());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    info!("Pairvisor API listening on http://{addr} (OpenAPI: /api/v1/openapi.json)");
    // Machine-readable line for scripts and tests.
    println!("listening on http://{addr}");
    let _ = std::io::stdout().flush();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving the API")?;
    agent.detach_all();
    info!("daemon stopped; VMs keep running and will be re-attached on the next start");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// On first start, creates the `admin` user. Its password comes from
/// `--admin-password-file`, or is generated and written to
/// DATA_DIR/initial-admin-password (mode 0600) — never to the log.
fn ensure_admin(store: &Store, args: &ServeArgs) -> Result<()> {
    if !store.list::<UserRecord>()?.is_empty() {
        return Ok(());
    }
    let password = match &args.admin_password_file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim_end_matches(['\n', '\r'])
            .to_string(),
        None => {
            let p = hex::encode(rand::random::<[u8; 12]>());
            let file = args.data_dir.join("initial-admin-password");
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&file)
                .with_context(|| format!("writing {}", file.display()))?;
            writeln!(f, "{p}")?;
            info!(
                "created user 'admin'; its password is in {}",
                file.display()
            );
            p
        }
    };
    pairvisor_api::auth::create_user(store, "admin", Role::Administrator, &password)
        .map_err(|e| anyhow::anyhow!("creating the admin user: {}", e.body.message))?;
    Ok(())
}
