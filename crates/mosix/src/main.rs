//! `mosix`: the MOSIX command line. Thin: parsing and printing only, the work is in the
//! library crates. Also answers to the MOSIX names through argv[0] (see `alias`).

mod cmd;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "mosix",
    version,
    about = "MOSIX for today's Linux: a cluster of machines that behaves like one computer",
    long_about = "MOSIX for today's Linux: a cluster of machines that behaves like one computer.\n\n\
        Processes started on a node can be checkpointed, restarted, and (with mosixd running) \
        migrate to the node where they finish soonest.",
    after_help = "Examples:\n  \
        mosrun ./simulate < input &      # (= mosix run) start a migratable job here\n  \
        mosix status                     # the cluster: every node's status, load, CPUs\n  \
        mosix ps                         # this node's jobs: where and why\n  \
        migrate 4321 3                   # move job 4321 to node 3 (0 or home: back)\n  \
        mon                              # the MOSIX monitor\n  \
        mosix fs /mnt/mosix              # nodes/N/status, procs/PID/where, .../goto\n  \
        mosix completions bash > /etc/bash_completion.d/mosix"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Run(cmd::run::Args),
    Migrate(cmd::procs::MigrateArgs),
    Where(cmd::procs::WhereArgs),
    Ps(cmd::procs::PsArgs),
    Mosctl(cmd::procs::MosctlArgs),
    Sim(cmd::sim::Args),
    Checkpoint(cmd::checkpoint::Args),
    Restart(cmd::restart::Args),
    Status(cmd::status::Args),
    Mon(cmd::mon::Args),
    Testbed(cmd::testbed::Args),
    Fs(cmd::fs::Args),
    Completions(CompletionsArgs),
    /// (install helper) write the man pages of mosix, its subcommands and its MOSIX names
    /// into DIR.
    #[command(name = "__man-pages", hide = true)]
    ManPages {
        dir: std::path::PathBuf,
    },
    /// (benchmark helper) touch MIB MiB of memory, print "ready PID", wait for a line.
    #[command(name = "__touch", hide = true)]
    Touch {
        mib: u64,
        /// MiB per second written to it until the line comes.
        #[arg(long, default_value_t = 0.0)]
        dirty: f64,
    },
    /// (benchmark helper) write MIB MiB of memory over PASSES times; see bench-checkpoint.
    #[command(name = "__churn", hide = true)]
    Churn {
        mib: u64,
        passes: u64,
    },
    /// (benchmark helper) with FILE open, make the calls asked on stdin; see bench-calls.
    #[command(name = "__calls", hide = true)]
    Calls {
        file: std::path::PathBuf,
        shared: std::path::PathBuf,
    },
    /// (mosrun -R helper) print MESSAGE on stderr and exit 1: what a process becomes
    /// when its restore fails after it began.
    #[command(name = "__fail", hide = true)]
    Fail {
        message: String,
    },
    /// (benchmark helper) accept one TCP connection at ADDR and read it to the end.
    #[command(name = "__net-sink", hide = true)]
    NetSink {
        addr: String,
    },
    /// (benchmark helper) send MIB MiB to ADDR, print the seconds taken.
    #[command(name = "__net-source", hide = true)]
    NetSource {
        addr: String,
        mib: u64,
    },
    /// (benchmark helper) time N forks; under mosrun, also until children are migratable.
    #[command(name = "__forks", hide = true)]
    Forks {
        n: u32,
    },
    /// (benchmark helper) once file GO exists, write MIB MiB to stdout.
    #[command(name = "__pipe-writer", hide = true)]
    PipeWriter {
        go: std::path::PathBuf,
        mib: u64,
    },
    /// (benchmark helper) read stdin to its end; print the bytes and seconds.
    #[command(name = "__pipe-reader", hide = true)]
    PipeReader,
}

/// Print a shell completion script for mosix or one of its MOSIX names.
///
/// scripts/install.sh installs them for bash, zsh and fish; this prints one, e.g. for a
/// shell or a prefix the installer did not cover.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    source <(mosix completions bash)\n  \
    mosix completions bash --name mosrun > ~/.local/share/bash-completion/completions/mosrun\n  \
    mosix completions zsh > \"${fpath[1]}/_mosix\"\n  \
    mosix completions fish > ~/.config/fish/completions/mosix.fish")]
struct CompletionsArgs {
    /// bash, zsh, fish, elvish or powershell.
    shell: mosix_doc::Shell,
    /// The program name to complete: mosix, or one of the MOSIX names mosrun, migrate, mon,
    /// mosctl.
    #[arg(long, default_value = "mosix", value_parser = ["mosix", "mosrun", "migrate", "mon", "mosctl"])]
    name: String,
}

/// The clap command a program name runs: `mosix`, or the subcommand behind an alias.
fn command_named(name: &str) -> clap::Command {
    let root = Cli::command();
    match cmd::ALIASES.iter().find(|(a, _)| *a == name) {
        Some((alias, sub)) => match root.find_subcommand(sub) {
            Some(c) => mosix_doc::renamed(c.clone(), alias),
            None => root,
        },
        None => root,
    }
}

fn completions(a: CompletionsArgs) -> anyhow::Result<i32> {
    let cmd = command_named(&a.name);
    mosix_doc::completion(a.shell, cmd, &a.name, &mut std::io::stdout());
    Ok(0)
}

fn man_pages(dir: &std::path::Path) -> anyhow::Result<i32> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = mosix_doc::man_pages(
        Cli::command(),
        &cmd::ALIASES,
        "1",
        &["mosixd(8)".to_string()],
        dir,
    )
    .with_context(|| format!("writing man pages into {}", dir.display()))?;
    for f in files {
        println!("{}", f.display());
    }
    Ok(0)
}

/// Parses the command line. Under a MOSIX name (`mosrun`, `migrate`, `mon`, `mosctl`:
/// links to mosix) the arguments are those of that subcommand, and help and errors name
/// the program as it was called.
fn parse() -> Cli {
    use clap::FromArgMatches;
    let argv0 = std::env::args_os()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let Some(&(alias, sub)) = cmd::ALIASES.iter().find(|(a, _)| *a == argv0) else {
        return Cli::parse();
    };
    let Some(c) = Cli::command().find_subcommand(sub).cloned() else {
        return Cli::parse();
    };
    let m = mosix_doc::renamed(c, alias).get_matches();
    fn args<T: FromArgMatches>(m: &clap::ArgMatches) -> T {
        T::from_arg_matches(m).unwrap_or_else(|e| e.exit())
    }
    let command = match sub {
        "run" => Command::Run(args(&m)),
        "migrate" => Command::Migrate(args(&m)),
        "mon" => Command::Mon(args(&m)),
        _ => Command::Mosctl(args(&m)),
    };
    Cli { command }
}

fn main() {
    let cli = parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOSIX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(a) => cmd::run::run(a),
        Command::Migrate(a) => cmd::procs::migrate(a),
        Command::Where(a) => cmd::procs::where_(a),
        Command::Ps(a) => cmd::procs::ps(a),
        Command::Mosctl(a) => cmd::procs::mosctl(a),
        Command::Sim(a) => cmd::sim::run(a),
        Command::Checkpoint(a) => cmd::checkpoint::run(a),
        Command::Restart(a) => cmd::restart::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Mon(a) => cmd::mon::run(a),
        Command::Testbed(a) => cmd::testbed::run(a),
        Command::Fs(a) => cmd::fs::run(a),
        Command::Completions(a) => completions(a),
        Command::ManPages { dir } => man_pages(&dir),
        Command::Touch { mib, dirty } => cmd::benchmig::touch(mib, dirty),
        Command::Churn { mib, passes } => cmd::benchckpt::churn(mib, passes),
        Command::Calls { file, shared } => cmd::benchcalls::calls(&file, &shared),
        Command::Fail { message } => {
            eprintln!("{message}");
            Ok(1)
        }
        Command::NetSink { addr } => cmd::benchmig::net_sink(&addr),
        Command::NetSource { addr, mib } => cmd::benchmig::net_source(&addr, mib),
        Command::Forks { n } => cmd::benchfam::forks(n),
        Command::PipeWriter { go, mib } => cmd::benchfam::pipe_writer(&go, mib),
        Command::PipeReader => cmd::benchfam::pipe_reader(),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // One clear line: what failed and why (anyhow's chain joined by ": ").
            eprintln!("mosix: {e:#}");
            std::process::exit(1);
        }
    }
}
