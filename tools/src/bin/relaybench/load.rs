//! `relaybench load` (placeholder until implemented).

/// Options of `relaybench load`.
#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("relaybench load is not implemented yet")
}
