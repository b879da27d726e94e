//! The node agent: checkpoints containers through its own kubelet, streams archives to the
//! target node's agent over mTLS, builds checkpoint images and serves them to its node's
//! runtime, and cleans up after itself.

pub mod api;
pub mod archive;
pub mod authz;
pub mod checkpoint;
pub mod chunks;
pub mod client;
pub mod consent;
pub mod cri;
pub mod expect;
pub mod freezer;
pub mod identity;
pub mod image;
pub mod incoming;
pub mod kubelet;
pub mod place;
pub mod prepare;
pub mod prepull;
pub mod private;
pub mod progress;
pub mod receive;
pub mod registry;
pub mod server;
pub mod source;
pub mod store;
pub mod transfer;
pub mod volumes;
