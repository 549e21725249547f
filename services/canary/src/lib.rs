//! The canary controller (issue 24): decides whether a candidate model
//! version advances, is promoted or is rolled back, from online evidence.
//!
//! For now this crate holds only the pure parts, the statistics every verdict
//! is built from: [`stats::sequential`] (anytime-valid tests that may be
//! looked at after every batch) and [`interleave`] (team-draft interleaving
//! and its click credit). The service wiring (Kafka, Postgres, the rollout
//! ladder, the admin API) comes later. The methods and why they stay valid
//! under peeking are explained in `docs/CANARY_STATISTICS.md`.

pub mod interleave;
pub mod stats;
