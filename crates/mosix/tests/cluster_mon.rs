//! `mon` in a real terminal: tmux runs it (through the `mon` argv[0] alias) against two real
//! mosixd daemons on loopback, the test types keys and reads the screen back.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(20);
const NET: u8 = 36;
const NODES: u32 = 40;

fn mosix() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mosix"))
}

struct Fixture {
    dir: tempfile::TempDir,
    daemons: Vec<Child>,
    tmux_sock: String,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.tmux_sock, "kill-server"])
            .stderr(Stdio::null())
            .status();
        for d in &mut self.daemons {
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

impl Fixture {
    fn tmux(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.tmux_sock, "-f", "/dev/null"])
            .args(args)
            .output()
            .unwrap()
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "mon"]).stdout)
            .into_owned()
    }

    fn wait_screen(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let s = self.screen();
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn press(&self, key: &str) {
        let o = self.tmux(&["send-keys", "-t", "mon", key]);
        assert!(o.status.success(), "send-keys {key}: {o:?}");
    }
}

fn start_daemons(dir: &Path) -> Vec<Child> {
    let mosixd = mosix().with_file_name("mosixd");
    assert!(
        mosixd.is_file(),
        "{} is missing: build the workspace binaries first",
        mosixd.display()
    );
    let secret = dir.join("secret");
    std::fs::write(&secret, "mon-test-secret-0123456789\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    (1..=2)
        .map(|i| {
            let nd = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&nd).unwrap();
            let cfg = nd.join("mosix.toml");
            std::fs::write(
                &cfg,
                format!(
                    "node = {i}\nsecret_file = \"{s}\"\nstate_dir = \"{d}\"\n\
                     control_socket = \"{d}/sock\"\nspeed = {i}.0\ngossip_interval_ms = 200\n\
                     [[map]]\nnode = 1\naddress = \"127.0.{NET}.1\"\ncount = {NODES}\n",
                    s = secret.display(),
                    d = nd.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(nd.join("log")).unwrap();
            Command::new(&mosixd)
                .arg("--config")
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap()
        })
        .collect()
}

#[test]
fn mon_in_tmux_answers_every_key() {
    if Command::new("tmux").arg("-V").output().is_err() {
        panic!("tmux is not installed (scripts/setup.sh installs it)");
    }
    let dir = tempfile::tempdir().unwrap();
    let daemons = start_daemons(dir.path());
    let fx = Fixture {
        tmux_sock: format!("mosix-mon-test-{}", std::process::id()),
        daemons,
        dir,
    };
    let sock = fx.dir.path().join("n1/sock");
    // Node 1 must see node 2 before the screen is meaningful.
    let end = Instant::now() + DEADLINE;
    loop {
        // Found through $MOSIX_CONFIG's control_socket.
        let o = Command::new(mosix())
            .args(["status", "--json"])
            .env_remove("MOSIX_SOCKET")
            .env("MOSIX_CONFIG", fx.dir.path().join("n1/mosix.toml"))
            .output()
            .unwrap();
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if v["nodes"][1]["status"] == 3 {
                break;
            }
        }
        assert!(Instant::now() < end, "the two daemons never saw each other");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Run it as `mon` (argv[0] alias).
    let mon = fx.dir.path().join("mon");
    std::os::unix::fs::symlink(mosix(), &mon).unwrap();
    let cmd = format!("{} --socket {}", mon.display(), sock.display());
    let o = fx.tmux(&[
        "new-session",
        "-d",
        "-s",
        "mon",
        "-x",
        "100",
        "-y",
        "30",
        &cmd,
    ]);
    assert!(o.status.success(), "tmux new-session: {o:?}");

    // A detached session may start at tmux's default size; make it 100x30 for sure.
    let o = fx.tmux(&["resize-window", "-t", "mon", "-x", "100", "-y", "30"]);
    assert!(o.status.success(), "{o:?}");
    // 40 nodes do not fit in 100 columns: the view scrolls; nodes 3.. are down.
    fx.wait_screen("the load view", |s| {
        s.contains("MOSIX mon - node 1 - Load")
            && s.contains("1*")
            && s.contains(" down")
            && s.contains("nodes 1-20 of 40")
    });

    fx.press("m");
    fx.wait_screen("memory view", |s| s.contains("Memory (used/free)"));
    fx.press("u");
    fx.wait_screen("utilization view", |s| s.contains("Utilization"));
    fx.press("s");
    fx.wait_screen("speed view with both speeds", |s| {
        s.contains("- Speed") && s.contains("1.00") && s.contains("2.00")
    });
    fx.press("l");
    fx.wait_screen("load view again", |s| s.contains("- Load"));
    fx.press("t");
    fx.wait_screen("active nodes", |s| s.contains("Active nodes: 2 of 40"));
    fx.press("t");
    fx.wait_screen("active nodes hidden", |s| !s.contains("Active nodes"));
    fx.press("h");
    fx.wait_screen("help", |s| {
        s.contains("Help - MOSIX monitor keys") && s.contains("q   quit")
    });
    fx.press("h");
    fx.wait_screen("help closed", |s| !s.contains("Help - MOSIX"));
    fx.press("Right");
    fx.wait_screen("scrolled right", |s| s.contains("nodes 2-21 of 40"));
    fx.press("End");
    fx.wait_screen("scrolled to the end", |s| s.contains("nodes 21-40 of 40"));

    // Any terminal size: shrink to a tiny window and grow back.
    let o = fx.tmux(&["resize-window", "-t", "mon", "-x", "24", "-y", "6"]);
    assert!(o.status.success(), "{o:?}");
    fx.wait_screen("tiny window", |s| {
        s.contains("MOSIX mon") && s.contains("of 40")
    });
    let o = fx.tmux(&["resize-window", "-t", "mon", "-x", "12", "-y", "3"]);
    assert!(o.status.success(), "{o:?}");
    fx.wait_screen("tinier window", |s| s.contains("MOSIX mon"));
    let o = fx.tmux(&["resize-window", "-t", "mon", "-x", "100", "-y", "30"]);
    assert!(o.status.success(), "{o:?}");
    fx.wait_screen("normal window", |s| s.contains("MOSIX mon - node 1"));

    fx.press("q");
    let end = Instant::now() + DEADLINE;
    while fx.tmux(&["has-session", "-t", "mon"]).status.success() {
        assert!(
            Instant::now() < end,
            "mon did not quit on q:\n{}",
            fx.screen()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn mon_refuses_without_a_terminal() {
    let o = Command::new(mosix())
        .args(["mon", "--socket", "/nonexistent.sock"])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("mon needs a terminal"), "{e}");
}
