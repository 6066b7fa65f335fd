//! One module per subcommand; each has `Args` (clap) and `run(Args) -> anyhow::Result<i32>`
//! returning the process exit code.

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

/// The subcommand that the program name `argv0` stands for, if it is a MOSIX name.
pub fn alias(argv0: &str) -> Option<&'static str> {
    ALIASES.iter().find(|(a, _)| *a == argv0).map(|(_, s)| *s)
}
