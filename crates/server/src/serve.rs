//! One `custody serve` process: the daemon, its queue worker and the HTTP
//! API, from start to a clean stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use custody_daemon::embedded;
use custody_daemon::queue::{Queue, QueueConfig};
use tokio::net::TcpListener;

use crate::api::{KeyList, PublicKey};
use crate::connections::{self, ConnectionLimits};
use crate::http::{App, router};
use crate::metrics::Metrics;

/// Everything `serve` needs, defaults already applied (see
/// [`crate::config::Config::resolve`]).
pub struct Settings {
    pub daemon: embedded::Config,
    pub listen: String,
    pub tokens: Vec<String>,
    pub queue: QueueConfig,
    /// How long running builds get to finish after SIGTERM.
    pub grace: Duration,
    /// What `/metrics` wants as a bearer token; `None` leaves it open.
    pub metrics_token: Option<String>,
    /// The caps on open API connections (before the open-file limit
    /// lowers the total, see [`ConnectionLimits::within_open_files`]).
    pub connections: ConnectionLimits,
    /// Log streams one API token may hold open at once.
    pub max_streams_per_token: usize,
}

/// The sockets a service serves on, bound before it starts (by the binary
/// where the settings say, by a test on any free port).
pub struct Listeners {
    pub api: TcpListener,
    pub runners: TcpListener,
}

impl Listeners {
    /// Binds where `settings` say.
    pub async fn bind(settings: &Settings) -> Result<Self, ServeError> {
        let api = TcpListener::bind(&settings.listen)
            .await
            .map_err(|source| ServeError::Listen {
                addr: settings.listen.clone(),
                source,
            })?;
        let runners = embedded::bind_connector(&settings.daemon).await?;
        Ok(Self { api, runners })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Daemon(#[from] embedded::Error),
    #[error("cannot listen on `{addr}`: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
}

/// What a started service tells its caller.
pub struct Started {
    pub api: SocketAddr,
    /// The signing key's file or token URI (never its PIN).
    pub key_source: String,
    pub public_key_path: Option<PathBuf>,
    pub key_created: bool,
}

/// Serves on `listeners` until `shutdown` resolves (SIGTERM or SIGINT for
/// the binary, see [`shutdown_signal`]): then stops claiming, lets running
/// builds finish within the grace period, cancels the rest, and returns.
pub async fn run(
    settings: Settings,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
    started: impl FnOnce(&Started),
) -> Result<(), ServeError> {
    let daemon = embedded::start(settings.daemon, listeners.runners).await?;
    let listener = listeners.api;
    let api = listener.local_addr().map_err(ServeError::Http)?;

    let signing = daemon.service.key.verifying_key();
    let listed = |key: &custody_attest::keys::VerifyingKey, signs| PublicKey {
        key_id: key.key_id().to_owned(),
        algorithm: key.algorithm().to_string(),
        pem: key.to_pem(),
        signs,
    };
    let keys = KeyList {
        keys: std::iter::once(listed(signing, true))
            .chain(daemon.retired_keys.iter().map(|key| listed(key, false)))
            .collect(),
    };
    started(&Started {
        api,
        key_source: daemon.key_source.clone(),
        public_key_path: daemon.public_key_path.clone(),
        key_created: daemon.key_created,
    });
    let metrics = Arc::new(Metrics::default());
    let service = Arc::new(daemon.service);
    let queue = Queue::new(service.clone(), settings.queue, metrics.clone());
    queue.start();
    let app = Arc::new(App::new(
        queue.clone(),
        &settings.tokens,
        settings.metrics_token.as_deref(),
        settings.max_streams_per_token,
        metrics,
        keys,
    ));

    let limits = match connections::open_files_limit() {
        Some(open_files) => settings.connections.within_open_files(open_files),
        None => settings.connections,
    };
    tracing::info!(
        max_connections = limits.total,
        max_connections_per_address = limits.per_address,
        header_read_timeout = ?connections::HEADER_READ_TIMEOUT,
        "serving the API"
    );
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(connections::serve(
        listener,
        router(app.clone()),
        limits,
        async {
            let _ = http_stopped.await;
        },
    ));

    shutdown.await;
    tracing::info!(
        running = queue.running(),
        grace = ?settings.grace,
        "stopping: no new builds claimed; running builds get the grace period"
    );
    app.shutting_down.store(true, Ordering::Relaxed);
    queue.shutdown(settings.grace).await;
    let _ = http_stop.send(());
    // Followers of a log stream hold connections open; they have had their
    // `end` event by now, so do not wait on them for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    service.store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
