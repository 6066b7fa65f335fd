//! `mosixd`: the MOSIX node daemon (the logic is the `mosixd` library).

use clap::Parser;
use std::path::PathBuf;
use tracing::error;

#[derive(Parser)]
#[command(
    name = "mosixd",
    version,
    about = "MOSIX node daemon: gossips this node's load and learns the cluster's",
    long_about = "MOSIX node daemon.\n\n\
        Every node of a MOSIX cluster runs mosixd. It measures this node's load (runnable \
        processes per unit of CPU speed, utilisation, memory, processes), spreads it by gossip \
        to the nodes of the cluster map, and learns theirs; there is no master. Gossip is \
        authenticated and encrypted with the cluster secret: datagrams from nodes without it \
        are dropped and counted.\n\n\
        Node-to-node streams (migration, links to a process's home) are authenticated with \
        the cluster secret and each node's own key: a node cannot claim another's number. \
        Make a node's key with `mosixd --gen-key /etc/mosix/node.key` and add the line it \
        prints to public_keys_file, the same file on every node. Without private_key_file \
        and public_keys_file mosixd still starts, with a warning, and any node with the \
        secret can then pass for any other (see docs/security.md).\n\n\
        `mosix status` and `mon` read the result through the control socket; scripts can read \
        status.json next to the control socket (/run/mosix/status.json by default, \
        rewritten every second). With metrics_listen = \"ADDR:PORT\" in the config, mosixd \
        also serves Prometheus metrics (mosix_*) at http://ADDR:PORT/metrics.\n\n\
        Minimal /etc/mosix/mosix.toml:\n\n  \
        node = 1\n  \
        secret_file = \"/etc/mosix/secret\"   # chmod 600, owned by root\n  \
        private_key_file = \"/etc/mosix/node.key\"    # mosixd --gen-key\n  \
        public_keys_file = \"/etc/mosix/nodes.keys\"  # lines NODE KEY, for every node\n  \
        state_dir = \"/var/lib/mosix\"\n  \
        [[map]]\n  \
        node = 1\n  \
        address = \"192.168.1.10\"           # nodes 1..4 at .10 .. .13\n  \
        count = 4\n\n\
        Logging: MOSIXD_LOG=debug (tracing env-filter syntax).",
    after_help = "Examples:\n  \
        mosixd --config /etc/mosix/mosix.toml --check    # validate config, secret and keys\n  \
        mosixd --gen-key /etc/mosix/node.key             # this node's key; prints NODE KEY\n  \
        systemctl enable --now mosixd                    # run it as a service\n  \
        MOSIXD_LOG=debug mosixd -c /etc/mosix/mosix.toml # in the foreground, verbose\n  \
        curl -s http://127.0.0.1:9464/metrics            # with metrics_listen set"
)]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = mosix_proto::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Check the configuration, the secret and the key files, print a summary, and exit.
    #[arg(long)]
    check: bool,
    /// Measure this machine's (or this cgroup's) CPU speed for 1 s, print it, and exit.
    #[arg(long)]
    measure_speed: bool,
    /// Make a new private key for this node in PATH (mode 0600; an existing file is never
    /// overwritten), print the line `NODE PUBLIC-KEY` to add to public_keys_file on every
    /// node (NODE from --config; just the key if the config cannot be read), and exit.
    #[arg(long, value_name = "PATH")]
    gen_key: Option<PathBuf>,
    /// (install helper) print mosixd's man page (roff) and exit.
    #[arg(long, hide = true)]
    man_page: bool,
    /// (install helper) print a completion script for SHELL and exit.
    #[arg(long, hide = true, value_name = "SHELL")]
    completions: Option<mosix_doc::Shell>,
}

fn main() {
    mosix_remote::keep_heap();
    // A supervisor of a guest, the mover of a leaving process and the freezer of a frozen
    // one are this program again (see procs::supervisor, procs::mover, procs::checkpoint).
    let helper = std::env::args()
        .nth(1)
        .filter(|a| a == "supervise" || a == "move" || a == "freeze");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOSIXD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if let Some(role) = helper {
        // Started as /proc/self/exe: named as the daemon, not "exe". A helper is an
        // ordinary process for the OOM killer again; a supervisor, and the process it
        // restores until it runs, is its first choice in the node: out of memory in a
        // restore, the restore fails, not the daemon (which cannot lower its own score
        // without CAP_SYS_RESOURCE, missing in some containers and VMs). The restored
        // process is set back to 0 once it runs.
        mosixd::procs::supervisor::name_self();
        let score = if role == "move" || role == "freeze" {
            "0"
        } else {
            "500"
        };
        let _ = std::fs::write("/proc/self/oom_score_adj", score);
        std::process::exit(match role.as_str() {
            "move" => mosixd::procs::mover::main(),
            "freeze" => mosixd::procs::checkpoint::freezer_main(),
            _ => mosixd::procs::supervisor::main(),
        });
    }
    let args = Args::parse();
    // Out of memory in its node (a process restored into a memory limit too small), the
    // kernel kills the process being restored, not the daemon every job depends on.
    // Needs CAP_SYS_RESOURCE (else it stays 0, and the supervisors' 500 does it). Its
    // helpers set their own (above).
    let _ = std::fs::write("/proc/self/oom_score_adj", "-900");
    if args.man_page || args.completions.is_some() {
        use clap::CommandFactory;
        let mut out = std::io::stdout();
        if let Some(shell) = args.completions {
            mosix_doc::completion(shell, Args::command(), "mosixd", &mut out);
            return;
        }
        let see = [
            "mosix(1)".to_string(),
            "mosrun(1)".to_string(),
            "mon(1)".to_string(),
        ];
        if let Err(e) = mosix_doc::write_man(Args::command(), "8", &see, &mut out) {
            eprintln!("mosixd: cannot write the man page: {e}");
            std::process::exit(1);
        }
        return;
    }
    let opts = mosixd::Options {
        config: args.config,
        check: args.check,
        measure_speed: args.measure_speed,
        gen_key: args.gen_key,
    };
    if let Err(e) = mosixd::run(opts) {
        error!("{e:#}");
        eprintln!("mosixd: {e:#}");
        std::process::exit(1);
    }
}
