//! Network namespaces, veth pairs and a bridge for the lab (`ip` from
//! iproute2). Every command is checked; a failure says which command failed
//! and what it printed.

use serde::{Deserialize, Serialize};
use std::process::Command;
use thiserror::Error;

/// A failed network operation.
#[derive(Debug, Error)]
pub enum NetError {
    /// Namespaces need root.
    #[error("network namespaces need root; run as root or use the loopback lab")]
    NotRoot,
    /// `ip` failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// What it printed.
        stderr: String,
    },
    /// Bad prefix or network number.
    #[error("{0}")]
    Invalid(String),
}

/// A link of the lab topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// The direct private link between the PMs.
    Private,
    /// PM A's port on the business network.
    BusinessA,
    /// PM B's port on the business network.
    BusinessB,
    /// The witness's port on the business network.
    Witness,
    /// The PMs' path to each other on the business network only (both keep
    /// reaching the witness): with `private`, the two PMs lose each other
    /// while each still reaches the witness.
    Peers,
}

impl Link {
    /// Parses `private`, `business-a`, `business-b`, `witness`.
    pub fn parse(s: &str) -> Result<Link, NetError> {
        Ok(match s {
            "private" => Link::Private,
            "business-a" => Link::BusinessA,
            "business-b" => Link::BusinessB,
            "witness" => Link::Witness,
            "peers" => Link::Peers,
            other => {
                return Err(NetError::Invalid(format!(
                    "unknown link '{other}'; links are: private, business-a, business-b, \
                     witness, peers"
                )))
            }
        })
    }
}

/// The lab's namespaces and links.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Name prefix (1–6 lowercase letters/digits).
    pub prefix: String,
    /// Second octet of the lab's 10.x.0.0/16 range (100..=199).
    pub net: u8,
}

fn run(args: &[&str]) -> Result<String, NetError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| NetError::Command {
            cmd: format!("ip {}", args.join(" ")),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Command {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Whether this process may create namespaces.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                == Some("0")
        })
        .unwrap_or(false)
}

impl Topology {
    /// A topology; checks the prefix and network number.
    pub fn new(prefix: &str, net: u8) -> Result<Topology, NetError> {
        if prefix.is_empty()
            || prefix.len() > 6
            || !prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(NetError::Invalid(format!(
                "lab prefix '{prefix}' must be 1-6 lowercase letters or digits"
            )));
        }
        if !(100..=199).contains(&net) {
            return Err(NetError::Invalid(format!(
                "lab network {net} must be within 100..=199"
            )));
        }
        Ok(Topology {
            prefix: prefix.into(),
            net,
        })
    }

    /// Namespace of a member: `a`, `b` or `w`.
    pub fn ns(&self, member: char) -> String {
        format!("{}-{member}", self.prefix)
    }

    fn ifname(&self, member: char, kind: char) -> String {
        format!("{}{member}{kind}", self.prefix)
    }

    fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// Private-link address of PM `a` or `b`.
    pub fn private_addr(&self, member: char) -> String {
        format!("10.{}.1.{}", self.net, if member == 'a' { 1 } else { 2 })
    }

    /// Business-network address of `a`, `b` or `w`.
    pub fn business_addr(&self, member: char) -> String {
        let host = match member {
            'a' => 1,
            'b' => 2,
            _ => 3,
        };
        format!("10.{}.2.{host}", self.net)
    }

    /// The host's address on the business bridge.
    pub fn host_addr(&self) -> String {
        format!("10.{}.2.254", self.net)
    }

    /// Creates namespaces, links and addresses. Fails if any already exists.
    pub fn create(&self) -> Result<(), NetError> {
        if !is_root() {
            return Err(NetError::NotRoot);
        }
        let result = self.create_inner();
        if result.is_err() {
            self.destroy();
        }
        result
    }

    fn create_inner(&self) -> Result<(), NetError> {
        for m in ['a', 'b', 'w'] {
            let ns = self.ns(m);
            run(&["netns", "add", &ns])?;
            run(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // Private link: a direct veth pair between the PMs.
        let (ap, bp) = (self.ifname('a', 'p'), self.ifname('b', 'p'));
        run(&["link", "add", &ap, "type", "veth", "peer", "name", &bp])?;
        for (ifn, m) in [(&ap, 'a'), (&bp, 'b')] {
            let ns = self.ns(m);
            run(&["link", "set", ifn, "netns", &ns])?;
            run(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.private_addr(m)),
                "dev",
                ifn,
            ])?;
            run(&["-n", &ns, "link", "set", ifn, "up"])?;
        }
        // Business network: a bridge on the host, one veth per member.
        let br = self.bridge();
        run(&["link", "add", &br, "type", "bridge"])?;
        run(&[
            "addr",
            "add",
            &format!("{}/24", self.host_addr()),
            "dev",
            &br,
        ])?;
        run(&["link", "set", &br, "up"])?;
        for m in ['a', 'b', 'w'] {
            let inside = self.ifname(m, 'b');
            let outside = self.ifname(m, 'h');
            let ns = self.ns(m);
            run(&[
                "link", "add", &inside, "type", "veth", "peer", "name", &outside,
            ])?;
            run(&["link", "set", &outside, "master", &br])?;
            run(&["link", "set", &outside, "up"])?;
            run(&["link", "set", &inside, "netns", &ns])?;
            run(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", self.business_addr(m)),
                "dev",
                &inside,
            ])?;
            run(&["-n", &ns, "link", "set", &inside, "up"])?;
        }
        Ok(())
    }

    fn link_ends(&self, link: Link) -> (String, String) {
        match link {
            Link::Private => (self.ns('a'), self.ifname('a', 'p')),
            Link::BusinessA => (self.ns('a'), self.ifname('a', 'b')),
            Link::BusinessB => (self.ns('b'), self.ifname('b', 'b')),
            Link::Witness => (self.ns('w'), self.ifname('w', 'b')),
            // Not an interface (see `cut`); never used for it.
            Link::Peers => (self.ns('a'), self.ifname('a', 'b')),
        }
    }

    /// Cuts a link (its interface goes down inside the namespace; for
    /// `peers`, each PM gets a blackhole route to the other's business
    /// address).
    pub fn cut(&self, link: Link) -> Result<(), NetError> {
        if link == Link::Peers {
            for (me, other) in [('a', 'b'), ('b', 'a')] {
                let dst = format!("{}/32", self.business_addr(other));
                let _ = run(&["-n", &self.ns(me), "route", "del", "blackhole", &dst]);
                run(&["-n", &self.ns(me), "route", "add", "blackhole", &dst])?;
            }
            return Ok(());
        }
        let (ns, ifn) = self.link_ends(link);
        run(&["-n", &ns, "link", "set", &ifn, "down"])?;
        Ok(())
    }

    /// Restores a cut link, with its address (a downed veth keeps it).
    pub fn heal(&self, link: Link) -> Result<(), NetError> {
        if link == Link::Peers {
            for (me, other) in [('a', 'b'), ('b', 'a')] {
                let dst = format!("{}/32", self.business_addr(other));
                let _ = run(&["-n", &self.ns(me), "route", "del", "blackhole", &dst]);
            }
            return Ok(());
        }
        let (ns, ifn) = self.link_ends(link);
        run(&["-n", &ns, "link", "set", &ifn, "up"])?;
        Ok(())
    }

    /// Whether a link is up.
    pub fn is_up(&self, link: Link) -> Result<bool, NetError> {
        if link == Link::Peers {
            let dst = self.business_addr('b');
            let out = run(&["-n", &self.ns('a'), "route", "show", "type", "blackhole"])?;
            return Ok(!out.contains(&dst));
        }
        let (ns, ifn) = self.link_ends(link);
        let out = run(&["-n", &ns, "-o", "link", "show", &ifn])?;
        Ok(out.contains("state UP") || out.contains(",UP"))
    }

    /// A command prefix that runs a program inside a member's namespace.
    pub fn exec_prefix(&self, member: char) -> Vec<String> {
        vec!["ip".into(), "netns".into(), "exec".into(), self.ns(member)]
    }

    /// Pids of every process inside a member's namespace.
    pub fn pids(&self, member: char) -> Vec<i32> {
        run(&["netns", "pids", &self.ns(member)])
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Removes everything; ignores what is already gone.
    pub fn destroy(&self) {
        for m in ['a', 'b', 'w'] {
            let _ = run(&["netns", "del", &self.ns(m)]);
        }
        let _ = run(&["link", "del", &self.bridge()]);
        for m in ['a', 'b', 'w'] {
            let _ = run(&["link", "del", &self.ifname(m, 'h')]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses() {
        let t = Topology::new("pvt1", 150).unwrap();
        assert_eq!(t.ns('a'), "pvt1-a");
        assert_eq!(t.ifname('w', 'b'), "pvt1wb");
        assert!(
            t.ifname('a', 'p').len() <= 15,
            "Linux interface names are at most 15 bytes"
        );
        assert_eq!(t.private_addr('b'), "10.150.1.2");
        assert_eq!(t.business_addr('w'), "10.150.2.3");
        assert!(Topology::new("Bad!", 150).is_err());
        assert!(Topology::new("toolong", 150).is_err());
        assert!(Topology::new("ok", 10).is_err());
        assert_eq!(Link::parse("business-a").unwrap(), Link::BusinessA);
        assert!(Link::parse("wan")
            .unwrap_err()
            .to_string()
            .contains("links are"));
    }
}
