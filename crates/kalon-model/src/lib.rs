//! Kalon's reference two-tower model: its candle definition ([`model`]),
//! contrastive pretraining ([`train`]), Kalon's own ONNX writer
//! ([`onnx`]) and export to an encoder directory ([`export`]), and the
//! retrieval metrics ([`eval`]).

pub mod eval;
pub mod export;
pub mod model;
pub mod onnx;
pub mod train;

pub use model::{ModelConfig, Pooling, TwoTower};
