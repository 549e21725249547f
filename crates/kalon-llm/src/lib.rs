//! Kalon's large-model side, over any OpenAI-compatible chat-completions
//! endpoint (OpenAI, Azure, vLLM, Ollama, llama.cpp server, or the simulated
//! world's own `kalon-sim-llm`, under `sim/`).
//!
//! - [`client`]: the HTTP client with concurrency limit, token-bucket rate
//!   limit, retries with backoff and jitter, circuit breaker, token budget.
//! - [`prompts`]: every prompt Kalon sends and robust parsing of answers;
//!   [`ask`]: one question with the strict retry a malformed answer gets.
//! - [`rephrase`]: query rephrasing behind one trait, with the paper's
//!   prompt variants (world and HTTP implementations).
//! - [`judge`]: the LMM judge, order-consistent comparisons and scores.

pub mod ask;
pub mod blocking;
pub mod client;
pub mod config;
pub mod judge;
pub mod limits;
mod metrics;
pub mod prompts;
pub mod protocol;
pub mod rephrase;

pub use client::{Completion, LlmClient, LlmError};
pub use config::LlmConfig;
pub use judge::{Judge, Tally, Verdict};
pub use prompts::{Aspect, ImageRef};
pub use rephrase::{PromptVariant, Rephraser};
