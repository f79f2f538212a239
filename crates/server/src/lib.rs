//! `custody serve`: the daemon as a service. A durable queue (SQLite, or
//! PostgreSQL shared by several daemons) worked by [`custody_daemon::queue`],
//! and an HTTP API over it: submit, list, show, follow logs, cancel,
//! provenance, public keys, health and Prometheus metrics.
//!
//! # Layout
//! - [`api`]: the JSON types on the wire (the OpenAPI schema comes from them).
//! - [`http`]: routes, bearer-token auth, errors, log streaming.
//! - [`follow`]: one store poll per followed build, shared by its followers.
//! - [`connections`]: the accept loop: connection caps, header deadline.
//! - [`serve`]: one process from start to a clean stop.
//! - [`config`]: the TOML configuration file.
//! - [`client`]: the API's client, for the CLI.

pub mod api;
pub mod client;
pub mod config;
pub mod connections;
pub mod follow;
pub mod http;
pub mod metrics;
pub mod serve;
