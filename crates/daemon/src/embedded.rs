//! Setting a daemon up: the data directory, the signing key, the store, the
//! runner connector and the executor. `custody build` uses it with the
//! defaults (SQLite in the data directory, a key created on first use,
//! local runners connecting back to 127.0.0.1); `custody serve` with its
//! configuration.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use custody_attest::keys::{self, Algorithm, Signer, SigningKey, VerifyingKey};
use custody_oci::registry::RegistryOptions;
use custody_wire::{Connector, DaemonIdentity};
use tokio::net::TcpListener;

use crate::bounds::StepBounds;
use crate::build::BuildService;
use crate::dispatch::Dispatcher;
use crate::executor::ExecutorSettings;
use crate::policy::ServicePolicy;
use crate::record::BuildId;
use crate::signer::KeySource;
use crate::store::{Store, StoreError};

/// How to set the embedded daemon up.
pub struct Config {
    pub data_dir: PathBuf,
    /// A PKCS#8 PEM key file or a key in a PKCS#11 token; `None` uses (or
    /// creates) `DATA_DIR/keys/custody.key`.
    pub signing_key: Option<KeySource>,
    /// Public keys that signed before the current one: listed, never used.
    pub retired_keys: Vec<PathBuf>,
    pub builder_id: String,
    pub registry: RegistryOptions,
    /// The `custody` binary runners start from.
    pub runner_program: PathBuf,
    /// `local` or `slurm`, with the settings the kind needs.
    pub executor: String,
    pub executor_settings: ExecutorSettings,
    /// `None`: SQLite at `DATA_DIR/custody.db`.
    pub database_url: Option<String>,
    /// Where the runner connector listens.
    pub connector_listen: String,
    /// The `host:port` runners dial (default: the address it listens on).
    pub connector_advertise: Option<String>,
    /// More host paths no step may see (a configuration file with tokens).
    pub hidden_paths: Vec<PathBuf>,
    /// The step boundary's settings.
    pub bounds: StepBounds,
    /// What a shared service accepts; `None` for `custody build`.
    pub policy: Option<ServicePolicy>,
    /// The longest a build may take.
    pub max_build: Option<Duration>,
    /// The secrets steps may ask for (their files are hidden from steps).
    pub secrets: crate::secrets::Secrets,
}

impl Config {
    /// The defaults `custody build` runs with.
    pub fn local(
        data_dir: PathBuf,
        builder_id: String,
        registry: RegistryOptions,
        runner_program: PathBuf,
    ) -> Self {
        Self {
            data_dir,
            signing_key: None,
            retired_keys: Vec::new(),
            builder_id,
            registry,
            executor_settings: ExecutorSettings {
                runner_program: runner_program.clone(),
                spool_dir: None,
                sbatch_args: Vec::new(),
            },
            runner_program,
            executor: "local".to_owned(),
            database_url: None,
            connector_listen: "127.0.0.1:0".to_owned(),
            connector_advertise: None,
            hidden_paths: Vec::new(),
            bounds: StepBounds::default(),
            policy: None,
            max_build: None,
            secrets: crate::secrets::Secrets::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot use the data directory `{}`: {source}", path.display())]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] custody_attest::Error),
    /// The PKCS#11 signer did not open (module, token, PIN, key): the
    /// daemon does not start rather than fail every build later.
    #[error("cannot sign with `{source_uri}`")]
    Signer {
        source_uri: String,
        #[source]
        source: custody_pkcs11::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the runner connector: {0}")]
    Connector(String),
    #[error(transparent)]
    Executor(#[from] crate::ExecutorError),
}

/// A running embedded daemon.
pub struct Embedded {
    pub service: BuildService,
    /// Where the signing key is (a file, or a token's URI without its
    /// PIN), and whether it was created just now (a file in the data
    /// directory).
    pub key_source: String,
    /// Public keys that no longer sign, whose signatures still verify.
    pub retired_keys: Vec<VerifyingKey>,
    pub key_created: bool,
    pub public_key_path: Option<PathBuf>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// The data directory when none is given: `$XDG_DATA_HOME/custody`, else
/// `~/.local/share/custody`.
pub fn default_data_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .map(|d| d.join("custody"))
}

/// Binds the runner connector's listener where `config` says.
pub async fn bind_connector(config: &Config) -> Result<TcpListener, Error> {
    TcpListener::bind(&config.connector_listen)
        .await
        .map_err(|e| Error::Connector(format!("listening on `{}`: {e}", config.connector_listen)))
}

/// Starts a daemon with `config`, its runners connecting back on
/// `listener` (already bound, so a caller or a test picks the address).
pub async fn start(config: Config, listener: TcpListener) -> Result<Embedded, Error> {
    let data_dir = &config.data_dir;
    // Build logs, keys and provenance: for the daemon's user only.
    fs_err::create_dir_all(data_dir)
        .and_then(|()| fs_err::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| Error::DataDir {
            path: data_dir.clone(),
            source,
        })?;
    let (key, key_created, public_key_path) = load_or_create_key(&config).await?;
    let retired_keys = crate::signer::read_retired(&config.retired_keys)?
        .into_iter()
        .filter(|retired| retired.key_id() != key.key_id())
        .collect();
    let executor = crate::executor::build(&config.executor, &config.executor_settings)?;
    let store = match &config.database_url {
        Some(url) => Store::open(url).await?,
        None => {
            let path = data_dir.join("custody.db");
            let store = Store::open_sqlite(&path).await?;
            private_files(&path).map_err(|source| Error::DataDir {
                path: data_dir.clone(),
                source,
            })?;
            store
        }
    };

    let identity = DaemonIdentity::generate().map_err(|e| Error::Connector(e.to_string()))?;
    let connector = Connector::new(&identity);
    let daemon_addr = match &config.connector_advertise {
        Some(addr) => addr.clone(),
        None => listener
            .local_addr()
            .map_err(|e| Error::Connector(e.to_string()))?
            .to_string(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(connector.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let dispatcher = Dispatcher {
        connector,
        executor,
        daemon_addr,
        connect_timeout: Duration::from_secs(30),
    };
    let runner_digest = {
        let program = config.runner_program.clone();
        tokio::task::spawn_blocking(move || custody_oci::digest::sha256_file(&program).ok())
            .await
            .expect("hashing a file does not panic")
    };
    // Steps see the host read-only: everything secret the daemon reads must
    // be hidden from them (registry credentials and client keys too).
    let mut hidden_paths = vec![data_dir.clone()];
    if let Some(source) = &config.signing_key {
        hidden_paths.extend(source.secret_files());
    }
    hidden_paths.extend(config.hidden_paths.iter().cloned());
    hidden_paths.extend(config.registry.certs_dirs.iter().cloned());
    // Every credential file the daemon would read, not only `--authfile`.
    hidden_paths.extend(config.registry.credentials.files());
    // And every file a secret is read from.
    hidden_paths.extend(config.secrets.files().map(Path::to_owned));
    // The sandbox needs absolute paths; what does not exist needs no hiding.
    let hidden_paths = hidden_paths
        .iter()
        .filter_map(|path| path.canonicalize().ok())
        .collect();
    Ok(Embedded {
        service: BuildService {
            dispatcher: Arc::new(dispatcher),
            executor_kind: config.executor.clone(),
            registry: config.registry,
            key: key.clone(),
            builder_id: config.builder_id,
            runner_digest,
            hidden_paths,
            bounds: config.bounds,
            store,
            policy: config.policy.map(Arc::new),
            max_build: config.max_build,
            secrets: Arc::new(config.secrets),
        },
        key_source: match &config.signing_key {
            Some(source) => source.to_string(),
            None => config
                .data_dir
                .join("keys/custody.key")
                .display()
                .to_string(),
        },
        retired_keys,
        key_created,
        public_key_path,
        _stop: stop,
    })
}

/// The signer `config` names, opened and proven (off the runtime: a token
/// may block), or the data directory's key file, made on first use.
async fn load_or_create_key(
    config: &Config,
) -> Result<(Arc<dyn Signer>, bool, Option<PathBuf>), Error> {
    if let Some(source) = config.signing_key.clone() {
        let key = tokio::task::spawn_blocking(move || source.open())
            .await
            .expect("opening a signer does not panic")?;
        return Ok((key, false, None));
    }
    let dir = config.data_dir.join("keys");
    let private = dir.join("custody.key");
    let public = dir.join("custody.pub");
    if private.exists() {
        let key = SigningKey::from_pem_file(&private)?;
        return Ok((Arc::new(key), false, Some(public)));
    }
    let (_, public, key) = keys::generate_files(&dir, Algorithm::EcdsaP256)?;
    Ok((Arc::new(key), true, Some(public)))
}

/// The SQLite database and its journal files: 0600.
fn private_files(database: &Path) -> std::io::Result<()> {
    let name = database
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let path = database.with_file_name(format!("{name}{suffix}"));
        if path.exists() {
            fs_err::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// Where `build` keeps a copy of each published envelope.
pub fn provenance_file(data_dir: &Path, build_id: &BuildId) -> PathBuf {
    data_dir
        .join("provenance")
        .join(format!("{build_id}.dsse.json"))
}
