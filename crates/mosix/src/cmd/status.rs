//! `mosix status` (issue 3: not built yet).

/// Not built yet (issue 3).
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_a: Args) -> anyhow::Result<i32> {
    anyhow::bail!("'status' is not available yet in this build")
}
