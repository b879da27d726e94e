//! Admission webhooks: `/validate/eviction` intercepts evictions of stateful pods and
//! `/mutate/pod` steers their replacement pods onto the checkpoint.
//!
//! The decisions ([`eviction::decide`], [`pod::decide`]) are pure functions of the request
//! and a snapshot of the cluster; [`server`] does the I/O around them.

pub mod eviction;
pub mod hold;
pub mod namespaces;
pub mod pod;
pub mod review;
pub mod server;
