//! One module per subcommand; each has `Args` (clap) and `run(Args) -> anyhow::Result<i32>`
//! returning the process exit code.

pub mod benchmig;
pub mod checkpoint;
pub mod mon;
pub mod procs;
pub mod restart;
pub mod run;
pub mod sim;
pub mod status;
pub mod testbed;

/// The MOSIX program names that `mosix` answers to when invoked under them (symlinks).
pub fn alias(argv0: &str) -> Option<&'static str> {
    match argv0 {
        "mon" => Some("mon"),
        "mosrun" => Some("run"),
        "migrate" => Some("migrate"),
        "mosctl" => Some("mosctl"),
        _ => None,
    }
}
