//! The daemon: the trusted control plane. It reads build specs, starts
//! runners through executors, follows their jobs, checks what they pushed,
//! signs provenance and publishes it. Steps never run here.
//!
//! # Layout
//! - [`spec`]: `custody.yaml`, parsed once into a checked [`spec::Spec`];
//!   [`source`]: where a build's source comes from (git, or a directory).
//! - [`bounds`]: what every step is held to (disk, logs, step ids, image
//!   sizes) and the daemon's own log backstop.
//! - [`build`]: one build as typed stages — plan (resolve source and step
//!   images, preflight destinations), run (dispatch the job, keep its log),
//!   publish (check → sign → attach → tag), each stage's output the next
//!   one's only input, all under one stop (cancel, and the build's
//!   deadline); [`build::BuildError`] says which stage failed.
//! - [`policy`]: what a service build may fetch, where it may push and
//!   whether its spec may come with the request ([`policy::ServicePolicy`]).
//! - [`executor`]: the `Executor` trait and its implementations, [`local`]
//!   (a child process) and [`slurm`] (a Slurm batch job).
//! - [`dispatch`]: one job's life: register a waiter, start the runner,
//!   wait for it to authenticate, hand it the job, follow its events.
//! - [`record`]: what a build's record is made of — [`record::BuildId`],
//!   [`record::Timestamp`] — and the [`record::Clock`] times come from.
//! - [`store`]: builds, logs and leases in SQLite or PostgreSQL;
//!   [`queue`]: claims queued builds, renews leases (on a clock passed in),
//!   runs them, fails or requeues those whose daemon died.
//! - [`embedded`]: the daemon `custody build` starts in-process.

#![forbid(unsafe_code)]

pub mod bounds;
pub mod build;
pub mod dispatch;
pub mod embedded;
pub mod executor;
pub mod local;
pub mod policy;
pub mod queue;
pub mod record;
pub mod secrets;
pub mod signer;
pub mod slurm;
pub mod source;
pub mod spec;
pub mod store;

pub use dispatch::{Dispatcher, JobError, JobReport};
pub use executor::{Executor, ExecutorError, ExecutorSettings, Launch, RunnerProcess};
