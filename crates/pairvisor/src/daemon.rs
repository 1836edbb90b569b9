//! `pairvisor serve`: opens the PM's state, re-attaches to running VMs and
//! serves the REST API until SIGTERM/SIGINT. Stopping the daemon never stops
//! VMs: QEMU runs on, and the next daemon re-attaches to it.

use anyhow::{bail, Context, Result};
use pairvisor_agent::{Agent, Paths};
use pairvisor_cli::ServeArgs;
use pairvisor_model::roles::Role;
use pairvisor_store::{Accel, Store, StoreError, UserRecord};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// How long a starting daemon waits for the state database's lock.
const STORE_LOCK_WAIT: Duration = Duration::from_secs(15);

/// Opens the state database, waiting a bounded time while another process
/// holds it: a daemon killed a moment ago keeps its files (and the lock) until
/// its last thread has exited, which can outlast the process's zombie state.
async fn open_store(path: &Path) -> Result<Store> {
    let deadline = tokio::time::Instant::now() + STORE_LOCK_WAIT;
    let mut said = false;
    loop {
        match Store::open(path) {
            Err(StoreError::InUse { .. }) if tokio::time::Instant::now() < deadline => {
                if !said {
                    info!(path = %path.display(), "the state database is locked by another process; waiting up to {}s for it to exit", STORE_LOCK_WAIT.as_secs());
                    said = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            r => return r.context("opening the state database"),
        }
    }
}

pub async fn serve(args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    private_umask();
    let paths = Paths::new(&args.data_dir).with_import_dirs(args.import_dirs.iter().cloned());
    paths
        .create_all()
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    warn_if_loose(&args.data_dir);
    let store = open_store(&paths.state_db()).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let tls = api_tls(&args, addr)?;
    let unit = match &args.unit_listen {
        Some(l) => Some(open_unit(&args, l, addr, &tls).await?),
        None => None,
    };
    let unit_db = match &unit {
        Some(u) => u.db().await,
        None => None,
    };
    if let Some(db) = &unit_db {
        // Already in a unit: the records live in the unit database.
        pairvisor_orchestrator::attach_store(&store, db.clone())
            .await
            .context("moving the records into the unit database")?;
    }

    if let Some(a) = &args.accel {
        let accel = match a.as_str() {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            other => bail!("--accel {other}: allowed values are kvm and tcg"),
        };
        store.write(|tx| {
            let mut s = tx.settings()?;
            if s.accel == accel {
                return Ok(());
            }
            s.accel = accel;
            tx.put_settings(&s)
        })?;
    }
    ensure_admin(&store, &args)?;

    let agent = Agent::open_deferred(paths, store)
        .await
        .context("starting the agent")?;
    let orchestrator: Arc<std::sync::Mutex<Option<Arc<pairvisor_orchestrator::Orchestrator>>>> =
        Default::default();
    match (&unit, unit_db) {
        (Some(u), Some(db)) => {
            let o = pairvisor_orchestrator::join_agent(&agent, u, db)
                .await
                .context("joining the agent to the unit")?;
            *orchestrator.lock().unwrap_or_else(|e| e.into_inner()) = Some(o);
        }
        _ => agent.recover().await,
    }
    if let Some(u) = &unit {
        // `unit init` / `unit join` later: join the agent then.
        let (agent, svc, slot) = (agent.clone(), Arc::downgrade(u), orchestrator.clone());
        u.set_member_hook(Arc::new(move |db| {
            let (agent, svc, slot) = (agent.clone(), svc.clone(), slot.clone());
            Box::pin(async move {
                let Some(svc) = svc.upgrade() else { return };
                match pairvisor_orchestrator::join_agent(&agent, &svc, db).await {
                    Ok(o) => *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(o),
                    Err(e) => tracing::error!("joining the agent to the unit: {e}"),
                }
            })
        }));
    }
    let app = pairvisor_api::router(agent.clone(), unit.clone()).merge(pairvisor_console::router());
    info!(
        "Pairvisor API listening on https://{addr} (OpenAPI: /api/v1/openapi.json); clients trust {}",
        tls.trust_file.display()
    );
    // Machine-readable line for scripts and tests.
    println!("listening on https://{addr}");
    let _ = std::io::stdout().flush();
    pairvisor_api::https::serve(listener, app, tls, shutdown_signal())
        .await
        .context("serving the API")?;
    agent.detach_all();
    orchestrator
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(u) = unit {
        u.shutdown().await;
    }
    info!("daemon stopped; VMs keep running and will be re-attached on the next start");
    Ok(())
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The API's TLS: the administrator's certificate, or the PM's own CA and a
/// server certificate for the names this PM is reached by.
fn api_tls(args: &ServeArgs, addr: std::net::SocketAddr) -> Result<pairvisor_api::tls::ApiTls> {
    use pairvisor_api::tls;
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => tls::from_files(cert, key).context("--tls-cert/--tls-key"),
        _ => {
            let host = hostname();
            let label = args
                .pm_name
                .clone()
                .or(host.clone())
                .unwrap_or_else(|| "pm".into());
            let names = tls::default_names(addr, host.as_deref(), &args.api_names);
            tls::load_or_create(&args.data_dir.join("tls"), &label, &names)
                .context("setting up HTTPS for the API")
        }
    }
}

/// Opens this PM's unit membership (re-joining if it was a member).
async fn open_unit(
    args: &ServeArgs,
    listen: &str,
    api: std::net::SocketAddr,
    tls: &pairvisor_api::tls::ApiTls,
) -> Result<std::sync::Arc<pairvisor_unit::UnitService>> {
    let listen: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--unit-listen {listen}: expected host:port"))?;
    let host = listen.ip();
    let name = match &args.pm_name {
        Some(n) => n.clone(),
        None => hostname().unwrap_or_else(|| "pm".into()),
    };
    pairvisor_model::names::validate_name("PM", &name)
        .map_err(|e| anyhow::anyhow!("--pm-name: {e}"))?;
    let pm = pairvisor_unit::PmAddresses {
        name,
        private_hb: args
            .private_hb
            .clone()
            .unwrap_or_else(|| format!("{host}:7482")),
        business_hb: args
            .business_hb
            .clone()
            .unwrap_or_else(|| format!("{host}:7483")),
        api_url: format!("https://{api}"),
        api_trust_pem: Some(tls.trust_pem.clone()),
    };
    let svc = pairvisor_unit::UnitService::open(pairvisor_unit::UnitConfig {
        data_dir: args.data_dir.join("unit"),
        listen,
        advertise: args.unit_advertise.clone(),
        pm: Some(pm),
        timing: Default::default(),
    })
    .await
    .map_err(|e| anyhow::anyhow!("opening the unit database: {e}"))?;
    Ok(svc)
}

/// `pairvisor witness`: a unit database voter without VMs.
pub async fn witness(args: pairvisor_cli::WitnessArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    private_umask();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.data_dir)
        .with_context(|| format!("creating data directory {}", args.data_dir.display()))?;
    warn_if_loose(&args.data_dir);
    let listen: std::net::SocketAddr = args
        .listen
        .parse()
        .with_context(|| format!("--listen {}: expected host:port", args.listen))?;
    let svc = pairvisor_unit::UnitService::open(pairvisor_unit::UnitConfig {
        data_dir: args.data_dir.clone(),
        listen,
        advertise: args.advertise.clone(),
        pm: None,
        timing: Default::default(),
    })
    .await
    .map_err(|e| anyhow::anyhow!("opening the unit database: {e}"))?;
    if svc.view().await.name.is_none() {
        let token = args
            .join
            .as_deref()
            .context("this witness is not in a unit yet: give --join TOKEN (from `pairvisor unit token --witness`)")?;
        svc.join(token)
            .await
            .map_err(|e| anyhow::anyhow!("joining the unit: {e}"))?;
    }
    let v = svc.view().await;
    info!(
        unit = v.name.as_deref().unwrap_or("-"),
        node = v.node_id.unwrap_or(0),
        "witness running"
    );
    println!("witness of unit {} running", v.name.unwrap_or_default());
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    svc.shutdown().await;
    Ok(())
}

/// `pairvisor watchdog`: kills this PM's QEMU processes once the lease the
/// daemon published has ended (docs/fencing.md "A hung daemon").
pub fn watchdog(data_dir: &Path) -> Result<()> {
    private_umask();
    let run_dir = data_dir.join("run");
    let stamp = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    pairvisor_unit::watchdog::run(
        &run_dir,
        || pairvisor_hypervisor::kill_all_qemus(&run_dir),
        |line| eprintln!("{:.3} pairvisor watchdog: {line}", stamp()),
    )
    .with_context(|| format!("watchdog for {}", run_dir.display()))?;
    Ok(())
}

/// Everything the daemon creates (state databases, keys, replicas, disks,
/// QEMU's logs) is private to its user: group and others get nothing.
fn private_umask() {
    // SAFETY: umask only sets the process's file mode creation mask; it
    // cannot fail and touches no memory.
    unsafe {
        libc::umask(0o077);
    }
}

/// Makes the data directory private again and warns about anything inside
/// it that other users could read (an older version's files, or loosened by
/// hand).
fn warn_if_loose(dir: &Path) {
    match pairvisor_agent::private_tree(dir) {
        Ok(r) => {
            if let Some(m) = r.root_was {
                tracing::warn!(
                    "data directory {} was mode {m:o}: made private (0700); it holds the unit \
                     secret, password hashes, TLS keys and guest disks",
                    dir.display()
                );
            }
            if r.loose_count > 0 {
                let shown: Vec<String> = r
                    .loose
                    .iter()
                    .map(|(p, m)| format!("{} ({m:o})", p.display()))
                    .collect();
                tracing::warn!(
                    "{} entries in {} are open to other users: {}{}; run `chmod -R go-rwx {}`",
                    r.loose_count,
                    dir.display(),
                    shown.join(", "),
                    if r.loose_count > shown.len() {
                        ", …"
                    } else {
                        ""
                    },
                    dir.display()
                );
            }
        }
        Err(e) => tracing::warn!("checking the permissions of {}: {e}", dir.display()),
    }
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
        // PM shutdown / unit shutdown (maintenance).
        _ = pairvisor_orchestrator::maintenance::exit_requested().notified() => {}
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
