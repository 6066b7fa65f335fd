//! The README's first command, `bash scripts/demo.sh`, run as a newcomer runs it (root):
//! its checkpoint/restart gives the loop's whole output once, the job moved by hand is
//! where `where` says and back home, and the FAQ's eight jobs all finish.

use std::path::Path;
use std::process::{Command, Stdio};

#[test]
fn the_readme_demo_runs() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (the demo's testbed): run it as root");
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new("bash")
        .arg(repo.join("scripts/demo.sh"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "demo.sh failed:\n{out}\n{err}");

    // 1. Before the checkpoint and after the restart: every line of the loop, once, in order.
    let loop_lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("i = ") || l.starts_with("finished "))
        .collect();
    let mut want: Vec<String> = (0..4000).step_by(500).map(|i| format!("i = {i}")).collect();
    want.push("finished 4000".into());
    assert_eq!(loop_lines, want, "{out}");
    assert!(out.contains("-- exit status 0"), "{out}");

    // 2. The job moved by hand: on node 3, then home, then it finished.
    let wheres: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("where "))
        .map(|l| l.rsplit(' ').next().unwrap())
        .collect();
    assert_eq!(wheres, ["3", "0"], "{out}");
    assert!(out.contains("the moved job finished"), "{out}");

    // The FAQ's eight jobs all ran to their end.
    assert_eq!(out.matches("job done").count(), 8, "{out}");
}
