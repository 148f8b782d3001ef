//! Network namespaces for the tests that need hosts of their own: one namespace holding a
//! bridge (the "switch") and one per node, each node's `eth0` a veth to a port of the bridge.
//! Needs root and iproute2; [`unsupported`] says why a machine cannot. Everything is named
//! after the test process and deleted on drop; no traffic leaves the namespaces.

use std::path::Path;
use std::process::{Child, Command};

pub fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces: one holding the bridge (the "switch"), one per node. Dropping it kills the
/// nodes and deletes the namespaces, which takes their interfaces with them.
pub struct Lab {
    pub switch: String,
    pub nodes: Vec<String>,
    /// Processes started in the namespaces, killed on drop.
    pub children: Vec<Option<Child>>,
}

impl Lab {
    /// Builds the namespaces of `nodes` nodes, named after this process and `tag` (one per
    /// test of a binary), node `i` at 10.213.0.`i + 1`.
    pub fn build(tag: &str, nodes: usize) -> Result<Self, String> {
        let pid = std::process::id();
        let mut lab = Self {
            switch: format!("exo-{pid}-{tag}sw"),
            nodes: (0..nodes).map(|i| format!("exo-{pid}-{tag}n{i}")).collect(),
            children: Vec::new(),
        };
        run(&["ip", "netns", "add", &lab.switch])?;
        for ns in lab.nodes.clone() {
            if let Err(e) = run(&["ip", "netns", "add", &ns]) {
                // Keep what was made so far known to Drop.
                lab.nodes.retain(|n| *n != ns);
                return Err(e);
            }
        }
        let sw = lab.switch.clone();
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        for (i, ns) in lab.nodes.iter().enumerate() {
            let port = format!("p{i}");
            run(&[
                "ip", "link", "add", &port, "netns", &sw, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &port, "up"])?;
            let address = format!("10.213.0.{}/24", i + 1);
            run(&["ip", "-n", ns, "addr", "add", &address, "dev", "eth0"])?;
            run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            // Without a default route, multicast needs a route of its own.
            run(&["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])?;
        }
        Ok(lab)
    }

    /// Caps both directions of node `i`'s link with a token bucket.
    pub fn cap(&self, i: usize, bits_per_s: f64) -> Result<(), String> {
        let rate = format!("{}mbit", bits_per_s / 1e6);
        for (ns, dev) in [
            (&self.nodes[i], "eth0".to_owned()),
            (&self.switch, format!("p{i}")),
        ] {
            run(&[
                "tc", "-n", ns, "qdisc", "add", "dev", &dev, "root", "tbf", "rate", &rate, "burst",
                "32kb", "latency", "50ms",
            ])?;
        }
        Ok(())
    }

    /// Takes node `i`'s switch port down: its packets go nowhere, and nothing tells the others.
    pub fn cut(&self, i: usize) {
        let port = format!("p{i}");
        run(&["ip", "-n", &self.switch, "link", "set", &port, "down"]).unwrap();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.nodes.iter().chain([&self.switch]) {
            remove_namespace(ns);
        }
    }
}

/// Kills whatever still runs in namespace `ns`, then deletes it.
pub fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = run(&["kill", "-KILL", pid]);
        }
    }
    let _ = run(&["ip", "netns", "del", ns]);
}

/// Removes what an earlier run left behind when it was killed before it could clean up
/// (namespaces named after a process that no longer exists).
pub fn remove_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let pid = name
            .strip_prefix("exo-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            remove_namespace(name);
        }
    }
}

/// Why this machine cannot run the test, if it cannot.
pub fn unsupported() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(str::to_owned));
    if uid.as_deref() != Some("0") {
        return Some("not running as root".to_owned());
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` (iproute2) is not installed"));
        }
    }
    None
}
