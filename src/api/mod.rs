//! The `migrate.io` API: the `PodMigration` resource, the annotations users set on pods and
//! the names derived from them. Everything here is data; no I/O.

mod annotations;
mod podmigration;

pub use annotations::*;
pub use podmigration::*;
