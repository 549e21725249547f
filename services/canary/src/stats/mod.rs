//! Statistics behind a canary verdict.

pub mod sequential;
