//! Kalon's model registry, the one writer of what search serves.
//!
//! - [`store`]: model versions (`model_versions`), their image embeddings
//!   (`image_embeddings`) and the deployments that route traffic
//!   (`deployments`), as migrations/20261128000001_search.sql defines them.
//! - [`lifecycle`]: a version's states, the legal moves between them, and
//!   every move recorded in `model_transitions`; registering the trainer's
//!   versions.
//! - [`artifact`]: encoder directories in an object store, addressed and
//!   verified by the sha256 of their content.
//! - [`lineage`]: why a version exists: its chain of parents, their
//!   training runs, gates and transitions.
//! - [`indexer`]: a version's catalog embeddings into Postgres (an aligned
//!   version reuses its parent's through the adapter).
//! - [`deploy`]: a deployment written and announced on `model.deployment.v1`.
//!
//! Search only reads these tables; kalonctl (and the trainer and canary
//! controller) write them through this crate, so deploying a model never
//! needs the search service linked in.

pub mod artifact;
pub mod deploy;
pub mod indexer;
pub mod lifecycle;
pub mod lineage;
pub mod store;
