//! Command-line grammar (clap) and what each command sends.

use crate::client::{self, CliError, Client, Saved};
use crate::ExitCode;
use clap::{Args, Parser, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};
use std::path::PathBuf;

/// Pairvisor: two servers, one unit that keeps VMs running.
#[derive(Debug, Parser)]
#[command(name = "pairvisor", version, about)]
pub struct Cli {
    /// Daemon URL (default: the saved login's, else https://127.0.0.1:7480).
    #[arg(long, global = true, env = "PAIRVISOR_URL")]
    pub url: Option<String>,
    /// CA certificate(s) to trust for the daemon's HTTPS (PEM; default: the
    /// saved login's, else the local PM's DATA_DIR/tls/api-ca.pem).
    #[arg(long, global = true, env = "PAIRVISOR_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Bearer token (default: the saved login's).
    #[arg(long, global = true, env = "PAIRVISOR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print the API's JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the PM daemon.
    Serve(Box<ServeArgs>),
    /// Run the witness: a unit database voter that runs no VMs.
    Witness(WitnessArgs),
    /// The lease watchdog (started by the daemon): kills this PM's VMs when
    /// its lease ends and the daemon did not stop them (hung or dead).
    #[command(hide = true)]
    Watchdog {
        /// The daemon's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// The unit: formation and membership.
    #[command(subcommand)]
    Unit(UnitCmd),
    /// A whole unit on this machine (two PMs and a witness) with fault injection.
    Lab {
        /// Lab directory.
        #[arg(long, global = true, default_value = "target/lab")]
        dir: PathBuf,
        /// What to do.
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Log in and save the token for later commands.
    Login {
        /// User name.
        #[arg(long, default_value = "admin")]
        user: String,
        /// File holding the password (else $PAIRVISOR_PASSWORD, else stdin).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Forget the saved token (and revoke it).
    Logout,
    /// Virtual machines.
    #[command(subcommand)]
    Vm(Box<VmCmd>),
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Storage groups.
    #[command(subcommand, name = "storage-group")]
    StorageGroup(GroupCmd),
    /// Virtual CDs.
    #[command(subcommand)]
    Vcd(VcdCmd),
    /// Users.
    #[command(subcommand)]
    User(UserCmd),
    /// Settings.
    #[command(subcommand)]
    Settings(SettingsCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// This physical machine.
    #[command(subcommand)]
    Pm(PmCmd),
}

/// `pairvisor serve` options.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Data directory (state database, run files, VCDs, default storage).
    #[arg(long, env = "PAIRVISOR_DATA_DIR", default_value = "/var/lib/pairvisor")]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "PAIRVISOR_LISTEN", default_value = "127.0.0.1:7480")]
    pub listen: String,
    /// QEMU accelerator for VMs: kvm (real hardware) or tcg (emulation).
    /// Stored in the settings; only applied when given.
    #[arg(long)]
    pub accel: Option<String>,
    /// File with the initial admin password (first start only). Without it a
    /// random password is written to DATA_DIR/initial-admin-password.
    #[arg(long)]
    pub admin_password_file: Option<PathBuf>,
    /// Unit database listener (Raft over mutual TLS); enables `unit init`
    /// and `unit join` on this PM.
    #[arg(long, env = "PAIRVISOR_UNIT_LISTEN")]
    pub unit_listen: Option<String>,
    /// Address other members use to reach the unit listener.
    #[arg(long)]
    pub unit_advertise: Option<String>,
    /// This PM's name in the unit (default: the host name).
    #[arg(long)]
    pub pm_name: Option<String>,
    /// Heartbeat address on the private link (host:port).
    #[arg(long, requires = "unit_listen")]
    pub private_hb: Option<String>,
    /// Heartbeat address on the first business network (host:port).
    #[arg(long, requires = "unit_listen")]
    pub business_hb: Option<String>,
    /// The API's certificate chain (PEM: server certificate, then its CAs),
    /// e.g. from the company's CA. Without it the PM makes its own CA
    /// (DATA_DIR/tls/api-ca.pem, the file to import into browsers).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A host directory API calls may take files from (VCD copies, kernels,
    /// initrds), besides DATA_DIR/import; repeatable. Nothing else on the
    /// host can be named by an API call.
    #[arg(long = "import-dir")]
    pub import_dirs: Vec<PathBuf>,
    /// More names (DNS names or addresses, e.g. the unit's management
    /// address) for the certificate the PM makes itself; repeatable.
    #[arg(long = "api-name")]
    pub api_names: Vec<String>,
}

/// `pairvisor witness` options.
#[derive(Debug, Args, Clone)]
pub struct WitnessArgs {
    /// Data directory of the witness.
    #[arg(long, default_value = "/var/lib/pairvisor-witness")]
    pub data_dir: PathBuf,
    /// Unit database listener.
    #[arg(long)]
    pub listen: String,
    /// Address other members use to reach it.
    #[arg(long)]
    pub advertise: Option<String>,
    /// Join token (first start only), from `pairvisor unit token --witness`.
    #[arg(long, env = "PAIRVISOR_JOIN_TOKEN", hide_env_values = true)]
    pub join: Option<String>,
}

/// `pairvisor lab ...`
#[derive(Debug, Subcommand)]
pub enum LabCmd {
    /// Start two PMs and a witness (own network namespaces as root), form the
    /// unit, and boot a demo VM on pm-a.
    Up {
        /// Test guest directory (vmlinuz, initrd.img) for the demo VM; none
        /// without it.
        #[arg(long)]
        guest_dir: Option<PathBuf>,
        /// Namespace prefix (1-6 lowercase letters/digits).
        #[arg(long, default_value = "pvlab")]
        prefix: String,
        /// Second octet of the lab's 10.x network (100-199).
        #[arg(long, default_value_t = 199)]
        net: u8,
        /// Two PMs only: losing one leaves the other without a majority
        /// (then `unit force-quorum`).
        #[arg(long)]
        no_witness: bool,
    },
    /// Show the unit as each member sees it.
    Status,
    /// Kill a member (pm-a, pm-b, witness) with everything it runs.
    Kill {
        /// Member.
        member: String,
    },
    /// Start a killed member again (pm-a, pm-b, witness), with its data.
    Start {
        /// Member.
        member: String,
    },
    /// Freeze a member's daemon (SIGSTOP; its VMs' QEMU processes go on),
    /// as a hung process or a long pause would.
    Freeze {
        /// Member.
        member: String,
    },
    /// Let a frozen member's daemon run again (SIGCONT).
    Thaw {
        /// Member.
        member: String,
    },
    /// Cut a link: private, business-a, business-b, witness, all.
    Cut {
        /// Link.
        link: String,
    },
    /// Restore a link (default: all).
    Heal {
        /// Link.
        #[arg(default_value = "all")]
        link: String,
    },
    /// Stop everything and remove the lab.
    Down,
    /// Benchmark in a lab of its own (temporary directory): live-migration
    /// downtime of an idle and a busy guest, failover time, acknowledged
    /// writes kept; prints JSON.
    Bench {
        /// Test guest directory (vmlinuz, initrd.img).
        #[arg(long, default_value = "target/guest")]
        guest_dir: PathBuf,
        /// Runs; each migrates an idle and a busy guest once.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Namespace prefix of the bench's lab (1-6 lowercase letters/digits).
        #[arg(long, default_value = "pvbn")]
        prefix: String,
        /// Second octet of the bench lab's 10.x network (100-199).
        #[arg(long, default_value_t = 198)]
        net: u8,
    },
}

/// `pairvisor unit ...`
#[derive(Debug, Subcommand)]
pub enum UnitCmd {
    /// Show the unit: members, leader, PMs, heartbeat links.
    Show,
    /// Force quorum on this PM when its partner is gone and there is no
    /// witness (U6). Without --yes, shows which PM holds the newest data.
    ForceQuorum {
        /// Confirm, after checking the preview.
        #[arg(long)]
        yes: bool,
    },
    /// Unit shutdown (U5): VMs first, then both PMs; the running VMs start
    /// again when the PMs come back.
    Shutdown {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
    /// Found a unit on this PM.
    Init {
        /// Unit name.
        name: String,
    },
    /// Issue a one-time join token for the second PM (or the witness).
    Token {
        /// For the witness.
        #[arg(long)]
        witness: bool,
    },
    /// Join a unit with a token from its first PM.
    Join {
        /// The token.
        token: String,
    },
}

/// `pairvisor vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCmd {
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        /// VM name.
        name: String,
    },
    /// Create a VM (stopped).
    Create(CreateVmArgs),
    /// Start a VM.
    Start {
        /// VM name.
        name: String,
    },
    /// ACPI shutdown (power off after the timeout).
    Shutdown {
        /// VM name.
        name: String,
    },
    /// Power off immediately.
    Poweroff {
        /// VM name.
        name: String,
    },
    /// Dump guest memory to a file, then restart.
    Dump {
        /// VM name.
        name: String,
    },
    /// Live-migrate a running VM to the partner PM (M1); prints the progress
    /// (M2 figures and convergence verdict) until it ends.
    Migrate {
        /// VM name.
        name: String,
        /// Maximum downtime at switch-over, ms (default: unit setting, 300).
        #[arg(long)]
        max_downtime_ms: Option<u64>,
        /// Bandwidth cap, MB/s (default: unit setting; 0 = unlimited).
        #[arg(long)]
        bandwidth_mbps: Option<u64>,
        /// Throttle the guest if it dirties memory too fast (M3).
        #[arg(long)]
        auto_converge: bool,
        /// Return once started instead of following the progress.
        #[arg(long)]
        no_wait: bool,
    },
    /// Restart the VM on the PM this CLI talks to although its replicas
    /// there may be behind (U6): the writes missing there are lost. Only
    /// while its host is fenced. Without --yes, shows what would be lost
    /// (the volumes' replicas and the refusal) and changes nothing.
    PromoteAnyway {
        /// VM name.
        name: String,
        /// Accept the data loss.
        #[arg(long)]
        yes: bool,
    },
    /// Set (or clear with `none`) the VM's preferred PM (L2).
    Placement {
        /// VM name.
        name: String,
        /// Preferred PM, or `none`.
        preferred: String,
    },
    /// Pre-flight (M4): measure the guest's dirty rate and say whether a
    /// migration would converge.
    MigrateEstimate {
        /// VM name.
        name: String,
        /// Bandwidth cap to assume, MB/s.
        #[arg(long)]
        bandwidth_mbps: Option<u64>,
    },
    /// Show the current (or last) migration of a VM.
    Migration {
        /// VM name.
        name: String,
    },
    /// Apply a remedy to a migration that does not converge (M3):
    /// raise_downtime, auto_converge, post_copy, pause_and_finish.
    MigrateRemedy {
        /// VM name.
        name: String,
        /// The remedy.
        remedy: String,
        /// For raise_downtime: the new maximum, ms.
        #[arg(long)]
        downtime_ms: Option<u64>,
    },
    /// Cancel a migration (before its switch-over).
    MigrateCancel {
        /// VM name.
        name: String,
    },
    /// Restart a critical VM and clear its crash counter.
    ResetDevice {
        /// VM name.
        name: String,
    },
    /// Start once from a VCD.
    BootFromCd {
        /// VM name.
        name: String,
        /// VCD name.
        vcd: String,
    },
    /// Insert a VCD into the CD drive.
    InsertCd {
        /// VM name.
        name: String,
        /// VCD name.
        vcd: String,
    },
    /// Eject the CD.
    EjectCd {
        /// VM name.
        name: String,
    },
    /// Re-provision a stopped VM.
    Config(ConfigVmArgs),
    /// Remove a VM (boot volume always; data volumes with --delete-data-volumes).
    Remove {
        /// VM name.
        name: String,
        /// Also delete data volumes.
        #[arg(long)]
        delete_data_volumes: bool,
    },
    /// Show the serial console output.
    Console {
        /// VM name.
        name: String,
        /// Keep following new output.
        #[arg(long, short)]
        follow: bool,
        /// Bytes from the end to show.
        #[arg(long, default_value_t = 16384)]
        tail_bytes: u64,
    },
}

/// `pairvisor vm create` options.
#[derive(Debug, Args)]
pub struct CreateVmArgs {
    /// VM name.
    pub name: String,
    /// vCPUs (1–8).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Memory, e.g. 512M or 2G.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Guest type: linux-64, linux-32, windows-64, windows-32, other.
    #[arg(long, default_value = "other")]
    pub guest_type: String,
    /// Size of a new boot volume, e.g. 8G.
    #[arg(long, conflicts_with = "boot_volume")]
    pub boot_size: Option<String>,
    /// Use an existing unattached volume as boot volume.
    #[arg(long)]
    pub boot_volume: Option<String>,
    /// Storage group for new volumes.
    #[arg(long)]
    pub group: Option<String>,
    /// New data volume NAME:SIZE (repeatable).
    #[arg(long = "data-volume")]
    pub data_volumes: Vec<String>,
    /// Network interface on NETWORK (repeatable; `user` is NAT).
    #[arg(long = "nic")]
    pub nics: Vec<String>,
    /// VCD to insert.
    #[arg(long)]
    pub cdrom: Option<String>,
    /// Direct kernel boot: kernel image path on the PM.
    #[arg(long)]
    pub kernel: Option<String>,
    /// Direct kernel boot: initrd path.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<String>,
    /// Direct kernel boot: command line.
    #[arg(long, requires = "kernel", default_value = "")]
    pub cmdline: String,
    /// Instance check: agent (guest agent ping) or none.
    #[arg(long, default_value = "agent")]
    pub instance_check: String,
    /// Start it right away.
    #[arg(long)]
    pub start: bool,
}

/// `pairvisor vm config` options.
#[derive(Debug, Args)]
pub struct ConfigVmArgs {
    /// VM name.
    pub name: String,
    /// New vCPU count.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// New memory, e.g. 1G.
    #[arg(long)]
    pub memory: Option<String>,
    /// Create and attach NAME:SIZE, or attach existing NAME (repeatable).
    #[arg(long = "add-volume")]
    pub add_volumes: Vec<String>,
    /// Detach a data volume, keeping it (repeatable).
    #[arg(long = "detach-volume")]
    pub detach_volumes: Vec<String>,
    /// Detach and delete a data volume (repeatable).
    #[arg(long = "delete-volume")]
    pub delete_volumes: Vec<String>,
    /// MAC override INDEX=MAC (repeatable).
    #[arg(long = "mac")]
    pub macs: Vec<String>,
}

/// `pairvisor volume ...`
#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// List volumes.
    List,
    /// Show a volume.
    Show {
        /// Name.
        name: String,
    },
    /// Show a split-brain volume's two copies side by side (S4).
    SplitBrain {
        /// Name.
        name: String,
    },
    /// Resolve a split brain by keeping one PM's copy; the other copy's
    /// independent writes are discarded. Without --yes, shows both copies
    /// and changes nothing.
    Resolve {
        /// Name.
        name: String,
        /// The PM whose copy is kept.
        #[arg(long)]
        keep: String,
        /// Discard the other copy's writes.
        #[arg(long)]
        yes: bool,
    },
    /// Create an unattached volume.
    Create {
        /// Name.
        name: String,
        /// Size, e.g. 10G.
        #[arg(long)]
        size: String,
        /// Storage group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Attach to a stopped VM.
    Attach {
        /// Volume.
        name: String,
        /// VM.
        #[arg(long)]
        vm: String,
    },
    /// Detach from its stopped VM (data kept).
    Detach {
        /// Volume.
        name: String,
    },
    /// Delete an unattached volume.
    Delete {
        /// Volume.
        name: String,
    },
}

/// `pairvisor storage-group ...`
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// List storage groups.
    List,
    /// Create a storage group.
    Create {
        /// Name.
        name: String,
        /// Absolute directory.
        #[arg(long)]
        path: String,
        /// Capacity, e.g. 100G.
        #[arg(long)]
        capacity: String,
    },
}

/// `pairvisor vcd ...`
#[derive(Debug, Subcommand)]
pub enum VcdCmd {
    /// List VCDs.
    List,
    /// Add from an ISO file on the PM.
    Add {
        /// Name.
        name: String,
        /// Absolute path on the PM.
        #[arg(long)]
        path: String,
    },
    /// Upload an ISO from this machine.
    Upload {
        /// Name.
        name: String,
        /// Local file.
        file: PathBuf,
    },
    /// Remove an unused VCD.
    Remove {
        /// Name.
        name: String,
    },
}

/// `pairvisor user ...`
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// List users.
    List,
    /// Create a user.
    Create {
        /// Name.
        name: String,
        /// administrator, operator or read_only.
        #[arg(long)]
        role: String,
        /// File holding the password (else $PAIRVISOR_NEW_PASSWORD, else stdin).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Delete a user.
    Delete {
        /// Name.
        name: String,
    },
}

/// `pairvisor settings ...`
#[derive(Debug, Subcommand)]
pub enum SettingsCmd {
    /// Show settings.
    Show,
    /// Change settings: KEY=VALUE ... (keys as in `settings show`).
    Set {
        /// KEY=VALUE pairs.
        #[arg(required = true)]
        pairs: Vec<String>,
    },
}

/// `pairvisor audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Show the newest audit records.
    List {
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
}

/// `pairvisor pm ...`
#[derive(Debug, Subcommand)]
pub enum PmCmd {
    /// Show this PM's resources and warnings.
    Show,
    /// Both PMs of the unit with their states and allowed operations (U2).
    List,
    /// Work On (U3): move the PM's VMs to the partner, then maintenance.
    WorkOn {
        /// PM name.
        name: String,
        /// Confirm shutting the VMs down when the partner cannot take them.
        #[arg(long)]
        yes: bool,
    },
    /// Finalize (U3): a PM in maintenance returns to service.
    Finalize {
        /// PM name.
        name: String,
    },
    /// Shut down a PM in maintenance (refused while a resync from it runs).
    Shutdown {
        /// PM name.
        name: String,
    },
    /// Power off a PM in maintenance, hard (when shutdown failed).
    Poweroff {
        /// PM name.
        name: String,
    },
    /// Put a PM taken out of service after too many failures back (U4).
    ResetDevice {
        /// PM name.
        name: String,
    },
}

/// Parses sizes like `512M`, `8G`, `1T`, `4096` (bytes), `10GiB`.
pub fn parse_size(s: &str) -> Result<u64, CliError> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        Some('T' | 't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| {
            CliError::Usage(format!(
                "'{s}' is not a size; write e.g. 512M, 8G or a number of bytes"
            ))
        })
}

fn mib(s: &str) -> Result<u64, CliError> {
    Ok(parse_size(s)? / (1 << 20))
}

fn read_password(file: &Option<PathBuf>, env: &str) -> Result<String, CliError> {
    if let Some(f) = file {
        let s = std::fs::read_to_string(f)
            .map_err(|e| CliError::Local(format!("cannot read {}: {e}", f.display())))?;
        return Ok(s.trim_end_matches(['\n', '\r']).to_string());
    }
    if let Ok(p) = std::env::var(env) {
        return Ok(p);
    }
    eprint!("password: ");
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Local(format!("cannot read the password: {e}")))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn volume_arg(s: &str, group: &Option<String>) -> Result<Value, CliError> {
    match s.split_once(':') {
        Some((name, size)) => {
            Ok(json!({"name": name, "size_bytes": parse_size(size)?, "group": group}))
        }
        None => Ok(json!({"name": s})),
    }
}

fn human_bytes(b: u64) -> String {
    const G: f64 = (1u64 << 30) as f64;
    const M: f64 = (1u64 << 20) as f64;
    if b as f64 >= G {
        format!("{:.1}G", b as f64 / G)
    } else {
        format!("{:.0}M", b as f64 / M)
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    // A cell is one line of plain text: control characters (a crafted user
    // name or path in the audit log, say) are shown escaped, so that they
    // cannot forge rows or send escape sequences to the terminal.
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.into_iter().map(|c| escape_controls(&c)).collect())
        .collect();
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|s| s.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

/// `c` with control characters escaped (`\n`, `\u{1b}`).
fn escape_controls(c: &str) -> String {
    if !c.chars().any(char::is_control) {
        return c.to_string();
    }
    c.chars()
        .flat_map(|ch| {
            let e: Vec<char> = if ch.is_control() {
                ch.escape_default().collect()
            } else {
                vec![ch]
            };
            e
        })
        .collect()
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn render(path_kind: &str, v: &Value) -> String {
    match (path_kind, v) {
        ("vms", Value::Array(a)) => table(
            &[
                "NAME",
                "STATE",
                "ACTIVITY",
                "VCPUS",
                "MEMORY",
                "BOOT VOLUME",
                "GUEST",
            ],
            a.iter()
                .map(|vm| {
                    vec![
                        s(&vm["name"]),
                        s(&vm["state"]),
                        s(&vm["activity"]),
                        s(&vm["vcpus"]),
                        format!("{}M", s(&vm["memory_mib"])),
                        s(&vm["boot_volume"]),
                        match vm["health"]["instance_ok"].as_bool() {
                            Some(true) => "answering".into(),
                            Some(false) => "not answering".into(),
                            None => "-".into(),
                        },
                    ]
                })
                .collect(),
        ),
        ("volumes", Value::Array(a)) => table(
            &["NAME", "SIZE", "GROUP", "VM", "BOOT", "SYNC"],
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["name"]),
                        human_bytes(x["size_bytes"].as_u64().unwrap_or(0)),
                        s(&x["group"]),
                        s(&x["vm"]),
                        s(&x["boot"]),
                        s(&x["sync"]),
                    ]
                })
                .collect(),
        ),
        ("vcds", Value::Array(a)) => table(
            &["NAME", "SIZE", "CAN REMOVE", "INSERTED IN"],
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["name"]),
                        human_bytes(x["size_bytes"].as_u64().unwrap_or(0)),
                        if x["can_remove"].as_bool() == Some(true) {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                        x["inserted_in"]
                            .as_array()
                            .map(|l| l.iter().map(s).collect::<Vec<_>>().join(","))
                            .unwrap_or_default(),
                    ]
                })
                .collect(),
        ),
        ("groups", Value::Array(a)) => table(
            &["NAME", "CAPACITY", "USED", "FREE", "VOLUMES", "PATH"],
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["name"]),
                        human_bytes(x["capacity_bytes"].as_u64().unwrap_or(0)),
                        human_bytes(x["used_bytes"].as_u64().unwrap_or(0)),
                        human_bytes(x["free_bytes"].as_u64().unwrap_or(0)),
                        s(&x["volumes"]),
                        s(&x["path"]),
                    ]
                })
                .collect(),
        ),
        ("users", Value::Array(a)) => table(
            &["NAME", "ROLE"],
            a.iter()
                .map(|x| vec![s(&x["name"]), s(&x["role"])])
                .collect(),
        ),
        ("audit", Value::Array(a)) => table(
            &["SEQ", "TIME", "USER", "ACTION", "RESULT"],
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["seq"]),
                        s(&x["time"]),
                        s(&x["user"]),
                        s(&x["action"]),
                        s(&x["result"]),
                    ]
                })
                .collect(),
        ),
        (_, Value::Object(o)) => o
            .iter()
            .map(|(k, v)| format!("{k}: {}", s(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        (_, Value::Null) => String::new(),
        (_, other) => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

/// Runs a client command (everything but `serve`). Prints the result and
/// returns the exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let json = cli.json;
    match run_inner(cli).await {
        Ok(()) => ExitCode::Ok,
        Err(e) => {
            if json {
                let body = match &e {
                    CliError::Api { body, .. } => body.clone(),
                    other => json!({"code": "cli_error", "message": other.to_string()}),
                };
                println!(
                    "{}",
                    serde_json::to_string_pretty(&body).unwrap_or_default()
                );
            } else {
                eprintln!("error: {e}");
            }
            e.exit_code()
        }
    }
}

async fn run_inner(cli: Cli) -> Result<(), CliError> {
    let saved = client::load_saved();
    let url = cli
        .url
        .clone()
        .or(saved.url.clone())
        .unwrap_or_else(|| "https://127.0.0.1:7480".into());
    let token = cli.token.clone().or(saved.token.clone());
    // A saved login's trust applies to its own URL only.
    let saved_trust = if saved.url.as_deref() == Some(url.as_str()) {
        saved.clone()
    } else {
        Saved::default()
    };
    let trust = client::trust_pem(cli.ca_cert.as_deref(), &saved_trust)?;
    let c = Client::with_trust(url.clone(), token, trust.as_deref())?;
    let out = |kind: &str, v: Value| {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            let text = render(kind, &v);
            if !text.is_empty() {
                println!("{text}");
            }
        }
    };
    let warn = |v: &Value| {
        if let Some(w) = v["warnings"].as_array() {
            for w in w {
                eprintln!("warning: {}", s(w));
            }
        }
    };
    use Method as M;
    match cli.command {
        Command::Serve(_) | Command::Witness(_) | Command::Watchdog { .. } | Command::Lab { .. } => {
            return Err(CliError::Usage("serve and witness are handled by the binary".into()));
        }
        Command::Unit(cmd) => match cmd {
            UnitCmd::Show => out("", c.call(M::GET, "/unit", None).await?),
            UnitCmd::Shutdown { yes } => {
                if !yes {
                    return Err(CliError::Usage(
                        "unit shutdown stops every VM and both PMs; repeat with --yes".into(),
                    ));
                }
                out("", c.call(M::POST, "/unit/shutdown", None).await?)
            }
            UnitCmd::ForceQuorum { yes } => {
                if yes {
                    out("", c.call(M::POST, "/unit/force-quorum", Some(json!({"confirm": true}))).await?)
                } else {
                    out("", c.call(M::GET, "/unit/force-quorum", None).await?);
                    eprintln!("nothing changed: repeat with --yes to force quorum on this PM");
                }
            }
            UnitCmd::Init { name } => out("", c.call(M::POST, "/unit/init", Some(json!({"name": name}))).await?),
            UnitCmd::Token { witness } => {
                let v = c.call(M::POST, "/unit/join-token", Some(json!({"witness": witness}))).await?;
                if cli.json {
                    out("", v);
                } else {
                    println!("{}", s(&v["token"]));
                }
            }
            UnitCmd::Join { token } => out("", c.call(M::POST, "/unit/join", Some(json!({"token": token}))).await?),
        },
        Command::Login { user, password_file } => {
            let password = read_password(&password_file, "PAIRVISOR_PASSWORD")?;
            let v = c
                .call(M::POST, "/auth/login", Some(json!({"user": user, "password": password})))
                .await?;
            client::save(&Saved {
                url: Some(url.clone()),
                token: v["token"].as_str().map(str::to_string),
                ca_pem: trust.clone(),
            })?;
            if cli.json {
                out("", json!({"user": v["user"], "role": v["role"], "url": url}));
            } else {
                println!("logged in to {url} as {} ({})", s(&v["user"]), s(&v["role"]));
            }
        }
        Command::Logout => {
            let _ = c.call(M::POST, "/auth/logout", None).await;
            client::save(&Saved {
                url: Some(url),
                token: None,
                ca_pem: trust,
            })?;
        }
        Command::Vm(cmd) => match *cmd {
            VmCmd::List => out("vms", c.call(M::GET, "/vms", None).await?),
            VmCmd::Show { name } => out("", c.call(M::GET, &format!("/vms/{name}"), None).await?),
            VmCmd::Create(a) => {
                let boot = match (&a.boot_size, &a.boot_volume) {
                    (Some(size), _) => json!({"size_bytes": parse_size(size)?, "group": a.group}),
                    (None, Some(v)) => json!({"name": v}),
                    (None, None) => {
                        return Err(CliError::Usage(
                            "give --boot-size SIZE for a new boot volume or --boot-volume NAME".into(),
                        ))
                    }
                };
                let data = a
                    .data_volumes
                    .iter()
                    .map(|d| volume_arg(d, &a.group))
                    .collect::<Result<Vec<_>, _>>()?;
                let kernel = a.kernel.as_ref().map(|k| json!({"kernel": k, "initrd": a.initrd, "cmdline": a.cmdline}));
                let body = json!({
                    "name": a.name, "vcpus": a.vcpus, "memory_mib": mib(&a.memory)?,
                    "guest_type": a.guest_type, "boot_volume": boot, "data_volumes": data,
                    "nics": a.nics.iter().map(|n| json!({"network": n})).collect::<Vec<_>>(),
                    "cdrom": a.cdrom, "kernel": kernel, "instance_check": a.instance_check,
                });
                let v = c.call(M::POST, "/vms", Some(body)).await?;
                if a.start {
                    let r = c.call(M::POST, &format!("/vms/{}/start", a.name), None).await?;
                    warn(&r);
                    out("", r["vm"].clone());
                } else {
                    out("", v);
                }
            }
            VmCmd::Start { name } => {
                let r = c.call(M::POST, &format!("/vms/{name}/start"), None).await?;
                warn(&r);
                out("", r["vm"].clone());
            }
            VmCmd::Shutdown { name } => out("", c.call(M::POST, &format!("/vms/{name}/shutdown"), None).await?),
            VmCmd::Poweroff { name } => out("", c.call(M::POST, &format!("/vms/{name}/poweroff"), None).await?),
            VmCmd::Dump { name } => out("", c.call(M::POST, &format!("/vms/{name}/dump"), None).await?),
            VmCmd::Migrate { name, max_downtime_ms, bandwidth_mbps, auto_converge, no_wait } => {
                let body = json!({"max_downtime_ms": max_downtime_ms, "bandwidth_mbps": bandwidth_mbps, "auto_converge": auto_converge});
                let v = c.call(M::POST, &format!("/vms/{name}/migrate"), Some(body)).await?;
                if no_wait {
                    out("", v);
                } else {
                    let mut last = String::new();
                    loop {
                        let m = c.call(M::GET, &format!("/vms/{name}/migration"), None).await?;
                        let phase = m["phase"].as_str().unwrap_or("").to_string();
                        if phase == "done" || phase == "failed" {
                            out("", m.clone());
                            if phase == "failed" {
                                return Err(CliError::Api {
                                    status: 409,
                                    code: "migration_failed".into(),
                                    message: m["error"].as_str().unwrap_or("the migration failed").to_string(),
                                    body: m.clone(),
                                });
                            }
                            break;
                        }
                        let line = format!(
                            "{phase}: {:.0}% of RAM sent, {:.1} MB/s, dirty {:.1} MB/s{}",
                            100.0 * m["ram_transferred_bytes"].as_f64().unwrap_or(0.0)
                                / m["ram_total_bytes"].as_f64().unwrap_or(1.0).max(1.0),
                            m["bandwidth_bps"].as_f64().unwrap_or(0.0) / 1e6,
                            m["dirty_rate_bps"].as_f64().unwrap_or(0.0) / 1e6,
                            match m["verdict"]["verdict"].as_str() {
                                Some("not_converging") => format!(
                                    " — NOT CONVERGING: {}",
                                    m["verdict"]["explanation"].as_str().unwrap_or("")
                                ),
                                Some(v) => format!(" — {v}"),
                                None => String::new(),
                            }
                        );
                        if line != last && !cli.json {
                            eprintln!("{line}");
                            last = line;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            }
            VmCmd::PromoteAnyway { name, yes } => {
                if yes {
                    out(
                        "",
                        c.call(M::POST, &format!("/vms/{name}/promote-anyway"), Some(json!({"confirm": name})))
                            .await?,
                    )
                } else {
                    let alerts = c.call(M::GET, "/alerts", None).await?;
                    let subject = format!("vm/{name}");
                    for a in alerts.as_array().into_iter().flatten() {
                        if a["subject"] == subject.as_str() {
                            eprintln!("{}: {}", s(&a["severity"]), s(&a["message"]));
                        }
                    }
                    out("", c.call(M::GET, "/unit/force-quorum", None).await?);
                    eprintln!(
                        "nothing changed: repeat with --yes to restart {name} here and lose the writes \
                         missing from this PM's replicas"
                    );
                }
            }
            VmCmd::Placement { name, preferred } => {
                let pm = (preferred != "none").then_some(preferred);
                out(
                    "",
                    c.call(M::PUT, &format!("/vms/{name}/placement"), Some(json!({"preferred_pm": pm})))
                        .await?,
                )
            }
            VmCmd::MigrateEstimate { name, bandwidth_mbps } => out(
                "",
                c.call(
                    M::POST,
                    &format!("/vms/{name}/migration/estimate"),
                    Some(json!({"bandwidth_mbps": bandwidth_mbps})),
                )
                .await?,
            ),
            VmCmd::Migration { name } => out("", c.call(M::GET, &format!("/vms/{name}/migration"), None).await?),
            VmCmd::MigrateRemedy { name, remedy, downtime_ms } => out(
                "",
                c.call(
                    M::POST,
                    &format!("/vms/{name}/migration/remedy"),
                    Some(json!({"remedy": remedy, "downtime_ms": downtime_ms})),
                )
                .await?,
            ),
            VmCmd::MigrateCancel { name } => out("", c.call(M::DELETE, &format!("/vms/{name}/migration"), None).await?),
            VmCmd::ResetDevice { name } => {
                out("", c.call(M::POST, &format!("/vms/{name}/reset-device"), None).await?)
            }
            VmCmd::BootFromCd { name, vcd } => {
                let r = c
                    .call(M::POST, &format!("/vms/{name}/boot-from-cd"), Some(json!({"vcd": vcd})))
                    .await?;
                warn(&r);
                out("", r["vm"].clone());
            }
            VmCmd::InsertCd { name, vcd } => {
                out("", c.call(M::PUT, &format!("/vms/{name}/cd"), Some(json!({"vcd": vcd}))).await?)
            }
            VmCmd::EjectCd { name } => out("", c.call(M::DELETE, &format!("/vms/{name}/cd"), None).await?),
            VmCmd::Config(a) => {
                let mut macs = Vec::new();
                for m in &a.macs {
                    let (i, mac) = m
                        .split_once('=')
                        .ok_or_else(|| CliError::Usage(format!("--mac '{m}': write INDEX=MAC")))?;
                    let nic: usize = i
                        .parse()
                        .map_err(|_| CliError::Usage(format!("--mac '{m}': INDEX must be a number")))?;
                    macs.push(json!({"nic": nic, "mac": mac}));
                }
                let body = json!({
                    "vcpus": a.vcpus,
                    "memory_mib": a.memory.as_deref().map(mib).transpose()?,
                    "add_volumes": a.add_volumes.iter().map(|v| volume_arg(v, &None)).collect::<Result<Vec<_>, _>>()?,
                    "detach_volumes": a.detach_volumes, "delete_volumes": a.delete_volumes, "macs": macs,
                });
                out("", c.call(M::POST, &format!("/vms/{}/config", a.name), Some(body)).await?)
            }
            VmCmd::Remove { name, delete_data_volumes } => {
                c.call(M::DELETE, &format!("/vms/{name}?delete_data_volumes={delete_data_volumes}"), None)
                    .await?;
                if !cli.json {
                    println!("VM '{name}' removed");
                }
            }
            VmCmd::Console { name, follow, tail_bytes } => {
                let path = format!("/vms/{name}/console?tail_bytes={tail_bytes}&follow={follow}");
                c.stream_to_stdout(&path).await?;
            }
        },
        Command::Volume(cmd) => match cmd {
            VolumeCmd::List => out("volumes", c.call(M::GET, "/volumes", None).await?),
            VolumeCmd::Show { name } => out("", c.call(M::GET, &format!("/volumes/{name}"), None).await?),
            VolumeCmd::SplitBrain { name } => {
                out("", c.call(M::GET, &format!("/volumes/{name}/split-brain"), None).await?)
            }
            VolumeCmd::Resolve { name, keep, yes } => {
                if yes {
                    out(
                        "",
                        c.call(
                            M::POST,
                            &format!("/volumes/{name}/resolve"),
                            Some(json!({"keep": keep, "confirm": name})),
                        )
                        .await?,
                    )
                } else {
                    out("", c.call(M::GET, &format!("/volumes/{name}/split-brain"), None).await?);
                    eprintln!(
                        "nothing changed: repeat with --yes to keep {keep}'s copy of {name} and discard \
                         the other copy's independent writes"
                    );
                }
            }
            VolumeCmd::Create { name, size, group } => out(
                "",
                c.call(M::POST, "/volumes", Some(json!({"name": name, "size_bytes": parse_size(&size)?, "group": group})))
                    .await?,
            ),
            VolumeCmd::Attach { name, vm } => {
                out("", c.call(M::POST, &format!("/volumes/{name}/attach"), Some(json!({"vm": vm}))).await?)
            }
            VolumeCmd::Detach { name } => out("", c.call(M::POST, &format!("/volumes/{name}/detach"), None).await?),
            VolumeCmd::Delete { name } => {
                c.call(M::DELETE, &format!("/volumes/{name}"), None).await?;
            }
        },
        Command::StorageGroup(cmd) => match cmd {
            GroupCmd::List => out("groups", c.call(M::GET, "/storage-groups", None).await?),
            GroupCmd::Create { name, path, capacity } => out(
                "",
                c.call(
                    M::POST,
                    "/storage-groups",
                    Some(json!({"name": name, "path": path, "capacity_bytes": parse_size(&capacity)?})),
                )
                .await?,
            ),
        },
        Command::Vcd(cmd) => match cmd {
            VcdCmd::List => out("vcds", c.call(M::GET, "/vcds", None).await?),
            VcdCmd::Add { name, path } => {
                out("", c.call(M::POST, "/vcds", Some(json!({"name": name, "path": path}))).await?)
            }
            VcdCmd::Upload { name, file } => out("", c.upload(&format!("/vcds/{name}"), &file).await?),
            VcdCmd::Remove { name } => {
                c.call(M::DELETE, &format!("/vcds/{name}"), None).await?;
            }
        },
        Command::User(cmd) => match cmd {
            UserCmd::List => out("users", c.call(M::GET, "/users", None).await?),
            UserCmd::Create { name, role, password_file } => {
                let password = read_password(&password_file, "PAIRVISOR_NEW_PASSWORD")?;
                out(
                    "",
                    c.call(M::POST, "/users", Some(json!({"name": name, "role": role, "password": password})))
                        .await?,
                )
            }
            UserCmd::Delete { name } => {
                c.call(M::DELETE, &format!("/users/{name}"), None).await?;
            }
        },
        Command::Settings(cmd) => match cmd {
            SettingsCmd::Show => out("", c.call(M::GET, "/settings", None).await?),
            SettingsCmd::Set { pairs } => {
                let mut body = serde_json::Map::new();
                for p in pairs {
                    let (k, v) = p
                        .split_once('=')
                        .ok_or_else(|| CliError::Usage(format!("'{p}': write KEY=VALUE")))?;
                    // Numbers go as numbers, everything else as strings.
                    let val = v.parse::<u64>().map(Value::from).unwrap_or_else(|_| Value::from(v));
                    body.insert(k.to_string(), val);
                }
                out("", c.call(M::PATCH, "/settings", Some(Value::Object(body))).await?)
            }
        },
        Command::Audit(AuditCmd::List { limit }) => {
            out("audit", c.call(M::GET, &format!("/audit?limit={limit}"), None).await?)
        }
        Command::Pm(PmCmd::Show) => out("", c.call(M::GET, "/pm", None).await?),
        Command::Pm(PmCmd::List) => out("", c.call(M::GET, "/pms", None).await?),
        Command::Pm(PmCmd::WorkOn { name, yes }) => out(
            "",
            c.call(M::POST, &format!("/pms/{name}/work-on"), Some(json!({"confirm": yes})))
                .await?,
        ),
        Command::Pm(PmCmd::Finalize { name }) => {
            out("", c.call(M::POST, &format!("/pms/{name}/finalize"), None).await?)
        }
        Command::Pm(PmCmd::Shutdown { name }) => {
            out("", c.call(M::POST, &format!("/pms/{name}/shutdown"), None).await?)
        }
        Command::Pm(PmCmd::ResetDevice { name }) => {
            out("", c.call(M::POST, &format!("/pms/{name}/reset-device"), None).await?)
        }
        Command::Pm(PmCmd::Poweroff { name }) => {
            out("", c.call(M::POST, &format!("/pms/{name}/poweroff"), None).await?)
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_cells_show_control_characters_escaped() {
        let t = table(
            &["USER", "ACTION"],
            vec![vec!["x\u{1b}[31m\nforged".into(), "POST /x".into()]],
        );
        assert_eq!(t.lines().count(), 2, "{t}");
        assert!(t.contains("x\\u{1b}[31m\\nforged"), "{t}");
        assert!(!t.contains('\u{1b}'));
    }

    #[test]
    fn sizes() {
        for (s, want) in [
            ("512M", 512 << 20),
            ("8G", 8 << 30),
            ("10GiB", 10 << 30),
            ("4096", 4096),
            ("1T", 1 << 40),
        ] {
            assert_eq!(parse_size(s).unwrap(), want, "{s}");
        }
        for bad in ["", "G", "1.5G", "-1", "99999999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grammar_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
