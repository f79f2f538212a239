//! `custody serve`'s configuration file (TOML). Every setting is optional
//! here; flags and the environment override it, defaults fill the rest.
//! `examples/serve.toml` shows each one.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the HTTP API listens.
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `postgres://…` to share the queue between daemons; default SQLite
    /// in the data directory.
    pub database_url: Option<String>,
    pub signing_key: Option<PathBuf>,
    pub builder_id: Option<String>,
    /// Bearer tokens the API accepts.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// This daemon's name in the store.
    pub daemon_name: Option<String>,
    /// Builds this daemon runs at once.
    pub concurrency: Option<usize>,
    pub lease_seconds: Option<u64>,
    pub poll_millis: Option<u64>,
    pub grace_seconds: Option<u64>,
    #[serde(default)]
    pub runners: Runners,
    #[serde(default)]
    pub executor: Executor,
    #[serde(default)]
    pub registry: Registry,
    /// Destinations `network: true` steps may reach although private,
    /// local or link-local: `HOST[:PORT]`, `IP[:PORT]` or `CIDR[:PORT]`.
    #[serde(default)]
    pub egress_allow: Vec<String>,
    /// The disk of a build whose spec sets none, e.g. `20GiB`.
    pub disk: Option<String>,
    /// How much of a build's log is stored, e.g. `64MiB`.
    pub log_limit: Option<String>,
    /// The host ids steps run as, `START:COUNT`.
    pub step_ids: Option<String>,
    /// Step images larger than this uncompressed are refused, e.g. `16GiB`.
    pub max_image_size: Option<String>,
    /// Step images with more layers are refused.
    pub max_image_layers: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runners {
    /// Where the runner connector listens.
    pub listen: Option<String>,
    /// The `host:port` runners dial, when it differs from `listen`.
    pub advertise: Option<String>,
    /// The `custody` binary runners start from.
    pub program: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Executor {
    /// `local` or `slurm`.
    pub kind: Option<String>,
    /// For `slurm`: a directory shared with the compute nodes.
    pub spool_dir: Option<PathBuf>,
    /// For `slurm`: extra `sbatch` arguments.
    #[serde(default)]
    pub sbatch_args: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Registries reached over plain HTTP.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// A certs.d directory (one `host[:port]` directory per registry).
    pub certs_dir: Option<PathBuf>,
    /// A docker `config.json` / containers `auth.json` with credentials.
    pub authfile: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = fs_err::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((0, 0), |span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                (line, column)
            });
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().to_owned(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configuration_parses() {
        let path = Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/serve.toml"
        ));
        let config = Config::load(path).unwrap();
        assert_eq!(config.executor.kind.as_deref(), Some("local"));
        assert!(config.listen.is_some());
    }

    #[test]
    fn an_unknown_setting_is_located() {
        let error = Config::parse(
            "listen = \"x\"\n[executor]\nkind = \"local\"\nnodes = 3\n",
            Path::new("s.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("s.toml:4:1: "), "{error}");
        assert!(error.contains("nodes"), "{error}");
    }
}
