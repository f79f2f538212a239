//! `custody serve` and the commands that talk to it: `submit` and
//! `builds list|show|logs|cancel|retry|provenance`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use custody_server::api::{Build, BuildState, ErrorCode, GitSource, LogStream, SubmitRequest};
use custody_server::client::{Client, ClientError};
use custody_server::config::{Config, Environment};
use custody_server::serve::{self, Listeners};

use crate::RegistryArgs;
use crate::build::{BuildFailed, Usage};

#[derive(Args)]
pub struct ServeArgs {
    /// The configuration file (TOML; see examples/serve.toml). Flags and
    /// the environment override what it sets.
    #[arg(long, short = 'c', value_name = "FILE", env = "CUSTODY_CONFIG")]
    config: Option<PathBuf>,
    /// Where the HTTP API listens [default: 127.0.0.1:8420].
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// How the service log on stderr is written: `text` (colour only on a
    /// terminal) or `json` (one object per line, for log collectors).
    /// `CUSTODY_LOG` filters it like `RUST_LOG` [default: info].
    #[arg(
        long,
        value_name = "FORMAT",
        env = "CUSTODY_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// The data directory: the SQLite store (unless `--database-url`) and
    /// the signing key (unless `--signing-key`) [default:
    /// $XDG_DATA_HOME/custody or ~/.local/share/custody].
    #[arg(long, value_name = "DIR", env = "CUSTODY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// `postgres://USER@HOST/DB` to share one queue between several
    /// daemons [default: SQLite at DATA_DIR/custody.db].
    #[arg(long, value_name = "URL", env = "CUSTODY_DATABASE_URL")]
    database_url: Option<String>,
    /// The key that signs provenance: a PKCS#8 PEM file, or a key in a
    /// PKCS#11 token as an RFC 7512 URI
    /// (`pkcs11:token=T;object=K?module-path=/…so&pin-source=file:/…`; keep
    /// the PIN in a file, not in the URI) [default:
    /// DATA_DIR/keys/custody.key, created on first use]. The daemon signs
    /// a probe with it before it starts.
    #[arg(long, value_name = "PEM|URI")]
    signing_key: Option<custody_daemon::signer::KeySource>,
    /// A public key (SPKI PEM) that signed before the current one;
    /// repeatable. Listed by `GET /api/v1/keys` with `signs: false`, so
    /// `custody verify --keys` still accepts what it signed.
    #[arg(long = "retired-key", value_name = "PUB.pem")]
    retired_keys: Vec<PathBuf>,
    /// Recorded as `runDetails.builder.id` [default: custody+serve://HOSTNAME].
    #[arg(long, value_name = "URI", env = "CUSTODY_BUILDER_ID")]
    builder_id: Option<String>,
    /// This daemon's name in the store [default: HOSTNAME-PID].
    #[arg(long, value_name = "NAME")]
    daemon_name: Option<String>,
    /// Builds this daemon runs at once [default: 2].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    concurrency: Option<u32>,
    /// Seconds a claim on a build holds without renewal; another daemon
    /// ends a build whose owner stopped renewing [default: 30].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    lease_seconds: Option<u64>,
    /// How often to look for builds other daemons queued, in milliseconds
    /// [default: 500].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(10..))]
    poll_millis: Option<u64>,
    /// After SIGTERM, seconds running builds get to finish before they are
    /// cancelled [default: 60].
    #[arg(long, value_name = "SECONDS")]
    grace_seconds: Option<u64>,
    /// A build still going after this many seconds is failed, naming
    /// the phase it was in [default: 21600, six hours].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    max_build_seconds: Option<u64>,
    /// Where the runner connector listens [default: 127.0.0.1:0].
    #[arg(long, value_name = "ADDR")]
    runner_listen: Option<String>,
    /// The `host:port` runners dial, when it differs from where the
    /// connector listens (a Slurm cluster reaches this machine by another name).
    #[arg(long, value_name = "HOST:PORT")]
    runner_advertise: Option<String>,
    /// The `custody` binary runners start from [default: this one].
    #[arg(long, value_name = "PATH")]
    runner_program: Option<PathBuf>,
    /// `local` (runners are child processes) or `slurm` (batch jobs)
    /// [default: local].
    #[arg(long, value_name = "KIND")]
    executor: Option<String>,
    /// For `slurm`: a directory shared with the compute nodes.
    #[arg(long, value_name = "DIR")]
    slurm_spool_dir: Option<PathBuf>,
    /// For `slurm`: an extra `sbatch` argument (repeatable).
    #[arg(long = "sbatch-arg", value_name = "ARG", allow_hyphen_values = true)]
    sbatch_args: Vec<String>,
    /// Open API connections at most; never more than the open-file limit
    /// leaves room for [default: 4096].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// Open API connections one client address (an IPv6 /64) may hold;
    /// raise it behind a reverse proxy [default: 256].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_address: Option<u32>,
    /// Log streams one API token may hold open at once [default: 64].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_token: Option<u32>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    bounds: crate::bounds::BoundsArgs,
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Freed memory goes back to the system on jemalloc's decay timers
    // (10 s each; all of it within about 30 s after a burst of connections,
    // `tests/abuse.rs`), also while the daemon is idle. Only here: other
    // commands are short-lived, and the runner makes its mount namespace
    // before any thread exists.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!("memory freed after a burst may stay resident: {e}");
    }
    let file = match &args.config {
        Some(path) => Config::load(path).map_err(|e| Usage(e.to_string()))?,
        None => Config::default(),
    };
    let config = file.overlay(args.as_config());
    // What needs flags only the binary knows (`--creds`) or crates the
    // server does not depend on (the runner's egress syntax) is made here.
    let registry = RegistryArgs {
        certs_dir: config.registry.certs_dir.clone(),
        insecure_registries: config.registry.insecure.clone(),
        creds: args.registry.creds.clone(),
        authfile: config.registry.authfile.clone(),
        registry_timeout: config.registry.timeout_seconds,
    };
    let bounds = crate::bounds::BoundsArgs {
        egress_allow: config.egress_allow.clone(),
        disk: config.disk.clone(),
        log_limit: config.log_limit.clone(),
        step_ids: config.step_ids.clone(),
        max_image_size: config.max_image_size.clone(),
        max_image_layers: config.max_image_layers,
    }
    .resolve(Default::default())?;
    let env = Environment {
        token: std::env::var("CUSTODY_TOKEN").ok(),
        config_path: args.config.clone(),
        current_exe: std::env::current_exe().ok(),
        hostname: custody_runner::hostname(),
        pid: std::process::id(),
    };
    let settings = config
        .resolve(
            env,
            crate::registry_options(&registry, crate::creds::Bare::Refused { command: "serve" })?,
            bounds,
        )
        .map_err(|e| Usage(e.to_string()))?;
    let owner = settings.queue.owner.clone();
    let store_description = match &settings.daemon.database_url {
        Some(url) if url.contains('@') => {
            format!(
                "postgres on {}",
                url.rsplit_once('@').map_or("", |(_, host)| host)
            )
        }
        Some(url) => url.clone(),
        None => format!(
            "sqlite {}",
            settings.daemon.data_dir.join("custody.db").display()
        ),
    };
    let listeners = Listeners::bind(&settings).await?;
    serve::run(settings, listeners, serve::shutdown_signal(), |started| {
        if started.key_created {
            tracing::info!(path = %started.key_source, "created a signing key");
        }
        tracing::info!(
            api = %format!("http://{}/api/v1", started.api),
            daemon = %owner,
            store = %store_description,
            "custody serve is up"
        );
    })
    .await?;
    Ok(())
}

impl ServeArgs {
    /// Warns when `--signing-key` carries the token's PIN.
    pub fn warn_if_pin_in_arguments(&self) {
        if let Some(custody_daemon::signer::KeySource::Pkcs11(uri)) = &self.signing_key {
            crate::warn_if_pin_in_arguments(uri);
        }
    }

    /// The flags as a configuration layer over the file's.
    fn as_config(&self) -> Config {
        Config {
            listen: self.listen.clone(),
            data_dir: self.data_dir.clone(),
            database_url: self.database_url.clone(),
            signing_key: self.signing_key.clone(),
            retired_keys: self.retired_keys.clone(),
            builder_id: self.builder_id.clone(),
            tokens: Vec::new(),
            daemon_name: self.daemon_name.clone(),
            concurrency: self.concurrency.map(|n| n as usize),
            lease_seconds: self.lease_seconds,
            poll_millis: self.poll_millis,
            grace_seconds: self.grace_seconds,
            runners: custody_server::config::Runners {
                listen: self.runner_listen.clone(),
                advertise: self.runner_advertise.clone(),
                program: self.runner_program.clone(),
            },
            executor: custody_server::config::Executor {
                kind: self.executor.clone(),
                spool_dir: self.slurm_spool_dir.clone(),
                sbatch_args: self.sbatch_args.clone(),
            },
            registry: custody_server::config::Registry {
                insecure: self.registry.insecure_registries.clone(),
                certs_dir: self.registry.certs_dir.clone(),
                authfile: self.registry.authfile.clone(),
                timeout_seconds: self.registry.registry_timeout,
            },
            egress_allow: self.bounds.egress_allow.clone(),
            disk: self.bounds.disk.clone(),
            log_limit: self.bounds.log_limit.clone(),
            step_ids: self.bounds.step_ids.clone(),
            max_image_size: self.bounds.max_image_size.clone(),
            max_image_layers: self.bounds.max_image_layers,
            max_build_seconds: self.max_build_seconds,
            // A secret: from the configuration file only, never argv.
            metrics_token: None,
            max_connections: self.max_connections.map(|n| n as usize),
            max_connections_per_address: self.max_connections_per_address.map(|n| n as usize),
            max_streams_per_token: self.max_streams_per_token.map(|n| n as usize),
            ..Config::default()
        }
    }
}

/// How `custody serve` writes its log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Args)]
pub struct ServerArgs {
    /// The custody server, `http://HOST:PORT`. The token comes from
    /// CUSTODY_TOKEN.
    #[arg(
        long,
        value_name = "URL",
        env = "CUSTODY_SERVER",
        default_value = "http://127.0.0.1:8420"
    )]
    server: String,
    /// Print JSON (the API's own objects) instead of text.
    #[arg(long)]
    json: bool,
}

impl ServerArgs {
    fn client(&self) -> anyhow::Result<Client> {
        let token = std::env::var("CUSTODY_TOKEN")
            .ok()
            .filter(|t| !t.is_empty());
        Ok(Client::new(&self.server, token).map_err(|e| Usage(e.to_string()))?)
    }
}

#[derive(Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// A checkout of the repository to build (its `origin` at its current
    /// commit, unless `--git` names the source).
    #[arg(value_name = "DIR", default_value = ".")]
    dir: PathBuf,
    /// The spec's path in the source, from its root; the server reads it
    /// there, at the commit it builds [default: DIR's custody.yaml, as
    /// `custody build DIR` reads it].
    #[arg(long, value_name = "PATH", conflicts_with = "file")]
    spec_path: Option<String>,
    /// Send this spec's text with the build instead (only where the
    /// service allows inline specs; the provenance says so, and
    /// `custody verify --source` then needs `--allow-inline-spec`).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// The git repository the server builds [default: the spec's `source`,
    /// else DIR's `origin` remote].
    #[arg(long, value_name = "URL")]
    git: Option<String>,
    /// The branch, tag or commit to build [default: with `--git`, HEAD;
    /// from DIR's checkout, its current commit].
    #[arg(long, value_name = "REV")]
    revision: Option<String>,
    /// Follow the build's log until it ends; exit 0 only if it succeeded.
    #[arg(long)]
    follow: bool,
}

impl SubmitArgs {
    pub fn json(&self) -> bool {
        self.server.json
    }
}

impl BuildsCommand {
    pub fn json(&self) -> bool {
        match self {
            BuildsCommand::List { server, .. }
            | BuildsCommand::Show { server, .. }
            | BuildsCommand::Logs { server, .. }
            | BuildsCommand::Cancel { server, .. }
            | BuildsCommand::Retry { server, .. }
            | BuildsCommand::Provenance { server, .. } => server.json,
        }
    }
}

pub async fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    // The spec is checked here first when it is at hand, for the file's
    // own name in errors; an inline one may name its own source.
    let inline = match &args.file {
        Some(path) => {
            let text = fs_err::read_to_string(path).map_err(|e| Usage(e.to_string()))?;
            let parsed = custody_daemon::spec::parse(&text, path)?;
            Some((path.clone(), text, parsed))
        }
        None => None,
    };
    let names_source = inline
        .as_ref()
        .is_some_and(|(_, _, spec)| spec.source.is_some());
    let source = match (&args.git, names_source) {
        (Some(git), _) => Some(GitSource {
            git: git.clone(),
            revision: args.revision.clone().unwrap_or_else(|| "HEAD".to_owned()),
            path: None,
        }),
        (None, true) => None,
        (None, false) => Some(checkout_source(&args.dir, args.revision.as_deref()).await?),
    };
    // Like `custody build DIR`: DIR's custody.yaml, steps started in DIR.
    let in_checkout = source.as_ref().and_then(|s| s.path.clone());
    let default_spec = match &in_checkout {
        Some(dir) => format!("{dir}/custody.yaml"),
        None => "custody.yaml".to_owned(),
    };
    match &inline {
        Some((path, _, spec)) => refuse_relative_layouts(spec, path)?,
        None if args.git.is_none() && args.spec_path.is_none() => {
            let local = args.dir.join("custody.yaml");
            if let Ok(text) = fs_err::read_to_string(&local) {
                refuse_relative_layouts(&custody_daemon::spec::parse(&text, &local)?, &local)?;
            }
        }
        None => {}
    }
    let (spec_path, spec) = match inline {
        Some((path, text, _)) => {
            let relative = path
                .strip_prefix(&args.dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            (relative, Some((path, text)))
        }
        None => (args.spec_path.clone().unwrap_or(default_spec), None),
    };
    let client = args.server.client()?;
    let build = client
        .submit(&SubmitRequest {
            spec_path: spec_path.clone(),
            source,
            spec: spec.as_ref().map(|(_, text)| text.clone()),
        })
        .await
        .map_err(|e| match &spec {
            Some((file, _)) => spec_located(e, file),
            None => e.into(),
        })?;
    if args.server.json && !args.follow {
        return print_json(&build);
    }
    say!("queued build {}", build.id);
    if !args.server.json {
        crate::print_line(&build.id)?;
    }
    if args.follow {
        let ended = follow(&client, &build.id, true, Lines::of(&args.server)).await?;
        return outcome(&ended, &args.server);
    }
    Ok(())
}

/// The source a checkout stands for: its `origin` at its current commit.
async fn checkout_source(dir: &Path, revision: Option<&str>) -> anyhow::Result<GitSource> {
    let origin = custody_source::origin(dir).await.ok_or_else(|| {
        Usage(format!(
            "the spec names no git `source` and `{}` has no `origin` remote: pass `--git URL` \
             (the server fetches the source itself)",
            dir.display()
        ))
    })?;
    let revision = match revision {
        Some(rev) => rev.to_owned(),
        None => {
            let state = custody_source::local_state(dir)
                .await
                .ok_or_else(|| Usage(format!("`{}` has no commit yet", dir.display())))?;
            if state.dirty {
                say!(
                    "warning: `{}` has uncommitted changes; the server builds commit {} from {origin}",
                    dir.display(),
                    state.commit
                );
            }
            state.commit
        }
    };
    // DIR's place in the checkout is where the build runs.
    let path = custody_source::path_in_checkout(dir)
        .await
        .filter(|p| !p.is_empty());
    Ok(GitSource {
        git: origin,
        revision,
        path,
    })
}

/// A service writes layouts only under the roots its operator allows
/// (absolute paths); a layout next to the spec (`oci:out/app`) is for
/// `custody build` only, so it is refused before the build is queued.
fn refuse_relative_layouts(spec: &custody_daemon::spec::Spec, file: &Path) -> anyhow::Result<()> {
    for to in spec.output_destinations() {
        let beside_spec = to
            .template()
            .strip_prefix("oci:")
            .is_some_and(|path| !path.starts_with('/'));
        if beside_spec {
            return Err(Usage(format!(
                "{}:{}:{}: destination `{}` is a layout next to the spec, which only \
                 `custody build` writes; a service pushes to a registry (or to an absolute \
                 `oci:` path its operator allows)",
                file.display(),
                to.line,
                to.column,
                to.template()
            ))
            .into());
        }
    }
    Ok(())
}

/// A spec the server refused, named by the local file.
fn spec_located(error: ClientError, spec_path: &Path) -> anyhow::Error {
    match error {
        ClientError::Api {
            code: ErrorCode::InvalidSpec,
            message,
            ..
        } => Usage(format!(
            "the server refused `{}`: {message}",
            spec_path.display()
        ))
        .into(),
        other => other.into(),
    }
}

#[derive(Subcommand)]
pub enum BuildsCommand {
    /// List builds, newest first.
    List {
        #[command(flatten)]
        server: ServerArgs,
        /// Only builds in this state: queued, running, succeeded, failed, cancelled.
        #[arg(long, value_parser = parse_state)]
        state: Option<BuildState>,
        /// At most this many (1–500).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=500))]
        limit: u32,
        /// Only builds older than this id (the previous page's last).
        #[arg(long, value_name = "ID")]
        before: Option<String>,
    },
    /// Show one build: its state, source and the commit it resolved, its
    /// steps (exit code, duration, image digest), error and outputs.
    Show {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        id: BuildIdArg,
    },
    /// Print a build's log, each line prefixed with its step's name;
    /// `--follow` streams it until the build ends (exit 0 only if it
    /// succeeded). With `--json`, one log event per line.
    Logs {
        #[command(flatten)]
        server: ServerArgs,
        /// Keep streaming until the build ends; exit 0 only if it succeeded.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        id: BuildIdArg,
    },
    /// Cancel a queued or running build.
    Cancel {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        id: BuildIdArg,
    },
    /// Queue a new build of the same spec at the same source commit.
    ///
    /// The new build reads the spec the build read (the same path in the
    /// source, or the same inline text) at the commit the build resolved,
    /// not at its branch again, and records which build it retries. A
    /// build that failed before it resolved a commit is retried as it was
    /// asked for. Prints the new build's id (`--json`: the build).
    Retry {
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        id: BuildIdArg,
    },
    /// Write a build's signed provenance (DSSE envelope) to stdout or a file.
    Provenance {
        #[command(flatten)]
        server: ServerArgs,
        /// Write the envelope to this file instead of stdout.
        #[arg(short = 'o', long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        id: BuildIdArg,
    },
}

/// The build a command is about.
#[derive(Args)]
pub struct BuildIdArg {
    /// The build's id, or enough of its start to name one build (like a
    /// git commit); `builds list` shows them.
    #[arg(value_name = "ID", value_parser = parse_build_id)]
    id: String,
}

fn parse_build_id(text: &str) -> Result<String, String> {
    custody_daemon::record::BuildIdPrefix::parse(text)
        .map(|prefix| prefix.as_str().to_owned())
        .ok_or_else(|| {
            format!(
                "`{text}` is not a build id: ids are hex digits and hyphens, \
                 give at least {} of them",
                custody_daemon::record::BuildIdPrefix::MIN
            )
        })
}

fn parse_state(text: &str) -> Result<BuildState, String> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).map_err(|_| {
        format!("`{text}` is not a state: use queued, running, succeeded, failed or cancelled")
    })
}

pub async fn builds(command: BuildsCommand) -> anyhow::Result<()> {
    match command {
        BuildsCommand::List {
            server,
            state,
            limit,
            before,
        } => {
            let page = server
                .client()?
                .list(state, limit, before.as_deref())
                .await?;
            if server.json {
                return print_json(&page);
            }
            let mut out = String::new();
            out.push_str(&format!(
                "{:<36}  {:<9}  {:<20}  {}\n",
                "ID", "STATE", "CREATED", "SOURCE"
            ));
            for build in &page.builds {
                out.push_str(&format!(
                    "{:<36}  {:<9}  {:<20}  {}\n",
                    build.id,
                    build.state.as_str(),
                    build.created_at.get(..19).unwrap_or(&build.created_at),
                    source_text(build)
                ));
            }
            if let Some(next) = &page.next {
                out.push_str(&format!("(more: --before {next})\n"));
            }
            write_stdout(out.as_bytes())
        }
        BuildsCommand::Show { server, id } => {
            let build = server.client()?.show(&id.id).await?;
            if server.json {
                return print_json(&build);
            }
            write_stdout(describe(&build).as_bytes())
        }
        BuildsCommand::Logs {
            server,
            follow: f,
            id,
        } => {
            let client = server.client()?;
            // The whole id, so a stream that reconnects asks for this
            // build even if a newer one begins with the same characters.
            let build = client.show(&id.id).await?;
            let ended = follow(&client, &build.id, f, Lines::of(&server)).await?;
            if f { outcome(&ended, &server) } else { Ok(()) }
        }
        BuildsCommand::Cancel { server, id } => {
            let build = server.client()?.cancel(&id.id).await?;
            if server.json {
                return print_json(&build);
            }
            say!(
                "{}",
                match build.state {
                    BuildState::Cancelled => format!("cancelled build {}", build.id),
                    _ => format!("asked the daemon running build {} to stop it", build.id),
                }
            );
            Ok(())
        }
        BuildsCommand::Retry { server, id } => {
            let build = server.client()?.retry(&id.id).await?;
            if server.json {
                return print_json(&build);
            }
            let retried = build.retry_of.as_deref().unwrap_or(&id.id);
            say!("queued build {}, retrying {retried}", build.id);
            crate::print_line(&build.id)
        }
        BuildsCommand::Provenance { server, out, id } => {
            let envelope = server.client()?.provenance(&id.id).await?;
            match out {
                Some(path) => Ok(fs_err::write(path, envelope)?),
                None => write_stdout(&envelope),
            }
        }
    }
}

/// How a followed log is printed.
#[derive(Clone, Copy)]
enum Lines {
    /// Stdout lines to stdout, stderr lines to stderr, each prefixed with
    /// its step.
    Text,
    /// Every event as one line of JSON on stdout (the API's `LogEvent`).
    Json,
}

impl Lines {
    fn of(server: &ServerArgs) -> Self {
        if server.json {
            Lines::Json
        } else {
            Lines::Text
        }
    }
}

/// Prints the log as it comes.
async fn follow(client: &Client, id: &str, follow: bool, lines: Lines) -> anyhow::Result<Build> {
    let (sender, mut events) = tokio::sync::mpsc::unbounded_channel();
    let stream = client.logs(id, follow, move |event| {
        let _ = sender.send(event);
    });
    // Lines are named by their step; the names come from the build's
    // record, asked again when a step it did not list yet speaks.
    let print = async {
        let mut names: Vec<String> = Vec::new();
        // The highest step the record was asked about: once per new step,
        // not once per line of a build whose record has no steps.
        let mut asked: Option<usize> = None;
        while let Some(event) = events.recv().await {
            let step = event.step as usize;
            if matches!(lines, Lines::Text) && step >= names.len() && asked.is_none_or(|a| step > a)
            {
                asked = Some(step);
                if let Ok(build) = client.show(id).await {
                    names = build.steps.into_iter().map(|s| s.name).collect();
                }
            }
            let (text, to_stderr) = match lines {
                Lines::Json => (
                    format!("{}\n", serde_json::to_string(&event).unwrap_or_default()),
                    false,
                ),
                Lines::Text => (
                    format!(
                        "[{}] {}\n",
                        names
                            .get(step)
                            .map_or_else(|| event.step.to_string(), Clone::clone),
                        event.line
                    ),
                    event.stream == LogStream::Stderr,
                ),
            };
            // A closed pipe ends nothing: the build's outcome still decides
            // the exit code.
            let _ = if to_stderr {
                std::io::stderr().lock().write_all(text.as_bytes())
            } else {
                std::io::stdout().lock().write_all(text.as_bytes())
            };
        }
    };
    let (ended, ()) = tokio::join!(stream, print);
    Ok(ended?)
}

/// Exit 0 for a succeeded build, 1 (with its reason) otherwise; with
/// `--json` the build is the last line on stdout.
fn outcome(build: &Build, server: &ServerArgs) -> anyhow::Result<()> {
    if server.json {
        crate::print_line(&serde_json::to_string(build)?)?;
    }
    if build.state == BuildState::Succeeded {
        say!("build {} succeeded", build.id);
        for output in &build.outputs {
            say!("  pushed {}", pinned(output));
        }
        return Ok(());
    }
    Err(BuildFailed::new(
        build.id.clone(),
        build.state.as_str(),
        build.error.clone().unwrap_or_default(),
    )
    .into())
}

/// An output's reference with its digest, once (a reference the runner
/// pushed by digest carries it already).
fn pinned(output: &custody_server::api::Output) -> String {
    if output.reference.ends_with(&format!("@{}", output.digest)) {
        output.reference.clone()
    } else {
        format!("{}@{}", output.reference, output.digest)
    }
}

fn source_text(build: &Build) -> String {
    match (
        build.source.get("git").and_then(|v| v.as_str()),
        build.source.get("revision").and_then(|v| v.as_str()),
    ) {
        (Some(git), Some(rev)) => format!("{git} {rev}"),
        _ => build.source.to_string(),
    }
}

fn describe(build: &Build) -> String {
    let mut text = format!(
        "build     {}\nstate     {}\nsource    {}\n",
        build.id,
        build.state.as_str(),
        source_text(build),
    );
    for (label, value) in [("commit", &build.commit), ("retry of", &build.retry_of)] {
        if let Some(value) = value {
            text.push_str(&format!("{label:<9} {value}\n"));
        }
    }
    text.push_str(&format!(
        "spec      {}\ncreated   {}\n",
        build.spec_path, build.created_at
    ));
    for (label, value) in [
        ("started", &build.started_at),
        ("finished", &build.finished_at),
        ("daemon", &build.daemon),
        ("cancel", &build.cancel_requested),
        ("error", &build.error),
    ] {
        if let Some(value) = value {
            text.push_str(&format!("{label:<9} {value}\n"));
        }
    }
    let width = build.steps.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for step in &build.steps {
        let mut line = format!("step      {:<width$}  {}", step.name, step.state.as_str());
        if let Some(code) = step.exit_code {
            line.push_str(&format!("  exit {code}"));
        }
        if let Some(ms) = step.duration_ms {
            line.push_str(&format!("  {}", duration_text(ms)));
        }
        if let Some(image) = &step.image {
            line.push_str(&format!("  image {image}"));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    for output in &build.outputs {
        text.push_str(&format!(
            "pushed    {}  (manifest, {} bytes)\n",
            pinned(output),
            output.size
        ));
    }
    if build.has_provenance {
        text.push_str(&format!(
            "provenance  custody builds provenance {}\n",
            build.id
        ));
    }
    text
}

/// `850 ms`, `12.3 s`, `4 min 05 s`.
fn duration_text(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        _ => format!("{} min {:02} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_stdout(text.as_bytes())
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}
