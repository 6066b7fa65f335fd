//! Post-copy from a stream (mosix_ckpt::restore_stream_running), on a real process, as
//! root: a process restored from a pipe whose image is only a quarter in moves an area
//! whose pages have not come yet (mremap: they are put in where it moved them), gives half
//! of another back (MADV_DONTNEED) and unmaps half of a third; then the rest of the image
//! comes, and it finds its memory as it was saved (zeros where it gave it back), and so
//! does a child it forks then. (It also needs its libc's small areas before the rest:
//! with its memory sent by address only, its first fgets waited for the whole image.)

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;

mod common;

const PROG: &str = r#"
int main(void) {
    uint64_t *a = area(1), *b = area(2), *c = area(3);
    printf("ready\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 2;
    /* None of this touches the memory that is still to come. */
    void *to = mmap(0, LEN, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *b2 = mremap(b, LEN, LEN, MREMAP_MAYMOVE | MREMAP_FIXED, to);
    if (b2 == MAP_FAILED) { printf("BAD mremap\n"); return 3; }
    madvise(c, LEN / 2, MADV_DONTNEED);
    munmap((char *)a + LEN / 2, LEN / 2);
    printf("moved\n");
    fflush(stdout);
    if (!fgets(line, sizeof line, stdin)) return 2;
    long i;
    if ((i = bad(b2, 0, WORDS, 2)) >= 0) { printf("BAD moved word %ld\n", i); return 3; }
    for (size_t j = 0; j < WORDS / 2; j++)
        if (c[j]) { printf("BAD given back word %zu\n", j); return 3; }
    if ((i = bad(c, WORDS / 2, WORDS, 3)) >= 0) { printf("BAD kept word %ld\n", i); return 3; }
    if ((i = bad(a, 0, WORDS / 2, 1)) >= 0) { printf("BAD unmapped word %ld\n", i); return 3; }
    pid_t k = fork();
    if (k == 0)
        _exit(bad(a, 0, WORDS / 2, 1) >= 0 || bad(b2, 0, WORDS, 2) >= 0 || bad(c, WORDS / 2, WORDS, 3) >= 0 ? 3 : 0);
    int st = 0;
    waitpid(k, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) { printf("BAD child %d\n", st); return 3; }
    printf("ok\n");
    return 0;
}
"#;

#[test]
fn a_process_run_from_a_quarter_of_its_image_moves_and_gives_memory_back() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let bin = common::build_c("postcopy_prog", &format!("{}{PROG}", common::AREAS_C));
    let (mut child, _out) = common::start_ready(&bin);
    let opts = mosix_ckpt::DumpOptions {
        leave_running: false,
        compression: mosix_ckpt::Compression::None,
    };
    // As `mosix checkpoint` writes it: the lazy mark, then its anonymous memory.
    let (image, _) = mosix_ckpt::checkpoint_to(child.id() as i32, Vec::new(), opts, &mut |_, _| {})
        .expect("checkpoint");
    let _ = child.wait();
    let cut = image.len() / 4;
    let (in_rd, in_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (out_rd, out_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let (img_rd, img_wr) = std::io::pipe().unwrap();
    // Its stdin and stdout: "go", then (once it said "moved") the rest of its image and
    // "check".
    let feeder = std::thread::spawn(move || {
        let mut img_wr = img_wr;
        img_wr.write_all(&image[..cut]).unwrap();
        let mut to_it = std::fs::File::from(in_wr);
        let mut from_it = BufReader::new(std::fs::File::from(out_rd));
        to_it.write_all(b"go\n").unwrap();
        let mut l = String::new();
        from_it.read_line(&mut l).unwrap();
        assert_eq!(l, "moved\n", "before the rest of its image");
        img_wr.write_all(&image[cut..]).unwrap();
        drop(img_wr);
        to_it.write_all(b"check\n").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut from_it, &mut rest).unwrap();
        rest
    });
    let ran = mosix_ckpt::restore_stream_running(
        img_rd,
        mosix_ckpt::RestoreOptions {
            stdio: Some([in_rd.as_raw_fd(), out_wr.as_raw_fd(), 2]),
            ..Default::default()
        },
        &mosix_ckpt::CredOptions::from_image(),
    )
    .expect("restore");
    drop((in_rd, out_wr));
    let filled = ran.filled.expect("it ran before all of its image came");
    let said = feeder.join().unwrap();
    let mut status = 0;
    // SAFETY: waitpid writes the status int; the process is our child.
    let r = unsafe { libc::waitpid(ran.restored.pid, &mut status, 0) };
    assert_eq!(r, ran.restored.pid);
    assert_eq!(said, "ok\n", "{filled:?}");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status}"
    );
    // What it unmapped before it came was not put in: the half of its highest area
    // (its memory comes smaller areas first, then by address).
    assert!(filled.dropped >= 12 << 20, "{filled:?}");
}
