//! `mosix restart`: bring a checkpointed process back.

use std::fs::Metadata;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

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
///
/// Whose process it becomes: an image is only a file, and anyone can write one that
/// claims to be a process of root's. So root restores an image as the user who owns the
/// image file (--as-image-owner, the default): that user's uid, with the image's gids and
/// groups where the user has them (the user's primary group otherwise), and no
/// capabilities unless the user is root. An image file owned by root that no one else may
/// write is restored as the image says. --trust-image restores any image as it says;
/// --as-user USER restores it as USER. An image read from standard input has no owner:
/// root must give --as-user or --trust-image. Every file the image names (program,
/// mapped and open files, working directory) is opened as the user the process will be,
/// so a file that user cannot open stops the restart with one line, and nothing runs.
/// A user other than root restores images as themselves: an image of another user's
/// process is refused.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  mosix restart job.img              # run it again; exit with its status\n  mosix restart --detach job.img     # print the new PID and return\n  mosix restart --keep-pid job.img   # same getpid() and monotonic clocks\n  mosix restart --as-user alice - < job.img   # root: stdin has no owner"
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
    /// Root: restore the process as the user who owns the image file (the default). An
    /// image file owned by root and writable by no one else is restored as it says.
    #[arg(long, conflicts_with_all = ["trust_image", "as_user"])]
    pub as_image_owner: bool,
    /// Root: restore the process with the credentials the image records, whoever wrote
    /// it (only for images you know to be genuine).
    #[arg(long, conflicts_with = "as_user")]
    pub trust_image: bool,
    /// Root: restore the process as USER (a name or a uid): USER's uid, and of the
    /// image's groups those USER has.
    #[arg(long, value_name = "USER")]
    pub as_user: Option<String>,
    /// With an image on standard input (`-`): let the process run as soon as everything
    /// but its private memory has arrived, and put that in as it comes (post-copy: a
    /// page it touches before it arrived waits for it; `mosix checkpoint` sends the
    /// stacks first). The price: the image's last records and its checksum are read
    /// after the process started, so a stream that breaks or turns out damaged then ends
    /// a process that already ran (its output and files written meanwhile stay). Without
    /// it, nothing runs until the whole image arrived and checked out. An image from an
    /// older mosix (no mark of where its private memory begins) is restored whole first.
    #[arg(long)]
    pub lazy: bool,
}

/// Opens the image file without following it into a FIFO, socket or device (O_PATH:
/// nothing is opened but the name), checks what the opened descriptor is, and only then
/// reads it, through that very descriptor.
fn open_image(path: &Path) -> anyhow::Result<(std::fs::File, Metadata)> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("cannot examine {}", path.display()))?;
    let t = md.file_type();
    let kind = if t.is_file() {
        return Ok((f, md));
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    anyhow::bail!("{} is {kind}, not an image file", path.display())
}

/// Whose process the image becomes (see the command's help).
fn cred_options(a: &Args, file: Option<&Metadata>) -> anyhow::Result<mosix_ckpt::CredOptions> {
    use mosix_ckpt::{CredOptions, Identity};
    let me = nix::unistd::geteuid();
    if !me.is_root() {
        if a.trust_image {
            anyhow::bail!("--trust-image is for root: you restore images as yourself");
        }
        if let Some(u) = &a.as_user {
            if Identity::of_name(u)?.uid != me.as_raw() {
                anyhow::bail!("only root can restore a process as another user");
            }
        }
        // The engine refuses an image that is not the caller's before anything starts.
        return Ok(CredOptions::from_image());
    }
    if a.trust_image {
        return Ok(CredOptions::from_image());
    }
    if let Some(u) = &a.as_user {
        return Ok(CredOptions::as_user(Identity::of_name(u)?));
    }
    let Some(md) = file else {
        anyhow::bail!(
            "the image comes from standard input, which has no owner to restore it as: give --as-user USER, or --trust-image to restore it as it says"
        );
    };
    let img = a.image.display();
    if md.uid() == 0 {
        if md.mode() & 0o022 != 0 {
            anyhow::bail!(
                "{img} is owned by root but others may write it: give --as-user USER, or --trust-image to restore it as it says"
            );
        }
        return Ok(CredOptions::from_image());
    }
    match Identity::of_uid(md.uid()) {
        Ok(who) => Ok(CredOptions::as_user(who)),
        Err(mosix_ckpt::Error::NoUser(_)) => anyhow::bail!(
            "{img} belongs to uid {}, who has no user account here: give --as-user USER or --trust-image",
            md.uid()
        ),
        Err(e) => Err(e.into()),
    }
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
    let stdin = a.image.as_os_str() == "-";
    if a.lazy && !stdin {
        anyhow::bail!(
            "--lazy is for an image on standard input (`-`): from a file, the process already runs before all its memory is in (unless --detach)"
        );
    }
    if stdin && a.as_image_owner {
        anyhow::bail!("an image from standard input has no owner: give --as-user USER");
    }
    let file = if stdin {
        None
    } else {
        Some(open_image(&a.image)?)
    };
    if let Some((f, _)) = &file {
        let mut r = std::fs::File::open(format!("/proc/self/fd/{}", f.as_raw_fd()))
            .with_context(|| format!("cannot open {}", a.image.display()))?;
        let mut m = [0u8; 8];
        use std::io::{Read, Seek};
        if r.seek(std::io::SeekFrom::End(-8)).is_ok()
            && r.read_exact(&mut m).is_ok()
            && &m == mosix_proto::control::CHECKPOINT_MAGIC
        {
            anyhow::bail!(
                "{} is a checkpoint of a migratable job (mosrun -C): bring it back with `mosrun -R {}`",
                a.image.display(),
                a.image.display()
            );
        }
    }
    // Decided before the image is read: a refusal costs nothing.
    let creds = cred_options(&a, file.as_ref().map(|f| &f.1))?;
    let opts = mosix_ckpt::RestoreOptions {
        keep_pid: a.keep_pid,
        time_ns: a.keep_pid,
        ..Default::default()
    };
    // A file is read (mapped) and verified whole first; standard input is restored
    // while it arrives (the process runs only once all of it arrived and checked out).
    let img = match &file {
        None => None,
        // The file already opened and checked, not the name again.
        Some((f, _)) => Some(std::sync::Arc::new(
            mosix_ckpt::read_image_file(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())))
                .with_context(|| format!("{}", a.image.display()))?,
        )),
    };
    drop(file);
    tracing::debug!("image read and verified in {:?}", t0.elapsed());
    // Staying with it (not --detach), its private memory is put in while it runs (by a
    // thread of ours), so that it runs without waiting for a copy of all of it
    // (docs/checkpoint.md, "Memory put in while it runs"); detached, all of it first.
    let stay = !a.detach;
    type Restore = (
        mosix_ckpt::Restored,
        Option<mosix_ckpt::lazy::Filling>,
        Option<mosix_ckpt::sys::Stop>,
    );
    let restore =
        |img: &Option<std::sync::Arc<mosix_ckpt::LoadedImage>>| -> anyhow::Result<Restore> {
            Ok(match img {
                Some(img) if stay => {
                    let (r, f) = mosix_ckpt::restore_lazy(img, opts, &creds)?;
                    (r, f, None)
                }
                Some(img) => (mosix_ckpt::restore_with(img, opts, &creds)?, None, None),
                None if a.lazy => {
                    let input = std::io::BufReader::with_capacity(1 << 20, std::io::stdin());
                    let ran = mosix_ckpt::restore_stream_running(input, opts, &creds)
                        .context("the image on standard input")?;
                    tracing::debug!("its memory is all in: {:?}", ran.filled);
                    (ran.restored, None, ran.ended)
                }
                None => (
                    mosix_ckpt::restore_stream(std::io::stdin().lock(), opts, &creds)
                        .context("the image on standard input")?,
                    None,
                    None,
                ),
            })
        };
    if a.detach {
        let (new, _, _) = restore(&img)?;
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
    let (pid, ns_init, mut filling, ended) = match restore(&img) {
        Ok((p, f, e)) => (Pid::from_raw(p.pid), p.ns_init.map(Pid::from_raw), f, e),
        Err(e) => {
            old.thread_set_mask()?;
            return Err(e);
        }
    };
    drop(img);
    // Once all its memory is in, its descriptor of the userfaultfd is closed in it: by this
    // thread (which waits for it: a ptrace stop of that close must not be taken by another
    // thread's wait), woken by a SIGCHLD.
    if let Some(f) = &filling {
        f.wake_on_done(nix::unistd::gettid().as_raw(), libc::SIGCHLD);
    }
    // The namespace's init (if any) exits by itself once the process has ended.
    let reap_init = || {
        if let Some(i) = ns_init {
            let _ = waitpid(i, None);
        }
    };
    // It ended while it was stopped for the end of its fill (its status was taken then):
    // its exit code, or this command dies by its signal.
    let ended_so = |ended: Option<mosix_ckpt::sys::Stop>| match ended {
        Some(mosix_ckpt::sys::Stop::Exited(code)) => {
            reap_init();
            Some(code)
        }
        Some(mosix_ckpt::sys::Stop::Signaled(sig)) => {
            reap_init();
            die_by(Signal::try_from(sig).unwrap_or(Signal::SIGKILL))
        }
        _ => None,
    };
    if let Some(code) = ended_so(ended) {
        return Ok(code);
    }
    loop {
        if filling.as_ref().is_some_and(|f| f.is_done()) {
            let (filled, ended) = filling.take().expect("just seen").finish_reaping();
            tracing::debug!("its memory is all in: {filled:?}");
            if let Some(code) = ended_so(ended) {
                return Ok(code);
            }
        }
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
