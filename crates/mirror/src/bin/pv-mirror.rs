//! `pv-mirror`: runs one volume's replica as its own process — NBD export,
//! replication listener, connection to the partner, and a JSON control
//! socket. The Pairvisor daemon embeds the same library instead.

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use pairvisor_mirror::nbd::server::NbdServer;
use pairvisor_mirror::replica::{CreateOptions, Replica, DEFAULT_REGION_SIZE};
use pairvisor_mirror::volume::{Durability, Volume, VolumeOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RoleArg {
    Primary,
    Secondary,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DurabilityArg {
    EveryWrite,
    OnFlush,
}

/// Runs one replica of a mirrored volume.
#[derive(Parser, Debug)]
#[command(name = "pv-mirror", version)]
struct Args {
    /// Replica directory.
    #[arg(long)]
    dir: PathBuf,
    /// Create the replica with this size in bytes when it does not exist.
    #[arg(long)]
    size: Option<u64>,
    /// Volume identifier (needed to create).
    #[arg(long, default_value = "vol")]
    volume_id: String,
    /// Dirty bitmap region size in bytes.
    #[arg(long, default_value_t = DEFAULT_REGION_SIZE)]
    region_size: u64,
    /// Initial generation of a new volume: give both replicas the same
    /// value and they start in sync. Without it a new replica is empty and
    /// receives a full copy.
    #[arg(long)]
    initial_gen: Option<u64>,
    /// NBD export on this Unix socket.
    #[arg(long)]
    nbd_unix: Option<PathBuf>,
    /// NBD export on this TCP address.
    #[arg(long)]
    nbd_tcp: Option<String>,
    /// Export name (default: the volume id).
    #[arg(long)]
    export_name: Option<String>,
    /// Listen for replication from a primary on this TCP address.
    #[arg(long)]
    repl_listen: Option<String>,
    /// The partner's replication address (used while primary).
    #[arg(long)]
    partner: Option<String>,
    /// File holding the unit secret.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Role at start.
    #[arg(long, value_enum, default_value = "secondary")]
    role: RoleArg,
    /// Epoch for `--role primary`: promotes when above the stored epoch,
    /// resumes when equal to it.
    #[arg(long, default_value_t = 1)]
    epoch: u64,
    /// Resync rate limit in bytes/s (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    resync_rate: u64,
    /// Durability policy.
    #[arg(long, value_enum, default_value = "every-write")]
    durability: DurabilityArg,
    /// Link timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    link_timeout_ms: u64,
    /// Forbid degraded mode at start (the lease stand-in).
    #[arg(long)]
    no_degraded: bool,
    /// Control socket.
    #[arg(long)]
    control: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(256)
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let replica = if args.dir.join("meta.json").exists() {
        Replica::open(&args.dir).context("opening replica")?
    } else {
        let Some(size) = args.size else {
            bail!(
                "{} holds no replica: give --size to create one",
                args.dir.display()
            );
        };
        Replica::create(
            &args.dir,
            &CreateOptions {
                volume_id: args.volume_id.clone(),
                size,
                region_size: args.region_size,
                initial_gen: args.initial_gen,
            },
        )
        .context("creating replica")?
    };
    let secret = match &args.secret_file {
        Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        None => Vec::new(),
    };
    if secret.is_empty() && (args.repl_listen.is_some() || args.partner.is_some()) {
        bail!("replication needs a non-empty --secret-file");
    }
    let export = args
        .export_name
        .clone()
        .unwrap_or_else(|| replica.meta().volume_id.clone());
    let vol = Volume::start(
        replica,
        VolumeOptions {
            secret,
            resync_rate: args.resync_rate,
            durability: match args.durability {
                DurabilityArg::EveryWrite => Durability::EveryWrite,
                DurabilityArg::OnFlush => Durability::OnFlush,
            },
            link_timeout: Duration::from_millis(args.link_timeout_ms),
            ..VolumeOptions::default()
        },
    );
    let lease = Arc::new(AtomicBool::new(!args.no_degraded));
    {
        let lease = lease.clone();
        vol.set_degraded_predicate(Arc::new(move || lease.load(Ordering::SeqCst)));
    }
    vol.set_partner(args.partner.clone());
    if let RoleArg::Primary = args.role {
        let stored = vol.replica().meta().epoch;
        if args.epoch == stored {
            vol.resume_primary(args.epoch)
                .context("resuming as primary")?;
        } else {
            vol.promote(args.epoch, false)
                .await
                .context("promoting to primary")?;
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = &args.repl_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding replication listener {addr}"))?;
        tasks.spawn(vol.clone().serve_replication(l));
    }
    let server = NbdServer::new(vol.clone(), export);
    if let Some(p) = &args.nbd_unix {
        let _ = std::fs::remove_file(p);
        let l = tokio::net::UnixListener::bind(p)
            .with_context(|| format!("binding NBD socket {}", p.display()))?;
        tasks.spawn(server.clone().serve_unix(l));
    }
    if let Some(addr) = &args.nbd_tcp {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding NBD listener {addr}"))?;
        tasks.spawn(server.clone().serve_tcp(l));
    }
    if let Some(p) = &args.control {
        let _ = std::fs::remove_file(p);
        let l = tokio::net::UnixListener::bind(p)
            .with_context(|| format!("binding control socket {}", p.display()))?;
        let vol = vol.clone();
        let lease = lease.clone();
        tasks.spawn(async move {
            pairvisor_mirror::control::serve(l, vol, lease).await;
            Ok(())
        });
    }
    tracing::info!("pv-mirror ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tasks.join_next() => {
            if let Some(Ok(Err(e))) = r {
                return Err(e).context("listener failed");
            }
        }
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
