//! One module per subcommand; each has `Args` (clap) and `run(Args) -> anyhow::Result<i32>`
//! returning the process exit code.

pub mod benchcalls;
pub mod benchckpt;
pub mod benchfam;
pub mod benchmig;
pub mod checkpoint;
pub mod fs;
pub mod mon;
pub mod procs;
pub mod restart;
pub mod run;
pub mod sim;
pub mod status;
pub mod testbed;

/// The MOSIX program names that `mosix` answers to when invoked under them (symlinks),
/// with the subcommand each one is.
pub const ALIASES: [(&str, &str); 4] = [
    ("mosrun", "run"),
    ("migrate", "migrate"),
    ("mon", "mon"),
    ("mosctl", "mosctl"),
];
