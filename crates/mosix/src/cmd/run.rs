//! `mosrun` (= `mosix run`): start a program as a migratable process whose home is this
//! node, and stay with it as its deputy: hold the real stdio, forward signals, exit as it
//! does.

use anyhow::{bail, Context, Result};
use clap::Parser;
use mosix_proto::control::{Client, ClientError, Request, Response};
use mosix_proto::wire::{self, ExitStatus, FromRun, ToRun};
use nix::sys::signal::{self, SigSet, Signal};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser)]
#[command(
    about = "Run a program as a migratable process (MOSIX mosrun)",
    long_about = "Run a program as a migratable process whose home is this node (MOSIX mosrun).\n\n\
        The local mosixd starts PROG under your uid; it may then move, while it runs, to \
        other nodes (by `migrate` or by the cluster's load balancing) and back. mosrun stays \
        here as its deputy: it passes your stdin to it and its output to your stdout/stderr, \
        forwards every signal it receives (Ctrl-C, SIGTERM, Ctrl-Z, SIGCONT, ...) to it \
        wherever it runs, and exits with its exit status (or dies by the same signal). If the \
        node it runs on dies, mosrun says so and exits with 137.\n\n\
        The home PID (the one `migrate`, `mosix where` and `mosix ps` use) is what the \
        process's getpid() returns on every node.",
    after_help = "Examples:\n  mosrun awk 'BEGIN {for(i=0;i<100000;i++)for(j=0;j<100000;j++);}' &\n  \
                  mosrun -r 3 python3 job.py < input.txt\n  mosrun -b ./simulate | head -1"
)]
pub struct Args {
    /// Start it and move it to this node at once.
    #[arg(short = 'r', value_name = "NODE", conflicts_with = "best")]
    node: Option<u32>,
    /// Start it and move it to the best node now (least load per unit of speed).
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

/// Signals mosrun passes on to the process.
const FORWARDED: &[Signal] = &[
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
    Signal::SIGWINCH,
    Signal::SIGCONT,
    Signal::SIGTSTP,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
];

pub fn run(a: Args) -> Result<i32> {
    let path = super::status::socket_path(a.socket)?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let req = Request::Run(mosix_proto::control::RunRequest {
        argv: a.command.clone(),
        env: std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect(),
        cwd: cwd.to_string_lossy().into_owned(),
        to: a.node,
        best: a.best,
        pinned: a.pinned,
        avoid: a.avoid.clone(),
    });
    // Signals are taken by one thread (sigwait), before any other thread exists.
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(*s);
    }
    set.thread_block().context("blocking signals")?;
    // SAFETY: setting SIGPIPE to ignored has no handler to be unsafe about; a write to a
    // closed stdout then fails with EPIPE, which we pass on to the process.
    unsafe { signal::signal(Signal::SIGPIPE, signal::SigHandler::SigIgn) }
        .context("ignoring SIGPIPE")?;

    let mut client = Client::connect(&path, Duration::from_secs(30))?;
    let home_pid = match client.call(&req) {
        Ok(Response::Started { home_pid }) => home_pid,
        Ok(other) => bail!("mosixd answered {other:?} to run"),
        Err(ClientError::Refused(m)) => {
            eprintln!("mosrun: {m}");
            return Ok(if m.starts_with("cannot run") { 127 } else { 1 });
        }
        Err(e) => return Err(e.into()),
    };
    tracing::debug!(home_pid, "started");
    if let Ok(v) = std::env::var("MOSRUN_PIDFILE") {
        let _ = std::fs::write(v, format!("{home_pid}\n"));
    }
    let (mut reader, writer) = client.into_parts();
    reader.get_ref().set_read_timeout(None)?;
    writer.set_write_timeout(None)?;
    let writer = Arc::new(Mutex::new(writer));

    let w = writer.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || forward_signals(set, w))?;
    let w = writer.clone();
    let credit = Arc::new(StdinCredit::default());
    let c = credit.clone();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || forward_stdin(w, &c))?;

    let mut closed = [false; 2];
    loop {
        match wire::recv::<_, ToRun>(&mut reader) {
            Ok(Some(ToRun::Out { fd, data })) => {
                let i = match fd {
                    1 => 0,
                    2 => 1,
                    _ => continue,
                };
                if closed[i] {
                    continue;
                }
                let res = if i == 0 {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&data).and_then(|_| o.flush())
                } else {
                    std::io::stderr().write_all(&data)
                };
                if res.is_err() {
                    closed[i] = true;
                    send(&writer, &FromRun::OutClosed(fd));
                }
            }
            Ok(Some(ToRun::StdinAck { at })) => credit.acked(at),
            Ok(Some(ToRun::Exited { status, message })) => {
                if let Some(m) = message {
                    eprintln!("{m}");
                }
                return Ok(exit_like(status));
            }
            Ok(None) | Err(_) => {
                eprintln!(
                    "mosrun: lost contact with mosixd; process {home_pid} was lost (mosixd stopped?)"
                );
                return Ok(137);
            }
        }
    }
}

fn send(w: &Mutex<UnixStream>, m: &FromRun) -> bool {
    let mut g = w.lock().unwrap_or_else(|p| p.into_inner());
    wire::send_flush(&mut *g, m).is_ok()
}

fn forward_signals(set: SigSet, w: Arc<Mutex<UnixStream>>) {
    loop {
        let Ok(sig) = set.wait() else { continue };
        match sig {
            Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU => {
                // Stop the process, then ourselves, so the shell sees the job stopped.
                send(&w, &FromRun::Signal(Signal::SIGSTOP as i32));
                let _ = signal::raise(Signal::SIGSTOP);
            }
            s => {
                if !send(&w, &FromRun::Signal(s as i32)) {
                    return;
                }
            }
        }
    }
}

/// How much stdin the process has consumed, as home reports it: mosrun reads no more
/// than [`wire::STDIN_WINDOW`] ahead of it, so a process that does not read its stdin
/// makes the writer into mosrun wait, as a pipe at home would.
#[derive(Default)]
struct StdinCredit {
    acked: Mutex<u64>,
    more: std::sync::Condvar,
}

impl StdinCredit {
    fn acked(&self, at: u64) {
        let mut a = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        if at > *a {
            *a = at;
            self.more.notify_all();
        }
    }
    /// Waits until something may be sent after `sent` bytes; how much.
    fn room(&self, sent: u64) -> usize {
        let mut a = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let room = (*a + wire::STDIN_WINDOW).saturating_sub(sent);
            if room > 0 {
                return room.min(wire::MAX_DATA as u64) as usize;
            }
            a = self.more.wait(a).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn forward_stdin(w: Arc<Mutex<UnixStream>>, credit: &StdinCredit) {
    let mut buf = vec![0u8; wire::MAX_DATA];
    let mut stdin = std::io::stdin().lock();
    let mut sent = 0u64;
    loop {
        let room = credit.room(sent);
        match stdin.read(&mut buf[..room]) {
            Ok(0) | Err(_) => {
                send(&w, &FromRun::StdinEof);
                return;
            }
            Ok(n) => {
                sent += n as u64;
                if !send(&w, &FromRun::Stdin(buf[..n].to_vec())) {
                    return;
                }
            }
        }
    }
}

/// Exit code for the process's status; for a signal, die by the same signal.
fn exit_like(status: ExitStatus) -> i32 {
    match status {
        ExitStatus::Code(c) => c,
        ExitStatus::Lost => 137,
        ExitStatus::Signal(s) => {
            if let Ok(sig) = Signal::try_from(s) {
                let _ = std::io::stdout().flush();
                // SAFETY: restoring the default disposition installs no handler.
                let _ = unsafe { signal::signal(sig, signal::SigHandler::SigDfl) };
                let mut one = SigSet::empty();
                one.add(sig);
                let _ = one.thread_unblock();
                let _ = signal::raise(sig);
            }
            128 + s
        }
    }
}
