//! Test support for kube-migrate.
//!
//! `test-kubelet` plays the kubelet of one node against a real control plane
//! (`cluster/up.sh`): it registers and keeps alive its Node, runs the pods bound to it as
//! simulated containers (a counter, optional deterministic "memory", a log), serves the
//! kubelet checkpoint API (KEP-2008) with real delegated authn/authz, writes checkpoint
//! archives in the CRI-O layout, serves container logs to the API server, and restores
//! containers from kube-migrate checkpoint images.
//!
//! * [`container`]: a container, simulated or real.
//! * [`crun`]: real containers with crun and CRIU (`kube-migrate.test/*` images).
//! * [`checkpoint`]: checkpoint archives (writer).
//! * [`restore`]: pulling checkpoint images and reading the state back.
//! * [`pull_secrets`]: registry credentials from a pod's `imagePullSecrets`.
//! * [`auth`]: TokenReview + SubjectAccessReview.
//! * [`node`]: Node registration, Lease, heartbeat.
//! * [`pods`]: the pod watch and the pods' lifecycle.
//! * [`server`]: the kubelet HTTPS API.
//! * [`app`]: options and the main loop.

pub mod app;
pub mod auth;
pub mod checkpoint;
pub mod container;
pub mod crun;
pub mod node;
pub mod pods;
pub mod pull_secrets;
pub mod restore;
pub mod server;
