//! Values that must never reach a log: [`Secret`] (an API key, a token) and
//! [`DatabaseUrl`] (a URL that may carry a password).
//!
//! Both print redacted through `Debug` and `Display`, so a settings struct
//! holding them can derive `Debug` and be logged whole. The value itself is
//! read with `expose()`, a name that is easy to look for in a review.
//! Neither implements `Serialize`: writing a secret out is done on purpose,
//! through `expose()`.

use std::convert::Infallible;
use std::ffi::OsStr;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// What a [`Secret`] prints instead of its value.
pub const REDACTED: &str = "[redacted]";

/// A value that prints as `[redacted]`; [`Secret::expose`] reads it.
///
/// Parsed from a string by [`FromStr`] (the inner type's), by serde (the
/// inner type's `Deserialize`) and by clap: a flag of type `Secret<T>`
/// gets [`SecretValueParser`], whose errors never echo the value (clap's
/// own errors quote what was given).
#[derive(Clone)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The value itself: for the one place that uses it, never for a log.
    pub fn expose(&self) -> &T {
        &self.0
    }

    /// The value, unwrapped.
    pub fn into_exposed(self) -> T {
        self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl<T> From<T> for Secret<T> {
    fn from(value: T) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret<String> {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

/// The inner type's parsing; its error is returned as it is (the standard
/// library's parse errors do not quote the input).
impl<T: FromStr> FromStr for Secret<T> {
    type Err = T::Err;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Secret)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        T::deserialize(deserializer).map(Secret)
    }
}

impl<T> clap::builder::ValueParserFactory for Secret<T>
where
    T: FromStr + Clone + Send + Sync + 'static,
{
    type Parser = SecretValueParser<T>;

    fn value_parser() -> Self::Parser {
        SecretValueParser(PhantomData)
    }
}

/// Parses a [`Secret`] flag with the inner type's [`FromStr`]; a value that
/// does not parse is named by its flag, never quoted.
pub struct SecretValueParser<T>(PhantomData<fn() -> T>);

impl<T> Clone for SecretValueParser<T> {
    fn clone(&self) -> Self {
        SecretValueParser(PhantomData)
    }
}

impl<T> clap::builder::TypedValueParser for SecretValueParser<T>
where
    T: FromStr + Clone + Send + Sync + 'static,
{
    type Value = Secret<T>;

    fn parse_ref(
        &self,
        command: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<Secret<T>, clap::Error> {
        value
            .to_str()
            .and_then(|text| text.parse().ok())
            .map(Secret)
            .ok_or_else(|| {
                let name = arg.map_or_else(|| "a secret".to_owned(), |a| a.to_string());
                clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!(
                        "the value of {name} is not a valid {} (the value is not shown)\n",
                        std::any::type_name::<T>()
                    ),
                )
                .with_cmd(command)
            })
    }
}

/// A database URL whose password never prints: `Debug` and `Display` show
/// it as `postgres://kalon:***@host/db` (see [`kalon_db::redact`]).
/// [`DatabaseUrl::expose`] gives the URL to connect with.
#[derive(Clone)]
pub struct DatabaseUrl(Secret<String>);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(Secret(url.into()))
    }

    /// The URL with its password: to connect, never to print.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        kalon_db::redact(self.expose())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        DatabaseUrl::new(url)
    }
}

impl From<&str> for DatabaseUrl {
    fn from(url: &str) -> Self {
        DatabaseUrl::new(url)
    }
}

/// Never fails: a malformed URL is refused when connecting, with the
/// redacted URL in the error (clap would quote a refused value whole).
impl FromStr for DatabaseUrl {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Infallible> {
        Ok(DatabaseUrl::new(s))
    }
}

impl<'de> Deserialize<'de> for DatabaseUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(DatabaseUrl::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_prints_redacted_and_exposes_its_value() {
        let key: Secret<String> = "sk-live-1234".parse().unwrap();
        assert_eq!(format!("{key:?}"), "[redacted]");
        assert_eq!(format!("{key}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(key.clone())), "Some([redacted])");
        assert_eq!(key.expose(), "sk-live-1234");
        assert_eq!(Secret::<String>::from("x").into_exposed(), "x");
        let number: Result<Secret<u16>, _> = "70000".parse();
        assert!(number.is_err());
    }

    #[test]
    fn secrets_deserialize_and_database_urls_hide_their_password() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)] // read through Debug only
        struct Settings {
            api_key: Secret<String>,
            database_url: DatabaseUrl,
        }
        let settings: Settings = serde_json::from_str(
            r#"{"api_key": "sk-hidden", "database_url": "postgres://kalon:hunter2@db:5432/kalon"}"#,
        )
        .unwrap();
        let printed = format!("{settings:?}");
        assert!(!printed.contains("sk-hidden"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(
            printed.contains(r#"database_url: "postgres://kalon:***@db:5432/kalon""#),
            "{printed}"
        );
        assert_eq!(
            settings.database_url.to_string(),
            "postgres://kalon:***@db:5432/kalon"
        );
        assert_eq!(
            settings.database_url.expose(),
            "postgres://kalon:hunter2@db:5432/kalon"
        );
        let query = DatabaseUrl::new("postgres://kalon@db/kalon?password=hunter2&sslmode=require");
        assert!(!format!("{query:?}").contains("hunter2"), "{query:?}");
    }

    #[test]
    fn clap_never_quotes_a_secret_that_does_not_parse() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Cli {
            #[arg(long)]
            pin: Secret<u16>,
        }
        let cli = Cli::try_parse_from(["cli", "--pin", "4321"]).unwrap();
        assert_eq!(*cli.pin.expose(), 4321);
        assert_eq!(format!("{cli:?}"), "Cli { pin: [redacted] }");
        let error = Cli::try_parse_from(["cli", "--pin", "98765"])
            .unwrap_err()
            .to_string();
        assert!(!error.contains("98765"), "{error}");
        assert!(error.contains("--pin"), "{error}");
    }
}
