//! Installing MOSIX: `scripts/install.sh --prefix` into a temporary prefix (the MOSIX names
//! on PATH, `man -l` on every page, bash completions, the systemd unit, the example config
//! never overwritten, `--uninstall`), and the Debian package of `scripts/deb.sh` really
//! installed with dpkg and purged again (root).
//!
//! Both use the binaries this test run was built with (`--bin-dir`): building inside
//! `cargo test` would wait for the build directory cargo holds.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_mosix"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(c: &mut Command) -> Output {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

const NAMES: [&str; 5] = ["mosix", "mosrun", "migrate", "mon", "mosctl"];

#[test]
fn install_into_a_prefix_and_uninstall() {
    assert!(
        bin_dir().join("mosixd").is_file(),
        "build mosixd first (cargo build --release --bins)"
    );
    let d = tempfile::tempdir().unwrap();
    let prefix = d.path().join("usr");
    let install = |extra: &[&str]| {
        run(Command::new("bash")
            .arg(repo().join("scripts/install.sh"))
            .arg("--prefix")
            .arg(&prefix)
            .arg("--bin-dir")
            .arg(bin_dir())
            .args(extra))
    };
    install(&[]);
    let path = format!("{}:/usr/bin:/bin", prefix.join("bin").display());
    // The MOSIX names are on PATH and answer as themselves.
    for name in NAMES {
        let o = run(Command::new(name).arg("--help").env("PATH", &path));
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(help.contains("Usage: "), "{name} --help: {help}");
    }
    let o = run(Command::new("mosrun").arg("--help").env("PATH", &path));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: mosrun"));
    let o = run(Command::new(prefix.join("sbin/mosixd")).arg("--help"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("mosixd"));
    // man -l on every page: it renders, with NAME; the MOSIX names have their examples.
    let mut pages: Vec<PathBuf> = ["share/man/man1", "share/man/man8"]
        .iter()
        .flat_map(|m| std::fs::read_dir(prefix.join(m)).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    assert!(pages.len() >= 10, "{pages:?}");
    for p in &pages {
        let o = run(Command::new("man")
            .arg("-l")
            .arg(p)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80"));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("NAME"), "{}: {text}", p.display());
        let name = p.file_name().unwrap().to_string_lossy();
        if NAMES[1..]
            .iter()
            .any(|n| name.starts_with(&format!("{n}.")))
            || name.starts_with("mosixd.")
        {
            assert!(text.contains("EXAMPLES"), "{}: {text}", p.display());
        }
    }
    for n in NAMES.iter().chain(&["mosixd"]) {
        assert!(
            pages.iter().any(|p| p
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!("{n}."))),
            "no man page for {n}"
        );
    }
    // Bash completions: sourcing one registers it.
    for n in NAMES.iter().chain(&["mosixd"]) {
        let f = prefix.join("share/bash-completion/completions").join(n);
        let o = run(Command::new("bash")
            .arg("-c")
            .arg(format!("source '{}' && complete -p {n}", f.display())));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(&format!(" {n}")),
            "{n}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(prefix
            .join(format!("share/zsh/site-functions/_{n}"))
            .is_file());
        assert!(prefix
            .join(format!("share/fish/vendor_completions.d/{n}.fish"))
            .is_file());
    }
    // The unit runs this prefix's mosixd; the example config is there and parses.
    let unit = std::fs::read_to_string(prefix.join("lib/systemd/system/mosixd.service")).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={}/sbin/mosixd ", prefix.display())),
        "{unit}"
    );
    let conf = prefix.join("etc/mosix/mosix.toml");
    let example = std::fs::read_to_string(&conf).unwrap();
    assert!(example.contains("[[map]]"));
    // A second install keeps an edited config.
    std::fs::write(&conf, "# mine\n").unwrap();
    install(&[]);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "# mine\n");
    // Uninstall removes every file it installed, and only those.
    install(&["--uninstall"]);
    let left: Vec<PathBuf> = walk(&prefix);
    assert_eq!(left, std::slice::from_ref(&conf), "left behind");
    let o = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .args(["--uninstall", "--prefix"])
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "a second uninstall has nothing to remove"
    );
    assert_eq!(String::from_utf8_lossy(&o.stderr).lines().count(), 1);
}

/// Every file and link under `dir`, sorted.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// dpkg ARGS, waiting while another dpkg or apt holds its lock.
fn dpkg(args: &[&str], deb: Option<&Path>) -> Output {
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let mut c = Command::new("dpkg");
        c.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        if let Some(d) = deb {
            c.arg(d);
        }
        let o = c.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() && err.contains("lock") && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        assert!(o.status.success(), "dpkg {args:?}: {err}");
        return o;
    }
}

#[test]
fn debian_package_installs_and_purges() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test needs root (dpkg -i): run it as root");
    }
    let installed = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "mosix"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&installed.stdout).contains("install ok installed"),
        "a mosix package is installed on this machine already: remove it first (dpkg --purge mosix)"
    );
    let out = tempfile::tempdir().unwrap();
    let o = run(Command::new("bash")
        .arg(repo().join("scripts/deb.sh"))
        .arg("--out")
        .arg(out.path())
        .arg("--bin-dir")
        .arg(bin_dir()));
    let deb = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
    assert!(deb.is_file(), "{}", deb.display());
    // Depends names the C library the programs were linked against, with a version.
    let o = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .arg("Depends"));
    let depends = String::from_utf8_lossy(&o.stdout);
    assert!(depends.contains("libc6 (>= 2."), "Depends: {depends}");
    let etc_before = Path::new("/etc/mosix").exists();
    let secret_before = std::fs::read("/etc/mosix/secret").ok();
    dpkg(&["-i"], Some(&deb));
    let r = std::panic::catch_unwind(|| {
        for n in NAMES {
            let p = Path::new("/usr/bin").join(n);
            assert!(p.exists(), "{}", p.display());
        }
        let o = run(Command::new("/usr/bin/mosrun").arg("--help"));
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: mosrun"));
        assert!(Path::new("/usr/sbin/mosixd").is_file());
        assert!(Path::new("/usr/share/man/man1/mosrun.1.gz").is_file());
        assert!(Path::new("/usr/share/man/man8/mosixd.8.gz").is_file());
        let unit = std::fs::read_to_string("/usr/lib/systemd/system/mosixd.service").unwrap();
        assert!(unit.contains("ExecStart=/usr/sbin/mosixd "), "{unit}");
        // postinst: the config directory and a secret, never replacing existing ones.
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata("/etc/mosix/secret").unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        match &secret_before {
            Some(s) => assert_eq!(&std::fs::read("/etc/mosix/secret").unwrap(), s),
            None => assert_eq!(std::fs::read("/etc/mosix/secret").unwrap().len(), 64),
        }
        assert!(Path::new("/etc/mosix/mosix.toml").is_file());
    });
    // Whatever happened: remove it again.
    dpkg(&["--purge", "mosix"], None);
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
    for n in NAMES {
        assert!(
            !Path::new("/usr/bin").join(n).exists(),
            "{n} left after purge"
        );
    }
    assert!(!Path::new("/usr/sbin/mosixd").exists());
    assert_eq!(
        Path::new("/etc/mosix").exists(),
        etc_before,
        "purge removes /etc/mosix only when the package made it"
    );
    if let Some(s) = secret_before {
        assert_eq!(std::fs::read("/etc/mosix/secret").unwrap(), s);
    }
}
