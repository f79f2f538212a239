//! `custody serve`'s settings: the configuration file (TOML, every setting
//! optional; `examples/serve.toml` shows each one), the flags over it
//! ([`Config::overlay`]), and every default, applied in one place
//! ([`Config::resolve`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use custody_daemon::bounds::StepBounds;
use custody_daemon::embedded;
use custody_daemon::executor::ExecutorSettings;
use custody_daemon::policy::{DestinationPolicy, ServicePolicy, SourcePolicy};
use custody_daemon::queue::QueueConfig;
use custody_oci::registry::RegistryOptions;
use serde::Deserialize;

use crate::connections::ConnectionLimits;
use crate::http::DEFAULT_MAX_STREAMS_PER_TOKEN;
use crate::serve::Settings;

/// Where the API listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8420";
pub const DEFAULT_CONCURRENCY: usize = 2;
pub const DEFAULT_LEASE_SECONDS: u64 = 30;
pub const DEFAULT_POLL_MILLIS: u64 = 500;
pub const DEFAULT_GRACE_SECONDS: u64 = 60;
pub const DEFAULT_MAX_BUILD_SECONDS: u64 = 6 * 60 * 60;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the HTTP API listens.
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// `postgres://…` to share the queue between daemons; default SQLite
    /// in the data directory.
    pub database_url: Option<String>,
    /// The key that signs provenance: a PKCS#8 PEM file, or a key in a
    /// PKCS#11 token (`pkcs11:token=…;object=…?module-path=…&pin-source=file:…`).
    pub signing_key: Option<custody_daemon::signer::KeySource>,
    /// Public keys (SPKI PEM) that signed before `signing_key`: listed by
    /// `GET /api/v1/keys` with `signs: false` so what they signed still
    /// verifies after a rotation.
    #[serde(default)]
    pub retired_keys: Vec<PathBuf>,
    pub builder_id: Option<String>,
    /// Bearer tokens the API accepts.
    #[serde(default)]
    pub tokens: Vec<ApiToken>,
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
    /// Which sources builds may come from.
    #[serde(default)]
    pub sources: Sources,
    /// Where builds may push.
    #[serde(default)]
    pub destinations: Destinations,
    /// Accept a spec's text with the request (recorded as inline in the
    /// provenance) instead of reading it from the source.
    pub allow_inline_specs: Option<bool>,
    /// A build still going after this long is failed, naming its phase.
    pub max_build_seconds: Option<u64>,
    /// When set, `/metrics` answers only requests carrying
    /// `Authorization: Bearer` this; unset, it is open.
    pub metrics_token: Option<ApiToken>,
    /// Build secrets steps may ask for, by name:
    /// `[secrets.NAME] file = "/etc/custody/NAME"` (or `env = "VAR"`) and
    /// `sources = ["https://git.example.org/team/*"]`, the git URLs
    /// (globs) whose builds may use it.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, SecretConfig>,
    /// Open API connections at most (never more than the open-file limit
    /// leaves room for).
    pub max_connections: Option<usize>,
    /// Open API connections one client address may hold (an IPv6 /64
    /// counts as one address): raise it behind a reverse proxy.
    pub max_connections_per_address: Option<usize>,
    /// Log streams (`GET /api/v1/builds/{id}/logs`) one API token may hold
    /// open at once; past it, `too_many_streams` (429).
    pub max_streams_per_token: Option<usize>,
}

/// A bearer token from the configuration file: compared, never shown (a
/// `Config` printed for debugging says `***`).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct ApiToken(String);

impl From<&str> for ApiToken {
    fn from(token: &str) -> Self {
        Self(token.to_owned())
    }
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sources {
    /// Transports fetched from: `https`, `ssh`, `http`, `git`, `file`
    /// (default `https` and `ssh`).
    #[serde(default)]
    pub schemes: Vec<String>,
    /// When set, the only hosts fetched from (`HOST[:PORT]`, `*.DOMAIN`,
    /// `IP`, `CIDR`), loopback and private addresses included; unset: any
    /// host whose address is public.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// One build secret: where its value is read from when a build needs it,
/// and the sources whose builds may have it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretConfig {
    /// A file the value is read from (hidden from every step).
    pub file: Option<PathBuf>,
    /// Or an environment variable of the daemon.
    pub env: Option<String>,
    /// Git URL glob patterns (`*` within a path segment, `**` across):
    /// only builds of a matching source may use the secret.
    pub sources: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destinations {
    /// `HOST[:PORT][/REPOSITORY-PREFIX]` builds may push under (`*`: any;
    /// unset: any registry).
    #[serde(default)]
    pub registries: Vec<String>,
    /// Absolute directories `oci:` destinations may be under (unset: no
    /// layouts).
    #[serde(default)]
    pub oci_roots: Vec<PathBuf>,
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
    /// Seconds one registry exchange that moves no blob may take.
    pub timeout_seconds: Option<u64>,
}

/// What the environment contributes to the settings.
#[derive(Clone, Debug, Default)]
pub struct Environment {
    /// `CUSTODY_TOKEN`, an API token besides the configuration's.
    pub token: Option<String>,
    /// The configuration file, hidden from every step (it may hold tokens).
    pub config_path: Option<PathBuf>,
    /// The binary runners start from when the configuration names none.
    pub current_exe: Option<PathBuf>,
    pub hostname: String,
    pub pid: u32,
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

/// Settings that cannot work, found before anything starts.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    #[error(
        "no API token: set CUSTODY_TOKEN or `tokens` in the configuration (every API request must carry one)"
    )]
    NoToken,
    #[error("an API token in the configuration is empty")]
    EmptyToken,
    #[error("no data directory: set HOME, XDG_DATA_HOME or `data_dir` (`--data-dir`)")]
    NoDataDir,
    #[error("cannot find the custody binary runners start from: set `runners.program`")]
    NoRunnerProgram,
    #[error("{0}")]
    Policy(String),
    #[error("{0}")]
    Secret(String),
    #[error("`metrics_token` is empty: remove it to leave /metrics open, or set a token")]
    EmptyMetricsToken,
    #[error(
        "`{0}` is 0, which would refuse everything: set it to at least 1, or remove it for the default"
    )]
    ZeroLimit(&'static str),
}

impl Config {
    /// These values with `over`'s wherever `over` sets one (lists joined):
    /// the flags over the file.
    pub fn overlay(self, over: Config) -> Config {
        fn join<T>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
            a.extend(b);
            a
        }
        Config {
            listen: over.listen.or(self.listen),
            data_dir: over.data_dir.or(self.data_dir),
            database_url: over.database_url.or(self.database_url),
            signing_key: over.signing_key.or(self.signing_key),
            retired_keys: join(self.retired_keys, over.retired_keys),
            builder_id: over.builder_id.or(self.builder_id),
            tokens: join(self.tokens, over.tokens),
            daemon_name: over.daemon_name.or(self.daemon_name),
            concurrency: over.concurrency.or(self.concurrency),
            lease_seconds: over.lease_seconds.or(self.lease_seconds),
            poll_millis: over.poll_millis.or(self.poll_millis),
            grace_seconds: over.grace_seconds.or(self.grace_seconds),
            runners: Runners {
                listen: over.runners.listen.or(self.runners.listen),
                advertise: over.runners.advertise.or(self.runners.advertise),
                program: over.runners.program.or(self.runners.program),
            },
            executor: Executor {
                kind: over.executor.kind.or(self.executor.kind),
                spool_dir: over.executor.spool_dir.or(self.executor.spool_dir),
                sbatch_args: join(self.executor.sbatch_args, over.executor.sbatch_args),
            },
            registry: Registry {
                insecure: join(self.registry.insecure, over.registry.insecure),
                certs_dir: over.registry.certs_dir.or(self.registry.certs_dir),
                authfile: over.registry.authfile.or(self.registry.authfile),
                timeout_seconds: over
                    .registry
                    .timeout_seconds
                    .or(self.registry.timeout_seconds),
            },
            egress_allow: join(self.egress_allow, over.egress_allow),
            disk: over.disk.or(self.disk),
            log_limit: over.log_limit.or(self.log_limit),
            step_ids: over.step_ids.or(self.step_ids),
            max_image_size: over.max_image_size.or(self.max_image_size),
            max_image_layers: over.max_image_layers.or(self.max_image_layers),
            sources: Sources {
                schemes: join(self.sources.schemes, over.sources.schemes),
                hosts: join(self.sources.hosts, over.sources.hosts),
            },
            destinations: Destinations {
                registries: join(self.destinations.registries, over.destinations.registries),
                oci_roots: join(self.destinations.oci_roots, over.destinations.oci_roots),
            },
            allow_inline_specs: over.allow_inline_specs.or(self.allow_inline_specs),
            max_build_seconds: over.max_build_seconds.or(self.max_build_seconds),
            metrics_token: over.metrics_token.or(self.metrics_token),
            max_connections: over.max_connections.or(self.max_connections),
            max_connections_per_address: over
                .max_connections_per_address
                .or(self.max_connections_per_address),
            max_streams_per_token: over.max_streams_per_token.or(self.max_streams_per_token),
            secrets: {
                let mut secrets = self.secrets;
                secrets.extend(over.secrets);
                secrets
            },
        }
    }

    /// The settings these values make, with every default applied here and
    /// nowhere else. `registry` and `bounds` come from the caller, which
    /// made them from this configuration's registry and step-boundary
    /// values (and flags only it knows, such as `--creds`).
    pub fn resolve(
        self,
        env: Environment,
        registry: RegistryOptions,
        bounds: StepBounds,
    ) -> Result<Settings, SettingsError> {
        let mut tokens: Vec<String> = self.tokens.into_iter().map(|t| t.0).collect();
        tokens.extend(env.token.filter(|t| !t.is_empty()));
        if tokens.iter().any(|t| t.trim().is_empty()) {
            return Err(SettingsError::EmptyToken);
        }
        if tokens.is_empty() {
            return Err(SettingsError::NoToken);
        }
        if self
            .metrics_token
            .as_ref()
            .is_some_and(|t| t.0.trim().is_empty())
        {
            return Err(SettingsError::EmptyMetricsToken);
        }
        let defaults = ConnectionLimits::default();
        let connections = ConnectionLimits {
            total: positive("max_connections", self.max_connections)?.unwrap_or(defaults.total),
            per_address: positive(
                "max_connections_per_address",
                self.max_connections_per_address,
            )?
            .unwrap_or(defaults.per_address),
        };
        let max_streams_per_token = positive("max_streams_per_token", self.max_streams_per_token)?
            .unwrap_or(DEFAULT_MAX_STREAMS_PER_TOKEN);
        let data_dir = self
            .data_dir
            .or_else(embedded::default_data_dir)
            .ok_or(SettingsError::NoDataDir)?;
        let runner_program = self
            .runners
            .program
            .or(env.current_exe)
            .ok_or(SettingsError::NoRunnerProgram)?;
        let builder_id = self
            .builder_id
            .unwrap_or_else(|| format!("custody+serve://{}", env.hostname));
        let mut daemon =
            embedded::Config::local(data_dir, builder_id, registry, runner_program.clone());
        daemon.signing_key = self.signing_key;
        daemon.retired_keys = self.retired_keys;
        daemon.database_url = self.database_url;
        daemon.executor = self.executor.kind.unwrap_or_else(|| "local".to_owned());
        daemon.executor_settings = ExecutorSettings {
            runner_program,
            spool_dir: self.executor.spool_dir,
            sbatch_args: self.executor.sbatch_args,
        };
        if let Some(listen) = self.runners.listen {
            daemon.connector_listen = listen;
        }
        daemon.connector_advertise = self.runners.advertise;
        // It may hold tokens and a database password: no step may read it.
        daemon.hidden_paths.extend(env.config_path);
        daemon.bounds = bounds;
        daemon.policy = Some(ServicePolicy {
            sources: SourcePolicy::new(&self.sources.schemes, &self.sources.hosts)
                .map_err(SettingsError::Policy)?,
            destinations: DestinationPolicy::new(
                &self.destinations.registries,
                &self.destinations.oci_roots,
            )
            .map_err(SettingsError::Policy)?,
            allow_inline_specs: self.allow_inline_specs.unwrap_or(false),
        });
        daemon.secrets = secrets(self.secrets).map_err(SettingsError::Secret)?;
        daemon.max_build = Some(Duration::from_secs(
            self.max_build_seconds
                .filter(|s| *s > 0)
                .unwrap_or(DEFAULT_MAX_BUILD_SECONDS),
        ));
        Ok(Settings {
            daemon,
            listen: self.listen.unwrap_or_else(|| DEFAULT_LISTEN.to_owned()),
            tokens,
            queue: QueueConfig {
                owner: self
                    .daemon_name
                    .unwrap_or_else(|| format!("{}-{}", env.hostname, env.pid)),
                concurrency: self.concurrency.unwrap_or(DEFAULT_CONCURRENCY),
                lease: Duration::from_secs(self.lease_seconds.unwrap_or(DEFAULT_LEASE_SECONDS)),
                poll: Duration::from_millis(self.poll_millis.unwrap_or(DEFAULT_POLL_MILLIS)),
                clock: std::sync::Arc::new(custody_daemon::queue::SystemClock),
            },
            grace: Duration::from_secs(self.grace_seconds.unwrap_or(DEFAULT_GRACE_SECONDS)),
            metrics_token: self.metrics_token.map(|t| t.0),
            connections,
            max_streams_per_token,
        })
    }

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

/// `value`, refused when it is zero.
/// The `secrets` table as the daemon's secrets: each with one source of
/// its value and at least one source pattern.
fn secrets(
    table: std::collections::BTreeMap<String, SecretConfig>,
) -> Result<custody_daemon::secrets::Secrets, String> {
    use custody_daemon::secrets::{SecretDefinition, SecretSource, Secrets, SourcePatterns};
    let mut secrets = Secrets::default();
    for (name, config) in table {
        let source = match (config.file, config.env) {
            (Some(file), None) if file.is_absolute() => SecretSource::File(file),
            (Some(file), None) => {
                return Err(format!(
                    "`secrets.{name}.file`: `{}` is not an absolute path",
                    file.display()
                ));
            }
            (None, Some(var)) if !var.is_empty() => SecretSource::Env(var),
            _ => {
                return Err(format!(
                    "`secrets.{name}`: give either `file` or `env`, where its value is read from"
                ));
            }
        };
        if config.sources.is_empty() {
            return Err(format!(
                "`secrets.{name}.sources` is empty: list the git URLs (globs) whose builds may use it"
            ));
        }
        let allowed = SourcePatterns::new(&config.sources)
            .map_err(|e| format!("`secrets.{name}.sources`: {e}"))?;
        secrets
            .define(
                &name,
                SecretDefinition {
                    source,
                    allowed: Some(allowed),
                },
            )
            .map_err(|e| format!("`secrets`: {e}"))?;
    }
    Ok(secrets)
}

fn positive(key: &'static str, value: Option<usize>) -> Result<Option<usize>, SettingsError> {
    match value {
        Some(0) => Err(SettingsError::ZeroLimit(key)),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Environment {
        Environment {
            token: None,
            config_path: None,
            current_exe: Some("/usr/bin/custody".into()),
            hostname: "builder".into(),
            pid: 7,
        }
    }

    #[test]
    fn a_printed_configuration_shows_no_token() {
        let config = Config::parse(
            "tokens = [\"api-token-3f9a\"]\nmetrics_token = \"metrics-token-77c1\"\n",
            Path::new("serve.toml"),
        )
        .unwrap();
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("api-token-3f9a") && !printed.contains("metrics-token-77c1"),
            "{printed}"
        );
        assert!(printed.contains("tokens: [***]"), "{printed}");
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let file = Config::parse(
            "listen = \"0.0.0.0:1\"\nconcurrency = 5\ntokens = [\"a\"]\n[registry]\ninsecure = [\"r:1\"]\n",
            Path::new("serve.toml"),
        )
        .unwrap();
        let flags = Config {
            listen: Some("127.0.0.1:2".into()),
            data_dir: Some("/srv/custody".into()),
            registry: Registry {
                insecure: vec!["r:2".into()],
                ..Registry::default()
            },
            ..Config::default()
        };
        let merged = file.overlay(flags);
        assert_eq!(merged.registry.insecure, ["r:1", "r:2"]);
        let settings = merged
            .resolve(env(), RegistryOptions::default(), StepBounds::default())
            .unwrap();
        assert_eq!(settings.listen, "127.0.0.1:2");
        assert_eq!(settings.queue.concurrency, 5);
        assert_eq!(settings.queue.owner, "builder-7");
        assert_eq!(
            settings.queue.lease,
            Duration::from_secs(DEFAULT_LEASE_SECONDS)
        );
        assert_eq!(settings.daemon.builder_id, "custody+serve://builder");
        assert_eq!(settings.daemon.executor, "local");
    }

    #[test]
    fn a_service_without_a_usable_token_does_not_start() {
        let resolve = |config: Config, token: Option<&str>| {
            let env = Environment {
                token: token.map(str::to_owned),
                ..env()
            };
            config
                .resolve(env, RegistryOptions::default(), StepBounds::default())
                .err()
        };
        let with_dir = || Config {
            data_dir: Some("/srv/custody".into()),
            ..Config::default()
        };
        assert_eq!(resolve(with_dir(), None), Some(SettingsError::NoToken));
        assert_eq!(resolve(with_dir(), Some("t")), None);
        let empty = Config {
            tokens: vec![" ".into()],
            ..with_dir()
        };
        assert_eq!(resolve(empty, Some("t")), Some(SettingsError::EmptyToken));
    }

    #[test]
    fn limits_default_when_unset_and_refuse_zero() {
        let resolve = |text: &str| {
            Config::parse(
                &format!("data_dir = \"/srv/custody\"\n{text}"),
                Path::new("s.toml"),
            )
            .unwrap()
            .overlay(Config {
                tokens: vec!["t".into()],
                ..Config::default()
            })
            .resolve(env(), RegistryOptions::default(), StepBounds::default())
        };
        let settings = resolve("").unwrap();
        assert_eq!(settings.connections, ConnectionLimits::default());
        assert_eq!(
            settings.max_streams_per_token,
            DEFAULT_MAX_STREAMS_PER_TOKEN
        );
        assert_eq!(settings.metrics_token, None);
        let settings = resolve(
            "max_connections = 10\nmax_connections_per_address = 2\n\
             max_streams_per_token = 3\nmetrics_token = \"m\"\n",
        )
        .unwrap();
        assert_eq!(
            (settings.connections.total, settings.connections.per_address),
            (10, 2)
        );
        assert_eq!(settings.max_streams_per_token, 3);
        assert_eq!(settings.metrics_token.as_deref(), Some("m"));
        assert_eq!(
            resolve("max_streams_per_token = 0\n").err(),
            Some(SettingsError::ZeroLimit("max_streams_per_token"))
        );
        assert_eq!(
            resolve("metrics_token = \" \"\n").err(),
            Some(SettingsError::EmptyMetricsToken)
        );
    }

    #[test]
    fn secrets_need_one_value_source_and_their_allowed_sources() {
        let resolve = |text: &str| {
            Config::parse(
                &format!("data_dir = \"/srv/custody\"\ntokens = [\"t\"]\n{text}"),
                Path::new("s.toml"),
            )
            .unwrap()
            .resolve(env(), RegistryOptions::default(), StepBounds::default())
        };
        let settings = resolve(
            "[secrets.npm]\nfile = \"/etc/custody/npm\"\nsources = [\"https://git.example.org/team/*\"]\n",
        )
        .unwrap();
        assert_eq!(
            settings.daemon.secrets.files().collect::<Vec<_>>(),
            [Path::new("/etc/custody/npm")]
        );
        for (text, says) in [
            (
                "[secrets.npm]\nsources = [\"x\"]\n",
                "give either `file` or `env`",
            ),
            (
                "[secrets.npm]\nfile = \"/a\"\nenv = \"A\"\nsources = [\"x\"]\n",
                "give either `file` or `env`",
            ),
            (
                "[secrets.npm]\nfile = \"rel\"\nsources = [\"x\"]\n",
                "absolute",
            ),
            (
                "[secrets.npm]\nenv = \"A\"\nsources = []\n",
                "`secrets.npm.sources` is empty",
            ),
            (
                "[secrets.\"../x\"]\nenv = \"A\"\nsources = [\"x\"]\n",
                "not a secret name",
            ),
        ] {
            match resolve(text) {
                Err(SettingsError::Secret(message)) => {
                    assert!(message.contains(says), "{text}: {message}");
                }
                other => panic!("{text}: {:?}", other.err()),
            }
        }
    }

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
