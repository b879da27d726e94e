//! Wiring of the binaries: options (clap, with environment variables) and `run`.
//! The binaries' `main` only installs the crypto provider, parses and calls these.

pub mod agent;
pub mod kubectl;
pub mod webhook;
