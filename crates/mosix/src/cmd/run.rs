//! `mosrun` (= `mosix run`): make this process a migratable process whose home is this
//! node, then become the program. Its PID (the shell's `$!`) is the home PID that
//! `migrate`, `mosix where` and `mosix ps` take and that getpid() returns on every node.

use anyhow::{bail, Result};
use clap::Parser;
use mosix_proto::control::{Client, ClientError, RegisterRequest, Request, Response};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    about = "Run a program as a migratable process (MOSIX mosrun)",
    long_about = "Run a program as a migratable process whose home is this node (MOSIX mosrun).\n\n\
        mosrun tells the local mosixd, then becomes PROG: the process the shell started IS \
        the job, with your stdio (a terminal stays a terminal), environment, cwd, limits and \
        descriptors, and its PID ($! in the shell) is what `migrate`, `mosix where`, `mosix \
        ps` and `kill` take. It may then move, while it runs, to other nodes (by `migrate` or \
        by the cluster's load balancing) and back. Away from home it keeps its home's world: \
        its files, sockets, pipes and terminal stay at home and keep working, its PID, \
        parent, process group and host name are the same; Ctrl-C, Ctrl-Z and `kill` reach it \
        wherever it runs, and the shell sees it exit as it would have at home.\n\n\
        If the node it runs on dies, it ends with status 137 and a line on its stderr.",
    after_help = "Examples:\n  mosrun awk 'BEGIN {for(i=0;i<100000;i++)for(j=0;j<100000;j++);}' &\n  \
                  migrate $! 3; mosix where $!\n  \
                  mosrun -r 3 python3 job.py < input.txt > out.txt\n  \
                  mosrun -b ./simulate | head -1\n  \
                  mosrun -L make -j4        # stays home unless moved by hand"
)]
pub struct Args {
    /// Move it to this node as soon as it starts.
    #[arg(short = 'r', value_name = "NODE", conflicts_with = "best")]
    node: Option<u32>,
    /// Move it to the best node (least load per unit of speed) as soon as it starts.
    #[arg(short = 'b')]
    best: bool,
    /// Keep it at home: no automatic migration (explicit `migrate` still works).
    #[arg(short = 'L')]
    pinned: bool,
    /// Never send it to these nodes automatically (comma-separated node numbers).
    #[arg(long, value_delimiter = ',', value_name = "NODE,..")]
    avoid: Vec<u32>,
    /// Control socket of the local mosixd.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROG ARGS"
    )]
    command: Vec<String>,
}

pub fn run(a: Args) -> Result<i32> {
    let path = super::status::socket_path(a.socket)?;
    let req = Request::Register(RegisterRequest {
        argv: a.command.clone(),
        to: a.node,
        best: a.best,
        pinned: a.pinned,
        avoid: a.avoid.clone(),
    });
    {
        // The connection is close-on-exec: the program gets only what we were given.
        let mut client = Client::connect(&path, Duration::from_secs(30))?;
        match client.call(&req) {
            Ok(Response::Registered { .. }) => {}
            Ok(other) => bail!("mosixd answered {other:?} to register"),
            Err(ClientError::Refused(m)) => {
                eprintln!("mosrun: {m}");
                return Ok(1);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let err = std::process::Command::new(&a.command[0])
        .args(&a.command[1..])
        .exec();
    eprintln!("mosrun: cannot run {}: {err}", a.command[0]);
    Ok(if err.kind() == std::io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}
