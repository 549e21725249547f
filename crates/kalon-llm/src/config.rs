//! Where the model endpoint is and how hard Kalon may use it.

use std::time::Duration;

use kalon_service::Secret;

/// Settings of an [`crate::LlmClient`]. [`LlmConfig::from_env`] reads them
/// from `KALON_LLM_*` variables; every field has a default that suits a
/// hosted endpoint. `Debug` prints the API key as `[redacted]`.
#[derive(Debug, Clone)]
pub struct LlmConfig {
    /// Base URL up to and including `/v1`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer ...` when set.
    pub api_key: Option<Secret<String>>,
    /// Limit on one HTTP attempt, connection to last byte.
    pub timeout: Duration,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Token bucket: sustained requests per second and burst size.
    pub rate_per_s: f64,
    pub burst: u32,
    /// Retries after the first attempt, on 429, 5xx, timeouts, transport
    /// errors and unreadable bodies.
    pub max_retries: u32,
    /// Exponential backoff with full jitter: base * 2^attempt, capped.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Consecutive failed attempts that open the circuit breaker, and how
    /// long it stays open before one probe is let through.
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// Tokens (prompt + completion) allowed per rolling hour; 0 = no limit.
    pub budget_tokens_per_hour: u64,
    /// Price in US dollars per 1,000 tokens, for the recorded cost.
    pub usd_per_1k_tokens: f64,
}

impl LlmConfig {
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        LlmConfig {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(60),
            concurrency: 16,
            rate_per_s: 50.0,
            burst: 50,
            max_retries: 4,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(20),
            breaker_failures: 10,
            breaker_cooldown: Duration::from_secs(30),
            budget_tokens_per_hour: 0,
            usd_per_1k_tokens: 0.0,
        }
    }

    /// Reads `KALON_LLM_BASE_URL` (required), `KALON_LLM_MODEL`,
    /// `KALON_LLM_API_KEY` (or `OPENAI_API_KEY`), `KALON_LLM_TIMEOUT_MS`,
    /// `KALON_LLM_CONCURRENCY`, `KALON_LLM_RATE`, `KALON_LLM_BURST`,
    /// `KALON_LLM_MAX_RETRIES`, `KALON_LLM_BACKOFF_MS`,
    /// `KALON_LLM_BREAKER_FAILURES`, `KALON_LLM_BREAKER_COOLDOWN_MS`,
    /// `KALON_LLM_BUDGET_TOKENS_PER_HOUR`, `KALON_LLM_USD_PER_1K_TOKENS`.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`LlmConfig::from_env`] when `KALON_LLM_BASE_URL` is set and not
    /// empty; `None` when it is not, for a service whose model is optional
    /// (it then runs without it).
    pub fn from_env_if_set() -> anyhow::Result<Option<Self>> {
        Self::from_lookup_if_set(|name| std::env::var(name).ok())
    }

    /// As [`LlmConfig::from_env_if_set`], from any lookup (tests).
    pub fn from_lookup_if_set(
        get: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Self>> {
        if get("KALON_LLM_BASE_URL").is_some_and(|url| !url.is_empty()) {
            Self::from_lookup(get).map(Some)
        } else {
            Ok(None)
        }
    }

    /// As [`LlmConfig::from_env`], from any lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let base_url = get("KALON_LLM_BASE_URL").ok_or_else(|| {
            anyhow::anyhow!(
                "KALON_LLM_BASE_URL is not set: give the OpenAI-compatible endpoint up to /v1 \
                 (e.g. https://api.openai.com/v1, or http://127.0.0.1:8090/v1 for `kalon-sim-llm`)"
            )
        })?;
        let model = get("KALON_LLM_MODEL").unwrap_or_else(|| "gpt-4o-mini".to_owned());
        let mut config = LlmConfig::new(base_url, model);
        config.api_key = get("KALON_LLM_API_KEY")
            .or_else(|| get("OPENAI_API_KEY"))
            .map(Secret::new);
        let number = |name: &str| -> anyhow::Result<Option<f64>> {
            get(name)
                .map(|v| {
                    v.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite() && *x >= 0.0)
                        .ok_or_else(|| anyhow::anyhow!("{name}={v:?} is not a non-negative number"))
                })
                .transpose()
        };
        let ms = |x: f64| Duration::from_millis(x as u64);
        if let Some(v) = number("KALON_LLM_TIMEOUT_MS")? {
            config.timeout = ms(v);
        }
        if let Some(v) = number("KALON_LLM_CONCURRENCY")? {
            config.concurrency = v as usize;
        }
        if let Some(v) = number("KALON_LLM_RATE")? {
            config.rate_per_s = v;
        }
        if let Some(v) = number("KALON_LLM_BURST")? {
            config.burst = v as u32;
        }
        if let Some(v) = number("KALON_LLM_MAX_RETRIES")? {
            config.max_retries = v as u32;
        }
        if let Some(v) = number("KALON_LLM_BACKOFF_MS")? {
            config.backoff_base = ms(v);
        }
        if let Some(v) = number("KALON_LLM_BREAKER_FAILURES")? {
            config.breaker_failures = v as u32;
        }
        if let Some(v) = number("KALON_LLM_BREAKER_COOLDOWN_MS")? {
            config.breaker_cooldown = ms(v);
        }
        if let Some(v) = number("KALON_LLM_BUDGET_TOKENS_PER_HOUR")? {
            config.budget_tokens_per_hour = v as u64;
        }
        if let Some(v) = number("KALON_LLM_USD_PER_1K_TOKENS")? {
            config.usd_per_1k_tokens = v;
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let url = self.base_url.trim_end_matches('/');
        anyhow::ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "LLM base URL {url:?} must start with http:// or https://"
        );
        anyhow::ensure!(!self.model.trim().is_empty(), "LLM model name is empty");
        anyhow::ensure!(self.concurrency >= 1, "LLM concurrency must be at least 1");
        anyhow::ensure!(self.rate_per_s > 0.0, "LLM rate must be above 0 requests/s");
        anyhow::ensure!(self.burst >= 1, "LLM burst must be at least 1");
        anyhow::ensure!(!self.timeout.is_zero(), "LLM timeout must be above 0 ms");
        anyhow::ensure!(
            self.breaker_failures >= 1,
            "LLM breaker threshold must be at least 1 failure"
        );
        Ok(())
    }

    /// A copy to log: `base_url` through [`kalon_db::redact`], since an
    /// endpoint may carry a key in its URL (a proxy's `?api-key=`). The API
    /// key already prints as `[redacted]`.
    pub fn redacted(&self) -> Self {
        LlmConfig {
            base_url: kalon_db::redact(&self.base_url),
            ..self.clone()
        }
    }

    /// `base_url` + `/chat/completions`.
    pub fn completions_url(&self) -> String {
        format!("{}/chat/completions", self.base_url.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn environment_overrides_defaults_and_bad_values_are_named() {
        let config = LlmConfig::from_lookup(lookup(&[
            ("KALON_LLM_BASE_URL", "http://127.0.0.1:1/v1/"),
            ("OPENAI_API_KEY", "sk-test"),
            ("KALON_LLM_RATE", "2.5"),
            ("KALON_LLM_TIMEOUT_MS", "1500"),
        ]))
        .unwrap();
        assert_eq!(
            config.completions_url(),
            "http://127.0.0.1:1/v1/chat/completions"
        );
        assert_eq!(config.api_key.as_ref().unwrap().expose(), "sk-test");
        let printed = format!("{config:?}");
        assert!(!printed.contains("sk-test"), "{printed}");
        assert!(printed.contains("api_key: Some([redacted])"), "{printed}");
        assert_eq!(config.rate_per_s, 2.5);
        assert_eq!(config.timeout, Duration::from_millis(1500));
        assert_eq!(config.concurrency, 16);

        let missing = LlmConfig::from_lookup(lookup(&[])).unwrap_err();
        assert!(
            missing.to_string().contains("KALON_LLM_BASE_URL"),
            "{missing}"
        );
        let bad = LlmConfig::from_lookup(lookup(&[
            ("KALON_LLM_BASE_URL", "http://x/v1"),
            ("KALON_LLM_RATE", "fast"),
        ]))
        .unwrap_err();
        assert!(bad.to_string().contains("KALON_LLM_RATE=\"fast\""), "{bad}");
        let scheme =
            LlmConfig::from_lookup(lookup(&[("KALON_LLM_BASE_URL", "ftp://x")])).unwrap_err();
        assert!(scheme.to_string().contains("http://"), "{scheme}");
    }

    #[test]
    fn optional_endpoint_and_redacted_copy() {
        assert!(LlmConfig::from_lookup_if_set(lookup(&[]))
            .unwrap()
            .is_none());
        assert!(
            LlmConfig::from_lookup_if_set(lookup(&[("KALON_LLM_BASE_URL", "")]))
                .unwrap()
                .is_none()
        );
        assert!(
            LlmConfig::from_lookup_if_set(lookup(&[("KALON_LLM_BASE_URL", "ftp://x")])).is_err()
        );
        let config = LlmConfig::from_lookup_if_set(lookup(&[
            (
                "KALON_LLM_BASE_URL",
                "https://llm.example/v1?api-key=sk-2&deployment=d",
            ),
            ("KALON_LLM_MODEL", "m"),
        ]))
        .unwrap()
        .unwrap();
        let redacted = config.redacted();
        assert_eq!(
            redacted.base_url,
            "https://llm.example/v1?api-key=***&deployment=d"
        );
        assert_eq!(redacted.model, "m");
        assert!(config.base_url.contains("sk-2"));
    }
}
