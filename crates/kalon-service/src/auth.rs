//! The operator's bearer token on state-changing HTTP calls (the canary's
//! admin API, the console): `Authorization: Bearer <token>`. Missing: the
//! caller should answer 401 with `WWW-Authenticate`; wrong, or no token
//! configured: 403. The comparison is constant-time (both sides hashed,
//! then compared without an early exit); neither side is ever logged.

use sha2::{Digest, Sha256};

use crate::Secret;

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer <token>` header (401).
    Missing,
    /// This service has no token configured, so it refuses every call (403).
    NotConfigured,
    /// The token is not the operator's (403).
    Wrong,
}

impl Refusal {
    /// The HTTP status: 401 for a missing token, else 403.
    pub fn status(self) -> u16 {
        match self {
            Refusal::Missing => 401,
            Refusal::NotConfigured | Refusal::Wrong => 403,
        }
    }
}

/// The token of an `Authorization` header value (`Bearer <token>`), if any.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Checks an `Authorization` header value against the configured token.
pub fn check(
    authorization: Option<&str>,
    expected: Option<&Secret<String>>,
) -> Result<(), Refusal> {
    let given = bearer(authorization).ok_or(Refusal::Missing)?;
    let expected = expected.ok_or(Refusal::NotConfigured)?;
    if same_token(given, expected.expose()) {
        Ok(())
    } else {
        Err(Refusal::Wrong)
    }
}

/// Equal tokens, compared in time independent of where they differ.
pub fn same_token(given: &str, expected: &str) -> bool {
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(expected.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> Secret<String> {
        Secret::new(s.to_owned())
    }

    #[test]
    fn tokens_compare_equal_only_when_equal() {
        assert!(same_token("s3cret", "s3cret"));
        assert!(!same_token("s3cret", "s3cres"));
        assert!(!same_token("s3cret", "s3cret-longer"));
        assert!(!same_token("", "s3cret"));
    }

    #[test]
    fn missing_wrong_unconfigured_and_right() {
        let token = secret("op-s3cret");
        assert_eq!(check(None, Some(&token)), Err(Refusal::Missing));
        assert_eq!(check(Some("Bearer  "), Some(&token)), Err(Refusal::Missing));
        assert_eq!(
            check(Some("Basic op-s3cret"), Some(&token)),
            Err(Refusal::Missing)
        );
        assert_eq!(
            check(Some("Bearer op-s3cre"), Some(&token)),
            Err(Refusal::Wrong)
        );
        assert_eq!(
            check(Some("Bearer op-s3cret"), None),
            Err(Refusal::NotConfigured)
        );
        assert_eq!(check(Some("Bearer op-s3cret"), Some(&token)), Ok(()));
        assert_eq!(check(Some("bearer op-s3cret "), Some(&token)), Ok(()));
        assert_eq!(Refusal::Missing.status(), 401);
        assert_eq!(Refusal::Wrong.status(), 403);
    }
}
