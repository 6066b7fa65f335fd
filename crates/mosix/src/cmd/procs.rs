//! `migrate`, `mosix where` and `mosix ps`: ask the local mosixd about migratable
//! processes.

use anyhow::{bail, Result};
use clap::Parser;
use mosix_proto::control::{After, Client, ProcEntry, Request, Response};
use std::path::PathBuf;
use std::time::Duration;

/// What `migrate PID WHAT` asks: a move, a checkpoint, a freeze.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// To a node (0: home).
    Node(u32),
    Checkpoint(After),
    Freeze(bool),
}

/// The second argument of `migrate`: a node number, `home` (= 0), or an action.
fn parse_action(s: &str) -> Result<Action, String> {
    Ok(match s {
        "home" | "0" => Action::Node(0),
        "checkpoint" => Action::Checkpoint(After::Continue),
        "chkstop" => Action::Checkpoint(After::Stop),
        "chkexit" => Action::Checkpoint(After::Exit),
        "freeze" => Action::Freeze(true),
        "continue" => Action::Freeze(false),
        _ => Action::Node(s.parse::<u32>().map_err(|_| {
            format!(
                "'{s}' is not a node number, 'home', checkpoint, chkstop, chkexit, freeze or continue"
            )
        })?),
    })
}

#[derive(Parser)]
#[command(
    about = "Move a migratable process to another node, or home; checkpoint or freeze it (MOSIX migrate)",
    long_about = "Move a running migratable process to another node, or back home (MOSIX migrate); \
        or checkpoint it, or freeze it.\n\n\
        PID is the process's home PID, given on its home node (the node where mosrun started \
        it). Returns once the process runs on NODE; if the move fails (the node is down, \
        refuses, or the process cannot move), the process goes on where it was and the \
        reason is printed. You may move your own processes; root may move any.\n\n\
        checkpoint   write a checkpoint now (to its mosrun -C FILE.N, else ckpt.PID.N in its\n\
        \x20            working directory), wherever it runs; it goes on. Prints the file.\n\
        chkstop      the same, then it is stopped (as by SIGSTOP; `continue` or kill -CONT)\n\
        chkexit      the same, then it ends (killed) once its image is safely written;\n\
        \x20            `mosrun -R FILE` brings it back\n\
        freeze       hold it where it runs: it uses no CPU, its parent sees no stop\n\
        continue     let a frozen (or stopped) process go on",
    after_help = "Examples:\n  migrate 4321 3            # to node 3\n  migrate 4321 home         # back home\n  \
        migrate 4321 checkpoint   # prints e.g. /home/u/sim.ckpt.4\n  \
        migrate 4321 freeze; migrate 4321 continue"
)]
pub struct MigrateArgs {
    /// Home PID of the process.
    pid: i32,
    /// A node number, `home` (also 0), checkpoint, chkstop, chkexit, freeze or continue.
    #[arg(value_parser = parse_action, value_name = "NODE|ACTION")]
    node: Action,
    /// Print what it took as JSON (a move: to, frozen_ms, memory_bytes; a checkpoint:
    /// file, frozen_ms, memory_bytes) instead of nothing or the file.
    #[arg(long)]
    json: bool,
    /// Control socket of the local mosixd.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Parser)]
#[command(
    about = "Where a migratable process runs: 0 at home, else the node number",
    long_about = "Print where the migratable process with this home PID runs: 0 when it is \
        at home, else the number of the node it runs on (MOSIX /proc/PID/where). Ask on its \
        home node.",
    after_help = "Examples:\n  mosix where 4321\n  cat /mnt/mosix/procs/4321/where   # the same, with mosix fs"
)]
pub struct WhereArgs {
    /// Home PID of the process.
    pid: i32,
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Parser)]
#[command(
    about = "List this node's migratable processes: its own (here or away) and guests",
    long_about = "List this node's migratable processes: those whose home is this node \
        (running here, or away on another node) and guests from other nodes running here, \
        with where they run, state, memory, CPU time and why they are where they are. \
        Families show as trees: a member's children follow it, indented (its `ppid` in \
        --json).",
    after_help = "Examples:\n  mosix ps\n  mosix ps --json | jq '.[] | select(.role == \"guest\")'"
)]
pub struct PsArgs {
    /// JSON array instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

fn ask(socket: Option<PathBuf>, req: &Request, timeout: Duration) -> Result<Response> {
    let path = super::status::socket_path(socket)?;
    let mut c = Client::connect(&path, timeout)?;
    Ok(c.call(req)?)
}

pub fn migrate(a: MigrateArgs) -> Result<i32> {
    let req = match a.node {
        Action::Node(to) => Request::Migrate { pid: a.pid, to },
        Action::Checkpoint(then) => Request::Checkpoint { pid: a.pid, then },
        Action::Freeze(freeze) => Request::Freeze { pid: a.pid, freeze },
    };
    match ask(a.socket, &req, Duration::from_secs(600))? {
        r @ (Response::Migrated { .. } | Response::Frozen { .. }) => {
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(0)
        }
        r @ Response::Checkpointed { .. } => {
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            } else if let Response::Checkpointed { file, .. } = r {
                println!("{file}");
            }
            Ok(0)
        }
        other => bail!("unexpected answer {other:?}"),
    }
}

pub fn where_(a: WhereArgs) -> Result<i32> {
    match ask(
        a.socket,
        &Request::Where { pid: a.pid },
        Duration::from_secs(10),
    )? {
        Response::Where { node, .. } => {
            println!("{node}");
            Ok(0)
        }
        other => bail!("unexpected answer {other:?}"),
    }
}

pub fn ps(a: PsArgs) -> Result<i32> {
    match ask(a.socket, &Request::Ps, Duration::from_secs(10))? {
        Response::Ps { node, procs } => {
            if a.json {
                println!("{}", serde_json::to_string_pretty(&procs)?);
            } else {
                print!("{}", table(node, &procs));
            }
            Ok(0)
        }
        other => bail!("unexpected answer {other:?}"),
    }
}

/// The entries in family order: each home process followed by its children (those listed
/// whose parent it is), depth first, with their depth; guests last, as given.
fn family_order(procs: &[ProcEntry]) -> Vec<(usize, &ProcEntry)> {
    let homes: std::collections::HashSet<i32> = procs
        .iter()
        .filter(|p| p.role == "home")
        .map(|p| p.home_pid)
        .collect();
    let parent_of = |p: &ProcEntry| {
        p.ppid
            .filter(|pp| p.role == "home" && *pp != p.home_pid && homes.contains(pp))
    };
    let mut out = Vec::with_capacity(procs.len());
    let mut todo: Vec<(usize, &ProcEntry)> = procs
        .iter()
        .rev()
        .filter(|p| parent_of(p).is_none())
        .map(|p| (0, p))
        .collect();
    while let Some((d, p)) = todo.pop() {
        out.push((d, p));
        if p.role == "home" && out.len() <= procs.len() {
            todo.extend(
                procs
                    .iter()
                    .rev()
                    .filter(|c| parent_of(c) == Some(p.home_pid))
                    .map(|c| (d + 1, c)),
            );
        }
    }
    out
}

fn table(node: u32, procs: &[ProcEntry]) -> String {
    let mut s = format!(
        "{:>8} {:>5} {:>8} {:>6} {:>5} {:<9} {:>7} {:>8} {:<24} REASON\n",
        "HOME_PID", "HOME", "PID", "ROLE", "WHERE", "STATE", "RSS", "CPU", "COMMAND"
    );
    for (depth, p) in family_order(procs) {
        let mut cmd = match depth {
            0 => p.cmd.clone(),
            d => format!("{}└ {}", "  ".repeat(d - 1), p.cmd),
        };
        if cmd.chars().count() > 24 {
            cmd = cmd.chars().take(23).collect::<String>() + "…";
        }
        s += &format!(
            "{:>8} {:>5} {:>8} {:>6} {:>5} {:<9} {:>7} {:>7.1}s {:<24} {}\n",
            p.home_pid,
            p.home,
            p.pid,
            p.role,
            p.where_,
            p.state,
            super::status::human(p.rss),
            p.cpu_secs,
            cmd,
            p.reason
        );
    }
    if procs.is_empty() {
        s += &format!("(no migratable processes on node {node})\n");
    }
    s
}

#[derive(Parser)]
#[command(
    about = "Show or change this node's balancing mode (MOSIX mosctl)",
    long_about = "Show or change this node's part in automatic load balancing (MOSIX mosctl). \
        Changing needs root.\n\n\
        stay / nostay      send no process away automatically / do again\n\
        lstay / nolstay    keep this node's own processes here / let them go again\n\
        block / noblock    take no guest processes / take them again\n\
        expel / noexpel    send guests home and take no more / stop\n\
        show               print the mode",
    after_help = "Examples:\n  mosctl stay\n  mosix mosctl show"
)]
pub struct MosctlArgs {
    /// stay, nostay, lstay, nolstay, block, noblock, expel, noexpel or show.
    #[arg(default_value = "show")]
    cmd: String,
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

pub fn mosctl(a: MosctlArgs) -> Result<i32> {
    match ask(
        a.socket,
        &Request::Mosctl { cmd: a.cmd },
        Duration::from_secs(10),
    )? {
        Response::Mode {
            stay,
            lstay,
            block,
            expel,
        } => {
            let on = |b: bool| if b { "on" } else { "off" };
            println!(
                "stay {}  lstay {}  block {}  expel {}",
                on(stay),
                on(lstay),
                on(block),
                on(expel)
            );
            Ok(0)
        }
        other => bail!("unexpected answer {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: i32, ppid: Option<i32>, role: &str, cmd: &str) -> ProcEntry {
        ProcEntry {
            home: 1,
            home_pid: pid,
            pid,
            role: role.into(),
            where_: 0,
            state: "running".into(),
            uid: 0,
            cmd: cmd.into(),
            rss: 0,
            cpu_secs: 0.0,
            resident_secs: 0.0,
            reason: String::new(),
            ppid,
        }
    }

    #[test]
    fn families_show_as_trees() {
        let procs = vec![
            entry(10, Some(1), "home", "make -j4"),
            entry(11, Some(10), "home", "cc -c a.c"),
            entry(12, Some(11), "home", "cc1 a.c"),
            entry(13, Some(10), "home", "cc -c b.c"),
            entry(20, Some(1), "home", "awk"),
            entry(30, None, "guest", "python3"),
        ];
        let order: Vec<(usize, i32)> = family_order(&procs)
            .into_iter()
            .map(|(d, p)| (d, p.home_pid))
            .collect();
        assert_eq!(
            order,
            [(0, 10), (1, 11), (2, 12), (1, 13), (0, 20), (0, 30)]
        );
        let t = table(1, &procs);
        assert!(t.contains("  └ cc1 a.c"), "{t}");
        assert_eq!(t.lines().count(), 7);
    }
}
