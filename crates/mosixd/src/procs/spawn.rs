//! Home side: starting a migratable process for `mosrun` (as the caller, with its
//! credentials and context) and its stdio pipes.

use super::*;
use std::ffi::CString;

/// Who asked for a job, as the control socket's peer credentials say, and the context
/// (umask, limits, cgroup) the job inherits from them.
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub pid: Option<i32>,
    pub ctx: crate::peer::Context,
}

/// What `mosrun` asked to run and where.
pub type RunSpec = mosix_proto::control::RunRequest;

impl Procs {
    /// A `mosrun` asked to run a program. Runs on its own thread; once the process has
    /// started, writes the `started` answer on `stream` and returns (the deputy and the
    /// keeper go on by themselves). On error nothing was written.
    pub fn run(self: &Arc<Self>, stream: UnixStream, caller: Caller, spec: RunSpec) -> Result<i32> {
        let RunSpec {
            argv,
            env,
            cwd,
            to,
            best,
            pinned,
            avoid,
        } = spec;
        if argv.is_empty() {
            bail!("nothing to run");
        }
        if let Some(t) = to {
            self.check_destination(t)?;
        }
        let (uid, mosrun_pid) = (caller.uid, caller.pid);
        let (tx, rx) = mpsc::channel::<Result<(KeeperTx, i32)>>();
        let me = self.clone();
        let cmd = argv.join(" ");
        let (dtx, drx) = mpsc::channel::<DevEv>();
        let dtx2 = dtx.clone();
        let cmd2 = cmd.clone();
        std::thread::Builder::new()
            .name("mosix-keeper".into())
            .spawn(move || {
                let started = spawn_user(&argv, &env, &cwd, &caller);
                let (child, pipes) = match started {
                    Ok(x) => x,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                // Waited for by the keeper (pidfd + waitpid), not through `Child`.
                let pid = child.id() as i32;
                drop(child);
                let k = Keeper::new(
                    &me,
                    pid,
                    None,
                    pipes,
                    KeeperMeta {
                        home: me.me(),
                        home_pid: pid,
                        epoch: 0,
                        uid,
                        cmd: cmd2,
                        stdin_base: 0,
                        pinned,
                        avoid,
                        migrations: 0,
                    },
                    "started here (its home)".into(),
                );
                let Ok(k) = k else {
                    let _ = tx.send(Err(anyhow!("cannot watch process {pid}")));
                    return;
                };
                let _ = tx.send(Ok((k.tx(), pid)));
                let up = Uplink::Local { tx: dtx2, epoch: 0 };
                k.run(up);
            })?;
        let (ktx, pid) = rx.recv().map_err(|_| anyhow!("the keeper thread died"))??;
        let info = Arc::new(Mutex::new(DeputyInfo {
            uid,
            cmd,
            node: self.me(),
            state: "running",
            mosrun_pid,
            since: Instant::now(),
        }));
        lock(&self.deputies).insert(
            pid,
            DeputyHandle {
                tx: dtx.clone(),
                info: info.clone(),
            },
        );
        // The answer line goes out before any frame of the deputy's.
        {
            let mut line =
                serde_json::to_vec(&mosix_proto::control::Response::Started { home_pid: pid })?;
            line.push(b'\n');
            (&stream).write_all(&line)?;
        }
        // mosrun's frames come in on their own thread.
        let reader = stream.try_clone()?;
        let rtx = dtx.clone();
        std::thread::Builder::new()
            .name("mosix-mosrun".into())
            .spawn(move || {
                let mut r = std::io::BufReader::new(reader);
                loop {
                    match wire::recv::<_, FromRun>(&mut r) {
                        Ok(Some(m)) => {
                            if rtx.send(DevEv::FromRun(m)).is_err() {
                                return;
                            }
                        }
                        _ => {
                            let _ = rtx.send(DevEv::RunGone);
                            return;
                        }
                    }
                }
            })?;
        // mosrun's frames go out on a writer thread of their own.
        let (run_tx, run_rx) = mpsc::channel::<ToRun>();
        let events = dtx.clone();
        std::thread::Builder::new()
            .name("mosix-runw".into())
            .spawn(move || deputy::write_to_run(stream, run_rx, events))?;
        let me = self.clone();
        let target = if best { self.best_node() } else { to };
        std::thread::Builder::new()
            .name("mosix-deputy".into())
            .spawn(move || {
                let mut d = deputy::Deputy::new(me.me(), pid, info, run_tx);
                // Its first host is here; linked before anything else is handled (a
                // `mosrun -r` move is asked for right away).
                let now = Instant::now();
                d.handle(
                    DevEv::HostLinked {
                        epoch: 0,
                        node: me.me(),
                        down: Downlink::Local(ktx),
                    },
                    now,
                );
                if let Some(t) = target.filter(|&t| t != me.me()) {
                    d.initial_move(t, now);
                }
                deputy::drive(&mut d, drx);
                lock(&me.deputies).remove(&pid);
            })?;
        info!(pid, uid, "started a migratable process");
        Ok(pid)
    }
}

impl Pipes {
    pub(super) fn new() -> std::io::Result<Pipes> {
        use nix::fcntl::OFlag;
        let flags = OFlag::O_CLOEXEC;
        let (in_r, in_w) = nix::unistd::pipe2(flags)?;
        let (o_r, o_w) = nix::unistd::pipe2(flags)?;
        let (e_r, e_w) = nix::unistd::pipe2(flags)?;
        for fd in [&in_w, &o_r, &e_r] {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        Ok(Pipes {
            stdin_w: Some(in_w),
            stdin_peek: in_r.try_clone()?,
            out: [Some(o_r), Some(e_r)],
            child: Some([in_r, o_w, e_w]),
        })
    }
    pub(super) fn child_fds(&self) -> [RawFd; 3] {
        let c = self.child.as_ref().expect("child ends still here");
        [c[0].as_raw_fd(), c[1].as_raw_fd(), c[2].as_raw_fd()]
    }
    pub(super) fn close_child_ends(&mut self) {
        self.child = None;
    }
}

/// Which step of starting a job failed in the child (one byte on the stage pipe).
const STAGE_CGROUP: u8 = b'g';
const STAGE_RLIMIT: u8 = b'l';
const STAGE_CREDS: u8 = b'u';
const STAGE_CWD: u8 = b'c';

/// Starts `argv` as the caller, in its own session, dying with this thread. The child
/// gets exactly the caller's context: its cgroups, resource limits and umask (set while
/// still root), then its groups, gid and uid; only then does it enter `cwd`, so the
/// directory is looked up with the caller's rights; and it keeps no descriptor but 0, 1
/// and 2.
pub(super) fn spawn_user(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    caller: &Caller,
) -> Result<(std::process::Child, Pipes)> {
    use std::os::unix::process::CommandExt;
    let cwd_c = CString::new(cwd).map_err(|_| anyhow!("the directory name contains a NUL byte"))?;
    let cgroups = caller
        .ctx
        .open_cgroup_procs()
        .map_err(|e| anyhow!("cannot place the job in your cgroup: {e}"))?;
    let mut pipes = Pipes::new()?;
    let [i, o, e] = pipes.child.take().expect("fresh pipes");
    let (stage_r, stage_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut c = std::process::Command::new(&argv[0]);
    c.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(i)
        .stdout(o)
        .stderr(e);
    let groups: Vec<nix::unistd::Gid> = caller
        .groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    let (uid, gid) = (caller.uid, caller.gid);
    let rlimits = caller.ctx.rlimits.clone();
    let umask = caller.ctx.umask;
    let cg_fds: Vec<RawFd> = cgroups.iter().map(|f| f.as_raw_fd()).collect();
    let stage_fd = stage_w.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes system
    // calls on memory prepared before the fork (no allocation, no locks).
    unsafe {
        c.pre_exec(move || {
            use nix::unistd::{Gid, Uid};
            let fail = |stage: u8, e: nix::errno::Errno| -> std::io::Error {
                let _ = libc::write(stage_fd, [stage].as_ptr().cast(), 1);
                std::io::Error::from_raw_os_error(e as i32)
            };
            nix::unistd::setsid()?;
            for &fd in &cg_fds {
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(fail(STAGE_CGROUP, nix::errno::Errno::last()));
                }
            }
            for &(res, cur, max) in &rlimits {
                let mut l = libc::rlimit64 {
                    rlim_cur: cur,
                    rlim_max: max,
                };
                if libc::setrlimit64(res, &l) != 0 {
                    // Raising a hard limit needs CAP_SYS_RESOURCE: without it the job
                    // gets the caller's limits within ours.
                    let mut own = libc::rlimit64 {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::getrlimit64(res, &mut own);
                    l.rlim_max = max.min(own.rlim_max);
                    l.rlim_cur = cur.min(l.rlim_max);
                    if libc::setrlimit64(res, &l) != 0 {
                        return Err(fail(STAGE_RLIMIT, nix::errno::Errno::last()));
                    }
                }
            }
            libc::umask(umask as libc::mode_t);
            let creds = (|| {
                nix::unistd::setgroups(&groups)?;
                let g = Gid::from_raw(gid);
                nix::unistd::setresgid(g, g, g)?;
                let u = Uid::from_raw(uid);
                nix::unistd::setresuid(u, u, u)
            })();
            if let Err(e) = creds {
                return Err(fail(STAGE_CREDS, e));
            }
            // After the uid change, which would clear it.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            // As the caller: a directory they may not enter stays closed to them.
            if libc::chdir(cwd_c.as_ptr()) != 0 {
                return Err(fail(STAGE_CWD, nix::errno::Errno::last()));
            }
            // Nothing of ours goes across exec (std's own error pipe still works).
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let spawned = c.spawn();
    drop(c);
    drop(stage_w);
    match spawned {
        Ok(child) => Ok((child, pipes)),
        Err(err) => {
            let mut b = [0u8; 1];
            let stage = match nix::unistd::read(&stage_r, &mut b) {
                Ok(1) => b[0],
                _ => 0,
            };
            let os = err
                .raw_os_error()
                .map(|e| std::io::Error::from_raw_os_error(e).to_string())
                .unwrap_or_else(|| err.to_string());
            Err(match stage {
                STAGE_CWD => anyhow!("cannot enter directory {cwd}: {os}"),
                STAGE_CGROUP => anyhow!("cannot place the job in your cgroup: {os}"),
                STAGE_RLIMIT => anyhow!("cannot give the job your resource limits: {os}"),
                STAGE_CREDS => anyhow!("cannot take your credentials: {os}"),
                _ => anyhow!("cannot run {}: {os}", argv[0]),
            })
        }
    }
}
