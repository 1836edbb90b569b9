//! Live migration through QMP (SPEC M1–M4): capabilities and parameters,
//! the deferred incoming side, progress figures for the convergence
//! analysis, the remedies (downtime, post-copy, pause), the
//! pause-before-switchover hand-over point, and the dirty-rate pre-flight.

use crate::qmp::QmpError;
use crate::vm::{QemuVm, VmError};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// QEMU's migration status (`query-migrate` `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationStatus {
    /// No migration yet.
    None,
    /// Setting up.
    Setup,
    /// Copying memory (pre-copy).
    Active,
    /// Post-copy: the destination runs and pulls missing pages.
    PostcopyActive,
    /// Paused before the device state is sent (hand-over point, with the
    /// `pause-before-switchover` capability); `migrate-continue` resumes.
    PreSwitchover,
    /// Sending device state.
    Device,
    /// Done: the destination has everything.
    Completed,
    /// Failed; the source still runs.
    Failed,
    /// Cancelled; the source still runs.
    Cancelled,
    /// Being cancelled.
    Cancelling,
    /// A state this code does not know.
    Other(String),
}

impl MigrationStatus {
    fn parse(s: &str) -> Self {
        match s {
            "none" => Self::None,
            "setup" => Self::Setup,
            "active" => Self::Active,
            "postcopy-active" => Self::PostcopyActive,
            "pre-switchover" => Self::PreSwitchover,
            "device" => Self::Device,
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "cancelling" => Self::Cancelling,
            other => Self::Other(other.to_string()),
        }
    }

    /// Whether the migration has ended (successfully or not).
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// A snapshot of `query-migrate`: the figures SPEC M2 shows.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationProgress {
    /// Status.
    pub status: MigrationStatus,
    /// Milliseconds since the migration started.
    pub total_time_ms: u64,
    /// QEMU's estimate of the downtime if it switched over now, ms.
    pub expected_downtime_ms: Option<u64>,
    /// Actual downtime, once completed, ms.
    pub downtime_ms: Option<u64>,
    /// RAM bytes sent so far.
    pub transferred: u64,
    /// RAM bytes still to send.
    pub remaining: u64,
    /// Guest RAM size, bytes.
    pub total: u64,
    /// Current transfer rate, bytes per second.
    pub bandwidth_bps: f64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// Guest page size, bytes.
    pub page_size: u64,
    /// Completed passes over memory.
    pub dirty_sync_count: u64,
    /// Guest CPU throttle applied by auto-converge, percent.
    pub cpu_throttle_percent: u64,
    /// Error text of a failed migration.
    pub error: Option<String>,
}

impl MigrationProgress {
    fn from_value(v: &Value) -> Self {
        let ram = &v["ram"];
        let u = |x: &Value| x.as_u64().unwrap_or(0);
        MigrationProgress {
            status: MigrationStatus::parse(v["status"].as_str().unwrap_or("none")),
            total_time_ms: u(&v["total-time"]),
            expected_downtime_ms: v["expected-downtime"].as_u64(),
            downtime_ms: v["downtime"].as_u64(),
            transferred: u(&ram["transferred"]),
            remaining: u(&ram["remaining"]),
            total: u(&ram["total"]),
            // QEMU reports megabits per second.
            bandwidth_bps: ram["mbps"].as_f64().unwrap_or(0.0) * 1e6 / 8.0,
            dirty_pages_rate: u(&ram["dirty-pages-rate"]),
            page_size: ram["page-size"].as_u64().unwrap_or(4096),
            dirty_sync_count: u(&ram["dirty-sync-count"]),
            cpu_throttle_percent: u(&v["cpu-throttle-percentage"]),
            error: v["error-desc"].as_str().map(str::to_string),
        }
    }
}

/// Migration capabilities, set on both sides before a migration starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigrationCaps {
    /// Throttle the guest when it dirties memory too fast (M3).
    pub auto_converge: bool,
    /// Allow switching to post-copy later (M3); must be set on both sides.
    pub postcopy_ram: bool,
    /// Stop before sending device state so that the disk can be handed
    /// over (source side only).
    pub pause_before_switchover: bool,
}

/// Migration parameters; may also change while a migration runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrationParams {
    /// Bandwidth cap, bytes per second.
    pub max_bandwidth_bps: Option<u64>,
    /// Maximum downtime allowed for the switch-over, ms.
    pub downtime_limit_ms: Option<u64>,
    /// Id of a `tls-creds-x509` object (see [`QemuVm::add_tls_creds`]):
    /// the migration stream runs over TLS with it.
    pub tls_creds: Option<String>,
    /// Source side: the name the destination's certificate must carry.
    pub tls_hostname: Option<String>,
}

/// Which end of a TLS connection a QEMU credentials object serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// Accepts connections (the migration destination); files
    /// `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.
    Server,
    /// Connects (the migration source); files `ca-cert.pem`,
    /// `client-cert.pem`, `client-key.pem`.
    Client,
}

impl TlsEndpoint {
    /// QEMU's word for this end: the `endpoint` of a `tls-creds-x509`
    /// object and the prefix of its certificate and key file names.
    pub fn qemu_name(self) -> &'static str {
        match self {
            TlsEndpoint::Server => "server",
            TlsEndpoint::Client => "client",
        }
    }
}

/// A dirty-rate measurement (M4 pre-flight).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DirtyRate {
    /// Bytes per second the guest dirtied during the measurement.
    pub bytes_per_sec: f64,
    /// How long was measured, seconds.
    pub calc_time_secs: u64,
}

fn mig_err(e: QmpError) -> VmError {
    VmError::from(e)
}

impl QemuVm {
    /// Sets migration capabilities (before `migrate` / `migrate-incoming`).
    pub async fn set_migration_caps(&self, caps: MigrationCaps) -> Result<(), VmError> {
        let list = json!([
            {"capability": "events", "state": true},
            {"capability": "auto-converge", "state": caps.auto_converge},
            {"capability": "postcopy-ram", "state": caps.postcopy_ram},
            {"capability": "pause-before-switchover", "state": caps.pause_before_switchover},
        ]);
        self.qmp()
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": list })),
            )
            .await
            .map(|_| ())
            .map_err(mig_err)
    }

    /// Sets (or changes, during a migration) bandwidth cap and downtime.
    pub async fn set_migration_params(&self, p: MigrationParams) -> Result<(), VmError> {
        let mut args = serde_json::Map::new();
        if let Some(b) = p.max_bandwidth_bps {
            args.insert("max-bandwidth".into(), json!(b));
        }
        if let Some(d) = p.downtime_limit_ms {
            args.insert("downtime-limit".into(), json!(d));
        }
        if let Some(c) = p.tls_creds {
            args.insert("tls-creds".into(), json!(c));
        }
        if let Some(h) = p.tls_hostname {
            args.insert("tls-hostname".into(), json!(h));
        }
        if args.is_empty() {
            return Ok(());
        }
        self.qmp()
            .execute("migrate-set-parameters", Some(Value::Object(args)))
            .await
            .map(|_| ())
            .map_err(mig_err)
    }

    /// Creates (or replaces) the TLS credentials object `id` from the PEM
    /// files in `dir` (QEMU's names, see [`TlsEndpoint`]); the peer must
    /// present a certificate of the same CA.
    pub async fn add_tls_creds(
        &self,
        id: &str,
        dir: &std::path::Path,
        endpoint: TlsEndpoint,
    ) -> Result<(), VmError> {
        // A retried migration finds the previous object: replace it.
        let _ = self
            .qmp()
            .execute("object-del", Some(json!({ "id": id })))
            .await;
        self.qmp()
            .execute(
                "object-add",
                Some(json!({
                    "qom-type": "tls-creds-x509",
                    "id": id,
                    "dir": dir.display().to_string(),
                    "endpoint": endpoint.qemu_name(),
                    "verify-peer": true,
                })),
            )
            .await
            .map(|_| ())
            .map_err(mig_err)
    }

    /// Destination side (started with `incoming_defer`): listens on `uri`
    /// (e.g. `tcp:127.0.0.1:4444`, `unix:/path`).
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), VmError> {
        self.qmp()
            .execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(|_| ())
            .map_err(mig_err)
    }

    /// Source side: starts migrating to `uri`.
    pub async fn migrate(&self, uri: &str) -> Result<(), VmError> {
        self.qmp()
            .execute("migrate", Some(json!({ "uri": uri })))
            .await
            .map(|_| ())
            .map_err(mig_err)
    }

    /// Progress of the current (or last) migration.
    pub async fn query_migrate(&self) -> Result<MigrationProgress, VmError> {
        let v = self
            .qmp()
            .execute("query-migrate", None)
            .await
            .map_err(mig_err)?;
        Ok(MigrationProgress::from_value(&v))
    }

    /// M3 remedy: switch a running pre-copy migration to post-copy (needs
    /// the `postcopy_ram` capability on both sides).
    pub async fn migrate_start_postcopy(&self) -> Result<(), VmError> {
        self.qmp()
            .execute("migrate-start-postcopy", None)
            .await
            .map(|_| ())
            .map_err(mig_err)
    }

    /// Resumes a migration paused at `pre-switchover`.
    pub async fn migrate_continue(&self) -> Result<(), VmError> {
        self.qmp()
            .execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
            .await
            .map(|_| ())
            .map_err(mig_err)
    }

    /// Cancels a running migration; the source keeps running.
    pub async fn migrate_cancel(&self) -> Result<(), VmError> {
        self.qmp()
            .execute("migrate_cancel", None)
            .await
            .map(|_| ())
            .map_err(mig_err)
    }

    /// Polls `query-migrate` until `pred` holds or the migration ends,
    /// calling `on_progress` with each snapshot.
    pub async fn wait_migration(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&MigrationProgress) -> bool,
        mut on_progress: impl FnMut(&MigrationProgress),
    ) -> Result<MigrationProgress, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.query_migrate().await?;
            on_progress(&p);
            if pred(&p) || p.status.is_final() {
                return Ok(p);
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    what: "migration",
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// M4 pre-flight: measures how fast the running guest dirties memory
    /// (`calc-dirty-rate` over `secs` seconds).
    pub async fn measure_dirty_rate(&self, secs: u64) -> Result<DirtyRate, VmError> {
        self.qmp()
            .execute("calc-dirty-rate", Some(json!({"calc-time": secs})))
            .await
            .map_err(mig_err)?;
        let deadline = Instant::now() + Duration::from_secs(secs + 10);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let v = self
                .qmp()
                .execute("query-dirty-rate", None)
                .await
                .map_err(mig_err)?;
            if v["status"] == "measured" {
                // QEMU reports MB/s (MiB).
                let mb = v["dirty-rate"].as_f64().unwrap_or(0.0);
                return Ok(DirtyRate {
                    bytes_per_sec: mb * 1024.0 * 1024.0,
                    calc_time_secs: v["calc-time"].as_u64().unwrap_or(secs),
                });
            }
            if Instant::now() > deadline {
                return Err(VmError::Timeout {
                    what: "dirty-rate measurement",
                    after: Duration::from_secs(secs + 10),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_from_query_migrate() {
        let v = json!({
            "status": "active", "total-time": 1500, "expected-downtime": 420, "setup-time": 3,
            "ram": {"transferred": 1000, "remaining": 2000, "total": 268435456, "mbps": 80.0,
                    "dirty-pages-rate": 5000, "page-size": 4096, "dirty-sync-count": 3}
        });
        let p = MigrationProgress::from_value(&v);
        assert_eq!(p.status, MigrationStatus::Active);
        assert_eq!(p.expected_downtime_ms, Some(420));
        assert_eq!(p.remaining, 2000);
        assert!((p.bandwidth_bps - 10e6).abs() < 1.0, "80 Mbit/s = 10 MB/s");
        assert_eq!(p.dirty_pages_rate, 5000);
        let f = MigrationProgress::from_value(&json!({"status": "failed", "error-desc": "boom"}));
        assert!(f.status.is_final());
        assert_eq!(f.error.as_deref(), Some("boom"));
        assert_eq!(
            MigrationStatus::parse("wait-unplug"),
            MigrationStatus::Other("wait-unplug".into())
        );
    }
}
