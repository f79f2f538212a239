//! The daemon: the trusted control plane. So far it starts runners through
//! executors and dispatches jobs to them over the runner connection.
//!
//! # Layout
//! - [`executor`]: the `Executor` trait and its implementations, [`local`]
//!   (a child process) and [`slurm`] (a Slurm batch job).
//! - [`dispatch`]: one job's life: register a waiter, start the runner,
//!   wait for it to authenticate, hand it the job, follow its events.

#![forbid(unsafe_code)]

pub mod bounds;
pub mod build;
pub mod dispatch;
pub mod embedded;
pub mod executor;
pub mod local;
pub mod queue;
pub mod slurm;
pub mod spec;
pub mod store;

pub use dispatch::{Dispatcher, JobError, JobReport};
pub use executor::{Executor, ExecutorError, ExecutorSettings, Launch, RunnerProcess};
