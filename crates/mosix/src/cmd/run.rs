//! `mosrun` (= `mosix run`): make this process a migratable process whose home is this
//! node, then become the program. Its PID (the shell's `$!`) is the home PID that
//! `migrate`, `mosix where` and `mosix ps` take and that getpid() returns on every node.
//! With `-R FILE` it becomes the process of a checkpoint instead.

use anyhow::{bail, Context, Result};
use clap::Parser;
use mosix_proto::control::{
    CheckpointSpec, Client, ClientError, RegisterRequest, Request, Response, RestoreRequest,
};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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
        Checkpoints (-C FILE, -A MINUTES): the job is checkpointed to FILE.1, FILE.2, ... \
        (the last 3 are kept) every MINUTES, wherever it runs, each time it leaves home, and \
        on `migrate PID checkpoint`. The files are written at home, as you (mode 0600), so \
        they survive the node the job runs on. If that node dies, the job is brought back \
        from its last checkpoint, on the best node or at home, and goes on: output it had \
        already written is not written twice, input it had read is read again, files at \
        home are back at the offsets they had (a job that writes the same bytes again \
        writes them in the same place); one line on its stderr says so. `mosrun -R FILE.N` \
        brings a job back from a checkpoint by hand.\n\n\
        Without checkpoints, a job whose node dies ends with status 137 and a line on its \
        stderr.",
    after_help = "Examples:\n  mosrun awk 'BEGIN {for(i=0;i<100000;i++)for(j=0;j<100000;j++);}' &\n  \
                  migrate $! 3; mosix where $!\n  \
                  mosrun -r 3 python3 job.py < input.txt > out.txt\n  \
                  mosrun -b ./simulate | head -1\n  \
                  mosrun -L make -j4        # stays home unless moved by hand\n  \
                  mosrun -C ~/sim.ckpt -A 10 ./simulate > out.txt &   # a checkpoint every 10 minutes\n  \
                  migrate $! chkexit        # checkpoint it and end it (~/sim.ckpt.N)\n  \
                  mosrun -R ~/sim.ckpt.4 >> out.txt   # ... and later go on from there"
)]
pub struct Args {
    /// Run it on this node from its start: it is moved before its first instruction (if
    /// the move fails, it runs here; mosixd's log says why).
    #[arg(short = 'r', value_name = "NODE", conflicts_with = "best")]
    node: Option<u32>,
    /// Run it on the best node (least load per unit of speed) from its start, as -r does
    /// (here if this node is the best).
    #[arg(short = 'b')]
    best: bool,
    /// Keep it at home: no automatic migration (explicit `migrate` still works).
    #[arg(short = 'L')]
    pinned: bool,
    /// Never send it to these nodes automatically (comma-separated node numbers).
    #[arg(long, value_delimiter = ',', value_name = "NODE,..")]
    avoid: Vec<u32>,
    /// Checkpoint it to FILE.1, FILE.2, ... (the last 3 are kept): every -A MINUTES, each
    /// time it leaves home, and on `migrate PID checkpoint`. If the node it runs on dies, it
    /// is brought back from the last one.
    #[arg(short = 'C', value_name = "FILE")]
    checkpoint: Option<PathBuf>,
    /// Minutes between automatic checkpoints (fractions allowed, e.g. 0.5). Without -C,
    /// the files are ckpt.PID.N in the current directory.
    #[arg(short = 'A', value_name = "MINUTES", value_parser = positive_minutes)]
    every: Option<f64>,
    /// Bring the job of checkpoint FILE back: it becomes this process (its PID, its
    /// standard input, output and error; regular files it had open are reopened at their
    /// offsets), a migratable process of this node. Only your own checkpoints. It goes on
    /// being checkpointed as before (same FILE, numbered on) unless -C/-A say otherwise.
    #[arg(short = 'R', value_name = "FILE", conflicts_with_all = ["node", "best", "command"])]
    restore: Option<PathBuf>,
    /// Control socket of the local mosixd.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The program and its arguments.
    #[arg(
        required_unless_present = "restore",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROG ARGS"
    )]
    command: Vec<String>,
}

fn positive_minutes(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(m) if m.is_finite() && m > 0.0 => Ok(m),
        _ => Err(format!("'{s}' is not a positive number of minutes")),
    }
}

/// `path` from the current directory, for mosixd (which has its own).
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("{}", path.display()))
}

/// Where the checkpoints go: -C FILE (its directory must be yours to write), or
/// ckpt.PID in the current directory with -A alone.
fn checkpoint_spec(a: &Args) -> Result<Option<CheckpointSpec>> {
    let file = match (&a.checkpoint, a.every) {
        (Some(f), _) => absolute(f)?,
        (None, Some(_)) => absolute(Path::new(&format!("ckpt.{}", std::process::id())))?,
        (None, None) => return Ok(None),
    };
    let dir = file.parent().unwrap_or(Path::new("/"));
    if file.file_name().is_none() {
        bail!("-C {}: not a file name", file.display());
    }
    nix::unistd::access(
        dir,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .with_context(|| format!("cannot write checkpoints into {}", dir.display()))?;
    Ok(Some(CheckpointSpec {
        file: file.to_string_lossy().into_owned(),
        every_min: a.every,
    }))
}

pub fn run(a: Args) -> Result<i32> {
    let path = super::status::socket_path(a.socket.clone())?;
    let spec = match checkpoint_spec(&a) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mosrun: {e:#}");
            return Ok(1);
        }
    };
    if let Some(file) = &a.restore {
        return restore(&a, &path, file, spec);
    }
    let req = Request::Register(RegisterRequest {
        argv: a.command.clone(),
        to: a.node,
        best: a.best,
        pinned: a.pinned,
        avoid: a.avoid.clone(),
        checkpoint: spec,
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

/// `mosrun -R FILE`: mosixd rebuilds the checkpointed process inside this one.
fn restore(a: &Args, socket: &Path, file: &Path, spec: Option<CheckpointSpec>) -> Result<i32> {
    let file = absolute(file)?;
    // Only the standard descriptors go on into the restored process (with the files it
    // had open, which mosixd reopens): the others we were given are closed.
    // SAFETY: close_range on numbers this process owns; nothing of ours is open there.
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    let req = Request::Restore(RestoreRequest {
        file: file.to_string_lossy().into_owned(),
        checkpoint: spec,
        pinned: a.pinned,
        avoid: a.avoid.clone(),
    });
    // The image is read and restored before this call would return: a long wait.
    let mut client = Client::connect(socket, Duration::from_secs(600))?;
    match client.call(&req) {
        Err(ClientError::Refused(m)) => {
            eprintln!("mosrun: {m}");
            Ok(1)
        }
        Err(e) => Err(e.into()),
        Ok(other) => bail!("mosixd answered {other:?} to the restore"),
    }
}
