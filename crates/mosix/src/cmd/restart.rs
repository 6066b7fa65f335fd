//! `mosix restart`: bring a checkpointed process back.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Bring a checkpointed process back to life from its image.
///
/// The process continues where it was checkpointed, with its memory, registers, signal
/// handlers, timers, working directory and open files. Standard input, output and error
/// that were a terminal, pipe, socket or /dev/null are connected to this command's own;
/// regular files are reopened at the saved offset. Without --detach this command waits
/// for the process and exits with its exit status (or dies by the same signal), so it can
/// stand in for the original in a shell. A damaged, truncated, foreign or newer image is
/// refused and nothing is started.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  mosix restart job.img              # run it again; exit with its status\n  mosix restart --detach job.img     # print the new PID and return\n  mosix restart --keep-pid job.img   # same getpid() and monotonic clocks\n  mosix restart - < job.img"
)]
pub struct Args {
    /// The image to restore (`-` reads it from standard input).
    pub image: PathBuf,
    /// Print the new PID and return instead of waiting for the process.
    #[arg(long)]
    pub detach: bool,
    /// Keep the process's PID and clocks: restore it into a new PID namespace where
    /// getpid() returns the PID it had at checkpoint time, and a new time namespace where
    /// CLOCK_MONOTONIC and CLOCK_BOOTTIME go on from their values at checkpoint time.
    /// (The printed PID with --detach is the one this machine sees.)
    #[arg(long)]
    pub keep_pid: bool,
}

/// Signals sent to this command that are passed on to the restored process. Terminal
/// signals (Ctrl-C, Ctrl-\) reach it directly: it is in our process group.
const FORWARDED: [Signal; 4] = [
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

pub fn run(a: Args) -> anyhow::Result<i32> {
    let t0 = std::time::Instant::now();
    let img = if a.image.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut buf)
            .context("reading the image from standard input")?;
        mosix_ckpt::read_image(&buf[..])
    } else {
        if let Err(e) = std::fs::metadata(&a.image) {
            anyhow::bail!("cannot open {}: {e}", a.image.display());
        }
        mosix_ckpt::read_image_file(&a.image)
    }
    .with_context(|| format!("{}", a.image.display()))?;
    let opts = mosix_ckpt::RestoreOptions {
        keep_pid: a.keep_pid,
        time_ns: a.keep_pid,
        ..Default::default()
    };
    tracing::debug!("image read and verified in {:?}", t0.elapsed());
    if a.detach {
        let new = mosix_ckpt::restore(&img, opts)?;
        println!("{}", new.pid);
        return Ok(0);
    }
    // Block the forwarded signals and SIGCHLD before the child exists, then wait for them.
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    let old = set.thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)?;
    let ignore_terminal = [Signal::SIGINT, Signal::SIGQUIT];
    for s in ignore_terminal {
        // SAFETY: installing SIG_IGN has no handler code to be unsafe about.
        unsafe { nix::sys::signal::signal(s, nix::sys::signal::SigHandler::SigIgn) }?;
    }
    let (pid, ns_init) = match mosix_ckpt::restore(&img, opts) {
        Ok(p) => (Pid::from_raw(p.pid), p.ns_init.map(Pid::from_raw)),
        Err(e) => {
            old.thread_set_mask()?;
            return Err(e.into());
        }
    };
    drop(img);
    // The namespace's init (if any) exits by itself once the process has ended.
    let reap_init = || {
        if let Some(i) = ns_init {
            let _ = waitpid(i, None);
        }
    };
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG))? {
            WaitStatus::Exited(_, code) => {
                reap_init();
                return Ok(code);
            }
            WaitStatus::Signaled(_, sig, _) => {
                reap_init();
                die_by(sig)
            }
            _ => {}
        }
        let sig = set.wait()?;
        if sig != Signal::SIGCHLD {
            let _ = nix::sys::signal::kill(pid, sig);
        }
    }
}

/// Ends this process by `sig`, as the restored process ended.
fn die_by(sig: Signal) -> ! {
    // No core file of ours for the process's crash.
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    // SAFETY: restoring the default action has no handler code to be unsafe about.
    let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
    let mut s = SigSet::empty();
    s.add(sig);
    let _ = s.thread_unblock();
    let _ = nix::sys::signal::raise(sig);
    std::process::exit(128 + sig as i32)
}
