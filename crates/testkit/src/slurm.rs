//! A real Slurm cluster for a test: `scripts/slurm-cluster up`, torn down
//! with `down` when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct SlurmCluster {
    script: PathBuf,
    /// `SLURM_CONF` for the Slurm commands.
    pub conf: String,
    /// The bridge address: where the nodes reach the host.
    pub host_addr: String,
    /// Node name and address, for each node.
    pub nodes: Vec<(String, String)>,
}

impl SlurmCluster {
    /// Brings up a cluster of `nodes` slurmd nodes, each in its own network
    /// namespace. Needs root; panics with the script's output otherwise.
    pub fn up(workspace: &Path, nodes: usize) -> Self {
        let script = workspace.join("scripts/slurm-cluster");
        let output = Command::new(&script)
            .arg("up")
            .arg(nodes.to_string())
            .output()
            .expect("scripts/slurm-cluster runs");
        assert!(
            output.status.success(),
            "scripts/slurm-cluster up failed (it needs root):\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let value = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .map(str::to_owned)
        };
        let nodes = text
            .lines()
            .filter_map(|l| l.strip_prefix("node="))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, a)| (n.to_owned(), a.to_owned()))
            .collect();
        Self {
            script,
            conf: value("SLURM_CONF=").expect("the script prints SLURM_CONF"),
            host_addr: value("bridge=").expect("the script prints the bridge address"),
            nodes,
        }
    }

    /// Brings the cluster down now (also done on drop).
    pub fn down(&self) {
        let _ = Command::new(&self.script).arg("down").status();
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        self.down();
    }
}
