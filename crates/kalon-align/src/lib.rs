//! Ranked DPO alignment (after Zhang et al., arXiv 2406.09397).
//!
//! - [`algorithm`]: the score, the Ranked DPO loss, D_po construction and
//!   the HPIR-style agreement, in one place, as `docs/ALGORITHM.md` states
//!   them.
//! - [`pairs`]: the preference pair every source (D_po, clicks, ratings,
//!   LMM judgments) produces.
//! - [`scorer`]: aesthetic scorers behind one trait.
//! - [`feedback`]: pairs from clicks, ratings and judgments, clicks weighted
//!   by inverse position propensity; [`propensity`] estimates that
//!   propensity from the traffic (intervention harvesting).

pub mod adapter;
pub mod algorithm;
pub mod dataset;
pub mod dpo;
pub mod eval;
pub mod feedback;
pub mod lmm;
pub mod pairs;
pub mod pipeline;
pub mod propensity;
pub mod scorer;
pub mod train;

/// Query rephrasing lives with the LLM client; re-exported where D_po uses it.
pub use kalon_llm::rephrase;
pub use lmm::{ImageSource, LmmScorer};
pub use pairs::{PairSource, PreferencePair};
pub use scorer::{AestheticScorer, Candidate, LowLevelScorer, ModelScorer};
