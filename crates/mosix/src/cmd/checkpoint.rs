//! `mosix checkpoint`: freeze a process and write its image.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use mosix_ckpt::{Compression, DumpOptions, Error};

/// Freeze a running process and save its complete state to an image.
///
/// The process is stopped, its memory, registers, signal state and open files are
/// written to IMAGE, and then it is killed (default) or let go on (--leave-running).
/// `mosix restart IMAGE` brings it back, here or on another machine with the same files.
/// Processes that cannot be restored faithfully (several threads, shared memory, open
/// sockets or pipes other than standard input/output/error, ...) are refused before they
/// are touched; --check lists every reason.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  mosix checkpoint 4242 -o job.img           # save and stop process 4242\n  mosix checkpoint 4242 -o job.img --leave-running --compress zstd\n  mosix checkpoint --check 4242               # can it be checkpointed? why not?\n  mosix checkpoint 4242 -o - | ssh other mosix restart -"
)]
pub struct Args {
    /// The process to checkpoint.
    pub pid: i32,
    /// Where to write the image: a file, or `-` for standard output.
    #[arg(short, long, value_name = "IMAGE", required_unless_present = "check")]
    pub output: Option<PathBuf>,
    /// Let the process go on running after the checkpoint instead of killing it.
    #[arg(long)]
    pub leave_running: bool,
    /// Compression of the image body.
    #[arg(long, value_name = "none|lz4|zstd", default_value = "none")]
    pub compress: Compression,
    /// Only say whether PID can be checkpointed and, if not, every reason; touch nothing.
    #[arg(long, conflicts_with_all = ["output", "leave_running"])]
    pub check: bool,
    /// Print nothing on success.
    #[arg(short, long)]
    pub quiet: bool,
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
    let out = a.output.expect("required by clap");
    let opts = DumpOptions {
        leave_running: a.leave_running,
        compression: a.compress,
    };
    let bar = progress_bar();
    let mut progress = |done: u64, total: u64| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    };
    let stats = if out.as_os_str() == "-" {
        let stdout = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::from(std::io::stdout().as_fd_owned().context("standard output")?),
        );
        let (mut w, stats) = mosix_ckpt::checkpoint(a.pid, stdout, opts, &mut progress)?;
        w.flush()?;
        stats
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
        let w = std::io::BufWriter::with_capacity(1 << 20, file);
        let (w, stats) = mosix_ckpt::checkpoint(a.pid, w, opts, &mut progress)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_data().ok();
        path.persist(&out)
            .with_context(|| format!("cannot write {}", out.display()))?;
        stats
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if !a.quiet {
        eprintln!(
            "checkpointed process {}: {:.1} MiB of memory, stopped for {} ms{}",
            a.pid,
            stats.memory_bytes as f64 / (1 << 20) as f64,
            stats.frozen.as_millis(),
            if a.leave_running {
                ", left running"
            } else {
                ""
            }
        );
    }
    Ok(0)
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
