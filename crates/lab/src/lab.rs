//! `pairvisor lab up|status|kill|cut|heal|down`: a whole unit (two PM
//! daemons and a witness, as separate processes) on this machine.

use crate::netns::{is_root, Link, Topology};
use pairvisor_cli::Client;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

/// A lab failure, with what to do.
#[derive(Debug, Error)]
pub enum LabError {
    /// A lab runs already in this directory.
    #[error("a lab is already up in {0}; run `pairvisor lab down` first")]
    AlreadyUp(String),
    /// No lab here.
    #[error("no lab is up in {0}; run `pairvisor lab up`")]
    NotUp(String),
    /// A member did not start.
    #[error("{member} did not start: {detail}")]
    Start {
        /// Which member.
        member: String,
        /// Its log tail or the error.
        detail: String,
    },
    /// A request to a member failed.
    #[error("{0}")]
    Api(String),
    /// Network namespaces.
    #[error(transparent)]
    Net(#[from] crate::netns::NetError),
    /// Local files.
    #[error("{0}")]
    Io(String),
    /// Not possible in this mode.
    #[error("{0}")]
    Unsupported(String),
}

/// One process of the lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    /// `pm-a`, `pm-b` or `witness`.
    pub name: String,
    /// Daemon pid.
    pub pid: u32,
    /// API URL (PMs only).
    pub api: Option<String>,
    /// Data directory.
    pub data: PathBuf,
    /// Namespace member letter.
    pub ns: char,
    /// Its command line (for `lab start` after `lab kill`).
    #[serde(default)]
    pub argv: Vec<String>,
    /// What its stdout prints once it is ready.
    #[serde(default)]
    pub ready: String,
}

/// What `lab up` made, saved in DIR/lab.json.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    /// Network namespaces (root) or `None` (loopback lab).
    pub topology: Option<Topology>,
    /// The processes.
    pub members: Vec<Member>,
    /// Admin password of both PMs.
    pub password_file: PathBuf,
}

/// Options of `lab up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Lab directory.
    pub dir: PathBuf,
    /// The `pairvisor` binary to run.
    pub bin: PathBuf,
    /// Namespace prefix (root only).
    pub prefix: String,
    /// Second octet of the lab network (root only).
    pub net: u8,
    /// Boot a demo VM on pm-a from the test guest in this directory.
    pub guest_dir: Option<PathBuf>,
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

/// Loads the lab state of `dir`.
pub fn load(dir: &Path) -> Result<LabState, LabError> {
    let b =
        std::fs::read(state_file(dir)).map_err(|_| LabError::NotUp(dir.display().to_string()))?;
    serde_json::from_slice(&b).map_err(|e| LabError::Io(format!("lab.json is unreadable: {e}")))
}

/// Whether process `pid` still runs or still holds its files. A killed
/// process's leader turns zombie as soon as its own thread exits, while its
/// other threads may still be exiting with the files (and their locks)
/// open, so a zombie counts as gone only once it is the last task of its
/// group.
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    if !stat.contains(") Z ") {
        return true;
    }
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|d| d.count() > 1)
}

struct Plan {
    name: &'static str,
    ns: char,
    args: Vec<String>,
    api: Option<String>,
}

fn plan(opts: &UpOptions, topo: Option<&Topology>, password: &Path) -> Vec<Plan> {
    let (a_biz, b_biz, w_biz, a_priv, b_priv) = match topo {
        Some(t) => (
            t.business_addr('a'),
            t.business_addr('b'),
            t.business_addr('w'),
            t.private_addr('a'),
            t.private_addr('b'),
        ),
        // Loopback lab: each member its own loopback address (replication
        // listens on the same port on each PM's address).
        None => (
            "127.0.1.1".to_string(),
            "127.0.1.2".to_string(),
            "127.0.1.3".to_string(),
            "127.0.1.1".to_string(),
            "127.0.1.2".to_string(),
        ),
    };
    // Distinct ports too, so that the loopback lab's members never collide.
    let (pa, pb, pw) = if topo.is_some() {
        (7480, 7480, 7480)
    } else {
        (17480, 17490, 17500)
    };
    let pm = |name: &str, biz: &str, private: &str, p: u16| -> Vec<String> {
        // The demo VM boots the test guest's kernel: API calls may name
        // files there.
        let import: Vec<String> = opts
            .guest_dir
            .iter()
            .flat_map(|g| {
                let g = std::fs::canonicalize(g).unwrap_or_else(|_| g.clone());
                ["--import-dir".to_string(), g.display().to_string()]
            })
            .collect();
        let mut args: Vec<String> = vec![
            "serve".into(),
            "--data-dir".into(),
            opts.dir.join(name).display().to_string(),
            "--listen".into(),
            format!("{biz}:{p}"),
            "--unit-listen".into(),
            format!("{biz}:{}", p + 1),
            "--pm-name".into(),
            name.into(),
            "--private-hb".into(),
            format!("{private}:{}", p + 2),
            "--business-hb".into(),
            format!("{biz}:{}", p + 3),
            "--accel".into(),
            "tcg".into(),
            "--admin-password-file".into(),
            password.display().to_string(),
        ];
        args.extend(import);
        args
    };
    vec![
        Plan {
            name: "pm-a",
            ns: 'a',
            args: pm("pm-a", &a_biz, &a_priv, pa),
            api: Some(format!("https://{a_biz}:{pa}")),
        },
        Plan {
            name: "pm-b",
            ns: 'b',
            args: pm("pm-b", &b_biz, &b_priv, pb),
            api: Some(format!("https://{b_biz}:{pb}")),
        },
        Plan {
            name: "witness",
            ns: 'w',
            args: vec![
                "witness".into(),
                "--data-dir".into(),
                opts.dir.join("witness").display().to_string(),
                "--listen".into(),
                format!("{w_biz}:{}", pw + 1),
            ],
            api: None,
        },
    ]
}

fn spawn(
    opts: &UpOptions,
    topo: Option<&Topology>,
    p: &Plan,
    extra: &[String],
    ready: &str,
) -> Result<Member, LabError> {
    let out = opts.dir.join(format!("{}.out", p.name));
    let log = opts.dir.join(format!("{}.log", p.name));
    let file = |f: &Path| {
        std::fs::File::create(f).map_err(|e| LabError::Io(format!("{}: {e}", f.display())))
    };
    let mut argv: Vec<String> = Vec::new();
    if let Some(t) = topo {
        argv.extend(t.exec_prefix(p.ns));
    }
    argv.push(opts.bin.display().to_string());
    argv.extend(p.args.iter().cloned());
    argv.extend(extra.iter().cloned());
    let _ = (file(&out)?, file(&log)?);
    let pid = launch(p.name, &argv, &out, &log, ready)?;
    Ok(Member {
        name: p.name.into(),
        pid,
        api: p.api.clone(),
        data: opts.dir.join(p.name),
        ns: p.ns,
        argv,
        ready: ready.to_string(),
    })
}

/// Starts a member's process (appending to its output files) and waits for
/// its ready line.
fn launch(
    name: &str,
    argv: &[String],
    out: &Path,
    log: &Path,
    ready: &str,
) -> Result<u32, LabError> {
    let append = |f: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)
            .map_err(|e| LabError::Io(format!("{}: {e}", f.display())))
    };
    let seen_before = std::fs::read_to_string(out)
        .unwrap_or_default()
        .matches(ready)
        .count();
    // setsid: the member outlives this command and has its own session.
    let child = Command::new("setsid")
        .args(argv)
        .stdin(Stdio::null())
        .stdout(append(out)?)
        .stderr(append(log)?)
        .spawn()
        .map_err(|e| LabError::Start {
            member: name.into(),
            detail: e.to_string(),
        })?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::fs::read_to_string(out)
            .unwrap_or_default()
            .matches(ready)
            .count()
            > seen_before
        {
            break;
        }
        if !alive(pid) || Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: String = tail
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            return Err(LabError::Start {
                member: name.into(),
                detail: tail,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(pid)
}

/// The certificate authority a lab PM made for its API (its data
/// directory's `tls/api-ca.pem`).
pub fn member_trust(data: &Path) -> Option<String> {
    std::fs::read_to_string(data.join("tls/api-ca.pem")).ok()
}

/// A client for a lab PM's API that trusts that PM's own CA.
pub fn member_client(api: &str, data: &Path, token: Option<String>) -> Result<Client, LabError> {
    Client::with_trust(api.to_string(), token, member_trust(data).as_deref())
        .map_err(|e| LabError::Api(format!("{api}: {e}")))
}

async fn login(api: &str, data: &Path, password: &str) -> Result<Client, LabError> {
    let c = member_client(api, data, None)?;
    let v = c
        .call(
            reqwest_post(),
            "/auth/login",
            Some(json!({"user": "admin", "password": password})),
        )
        .await
        .map_err(|e| LabError::Api(format!("login to {api}: {e}")))?;
    let token = v["token"].as_str().unwrap_or_default().to_string();
    member_client(api, data, Some(token))
}

fn reqwest_post() -> pairvisor_cli::Method {
    pairvisor_cli::Method::POST
}

async fn call(
    c: &Client,
    method: pairvisor_cli::Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, LabError> {
    c.call(method, path, body)
        .await
        .map_err(|e| LabError::Api(format!("{} {path}: {e}", c.url)))
}

/// `lab up`: namespaces (as root), two PMs, the unit, the witness, a demo VM.
pub async fn up(opts: UpOptions) -> Result<LabState, LabError> {
    up_with(opts, true).await
}

/// `lab up`, with or without the witness (without it, losing one PM leaves
/// the other without a majority: SPEC U6's force quorum case).
pub async fn up_with(opts: UpOptions, witness: bool) -> Result<LabState, LabError> {
    if let Ok(st) = load(&opts.dir) {
        if st.members.iter().any(|m| alive(m.pid)) {
            return Err(LabError::AlreadyUp(opts.dir.display().to_string()));
        }
    }
    let _ = std::fs::remove_dir_all(&opts.dir);
    std::fs::create_dir_all(&opts.dir).map_err(|e| LabError::Io(e.to_string()))?;
    let topo = if is_root() {
        let t = Topology::new(&opts.prefix, opts.net)?;
        t.destroy();
        t.create()?;
        Some(t)
    } else {
        None
    };
    let password = "pairvisor-lab";
    let password_file = opts.dir.join("admin-password");
    std::fs::write(&password_file, password).map_err(|e| LabError::Io(e.to_string()))?;
    let plans = plan(&opts, topo.as_ref(), &password_file);
    let mut members = Vec::new();
    let result = async {
        for p in &plans[..2] {
            members.push(spawn(&opts, topo.as_ref(), p, &[], "listening on")?);
        }
        let a = login(
            plans[0].api.as_deref().unwrap_or_default(),
            &members[0].data,
            password,
        )
        .await?;
        let b = login(
            plans[1].api.as_deref().unwrap_or_default(),
            &members[1].data,
            password,
        )
        .await?;
        // One file for clients that talk to both PMs (CLI, browser).
        let bundle: String = members
            .iter()
            .filter_map(|m| member_trust(&m.data))
            .collect();
        std::fs::write(opts.dir.join("api-ca.pem"), bundle)
            .map_err(|e| LabError::Io(format!("writing the lab's api-ca.pem: {e}")))?;
        call(
            &a,
            pairvisor_cli::Method::POST,
            "/unit/init",
            Some(json!({"name": "lab"})),
        )
        .await?;
        let t = call(
            &a,
            pairvisor_cli::Method::POST,
            "/unit/join-token",
            Some(json!({})),
        )
        .await?;
        call(
            &b,
            pairvisor_cli::Method::POST,
            "/unit/join",
            Some(json!({"token": t["token"]})),
        )
        .await?;
        if witness {
            let tw = call(
                &a,
                pairvisor_cli::Method::POST,
                "/unit/join-token",
                Some(json!({"witness": true})),
            )
            .await?;
            let tok = tw["token"].as_str().unwrap_or_default().to_string();
            members.push(spawn(
                &opts,
                topo.as_ref(),
                &plans[2],
                &["--join".into(), tok],
                "witness of unit",
            )?);
        }
        let want_voters = if witness { 3 } else { 2 };
        // Wait for three voters, a leader, and the heartbeats.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = call(&a, pairvisor_cli::Method::GET, "/unit", None).await?;
            let voters = v["metrics"]["members"]
                .as_array()
                .map(|m| m.iter().filter(|x| x["voter"] == true).count())
                .unwrap_or(0);
            let links_up = v["health"]["links"]
                .as_array()
                .is_some_and(|l| l.len() == 2 && l.iter().all(|x| x["up"] == true));
            if voters == want_voters && !v["metrics"]["leader"].is_null() && links_up {
                break;
            }
            if Instant::now() > deadline {
                return Err(LabError::Api(format!("the unit did not form: {v}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if let Some(g) = &opts.guest_dir {
            let g = std::fs::canonicalize(g)
                .map_err(|e| LabError::Io(format!("guest directory {}: {e}", g.display())))?;
            let body = json!({
                "name": "demo", "vcpus": 1, "memory_mib": 256,
                "boot_volume": {"size_bytes": 64 << 20},
                "kernel": {"kernel": g.join("vmlinuz"), "initrd": g.join("initrd.img"),
                           "cmdline": "console=ttyS0 panic=0 quiet"},
            });
            call(&a, pairvisor_cli::Method::POST, "/vms", Some(body)).await?;
            call(&a, pairvisor_cli::Method::POST, "/vms/demo/start", None).await?;
        }
        Ok::<_, LabError>(())
    }
    .await;
    let state = LabState {
        topology: topo.clone(),
        members,
        password_file,
    };
    save(&opts.dir, &state)?;
    if let Err(e) = result {
        down(&opts.dir)?;
        return Err(e);
    }
    Ok(state)
}

fn save(dir: &Path, st: &LabState) -> Result<(), LabError> {
    std::fs::write(
        state_file(dir),
        serde_json::to_vec_pretty(st).unwrap_or_default(),
    )
    .map_err(|e| LabError::Io(e.to_string()))
}

fn kill_member(st: &LabState, m: &Member) {
    // A dead "host": the daemon and every VM it ran.
    let mut pids = vec![m.pid as i32];
    match &st.topology {
        Some(t) => pids.extend(t.pids(m.ns)),
        None => {
            if let Ok(rd) = std::fs::read_dir(m.data.join("run")) {
                for e in rd.flatten() {
                    if let Ok(p) = std::fs::read_to_string(e.path().join("qemu.pid")) {
                        if let Ok(p) = p.trim().parse() {
                            pids.push(p);
                        }
                    }
                }
            }
        }
    }
    for p in &pids {
        let _ = Command::new("kill")
            .args(["-9", &p.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    // Returns once they are really gone, so that `lab start` right after
    // finds the member's files free.
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| alive(p as u32)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn member<'a>(st: &'a LabState, member: &str) -> Result<&'a Member, LabError> {
    st.members.iter().find(|m| m.name == member).ok_or_else(|| {
        LabError::Api(format!(
            "no lab member '{member}'; members: pm-a, pm-b, witness"
        ))
    })
}

/// `lab kill <member>`: the member dies with everything it ran.
pub fn kill(dir: &Path, member_name: &str) -> Result<(), LabError> {
    let st = load(dir)?;
    kill_member(&st, member(&st, member_name)?);
    Ok(())
}

/// `lab freeze <member>` / `lab thaw <member>`: SIGSTOP / SIGCONT of the
/// member's daemon alone (its QEMU processes are not its children and go
/// on), as a hung daemon or a long pause would.
pub fn freeze(dir: &Path, member_name: &str, stop: bool) -> Result<(), LabError> {
    let st = load(dir)?;
    let m = member(&st, member_name)?;
    if !alive(m.pid) {
        return Err(LabError::Api(format!("{member_name} is not running")));
    }
    let sig = if stop { "-STOP" } else { "-CONT" };
    let ok = Command::new("kill")
        .args([sig, &m.pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        return Err(LabError::Api(format!(
            "could not send SIG{} to {member_name}",
            &sig[1..]
        )));
    }
    Ok(())
}

/// `lab start <member>`: starts a killed member again, with its data.
pub fn start(dir: &Path, member: &str) -> Result<(), LabError> {
    let mut st = load(dir)?;
    let m = st
        .members
        .iter_mut()
        .find(|m| m.name == member)
        .ok_or_else(|| {
            LabError::Api(format!(
                "no lab member '{member}'; members: pm-a, pm-b, witness"
            ))
        })?;
    if alive(m.pid) {
        return Err(LabError::Api(format!(
            "{member} is running (pid {}); `lab kill {member}` first",
            m.pid
        )));
    }
    if m.argv.is_empty() {
        return Err(LabError::Unsupported(format!(
            "this lab did not record {member}'s command line; recreate it with `lab down` and `lab up`"
        )));
    }
    let out = dir.join(format!("{}.out", m.name));
    let log = dir.join(format!("{}.log", m.name));
    m.pid = launch(&m.name, &m.argv, &out, &log, &m.ready)?;
    save(dir, &st)
}

/// `lab cut <link>` / `lab heal [<link>]` (network namespaces only).
pub fn cut(dir: &Path, link: &str, heal: bool) -> Result<(), LabError> {
    let st = load(dir)?;
    let t = st.topology.as_ref().ok_or_else(|| {
        LabError::Unsupported("cutting links needs the namespace lab (run the lab as root)".into())
    })?;
    let links = if link == "all" {
        vec![
            Link::Private,
            Link::BusinessA,
            Link::BusinessB,
            Link::Witness,
            Link::Peers,
        ]
    } else {
        vec![Link::parse(link)?]
    };
    for l in links {
        if heal {
            t.heal(l)?;
        } else {
            t.cut(l)?;
        }
    }
    Ok(())
}

/// `lab status`: the unit as each PM sees it.
pub async fn status(dir: &Path) -> Result<Value, LabError> {
    let st = load(dir)?;
    let password = std::fs::read_to_string(&st.password_file).unwrap_or_default();
    let mut out = serde_json::Map::new();
    for m in &st.members {
        let v = match (&m.api, alive(m.pid)) {
            (_, false) => json!({"alive": false}),
            (None, true) => json!({"alive": true}),
            (Some(api), true) => match login(api, &m.data, password.trim()).await {
                Ok(c) => call(&c, pairvisor_cli::Method::GET, "/unit", None)
                    .await
                    .unwrap_or_else(|e| json!({"alive": true, "error": e.to_string()})),
                Err(e) => json!({"alive": true, "error": e.to_string()}),
            },
        };
        out.insert(m.name.clone(), v);
    }
    Ok(Value::Object(out))
}

/// `lab down`: every process killed, namespaces removed, the directory too.
pub fn down(dir: &Path) -> Result<(), LabError> {
    let st = load(dir)?;
    for m in &st.members {
        kill_member(&st, m);
    }
    if let Some(t) = &st.topology {
        t.destroy();
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}
