//! One question to the model, parsed, with the one retry a malformed answer
//! gets: the same question in its strict form.

use crate::client::{Completion, LlmClient, LlmError};
use crate::prompts::ParseError;
use crate::protocol::Message;

/// A parsed answer, with any refused answer before it (to be recorded).
#[derive(Debug, Clone)]
pub struct Answer<T> {
    pub value: T,
    pub completion: Completion,
    /// Whether the strict prompt was needed.
    pub strict: bool,
    pub refused: Vec<(Completion, ParseError)>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum AskError {
    /// The endpoint failed (after the client's own retries); the work
    /// should wait and be tried again.
    #[error(transparent)]
    Llm(#[from] LlmError),
    /// Both the normal and the strict answers were unusable: dead-letter it.
    #[error("{} answers could not be parsed; last: {}", .refused.len(), .refused.last().map(|r| r.1.to_string()).unwrap_or_default())]
    Malformed {
        refused: Vec<(Completion, ParseError)>,
    },
}

/// Asks `build(false)`; if the answer does not parse, asks `build(true)`.
/// `task` names the question in the client's metrics (`rephrase`,
/// `compare`, `score`, `rank`).
pub async fn ask<T>(
    client: &LlmClient,
    task: &'static str,
    build: impl Fn(bool) -> Vec<Message>,
    parse: impl Fn(&str) -> Result<T, ParseError>,
) -> Result<Answer<T>, AskError> {
    let mut refused = Vec::new();
    for strict in [false, true] {
        let completion = client.chat_for(task, build(strict)).await?;
        match parse(&completion.text) {
            Ok(value) => {
                return Ok(Answer {
                    value,
                    completion,
                    strict,
                    refused,
                })
            }
            Err(error) => {
                tracing::debug!(strict, %error, "model answer refused");
                refused.push((completion, error));
            }
        }
    }
    Err(AskError::Malformed { refused })
}
