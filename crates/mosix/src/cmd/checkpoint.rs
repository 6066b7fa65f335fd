//! `mosix checkpoint`: freeze a process and write its image.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use mosix_ckpt::{Compression, DumpOptions, Error};

/// Save the complete state of a running process to an image.
///
/// The process's memory, registers, signal state and open files are written to IMAGE,
/// and then it is killed (default) or let go on (--leave-running). `mosix restart IMAGE`
/// brings it back, here or on another machine with the same files. Processes that cannot
/// be restored faithfully (shared memory another process has, open sockets or pipes
/// other than standard input/output/error, ...) are refused before they are touched;
/// --check lists every reason.
///
/// With --leave-running the process is not stopped while its memory is written: it is
/// frozen for a moment to start tracking which pages it writes, its memory is saved
/// while it runs, and it is frozen again only to save its registers, signals, files and
/// the pages it wrote meanwhile (milliseconds, whatever its size; --json says how long).
/// Pages written while they were saved are saved again, so the image may be somewhat
/// larger than the memory. --frozen keeps it stopped for the whole checkpoint instead.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  mosix checkpoint 4242 -o job.img           # save and stop process 4242\n  mosix checkpoint 4242 -o job.img --leave-running --compress zstd\n  mosix checkpoint 4242 -o job.img --leave-running --sync --json\n  mosix checkpoint --check 4242               # can it be checkpointed? why not?\n  mosix checkpoint 4242 -o - | ssh other mosix restart -"
)]
pub struct Args {
    /// The process to checkpoint.
    pub pid: i32,
    /// Where to write the image: a file, or `-` for standard output.
    #[arg(short, long, value_name = "IMAGE", required_unless_present = "check")]
    pub output: Option<PathBuf>,
    /// Let the process go on running after the checkpoint instead of killing it; its
    /// memory is saved while it runs (see above).
    #[arg(long)]
    pub leave_running: bool,
    /// With --leave-running: keep the process stopped while its memory is written (one
    /// pass, no page saved twice; it is stopped for as long as the whole checkpoint).
    #[arg(long, requires = "leave_running")]
    pub frozen: bool,
    /// Make sure the image is on the disk before saying it is done (fdatasync). Without
    /// it the image is complete for every program on this machine at once, but a crash or
    /// power loss of the machine in the next seconds (until the kernel has written it
    /// out) can lose it or leave it damaged; a damaged image is refused by restart. With
    /// it the command takes as long as the disk needs to write the image.
    #[arg(long)]
    pub sync: bool,
    /// Compression of the image body.
    #[arg(long, value_name = "none|lz4|zstd", default_value = "none")]
    pub compress: Compression,
    /// Only say whether PID can be checkpointed and, if not, every reason; touch nothing.
    #[arg(long, conflicts_with_all = ["output", "leave_running"])]
    pub check: bool,
    /// Print the figures of the checkpoint as one JSON object on standard error
    /// (standard output may be the image): pid, memory_bytes, image_bytes, frozen_ms,
    /// seconds, rounds (bytes and ms of each pre-copy round) and left_running.
    #[arg(long)]
    pub json: bool,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
}

/// What a checkpoint did.
struct Done {
    memory_bytes: u64,
    frozen: std::time::Duration,
    rounds: Vec<mosix_ckpt::RoundStat>,
}

/// Checkpoints into `w` as the arguments say.
fn save<W: Write + Send + 'static>(
    a: &Args,
    w: W,
    progress: &mut dyn FnMut(u64, u64),
) -> anyhow::Result<(W, Done)> {
    if a.leave_running && !a.frozen {
        let opts = mosix_ckpt::LiveOptions {
            compression: a.compress,
            ..Default::default()
        };
        let (w, st) = mosix_ckpt::checkpoint_live(a.pid, w, &opts, &mut |_| {}, progress)?;
        let mut rounds = st.rounds.clone();
        rounds.push(st.last);
        return Ok((
            w,
            Done {
                memory_bytes: st.memory_bytes,
                frozen: st.frozen + st.arm,
                rounds,
            },
        ));
    }
    let opts = DumpOptions {
        leave_running: a.leave_running,
        compression: a.compress,
    };
    // Its memory read while the image is written.
    let (w, st) = mosix_ckpt::checkpoint_to(a.pid, w, opts, progress)?;
    Ok((
        w,
        Done {
            memory_bytes: st.memory_bytes,
            frozen: st.frozen,
            rounds: Vec::new(),
        },
    ))
}

pub fn run(a: Args) -> anyhow::Result<i32> {
    if a.check {
        return match mosix_ckpt::check(a.pid) {
            Ok(()) => {
                println!("process {} can be checkpointed", a.pid);
                Ok(0)
            }
            Err(Error::Refused { pid, reasons }) => {
                println!("process {pid} cannot be checkpointed:");
                for r in reasons {
                    println!("  - {r}");
                }
                Ok(1)
            }
            Err(e) => Err(e.into()),
        };
    }
    let t0 = std::time::Instant::now();
    let out = a.output.clone().expect("required by clap");
    let bar = progress_bar();
    let mut progress = |done: u64, total: u64| {
        if let Some(b) = &bar {
            b.set_length(total.max(done));
            b.set_position(done);
        }
    };
    let (done, image_bytes) = if out.as_os_str() == "-" {
        let stdout = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::from(std::io::stdout().as_fd_owned().context("standard output")?),
        );
        let (mut w, done) = save(&a, Counting::new(stdout), &mut progress)?;
        w.flush()?;
        let n = w.n;
        (done, n)
    } else {
        // Write beside the target and rename: a failed checkpoint leaves no half image.
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".mosix-ckpt-")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a file in {}", dir.display()))?;
        let (file, path) = tmp.into_parts();
        let file = WriteBehind {
            inner: file,
            start: a.sync,
            written: 0,
            started: 0,
        };
        let w = Counting::new(std::io::BufWriter::with_capacity(1 << 20, file));
        let (w, done) = save(&a, w, &mut progress)?;
        let n = w.n;
        let f = w.inner.into_inner().map_err(|e| e.into_error())?.inner;
        if a.sync {
            f.sync_data()
                .with_context(|| format!("cannot write {} to the disk", out.display()))?;
        }
        path.persist(&out)
            .with_context(|| format!("cannot write {}", out.display()))?;
        (done, n)
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if a.json {
        let rounds: Vec<serde_json::Value> = done
            .rounds
            .iter()
            .map(|r| serde_json::json!({"bytes": r.bytes, "ms": (r.ms * 10.0).round() / 10.0}))
            .collect();
        eprintln!(
            "{}",
            serde_json::json!({
                "pid": a.pid,
                "memory_bytes": done.memory_bytes,
                "image_bytes": image_bytes,
                "frozen_ms": (done.frozen.as_secs_f64() * 1e4).round() / 10.0,
                "seconds": (t0.elapsed().as_secs_f64() * 1e3).round() / 1e3,
                "rounds": rounds,
                "left_running": a.leave_running,
            })
        );
    } else if !a.quiet {
        eprintln!(
            "checkpointed process {}: {:.1} MiB of memory, stopped for {} ms{}",
            a.pid,
            done.memory_bytes as f64 / (1 << 20) as f64,
            done.frozen.as_millis(),
            if a.leave_running {
                if done.rounds.is_empty() {
                    ", left running".to_string()
                } else {
                    format!(
                        ", left running (memory saved in {} rounds while it ran)",
                        done.rounds.len() - 1
                    )
                }
            } else {
                String::new()
            }
        );
    }
    Ok(0)
}

/// A file whose writing back to its disk is started as it is written (every 32 MiB), when
/// it will be synced at the end: the fdatasync then waits for less.
struct WriteBehind {
    inner: std::fs::File,
    start: bool,
    written: u64,
    started: u64,
}

impl Write for WriteBehind {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.written += n as u64;
        if self.start && self.written - self.started >= 32 << 20 {
            use std::os::fd::AsRawFd;
            let _ = mosix_ckpt::sys::start_writeback(
                self.inner.as_raw_fd(),
                self.started,
                self.written - self.started,
            );
            self.started = self.written;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Counts the bytes written through it.
struct Counting<W: Write> {
    inner: W,
    n: u64,
}

impl<W: Write> Counting<W> {
    fn new(inner: W) -> Self {
        Counting { inner, n: 0 }
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn progress_bar() -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let b = indicatif::ProgressBar::new(0);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})",
        )
        .ok()?
        .progress_chars("=> "),
    );
    b.set_message("checkpoint");
    Some(b)
}

trait OwnedFd {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}
impl OwnedFd for std::io::Stdout {
    fn as_fd_owned(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.as_fd().try_clone_to_owned()
    }
}
