//! Statistics behind a canary verdict.

pub mod sequential;

#[cfg(test)]
mod interleaved_tests;
