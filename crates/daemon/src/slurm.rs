//! The Slurm executor: each runner is a batch job (placeholder until the
//! cluster support lands; see `SlurmExecutor`).
