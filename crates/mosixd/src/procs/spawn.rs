//! Home side: starting a migratable process for `mosrun` (as the caller, with its
//! credentials and context) and its stdio pipes.

use super::*;

impl Procs {
    /// A `mosrun` asked to run a program. Runs on its own thread; once the process has
    /// started, writes the `started` answer on `stream` and returns (the deputy and the
    /// keeper go on by themselves). On error nothing was written.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        self: &Arc<Self>,
        stream: UnixStream,
        uid: u32,
        gid: u32,
        mosrun_pid: Option<i32>,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: String,
        to: Option<u32>,
        best: bool,
        pinned: bool,
        avoid: Vec<u32>,
    ) -> Result<i32> {
        if argv.is_empty() {
            bail!("nothing to run");
        }
        if let Some(t) = to {
            self.check_destination(t)?;
        }
        let groups = mosrun_pid.map(peer_groups).unwrap_or_default();
        let (tx, rx) = mpsc::channel::<Result<(KeeperTx, i32)>>();
        let me = self.clone();
        let cmd = argv.join(" ");
        let (dtx, drx) = mpsc::channel::<DevEv>();
        let dtx2 = dtx.clone();
        let cmd2 = cmd.clone();
        std::thread::Builder::new()
            .name("mosix-keeper".into())
            .spawn(move || {
                let started = spawn_user(&argv, &env, &cwd, uid, gid, &groups);
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
        let _ = dtx.send(DevEv::HostLinked {
            epoch: 0,
            down: Downlink::Local(ktx),
        });
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
        let me = self.clone();
        let target = if best { self.best_node() } else { to };
        std::thread::Builder::new()
            .name("mosix-deputy".into())
            .spawn(move || {
                let mut d = Deputy::new(me.clone(), pid, info, stream);
                if let Some(t) = target.filter(|&t| t != me.me()) {
                    let (rtx, rrx) = mpsc::channel();
                    d.handle(DevEv::Migrate { to: t, reply: rtx });
                    d.initial_move = Some(rrx);
                }
                d.run(drx);
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

/// Starts `argv` as `uid`/`gid`, in its own session, dying with this thread.
pub(super) fn spawn_user(
    argv: &[String],
    env: &[(String, String)],
    cwd: &str,
    uid: u32,
    gid: u32,
    groups: &[u32],
) -> Result<(std::process::Child, Pipes)> {
    use std::os::unix::process::CommandExt;
    let mut pipes = Pipes::new()?;
    let [i, o, e] = pipes.child.take().expect("fresh pipes");
    let mut c = std::process::Command::new(&argv[0]);
    c.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(i)
        .stdout(o)
        .stderr(e);
    let groups: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    // SAFETY: the closure runs in the forked child before exec and only makes system
    // calls (setsid, setgroups, setresgid, setresuid, prctl), no allocation or locks.
    unsafe {
        c.pre_exec(move || {
            use nix::unistd::{Gid, Uid};
            nix::unistd::setsid()?;
            nix::unistd::setgroups(&groups)?;
            let g = Gid::from_raw(gid);
            nix::unistd::setresgid(g, g, g)?;
            let u = Uid::from_raw(uid);
            nix::unistd::setresuid(u, u, u)?;
            // After the uid change, which would clear it.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
            Ok(())
        });
    }
    let child = c
        .spawn()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    Ok((child, pipes))
}

/// Supplementary groups of a process (the `mosrun` that asked).
pub(super) fn peer_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}
