//! The migration controller.
pub mod placement;
pub mod quantity;
