//! The migration controller: leader-elected, drives each PodMigration through its phases
//! with all state in the API server.

pub mod agents;
pub mod leader;
pub mod placement;
pub mod quantity;
pub mod reconcile;
pub mod state;

pub use reconcile::{Config, Context, run};
