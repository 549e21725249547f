//! `kalon-sim-llm`: the simulated world's OpenAI-compatible endpoint as its
//! own program (point `KALON_LLM_BASE_URL` at it).

use clap::Parser;

#[derive(Parser)]
#[command(
    version,
    about = "The simulated world's OpenAI-compatible LLM/LMM endpoint"
)]
struct Cli {
    #[command(flatten)]
    serve: kalon_sim_llm::cli::ServeArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kalon_sim_llm::cli::serve(&Cli::parse().serve).await
}
