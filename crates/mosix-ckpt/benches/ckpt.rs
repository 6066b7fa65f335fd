//! Checkpoint and restart speed for processes with 1, 64 and 512 MiB of touched memory,
//! against this machine's memcpy bandwidth measured in the same run (alternating, the
//! median of the ratios reported). Run as root: `cargo bench -p mosix-ckpt`.
//! Checkpoint is timed into memory (the engine), restart from a mapped image file in
//! /dev/shm (as `mosix restart FILE`). Prints `BENCH <name> <value> <unit> [vs <reference>=<ratio>]`.
//! Also an 8-thread process against a single-threaded one of the same size (512 MiB):
//! frozen time, checkpoint and restart, and what each thread adds. Then: checkpoint into
//! a file against `dd` into the same directory ($MOSIX_BENCH_DIR, else /var/tmp) and into
//! a pipe against memcpy, the freeze of a checkpoint with --leave-running, 1 MiB
//! checkpoint plus restart; restart with the memory put in while the process runs (lazy)
//! against one that puts it in first; a checkpoint piped into a restart (`mosix checkpoint
//! PID - | mosix restart -`), the restart post-copy (`--lazy`) against one that waits for
//! the whole image. $MOSIX_BENCH_ONLY=file,live,lazy,stream,... runs only those sections.

use std::time::Instant;

use mosix_ckpt::{
    checkpoint, checkpoint_live, checkpoint_to, read_image_file, restore, Compression, DumpOptions,
    LiveOptions, RestoreOptions,
};

const REPS: usize = 5;

/// Starts a copy of this program that touches `mib` MiB with non-zero data, says so on
/// its stdout (a pipe) and then sleeps in pause().
fn toucher(mib: usize) -> (std::process::Child, i32) {
    toucher_with(mib, 1)
}

/// [`toucher`] with `threads` threads in all (the others sleep in pause() too).
fn toucher_with(mib: usize, threads: usize) -> (std::process::Child, i32) {
    toucher_thp(mib, threads, false)
}

/// [`toucher_with`], its memory asking for transparent huge pages (MADV_HUGEPAGE) if `thp`.
fn toucher_thp(mib: usize, threads: usize, thp: bool) -> (std::process::Child, i32) {
    use std::io::Read;
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    if thp {
        cmd.env("MOSIX_BENCH_THP", "1");
    }
    cmd.env("MOSIX_BENCH_TOUCHER", mib.to_string())
        .env("MOSIX_BENCH_THREADS", threads.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    // SAFETY: close_range in the child before exec; no memory involved.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        })
    };
    let mut child = cmd.spawn().unwrap();
    let mut b = [0u8; 1];
    child.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
    let pid = child.id() as i32;
    (child, pid)
}

fn touch_and_wait(mib: usize, threads: usize) -> ! {
    use std::io::Write;
    for _ in 1..threads {
        std::thread::spawn(|| loop {
            // SAFETY: pause has no arguments.
            unsafe { libc::pause() };
        });
    }
    let mut v = vec![0u64; mib << 17];
    if std::env::var_os("MOSIX_BENCH_THP").is_some() {
        // Before the first touch: the kernel then faults huge pages in.
        // SAFETY: advice on the Vec's own buffer, whole pages inside it; no memory changes.
        unsafe {
            let a = (v.as_mut_ptr() as usize).next_multiple_of(2 << 20);
            let end = v.as_ptr() as usize + v.len() * 8;
            if end > a {
                libc::madvise(a as *mut libc::c_void, end - a, libc::MADV_HUGEPAGE);
            }
        }
    }
    let mut x = 0x9E3779B97F4A7C15u64;
    for w in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
    std::hint::black_box(&v);
    let mut out = std::io::stdout();
    out.write_all(b"r").unwrap();
    out.flush().unwrap();
    loop {
        // SAFETY: pause has no arguments.
        unsafe { libc::pause() };
    }
}

/// Whether section `name` runs: $MOSIX_BENCH_ONLY (comma-separated: sizes, file, live,
/// small, threads), else all.
fn only(name: &str) -> bool {
    std::env::var("MOSIX_BENCH_ONLY").map_or(true, |v| v.split(',').any(|x| x == name))
}

fn reap(pid: i32) {
    // SAFETY: kill and waitpid of our own child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if let Some(mib) = std::env::var("MOSIX_BENCH_TOUCHER")
        .ok()
        .and_then(|m| m.parse().ok())
    {
        let threads = std::env::var("MOSIX_BENCH_THREADS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(1);
        touch_and_wait(mib, threads);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench: run as root (ptrace and PR_SET_MM_MAP need it)");
        std::process::exit(1);
    }
    let sizes: &[usize] = if only("sizes") { &[1, 64, 512] } else { &[] };
    let max = sizes.iter().max().copied().unwrap_or(1) << 20;
    let src = vec![1u8; max];
    let mut dst = vec![2u8; max];
    let mut image: Vec<u8> = Vec::with_capacity(max + (64 << 20));
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    let img_path =
        std::path::PathBuf::from(format!("{dir}/mosix-bench-{}.img", std::process::id()));
    for &mib in sizes {
        let bytes = mib << 20;
        let (mut child, pid) = toucher(mib);
        let (mut ck_t, mut rs_t, mut ck_r, mut rs_r, mut mem_bw) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut fresh_bw, mut rs_fr) = (vec![], vec![]);
        let mut img_size = 0;
        for _ in 0..REPS {
            let t = Instant::now();
            dst[..bytes].copy_from_slice(&src[..bytes]);
            std::hint::black_box(&dst);
            let bw = bytes as f64 / t.elapsed().as_secs_f64();
            mem_bw.push(bw);
            // Copying into memory never touched before: what a restore into a new process
            // must do at least (the kernel zeroes each fresh page first).
            let t = Instant::now();
            // (A large zeroed Vec is fresh mmap()ed memory: pages arrive on first write.)
            let mut fresh = vec![0u8; bytes];
            fresh.copy_from_slice(&src[..bytes]);
            std::hint::black_box(&fresh);
            let fbw = bytes as f64 / t.elapsed().as_secs_f64();
            drop(fresh);
            fresh_bw.push(fbw);

            image.clear();
            let opts = DumpOptions {
                leave_running: true,
                compression: Compression::None,
            };
            let t = Instant::now();
            let (out, stats) = checkpoint(pid, std::mem::take(&mut image), opts, &mut |_, _| {})
                .expect("checkpoint");
            let ck = t.elapsed().as_secs_f64();
            image = out;
            img_size = image.len();
            ck_t.push(ck);
            ck_r.push(stats.memory_bytes as f64 / ck / bw);

            // Restart as `mosix restart FILE` does: the image file mapped, not copied.
            std::fs::write(&img_path, &image).expect("image file");
            let t = Instant::now();
            let img = read_image_file(&img_path).expect("image reads back");
            let new = restore(&img, RestoreOptions::default()).expect("restore");
            let rs = t.elapsed().as_secs_f64();
            drop(img);
            reap(new.pid);
            rs_t.push(rs);
            rs_r.push(stats.memory_bytes as f64 / rs / bw);
            rs_fr.push(stats.memory_bytes as f64 / rs / fbw);
        }
        let _ = child.kill();
        let _ = child.wait();
        let bw = median(mem_bw);
        let (ck, rs) = (median(ck_t), median(rs_t));
        println!("BENCH memcpy_bandwidth_{mib}MiB {:.2} GB/s", bw / 1e9);
        println!(
            "BENCH memcpy_fresh_memory_bandwidth_{mib}MiB {:.2} GB/s",
            median(fresh_bw) / 1e9
        );
        println!("BENCH checkpoint_{mib}MiB_time {:.1} ms", ck * 1e3);
        println!(
            "BENCH checkpoint_{mib}MiB_throughput {:.2} GB/s vs memcpy={:.3}",
            bytes as f64 / ck / 1e9,
            median(ck_r)
        );
        println!("BENCH restart_{mib}MiB_time {:.1} ms", rs * 1e3);
        println!(
            "BENCH restart_{mib}MiB_throughput {:.2} GB/s vs memcpy={:.3}",
            bytes as f64 / rs / 1e9,
            median(rs_r)
        );
        println!(
            "BENCH restart_{mib}MiB_throughput_fresh {:.2} GB/s vs memcpy_fresh_memory={:.3}",
            bytes as f64 / rs / 1e9,
            median(rs_fr)
        );
        println!(
            "BENCH image_size_{mib}MiB {:.1} MiB vs touched={:.3}",
            img_size as f64 / (1 << 20) as f64,
            img_size as f64 / bytes as f64
        );
        if mib == 512 {
            println!(
                "BENCH checkpoint_plus_restart_512MiB {:.3} s vs goal_0.5s={:.2}",
                ck + rs,
                (ck + rs) / 0.5
            );
        }
    }
    if only("thp") {
        bench_thp(&img_path, 512, REPS);
    }
    if only("lazy") {
        bench_lazy(&img_path, 512, REPS);
    }
    if only("file") {
        bench_file_and_pipe(512, REPS);
    }
    if only("stream") {
        bench_stream(512, REPS);
    }
    if only("live") {
        bench_live(512, REPS);
    }
    if only("small") {
        bench_small(&img_path, 3 * REPS);
    }
    // As asked (512 MiB), and small, where what threads cost is not lost in the noise of
    // copying memory.
    if only("threads") {
        bench_threads(&img_path, 512, REPS);
        bench_threads(&img_path, 1, 3 * REPS);
    }
    let _ = std::fs::remove_file(&img_path);
}

/// The directory file benchmarks write into (a disk, not tmpfs): $MOSIX_BENCH_DIR, else
/// /var/tmp.
fn bench_dir() -> std::path::PathBuf {
    std::env::var_os("MOSIX_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/var/tmp".into())
}

/// Checkpoint of `mib` MiB into a file against `dd` writing as much into the same
/// directory, and into a pipe (read to nothing by a thread) against memcpy: alternating,
/// medians of the ratios. The file is not synced (neither is dd's); --sync's cost is the
/// disk's.
fn bench_file_and_pipe(mib: usize, reps: usize) {
    use std::io::Read;
    let dir = bench_dir();
    let (mut child, pid) = toucher(mib);
    let bytes = mib << 20;
    let src = vec![1u8; bytes];
    let mut dst = vec![2u8; bytes];
    let (mut file_r, mut pipe_r, mut file_t, mut dd_t, mut pipe_t) =
        (vec![], vec![], vec![], vec![], vec![]);
    let path = dir.join(format!("mosix-bench-{}.img", std::process::id()));
    let dd_path = dir.join(format!("mosix-bench-{}.dd", std::process::id()));
    let opts = DumpOptions {
        leave_running: true,
        compression: Compression::None,
    };
    for _ in 0..reps {
        // Each starts with nothing of the other's left to write back.
        nix::unistd::sync();
        let t = Instant::now();
        let st = std::process::Command::new("dd")
            .arg("if=/dev/zero")
            .arg(format!("of={}", dd_path.display()))
            .args(["bs=1M", &format!("count={mib}")])
            .stderr(std::process::Stdio::null())
            .status()
            .expect("dd runs");
        assert!(st.success());
        let dd = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&dd_path);
        nix::unistd::sync();
        let t = Instant::now();
        let f = std::fs::File::create(&path).expect("image file");
        let w = std::io::BufWriter::with_capacity(1 << 20, f);
        let (w, _) = checkpoint_to(pid, w, opts, &mut |_, _| {}).expect("checkpoint to a file");
        drop(w.into_inner().expect("flushed"));
        let ck = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&path);
        file_t.push(ck);
        dd_t.push(dd);
        file_r.push(dd / ck);
        // Into a pipe, read by another thread; memcpy of as much as the reference.
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        let mc = t.elapsed().as_secs_f64();
        let (mut r, w) = std::io::pipe().expect("pipe");
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while r.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        let t = Instant::now();
        let (w, _) = checkpoint_to(pid, w, opts, &mut |_, _| {}).expect("checkpoint to a pipe");
        drop(w);
        reader.join().unwrap();
        let pt = t.elapsed().as_secs_f64();
        pipe_t.push(pt);
        pipe_r.push(mc / pt);
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "BENCH checkpoint_{mib}MiB_to_file {:.1} ms vs dd={:.3} (dd {:.1} ms, {})",
        median(file_t) * 1e3,
        median(file_r),
        median(dd_t) * 1e3,
        dir.display()
    );
    println!(
        "BENCH checkpoint_{mib}MiB_to_pipe {:.1} ms vs memcpy={:.3}",
        median(pipe_t) * 1e3,
        median(pipe_r)
    );
}

/// Checkpoint of a running process (`--leave-running`): how long it is frozen, and the
/// whole checkpoint, into memory.
fn bench_live(mib: usize, reps: usize) {
    let (mut child, pid) = toucher(mib);
    let (mut frozen, mut total) = (vec![], vec![]);
    let mut image: Vec<u8> = Vec::with_capacity((mib + 64) << 20);
    for _ in 0..reps {
        image.clear();
        let t = Instant::now();
        let (out, st) = checkpoint_live(
            pid,
            std::mem::take(&mut image),
            &LiveOptions::default(),
            &mut |_| {},
            &mut |_, _| {},
        )
        .expect("live checkpoint");
        total.push(t.elapsed().as_secs_f64());
        image = out;
        frozen.push((st.frozen + st.arm).as_secs_f64());
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "BENCH leave_running_{mib}MiB_frozen {:.2} ms vs goal_20ms={:.3}",
        median(frozen.clone()) * 1e3,
        median(frozen) / 20e-3
    );
    println!(
        "BENCH leave_running_{mib}MiB_total {:.1} ms",
        median(total) * 1e3
    );
}

/// 1 MiB: checkpoint into memory and restart from a mapped image file, together.
fn bench_small(img_path: &std::path::Path, reps: usize) {
    let (mut child, pid) = toucher(1);
    let mut t = vec![];
    let opts = DumpOptions {
        leave_running: true,
        compression: Compression::None,
    };
    for _ in 0..reps {
        let t0 = Instant::now();
        let (image, _) =
            checkpoint(pid, Vec::with_capacity(2 << 20), opts, &mut |_, _| {}).expect("checkpoint");
        std::fs::write(img_path, &image).expect("image file");
        let img = read_image_file(img_path).expect("image reads back");
        let new = restore(&img, RestoreOptions::default()).expect("restore");
        t.push(t0.elapsed().as_secs_f64());
        drop(img);
        reap(new.pid);
    }
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "BENCH checkpoint_plus_restart_1MiB {:.2} ms vs goal_10ms={:.3}",
        median(t.clone()) * 1e3,
        median(t) / 10e-3
    );
}

/// Checkpoint (frozen time and total) and restart of an 8-thread process with `mib` MiB
/// touched against a single-threaded one of the same size, alternating in the same run;
/// the medians of the ratios, and what each thread adds (the median of the differences).
fn bench_threads(img_path: &std::path::Path, mib: usize, reps: usize) {
    const THREADS: usize = 8;
    let procs = [toucher_with(mib, 1), toucher_with(mib, THREADS)];
    let mut image: Vec<u8> = Vec::with_capacity((mib + 64) << 20);
    // [process][rep] of (frozen, checkpoint, restart) in seconds.
    let mut t = [vec![], vec![]];
    for _ in 0..reps {
        for (i, (_, pid)) in procs.iter().enumerate() {
            image.clear();
            let opts = DumpOptions {
                leave_running: true,
                compression: Compression::None,
            };
            let t0 = Instant::now();
            let (out, stats) = checkpoint(*pid, std::mem::take(&mut image), opts, &mut |_, _| {})
                .expect("checkpoint");
            let ck = t0.elapsed().as_secs_f64();
            image = out;
            std::fs::write(img_path, &image).expect("image file");
            let t0 = Instant::now();
            let img = read_image_file(img_path).expect("image reads back");
            assert_eq!(img.meta.threads.len(), [0, THREADS - 1][i]);
            let new = restore(&img, RestoreOptions::default()).expect("restore");
            let rs = t0.elapsed().as_secs_f64();
            drop(img);
            reap(new.pid);
            t[i].push((stats.frozen.as_secs_f64(), ck, rs));
        }
    }
    for (mut c, _) in procs {
        let _ = c.kill();
        let _ = c.wait();
    }
    let names = ["frozen", "checkpoint", "restart"];
    for (k, name) in names.iter().enumerate() {
        let get = |i: usize| -> Vec<f64> {
            t[i].iter()
                .map(|x| [x.0, x.1, x.2][k])
                .collect::<Vec<f64>>()
        };
        let (one, eight) = (get(0), get(1));
        // The same from the fastest run of each: the noise of a busy machine only adds
        // time, and at 512 MiB it is larger than what 7 threads cost.
        let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
        let extra_min = (min(&eight) - min(&one)) / (THREADS - 1) as f64;
        let ratios: Vec<f64> = one.iter().zip(&eight).map(|(a, b)| b / a).collect();
        let extra: Vec<f64> = one
            .iter()
            .zip(&eight)
            .map(|(a, b)| (b - a) / (THREADS - 1) as f64)
            .collect();
        println!(
            "BENCH {name}_{mib}MiB_{THREADS}threads_time {:.1} ms vs 1thread={:.3}",
            median(eight) * 1e3,
            median(ratios)
        );
        println!(
            "BENCH {name}_{mib}MiB_per_extra_thread {:.2} ms vs goal_5ms={:.3}",
            median(extra.clone()) * 1e3,
            median(extra) / 5e-3
        );
        println!(
            "BENCH {name}_{mib}MiB_per_extra_thread_fastest {:.2} ms vs goal_5ms={:.3}",
            extra_min * 1e3,
            extra_min / 5e-3
        );
    }
}

/// Checkpoints toucher `t` (ending it) into `img_path`.
fn image_into(t: (std::process::Child, i32), img_path: &std::path::Path) {
    let (mut child, pid) = t;
    let opts = DumpOptions {
        leave_running: false,
        compression: Compression::None,
    };
    let (image, _) = checkpoint(pid, Vec::new(), opts, &mut |_, _| {}).expect("checkpoint");
    let _ = child.wait();
    std::fs::write(img_path, &image).expect("image file");
}

/// Restarts `img_path` as `mosix restart --detach` does (all memory in first), then ends
/// it: the seconds the restart took.
fn restart_from(img_path: &std::path::Path) -> f64 {
    let t = Instant::now();
    let img = read_image_file(img_path).expect("image reads back");
    let new = restore(&img, RestoreOptions::default()).expect("restore");
    let rs = t.elapsed().as_secs_f64();
    drop(img);
    reap(new.pid);
    rs
}

/// Restart with the memory put in while the process runs (`mosix restart`'s way,
/// [`mosix_ckpt::restore_lazy`]) against one that puts it all in first, alternating: the
/// time until it runs, and until all its memory is in; medians of the ratios.
fn bench_lazy(img_path: &std::path::Path, mib: usize, reps: usize) {
    image_into(toucher(mib), img_path);
    let mut fig = Early::default();
    for _ in 0..reps {
        let e = restart_from(img_path);
        let t = Instant::now();
        let img = std::sync::Arc::new(read_image_file(img_path).expect("image reads back"));
        let (new, filling) = mosix_ckpt::restore_lazy(
            &img,
            RestoreOptions::default(),
            &mosix_ckpt::CredOptions::from_image(),
        )
        .expect("restore");
        let run = t.elapsed().as_secs_f64();
        if let Some(f) = filling {
            f.finish();
        }
        let all = t.elapsed().as_secs_f64();
        drop(img);
        reap(new.pid);
        fig.push(e, run, all);
    }
    fig.print(
        &format!("restart_lazy_{mib}MiB"),
        &format!("restart_eager_{mib}MiB"),
    );
}

/// Times of a restart that lets the process run early against one that puts all of it
/// in first (eager), in pairs: until it runs, until all of it is in, and the eager time.
#[derive(Default)]
struct Early {
    eager: Vec<f64>,
    running: Vec<f64>,
    all_in: Vec<f64>,
    r_running: Vec<f64>,
    r_all_in: Vec<f64>,
}

impl Early {
    fn push(&mut self, eager: f64, running: f64, all_in: f64) {
        self.eager.push(eager);
        self.running.push(running);
        self.all_in.push(all_in);
        self.r_running.push(running / eager);
        self.r_all_in.push(all_in / eager);
    }

    /// Medians, and medians of the ratios to eager.
    fn print(self, early: &str, eager: &str) {
        println!(
            "BENCH {early}_running {:.1} ms vs eager={:.3}",
            median(self.running) * 1e3,
            median(self.r_running)
        );
        println!(
            "BENCH {early}_all_in {:.1} ms vs eager={:.3}",
            median(self.all_in) * 1e3,
            median(self.r_all_in)
        );
        println!("BENCH {eager} {:.1} ms", median(self.eager) * 1e3);
    }
}

/// A 512 MiB process checkpointed into a pipe that a restart reads (`mosix checkpoint
/// PID -o - | mosix restart [--lazy] -`), eager and post-copy alternating: from the start
/// of the checkpoint until the process runs again (what the pipe costs it in stopped
/// time), and until the restart has all of it; medians, and medians of the ratios to
/// eager.
fn bench_stream(mib: usize, reps: usize) {
    let opts = DumpOptions {
        leave_running: false,
        compression: Compression::None,
    };
    let creds = mosix_ckpt::CredOptions::from_image();
    let once = |lazy: bool| -> (f64, f64) {
        let (mut child, pid) = toucher(mib);
        let (r, w) = std::io::pipe().expect("pipe");
        let t = Instant::now();
        let writer = std::thread::spawn(move || {
            let w = std::io::BufWriter::with_capacity(1 << 20, w);
            let (w, _) = checkpoint_to(pid, w, opts, &mut |_, _| {}).expect("checkpoint");
            drop(w);
        });
        let r = std::io::BufReader::with_capacity(1 << 20, r);
        let called = t.elapsed().as_secs_f64();
        let (new, run) = if lazy {
            let ran = mosix_ckpt::restore_stream_running(r, RestoreOptions::default(), &creds)
                .expect("restore");
            assert!(ran.filled.is_some(), "it ran before all of it was in");
            (ran.restored, Some(called + ran.running_after.as_secs_f64()))
        } else {
            let new =
                mosix_ckpt::restore_stream(r, RestoreOptions::default(), &creds).expect("restore");
            (new, None)
        };
        let all = t.elapsed().as_secs_f64();
        writer.join().unwrap();
        let _ = child.wait();
        reap(new.pid);
        // (Eager: it runs once all of it is in.)
        (run.unwrap_or(all), all)
    };
    let mut fig = Early::default();
    for _ in 0..reps {
        let (e, _) = once(false);
        let (run, all) = once(true);
        fig.push(e, run, all);
    }
    fig.print(
        &format!("pipe_restart_lazy_{mib}MiB"),
        &format!("pipe_restart_eager_{mib}MiB"),
    );
}

/// Restart of a process whose memory asked for transparent huge pages (MADV_HUGEPAGE,
/// kept in the image since format 3.2 and given back before its pages are put in) vs the
/// same process without, alternating; medians of the ratios.
fn bench_thp(img_path: &std::path::Path, mib: usize, reps: usize) {
    let restart_of = |thp: bool| -> f64 {
        image_into(toucher_thp(mib, 1, thp), img_path);
        restart_from(img_path)
    };
    let (mut with, mut ratio) = (vec![], vec![]);
    for _ in 0..reps {
        let plain = restart_of(false);
        let thp = restart_of(true);
        with.push(thp);
        ratio.push(thp / plain);
    }
    println!(
        "BENCH restart_{mib}MiB_thp {:.1} ms vs no_thp={:.3}",
        median(with) * 1e3,
        median(ratio)
    );
}
