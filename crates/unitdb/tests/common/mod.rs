//! The test harness shared by the cluster tests: real nodes on loopback
//! (HTTP/2 over mutual TLS, redb files in temporary directories), started,
//! stopped and restarted from their files. Every wait is a poll with a
//! deadline.
#![allow(dead_code)]

use pairvisor_unitdb::{
    Config, NodeIdentity, NodeRole, NodeState, OpenError, Timing, UnitCa, UnitDb,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The limit of every wait in these tests.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Short Raft timeouts for loopback.
pub fn timing() -> Timing {
    Timing {
        heartbeat: Duration::from_millis(100),
        election_min: Duration::from_millis(500),
        election_max: Duration::from_millis(1000),
        connect: Duration::from_millis(500),
        request: Duration::from_secs(3),
    }
}

/// Logs warnings (or `RUST_LOG`) to the test output.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One node: its identity, directory and address, and its database while
/// it runs.
pub struct Node {
    pub id: u64,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub role: NodeRole,
    pub identity: NodeIdentity,
    pub db: Option<UnitDb>,
}

impl Node {
    /// The running database (panics when stopped).
    pub fn db(&self) -> &UnitDb {
        self.db.as_ref().expect("node is running")
    }

    /// Its configuration (test timing, its identity).
    pub fn config(&self) -> Config {
        let mut c = Config::new(self.id, &self.dir, self.addr);
        c.role = self.role;
        c.identity = Some(self.identity.clone());
        c.timing = timing();
        c.snapshot_every = 10_000;
        c.keep_logs = 0;
        c
    }

    /// Shuts the node down; its files stay.
    pub async fn stop(&mut self) {
        if let Some(db) = self.db.take() {
            db.shutdown().await;
        }
    }

    /// (Re)starts the node from its directory on its address; retries while
    /// the previous instance still holds the files or the port.
    pub async fn start(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnitDb::open(self.config()).await {
                Ok(db) => {
                    self.addr = db.local_addr();
                    self.db = Some(db);
                    return;
                }
                Err(e @ (OpenError::Disk { .. } | OpenError::Bind { .. }))
                    if Instant::now() < deadline =>
                {
                    eprintln!("node {} not reopened yet: {e}", self.id);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot start node {}: {e:?}", self.id),
            }
        }
    }
}

/// Nodes 1..=n of one unit, in temporary directories.
pub struct Cluster {
    pub _tmp: TempDir,
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Two PMs (1, 2) and a witness (3), formed by node 1 and grown with
    /// `add_voter`.
    pub async fn three() -> Cluster {
        Cluster::form(&[NodeRole::Pm, NodeRole::Pm, NodeRole::Witness], 1).await
    }

    /// Two PMs (1, 2) and no witness, formed by node `founder` (which
    /// therefore leads at first).
    pub async fn two(founder: u64) -> Cluster {
        Cluster::form(&[NodeRole::Pm, NodeRole::Pm], founder).await
    }

    /// Nodes 1..=n with `roles`, formed by node `founder` and grown with
    /// `add_voter`.
    pub async fn form(roles: &[NodeRole], founder: u64) -> Cluster {
        init_tracing();
        let tmp = tempfile::tempdir().unwrap();
        let ca = UnitCa::create("test-unit").unwrap();
        let mut nodes = Vec::new();
        for (i, role) in roles.iter().enumerate() {
            let id = i as u64 + 1;
            let mut n = Node {
                id,
                dir: tmp.path().join(format!("node{id}")),
                addr: "127.0.0.1:0".parse().unwrap(),
                role: *role,
                identity: ca.issue_identity(id, *role == NodeRole::Pm).unwrap(),
                db: None,
            };
            n.start().await;
            nodes.push(n);
        }
        let first = nodes[(founder - 1) as usize].db().clone();
        first.initialize_alone().await.unwrap();
        first
            .wait_until("the founder to lead", DEADLINE, |m| {
                m.leader == Some(founder)
            })
            .await
            .unwrap();
        for n in nodes.iter().filter(|n| n.id != founder) {
            first.add_voter(n.id, n.db().node_info()).await.unwrap();
        }
        let all: Vec<u64> = nodes.iter().map(|n| n.id).collect();
        let c = Cluster { _tmp: tmp, nodes };
        c.agree_on_leader(&all).await;
        for n in &c.nodes {
            n.db()
                .wait_until("every voter", DEADLINE, |m| m.voters().len() == all.len())
                .await
                .unwrap();
        }
        c
    }

    /// Cuts node `id` off from every other node (both directions).
    pub fn isolate(&self, id: u64) {
        for n in &self.nodes {
            if let Some(db) = n.db.as_ref() {
                if n.id == id {
                    db.set_blocked_peers(self.nodes.iter().map(|x| x.id).filter(|x| *x != id));
                } else {
                    db.set_blocked_peers([id]);
                }
            }
        }
    }

    /// Heals every link.
    pub fn heal(&self) {
        for n in &self.nodes {
            if let Some(db) = n.db.as_ref() {
                db.set_blocked_peers([]);
            }
        }
    }

    /// Stops every node.
    pub async fn stop_all(&mut self) {
        for n in self.nodes.iter_mut() {
            n.stop().await;
        }
    }

    /// Node `id`.
    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[(id - 1) as usize]
    }

    /// Node `id`, to stop or start it.
    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Waits until every running node in `alive` names the same leader, one
    /// of `alive`; returns it.
    pub async fn agree_on_leader(&self, alive: &[u64]) -> u64 {
        eventually("a leader all running nodes agree on", DEADLINE, || {
            let leaders: Vec<Option<u64>> = alive
                .iter()
                .map(|id| self.node(*id).db().metrics().leader)
                .collect();
            let l = leaders[0]?;
            let leads = self.node(l).db.as_ref()?.metrics().state == NodeState::Leader;
            (alive.contains(&l) && leads && leaders.iter().all(|x| *x == Some(l))).then_some(l)
        })
        .await
    }

    /// Waits until `table/key` has `value` on every node in `ids`.
    pub async fn visible_on(&self, ids: &[u64], table: &str, key: &str, value: &serde_json::Value) {
        for id in ids {
            let db = self.node(*id).db();
            eventually(&format!("{table}/{key} on node {id}"), DEADLINE, || {
                let r = db.get(table, key).unwrap()?;
                (&r.value == value).then_some(())
            })
            .await;
        }
    }
}
