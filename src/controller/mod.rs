//! The migration controller: leader-elected, drives each PodMigration through its phases
//! with all state in the API server.
//!
//! * [`reconcile`]: the kube-rs `Controller` and the finalizer;
//! * `phase`: one file per phase (the I/O of each step);
//! * [`decide`], [`placement`], [`state`]: pure decisions, unit-tested without a cluster;
//! * [`context`]: what the steps share (caches, clients, slots, status writes, Events);
//! * [`signer`]: signs the per-node agent certificates (CertificateSigningRequest API).

pub mod agents;
pub mod context;
pub mod decide;
pub mod events;
pub mod leader;
mod phase;
pub mod placement;
pub mod pull;
pub mod quantity;
pub mod reconcile;
pub mod signer;
pub mod state;

pub use context::{Config, Context};
pub use reconcile::run;
