//! `mosix status`: every node of the cluster map as this node's mosixd sees it.

use anyhow::{Context, Result};
use mosix_proto::control::Client;
use mosix_proto::{ClusterStatus, NodeState};
use std::path::PathBuf;
use std::time::Duration;

/// Show every node of the cluster as this node sees it.
///
/// One line per node of the cluster map: node number (this node marked with `*`), address,
/// MOSIX status (3 = up; 1 = down, or up with an incompatible protocol version: shown but
/// never used), load (runnable processes per unit of capacity: speed × CPUs, so 1.00 = every
/// CPU busy), speed of one CPU, number of CPUs, utilisation, memory used and free, and number
/// of processes.
///
/// The daemon is found through --socket, else $MOSIX_SOCKET, else the control_socket of
/// $MOSIX_CONFIG, else /run/mosix/mosixd.sock.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  mosix status\n  mosix status --json | jq '.nodes[] | \
                        select(.status == 3) | .node'\n  mosix testbed exec 2 -- mosix status"
)]
pub struct Args {
    /// Print the whole status as JSON (the control socket's answer) instead of a table.
    #[arg(long)]
    json: bool,
    /// Control socket of the mosixd to ask.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

/// Where the local mosixd's control socket is: `--socket`, `$MOSIX_SOCKET`,
/// `$MOSIX_CONFIG`'s `control_socket`, or the default.
pub fn socket_path(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(p) = arg {
        return Ok(p);
    }
    if let Some(p) = std::env::var_os("MOSIX_SOCKET").filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    if let Some(cfg) = std::env::var_os("MOSIX_CONFIG").filter(|s| !s.is_empty()) {
        let cfg = PathBuf::from(cfg);
        let text = std::fs::read_to_string(&cfg)
            .with_context(|| format!("cannot read $MOSIX_CONFIG {}", cfg.display()))?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("$MOSIX_CONFIG {}: {}", cfg.display(), e.message()))?;
        return Ok(match table.get("control_socket").and_then(|v| v.as_str()) {
            Some(s) => PathBuf::from(s),
            None => PathBuf::from(mosix_proto::DEFAULT_SOCKET),
        });
    }
    Ok(PathBuf::from(mosix_proto::DEFAULT_SOCKET))
}

/// Asks the daemon at `path` for the cluster status.
pub fn fetch(path: &std::path::Path) -> Result<ClusterStatus> {
    let mut c = Client::connect(path, Duration::from_secs(5))?;
    Ok(c.status()?)
}

pub fn run(a: Args) -> Result<i32> {
    let path = socket_path(a.socket)?;
    let st = fetch(&path)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", table(&st));
    }
    Ok(0)
}

/// Bytes as a short human figure: 512K, 1.5G.
pub fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v < 10.0 && i > 0 {
        format!("{v:.1}{}", U[i])
    } else {
        format!("{v:.0}{}", U[i])
    }
}

fn table(st: &ClusterStatus) -> String {
    let mut s = format!(
        "{:>5}  {:<22} {:<16} {:>6} {:>6} {:>4} {:>5} {:>8} {:>8} {:>6}\n",
        "NODE",
        "ADDRESS",
        "STATUS",
        "LOAD",
        "SPEED",
        "CPUS",
        "UTIL",
        "MEM-USED",
        "MEM-FREE",
        "PROCS"
    );
    for n in &st.nodes {
        let state = match n.state {
            NodeState::Up => "up",
            NodeState::Down => "down",
            NodeState::Incompatible => "incompatible",
        };
        let mark = if n.this_node { "*" } else { " " };
        let status = format!("{} {}", n.status, state);
        match (&n.load, n.state) {
            (Some(l), NodeState::Up | NodeState::Incompatible) => s.push_str(&format!(
                "{:>4}{mark}  {:<22} {:<16} {:>6.2} {:>6.2} {:>4} {:>4.0}% {:>8} {:>8} {:>6}\n",
                n.node,
                n.address,
                status,
                l.load,
                l.speed,
                l.cpus,
                l.util * 100.0,
                human(l.mem_total.saturating_sub(l.mem_free)),
                human(l.mem_free),
                l.procs
            )),
            _ => s.push_str(&format!(
                "{:>4}{mark}  {:<22} {:<16} {:>6} {:>6} {:>4} {:>5} {:>8} {:>8} {:>6}\n",
                n.node, n.address, status, "-", "-", "-", "-", "-", "-", "-"
            )),
        }
    }
    s.push_str(&format!(
        "{} of {} nodes up; this node is {} (protocol {}); gossip datagrams rejected: {}\n",
        st.active_nodes(),
        st.nodes.len(),
        st.this_node,
        st.protocol,
        st.gossip.datagrams_rejected
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0B");
        assert_eq!(human(1536), "1.5K");
        assert_eq!(human(2 << 30), "2.0G");
        assert_eq!(human(300 << 20), "300M");
    }
}
