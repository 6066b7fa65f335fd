//! Memory put in while the process runs (mosix_ckpt::lazy), on a real process, as root: a
//! process restored so, which right away forks a child that checks all of its memory,
//! moves an area (mremap), gives half of one back (MADV_DONTNEED) and unmaps half of
//! another, sees its memory as it was saved (zeros where it gave it back), its child too.
//! Once with pages put in only when touched (every one of those happens during the fill),
//! once with the fill in the background as well.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use std::sync::Arc;

mod common;

const PROG: &str = r#"
int main(void) {
    uint64_t *a = area(1), *b = area(2), *c = area(3);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 2;
    pid_t k = fork();
    if (k == 0)
        _exit(bad(a, 0, WORDS, 1) >= 0 || bad(b, 0, WORDS, 2) >= 0 || bad(c, 0, WORDS, 3) >= 0 ? 3 : 0);
    int st = 0;
    waitpid(k, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("BAD child %d\n", st); return 3; }
    void *to = mmap(0, LEN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *b2 = mremap(b, LEN, LEN, MREMAP_MAYMOVE | MREMAP_FIXED, to);
    if (b2 == MAP_FAILED) { printf("BAD mremap\n"); return 3; }
    long i;
    if ((i = bad(b2, 0, WORDS, 2)) >= 0) { printf("BAD moved word %ld\n", i); return 3; }
    madvise(c, LEN / 2, MADV_DONTNEED);
    for (size_t j = 0; j < WORDS / 2; j++)
        if (c[j]) { printf("BAD given back word %zu\n", j); return 3; }
    if ((i = bad(c, WORDS / 2, WORDS, 3)) >= 0) { printf("BAD kept word %ld\n", i); return 3; }
    munmap((char *)a + LEN / 2, LEN / 2);
    if ((i = bad(a, 0, WORDS / 2, 1)) >= 0) { printf("BAD unmapped word %ld\n", i); return 3; }
    printf("ok\n");
    return 0;
}
"#;

fn build() -> std::path::PathBuf {
    common::build_c("lazy_prog", &format!("{}{PROG}", common::AREAS_C))
}

/// Starts the program, checkpoints it once it is ready, restores it with its memory put
/// in while it runs, tells it to go on: what it printed, its exit status, the fill's
/// figures.
fn round(bin: &std::path::Path) -> (String, i32, mosix_ckpt::lazy::Filled) {
    let (mut child, _out) = common::start_ready(bin);
    let opts = mosix_ckpt::DumpOptions {
        leave_running: false,
        compression: mosix_ckpt::Compression::None,
    };
    let (bytes, _) = mosix_ckpt::checkpoint(child.id() as i32, Vec::new(), opts, &mut |_, _| {})
        .expect("checkpoint");
    // The checkpoint ended it and reaped it (this says ECHILD).
    let _ = child.wait();
    let img = Arc::new(mosix_ckpt::read_image_bytes(bytes).unwrap());
    let (in_rd, in_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (out_rd, out_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (new, filling) = mosix_ckpt::restore_lazy(
        &img,
        mosix_ckpt::RestoreOptions {
            stdio: Some([in_rd.as_raw_fd(), out_wr.as_raw_fd(), 2]),
            ..Default::default()
        },
        &mosix_ckpt::CredOptions::from_image(),
    )
    .expect("restore");
    drop((in_rd, out_wr));
    let filling = filling.expect("a fill (root has /dev/userfaultfd)");
    std::fs::File::from(in_wr).write_all(b"go\n").unwrap();
    let mut said = String::new();
    std::fs::File::from(out_rd)
        .read_to_string(&mut said)
        .unwrap();
    let filled = filling.finish();
    let mut status = 0;
    // SAFETY: waitpid writes the status int; the process is our child.
    let r = unsafe { libc::waitpid(new.pid, &mut status, 0) };
    assert_eq!(r, new.pid);
    (said, status, filled)
}

#[test]
fn a_process_filled_while_it_runs_forks_moves_and_gives_memory_back() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let bin = build();
    // Pages only when touched: the fork, the mremap, the MADV_DONTNEED and the munmap all
    // come while none of its areas is in.
    std::env::set_var(mosix_ckpt::lazy::ENV_TEST_ON_FAULT_ONLY, "1");
    let (said, status, f) = round(&bin);
    std::env::remove_var(mosix_ckpt::lazy::ENV_TEST_ON_FAULT_ONLY);
    assert_eq!(said, "ok\n");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status}"
    );
    assert_eq!(f.forks, 1, "{f:?}");
    // Its child and it read all three areas (72 MiB), a page fault at most every 64 KiB.
    assert!(f.faults >= 3 * 24 * 16, "{f:?}");
    // In the background too (whatever it does during the fill).
    let (said, status, f) = round(&bin);
    assert_eq!(said, "ok\n");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status}"
    );
    assert!(f.bytes > 0, "{f:?}");
}
