//! `relaybench ring` (placeholder until implemented).

/// Options of `relaybench ring`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("relaybench ring is not implemented yet")
}
