//! The `custody` command: argument parsing, progress and error rendering
//! only; the work happens in the libraries.

/// A line on stderr for people. A closed stderr (`custody … 2>&- | head`)
/// loses the line instead of panicking, as `eprintln!` would.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}
/// jemalloc rather than glibc's malloc: glibc keeps what a burst of
/// connections freed (after 3,000 half-sent requests, `custody serve` stayed
/// 13 MB above idle for good, `crates/cli/tests/abuse.rs`), jemalloc gives
/// it back on a timer once `custody serve` turns its background threads on.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod artifacts;
mod bounds;
mod build;
mod creds;
mod progress;
mod serve;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use custody_oci::copy::{self, CopyOptions, Destination, Source};
use custody_oci::registry::{self, RegistryOptions};
use custody_oci::{Location, Reference};

#[derive(Parser)]
#[command(
    name = "custody",
    version,
    about = "Builds whose outputs can be trusted",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build a directory: run its custody.yaml, push the outputs, sign provenance.
    ///
    /// An embedded daemon runs the build on this machine: it resolves the
    /// source (the spec's git `source` at its revision, or DIR itself, with its
    /// commit and whether the tree is dirty) and every step image to a digest,
    /// starts a runner that runs each step in a bubblewrap sandbox (no
    /// network unless the step asks, memory and process limits where cgroups
    /// allow), and the runner — not the steps — pushes the declared images
    /// and artifacts. The daemon checks each pushed digest at its destination,
    /// then signs an in-toto / SLSA Provenance v1 statement (DSSE) and attaches
    /// it to every pushed image. A failed step, push or check publishes
    /// nothing. Exit 0 built and published, 1 the build failed, 2 usage or
    /// spec error, 3 custody could not start here (data directory, job
    /// store, listener, executor).
    Build(Box<build::BuildArgs>),
    /// Copy an image to a registry (or a layout), preserving every digest.
    ///
    /// SRC is `oci:PATH[:TAG]` (an OCI image layout; TAG selects by
    /// `org.opencontainers.image.ref.name`, and may be left out when the layout
    /// holds one image), `docker-archive:PATH` (a `docker save` tar) or a
    /// registry reference. DEST is a registry reference (`host[:port]/repo[:tag]`)
    /// or `oci:PATH[:TAG]`. Blobs the destination already has are skipped; a
    /// layout that lacks blobs (sparse) pushes when the destination has them.
    /// On success stdout carries exactly `REFERENCE@sha256:…`.
    Push(CopyArgs),
    /// Copy an image from a registry into an OCI image layout.
    ///
    /// SRC is a registry reference; DEST is `oci:PATH[:TAG]` (created if
    /// absent). Every digest is verified; blobs already in the layout are not
    /// fetched again. Any source and destination `push` accepts work here too.
    Pull(CopyArgs),
    /// List the manifests that refer to an image (attestations, signatures).
    ///
    /// Uses the OCI 1.1 referrers API, or the `sha256-<hex>` tag schema on
    /// registries without it.
    Referrers(ReferrersArgs),
    /// Check an image against its signed provenance.
    ///
    /// Resolves the image's digest, finds its attestations (OCI referrers,
    /// the `sha256-<hex>` tag schema, cosign's `.att` tag, or referrers in an
    /// OCI layout), and accepts it when one is signed by `--key`, is an
    /// in-toto statement about this very digest, carries SLSA Provenance v1,
    /// and meets the policy flags. Exit 0 verified, 1 not verified (the
    /// reason is printed), 2 usage error.
    Verify(VerifyArgs),
    /// Run the build service: an HTTP API over a durable queue.
    ///
    /// Builds submitted through the API wait in a queue kept in the store
    /// (SQLite in the data directory, or PostgreSQL with `--database-url`,
    /// which lets several daemons share one queue: each build is claimed by
    /// exactly one). Each daemon runs up to `--concurrency` builds through its
    /// executor and holds a lease on each that it renews; a build whose
    /// daemon died is failed by another (or queued again if its runner never
    /// started). SIGTERM stops claiming, gives running builds the grace
    /// period, then cancels them. Every `/api/v1` request needs a bearer
    /// token (CUSTODY_TOKEN or `tokens` in the configuration); `/healthz`,
    /// `/readyz` and `/metrics` are open. The OpenAPI document is at
    /// `/api/v1/openapi.json`. Exit 2 for a configuration error, 3 when it
    /// cannot start here (address in use, store or data directory).
    Serve(Box<serve::ServeArgs>),
    /// Queue a build on a custody server.
    ///
    /// Sends DIR's custody.yaml with the git source to build: `--git` (and
    /// `--revision`), else the spec's own `source`, else DIR's `origin`
    /// remote at its current commit. Prints the build id; `--follow` streams
    /// its log until it ends.
    Submit(serve::SubmitArgs),
    /// See, follow and cancel builds on a custody server.
    #[command(subcommand)]
    Builds(serve::BuildsCommand),
    /// Get the files of an artifact from a registry.
    #[command(subcommand)]
    Artifacts(artifacts::ArtifactsCommand),
    /// Manage signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Run one job for a daemon (started by an executor, not by hand).
    ///
    /// Dials the daemon over TLS 1.3, trusting only the certificate it was
    /// given, authenticates with the job's one-time token, then runs the
    /// job's steps and streams what happens back. Exits when the job is done
    /// or the connection drops.
    #[command(hide = true)]
    Runner(RunnerArgs),
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// A public key (SPKI PEM) the provenance may be signed with;
    /// repeatable (a service's current and retired keys). The signature's
    /// key id picks which.
    #[arg(long = "key", value_name = "PUB.pem", required_unless_present = "keys")]
    key: Vec<PathBuf>,
    /// The keys a service lists: the JSON `GET /api/v1/keys` returns
    /// (current and retired), with or without `--key`.
    #[arg(long, value_name = "KEYS.json")]
    keys: Option<PathBuf>,
    /// Require this builder id (`runDetails.builder.id`).
    #[arg(long, value_name = "URI")]
    builder_id: Option<String>,
    /// Require this source repository, optionally at a commit: `URL` or `URL@COMMIT`.
    #[arg(long, value_name = "URL[@COMMIT]")]
    source: Option<String>,
    /// Allow this step image digest (`sha256:…`); repeatable. When given,
    /// every step image must be one of them.
    #[arg(long = "allow-step-image", value_name = "DIGEST", value_parser = parse_image_digest)]
    allow_step_images: Vec<String>,
    /// Accept a build of a working tree with uncommitted changes when
    /// `--source` is given (by default it fails: such a build is not the
    /// repository at any commit).
    #[arg(long)]
    allow_dirty: bool,
    /// Accept a spec that was not read from the source at the commit
    /// built (sent inline to a service, or a local file of `custody
    /// build`) when `--source` is given (by default it fails: the source
    /// alone does not say what was built).
    #[arg(long)]
    allow_inline_spec: bool,
    /// Fail when any step reached anything through its egress proxy (the
    /// provenance's `egress:STEP` byproducts).
    #[arg(long, conflicts_with = "allow_egress")]
    no_egress: bool,
    /// Allow steps to have reached this destination: `HOST[:PORT]`,
    /// `*.DOMAIN[:PORT]` or `IP[:PORT]`; repeatable. When given, every
    /// destination recorded must match one.
    #[arg(long = "allow-egress", value_name = "PATTERN", value_parser = parse_host_pattern)]
    allow_egress: Vec<custody_provenance::policy::HostPattern>,
    /// Print the verified statement as JSON.
    #[arg(long)]
    json: bool,
    /// The image: `host[:port]/repo[:tag|@digest]` or `oci:PATH[:TAG]`.
    #[arg(value_name = "IMAGE")]
    image: String,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Write a new key pair: `DIR/custody.key` (PKCS#8 PEM, mode 0600) and
    /// `DIR/custody.pub` (SPKI PEM). An existing key is never overwritten.
    ///
    /// With `--pkcs11 URI`, the key pair is made inside the token instead:
    /// the private key sensitive and never extractable, labelled with the
    /// URI's `object`. Prints the key id.
    Generate {
        /// Where to write the two files.
        #[arg(long, value_name = "DIR", required_unless_present = "pkcs11")]
        out: Option<PathBuf>,
        /// Make the key in this PKCS#11 token instead:
        /// `pkcs11:token=T;object=K?module-path=/…so&pin-source=file:/…`.
        #[arg(long, value_name = "URI", conflicts_with = "out")]
        pkcs11: Option<custody_pkcs11::Pkcs11Uri>,
        /// `ecdsa-p256` (default) or `ed25519` (in a token, where it offers
        /// Ed25519).
        #[arg(long, default_value = "ecdsa-p256")]
        algorithm: custody_attest::keys::Algorithm,
        /// Print the key id (and the paths written) as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the public key (SPKI PEM) of a key pair in a PKCS#11 token,
    /// for `custody verify --key` and serve's `retired_keys`. Prints the key
    /// id.
    Export {
        /// The key pair:
        /// `pkcs11:token=T;object=K?module-path=/…so&pin-source=file:/…`.
        #[arg(long, value_name = "URI")]
        pkcs11: custody_pkcs11::Pkcs11Uri,
        /// Where to write the public key.
        #[arg(long, value_name = "PUB.pem")]
        out: PathBuf,
        /// Print the key id and the path written as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl Command {
    /// Whether the command line asked for JSON (and so for errors as
    /// JSON too).
    fn json(&self) -> bool {
        match self {
            Command::Build(args) => args.json(),
            Command::Push(args) | Command::Pull(args) => args.json,
            Command::Referrers(args) => args.json,
            Command::Verify(args) => args.json,
            Command::Submit(args) => args.json(),
            Command::Builds(command) => command.json(),
            Command::Keys(
                KeysCommand::Generate { json, .. } | KeysCommand::Export { json, .. },
            ) => *json,
            Command::Artifacts(command) => command.json(),
            Command::Serve(_) | Command::Runner(_) => false,
        }
    }
}

#[derive(Args)]
struct RunnerArgs {
    /// The daemon's runner connector, `host:port`.
    #[arg(long, value_name = "HOST:PORT")]
    daemon: String,
    /// The job this runner was started for.
    #[arg(long, value_name = "ID")]
    job_id: String,
    /// Read the token from the first line of stdin.
    #[arg(
        long,
        conflicts_with = "token_file",
        required_unless_present = "token_file"
    )]
    token_stdin: bool,
    /// Read the token from this file and delete it.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The daemon's certificate (PEM) as a file; else `CUSTODY_DAEMON_CERT` holds it.
    #[arg(long, value_name = "FILE")]
    daemon_cert_file: Option<PathBuf>,
    /// Where steps run (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Seconds to get through the connection and handshake.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    connect_timeout: u64,
}

#[derive(Args)]
pub(crate) struct RegistryArgs {
    /// Directory holding one `host[:port]` directory per registry, the Docker
    /// certs.d layout: `*.crt` CA roots, `*.cert` + `*.key` client pairs.
    /// Searched before custody's own and the system certs.d directories.
    #[arg(long, value_name = "DIR", env = "CUSTODY_CERTS_DIR")]
    certs_dir: Option<PathBuf>,
    /// Talk plain HTTP to this registry (repeatable). Only for registries
    /// you trust on a network you trust.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// A credential for one registry, `HOST=USER:PASSWORD` (repeatable),
    /// HOST as references write it (`registry.example.org:5000`). It is
    /// offered to that registry (and the token server it names) only: never
    /// to another host, a redirect target on another origin, or a token
    /// server another origin names.
    /// Registries no `--creds` names get no credential. `push`, `pull`,
    /// `referrers` and `verify` also take a bare `USER:PASSWORD`, offered to
    /// the registries their command line names (SRC, DEST or the image);
    /// `build` and `serve` do not, as there a spec chooses the registries.
    /// Prefer `--authfile` or `docker login`: arguments are visible to other
    /// local users.
    #[arg(long, value_name = "HOST=USER:PASS", conflicts_with = "authfile")]
    creds: Vec<String>,
    /// A docker `config.json` or containers `auth.json` to read credentials
    /// from (default: `$REGISTRY_AUTH_FILE`, containers' `auth.json`, then
    /// `$DOCKER_CONFIG/config.json` or `~/.docker/config.json`). Each entry
    /// is offered to the registry host it is keyed by only.
    #[arg(long, value_name = "FILE")]
    authfile: Option<PathBuf>,
    /// Seconds one registry exchange that moves no blob (a manifest, a tag,
    /// a referrers list, a token) may take, retries included [default: 60].
    #[arg(
        long,
        value_name = "SECONDS",
        env = "CUSTODY_REGISTRY_TIMEOUT",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    registry_timeout: Option<u64>,
}

#[derive(Args)]
struct CopyArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Blobs transferred at once.
    #[arg(long, short = 'j', default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// Also write the pushed manifest digest (`sha256:…`) to this file.
    #[arg(long, value_name = "FILE")]
    digestfile: Option<PathBuf>,
    /// A repository on the destination registry to mount blobs from instead
    /// of uploading them (repeatable).
    #[arg(long, value_name = "REPOSITORY")]
    mount_from: Vec<String>,
    /// Upload in chunks of this many bytes (PATCH) instead of one streaming
    /// PUT, for registries or proxies that limit request sizes.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1024..))]
    chunk_size: Option<u64>,
    /// Print the result as JSON (`reference`, `digest`, `size` of the
    /// manifest, `bytes` copied); errors as JSON on stderr.
    #[arg(long)]
    json: bool,
    /// Where the image comes from.
    #[arg(value_name = "SRC")]
    source: String,
    /// Where it goes.
    #[arg(value_name = "DEST")]
    destination: String,
}

#[derive(Args)]
struct ReferrersArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// Only referrers of this artifact type.
    #[arg(long, value_name = "MEDIA-TYPE")]
    artifact_type: Option<String>,
    /// Print the descriptors as JSON.
    #[arg(long)]
    json: bool,
    /// The image: `host[:port]/repo:tag` or `…@sha256:…`.
    #[arg(value_name = "REF")]
    reference: String,
}

/// Says that a PIN given in a command's arguments is readable by every
/// local user (`/proc/PID/cmdline`, `ps`), and what to use instead.
fn warn_if_pin_in_arguments(uri: &custody_pkcs11::Pkcs11Uri) {
    if uri.pin_in_uri() {
        say!(
            "warning: the token's PIN is in custody's arguments, which every local user can read (ps, /proc); hint: use `pin-source=file:PATH` with a file only this user reads"
        );
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Keys(KeysCommand::Generate {
            pkcs11: Some(uri), ..
        })
        | Command::Keys(KeysCommand::Export { pkcs11: uri, .. }) => warn_if_pin_in_arguments(uri),
        Command::Build(args) => args.warn_if_pin_in_arguments(),
        Command::Serve(args) => args.warn_if_pin_in_arguments(),
        _ => {}
    }
    if matches!(cli.command, Command::Runner(_)) {
        custody_runner::close_inherited_descriptors();
        // Before any thread exists: the build's disk is mounted in a mount
        // namespace of the runner's own.
        if let Err(e) = custody_runner::isolate_mounts() {
            say!("warning: {e}; the build's disk limit will not be enforced");
        }
    }
    // Both rustls providers may be linked in; pick ours explicitly.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // The service says what it does with each build; a command says only
    // what went wrong.
    let (default_filter, format) = match &cli.command {
        Command::Serve(args) => (
            "warn,custody=info,custody_daemon=info,custody_server=info",
            args.log_format,
        ),
        _ => ("warn", serve::LogFormat::Text),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CUSTODY_LOG")
        .unwrap_or_else(|_| default_filter.into());
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        serve::LogFormat::Json => log.json().init(),
        // Colour codes only where a terminal shows them, not into files.
        serve::LogFormat::Text => log.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the runtime starts");
    JSON_ERRORS.store(cli.command.json(), std::sync::atomic::Ordering::Relaxed);
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => report(&err),
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(args) => build::build(*args).await,
        Command::Serve(args) => serve::serve(*args).await,
        Command::Submit(args) => serve::submit(args).await,
        Command::Builds(command) => serve::builds(command).await,
        Command::Push(args) | Command::Pull(args) => copy_image(args).await,
        Command::Referrers(args) => referrers(args).await,
        Command::Artifacts(command) => artifacts::artifacts(command).await,
        Command::Runner(args) => runner(args).await,
        Command::Verify(args) => verify(args).await,
        Command::Keys(KeysCommand::Generate {
            pkcs11: Some(uri),
            algorithm,
            json,
            ..
        }) => {
            let public = tokio::task::spawn_blocking(move || {
                custody_pkcs11::generate(&uri, algorithm)
                    .map(|key| (key, uri))
                    .map_err(|source| Pkcs11Failed {
                        what: "generate a key in",
                        source,
                    })
            })
            .await
            .expect("generating a key does not panic");
            let (key, uri) = public?;
            if json {
                return print_line(&serde_json::json!({ "key_id": key.key_id() }).to_string());
            }
            say!(
                "made a {algorithm} key pair in `{uri}`; write its public key with `custody keys export --pkcs11 URI --out PUB.pem`"
            );
            print_line(key.key_id())
        }
        Command::Keys(KeysCommand::Generate {
            out,
            algorithm,
            json,
            ..
        }) => {
            let out = out.expect("clap requires --out without --pkcs11");
            let (private, public, key) = custody_attest::keys::generate_files(&out, algorithm)?;
            if json {
                let report = serde_json::json!({
                    "key_id": key.verifying_key().key_id(),
                    "private": private,
                    "public": public,
                });
                return print_line(&report.to_string());
            }
            say!(
                "wrote the private key to `{}` and the public key to `{}`",
                private.display(),
                public.display()
            );
            print_line(key.verifying_key().key_id())
        }
        Command::Keys(KeysCommand::Export { pkcs11, out, json }) => {
            let key = tokio::task::spawn_blocking(move || custody_pkcs11::public_key(&pkcs11))
                .await
                .expect("reading a key does not panic")
                .map_err(|source| Pkcs11Failed {
                    what: "read the public key from",
                    source,
                })?;
            fs_err::write(&out, key.to_pem())?;
            if json {
                let report = serde_json::json!({ "key_id": key.key_id(), "public": out });
                return print_line(&report.to_string());
            }
            say!("wrote the public key to `{}`", out.display());
            print_line(key.key_id())
        }
    }
}

/// How to reach registries; `bare` says which registries a `--creds`
/// naming none is for.
pub(crate) fn registry_options(
    args: &RegistryArgs,
    bare: creds::Bare,
) -> anyhow::Result<RegistryOptions> {
    let credentials = creds::source(&args.creds, args.authfile.as_deref(), bare)?;
    Ok(RegistryOptions {
        certs_dirs: registry::certs::default_search_path(args.certs_dir.as_deref()),
        insecure_hosts: args.insecure_registries.clone(),
        credentials,
        request_deadline: args.registry_timeout.map_or(
            registry::DEFAULT_REQUEST_DEADLINE,
            std::time::Duration::from_secs,
        ),
        ..RegistryOptions::default()
    })
}

/// A location the user typed. Layouts and archives are reached without
/// following symlinks (they may sit where builds write), so the path the
/// user named is made real first: their own links on the way are fine.
fn parse_location(text: &str) -> anyhow::Result<Location> {
    Ok(match text.parse::<Location>()? {
        Location::Layout { path, tag } => Location::Layout {
            path: real_path(&path),
            tag,
        },
        Location::DockerArchive { path } => Location::DockerArchive {
            path: real_path(&path),
        },
        registry => registry,
    })
}

/// The registry a location is on, if it is on one.
fn registry_host(location: &Location) -> Option<custody_oci::RegistryHost> {
    match location {
        Location::Registry(reference) => Some(reference.host()),
        _ => None,
    }
}

/// `path` with its longest existing prefix resolved (the rest may not
/// exist yet: a layout about to be written).
fn real_path(path: &std::path::Path) -> PathBuf {
    let mut existing = path.to_owned();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_owned()
                };
            }
            _ => return path.to_owned(),
        }
    }
}

async fn copy_image(args: CopyArgs) -> anyhow::Result<()> {
    let source_location = parse_location(&args.source)?;
    let destination_location = parse_location(&args.destination)?;
    destination_location.check_writable()?;
    let named = [&source_location, &destination_location]
        .into_iter()
        .filter_map(registry_host)
        .collect();
    let mut options = registry_options(&args.registry, creds::Bare::NamedHere(named))?;
    options.chunk_size = args.chunk_size;
    let progress: Arc<dyn copy::Progress> = if std::io::stderr().is_terminal() {
        Arc::new(progress::Bars::new())
    } else {
        Arc::new(progress::Lines::new("copying"))
    };
    let copy_options = CopyOptions {
        jobs: usize::from(args.jobs),
        mount_from: args.mount_from.clone(),
        progress,
    };
    let what = format!("failed to copy `{source_location}` to `{destination_location}`");
    let source = Source::open(&source_location, &options)
        .await
        .context(what.clone())?;
    let destination = Destination::open(&destination_location, &options)
        .await
        .context(what.clone())?;
    let report = copy::copy(&source, &destination, &copy_options)
        .await
        .context(what)?;
    tracing::info!(
        copied = report.blobs_copied,
        present = report.blobs_present,
        mounted = report.blobs_mounted,
        bytes = report.bytes_copied,
        "copy finished"
    );
    if let Some(path) = &args.digestfile {
        fs_write(path, report.descriptor.digest().to_string().as_bytes())?;
    }
    if args.json {
        let result = serde_json::json!({
            "reference": report.pinned.to_string(),
            "digest": report.descriptor.digest().to_string(),
            "size": report.descriptor.size(),
            "bytes": report.bytes_copied,
        });
        return print_line(&result.to_string());
    }
    print_line(&report.pinned)
}

async fn referrers(args: ReferrersArgs) -> anyhow::Result<()> {
    let reference: Reference = args.reference.parse()?;
    let options = registry_options(
        &args.registry,
        creds::Bare::NamedHere(vec![reference.host()]),
    )?;
    let what = format!("failed to list referrers of `{reference}`");
    let client = registry::Client::new(reference.api_host(), &options)
        .await
        .context(what.clone())?;
    let digest = match reference.digest() {
        Some(digest) => digest.clone(),
        None => {
            let (descriptor, _) = client
                .manifest(reference.repository(), &reference.manifest_ref())
                .await
                .context(what.clone())?;
            descriptor.digest().clone()
        }
    };
    let found = client
        .referrers(
            reference.repository(),
            &digest,
            args.artifact_type.as_deref(),
        )
        .await
        .context(what)?;
    if args.json {
        let text = serde_json::to_string_pretty(&found).expect("descriptors serialise");
        return print_line(&text);
    }
    for descriptor in &found {
        let artifact_type = descriptor
            .artifact_type()
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_else(|| "-".into());
        print_line(&format!(
            "{}\t{}\t{}",
            descriptor.digest(),
            artifact_type,
            descriptor.size()
        ))?;
    }
    Ok(())
}

fn fs_write(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    Ok(fs_err::write(path, bytes)?)
}

/// A step image digest as provenance records it: `sha256:` and 64 hex
/// digits (what `custody verify` prints and `skopeo inspect` shows).
fn parse_image_digest(text: &str) -> Result<String, String> {
    let digest: custody_oci::Digest = text.parse().map_err(|_| {
        format!("`{text}` is not an image digest: write `sha256:` followed by 64 hex digits")
    })?;
    Ok(digest.to_string())
}

fn parse_host_pattern(text: &str) -> Result<custody_provenance::policy::HostPattern, String> {
    custody_provenance::policy::HostPattern::parse(text)
}

/// The keys `verify` trusts: each `--key` file and each key of a
/// `--keys` file (a service's `/api/v1/keys` answer).
fn keyring(
    files: &[PathBuf],
    list: Option<&std::path::Path>,
) -> anyhow::Result<custody_attest::keys::Keyring> {
    use custody_attest::keys::{Keyring, VerifyingKey};
    let mut ring = Keyring::default();
    for path in files {
        ring.add(VerifyingKey::from_pem_file(path)?);
    }
    if let Some(path) = list {
        let bad = |reason: String| custody_attest::Error::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        let text = fs_err::read(path)?;
        let listed: custody_server::api::KeyList = serde_json::from_slice(&text).map_err(|e| {
            bad(format!(
                "not the JSON `GET /api/v1/keys` returns ({e}); save it with `curl -H 'Authorization: Bearer …' https://HOST/api/v1/keys`"
            ))
        })?;
        for listed in listed.keys {
            let key = VerifyingKey::from_pem(listed.pem.as_bytes())
                .map_err(|e| bad(format!("key `{}`: {e}", listed.key_id)))?;
            // The id is recomputed from the key: a list cannot make a key
            // answer to another key's id.
            if key.key_id() != listed.key_id {
                return Err(bad(format!(
                    "it lists key `{}` with a public key whose id is `{}`",
                    listed.key_id,
                    key.key_id()
                ))
                .into());
            }
            ring.add(key);
        }
        if ring.is_empty() {
            return Err(bad("it lists no keys".into()).into());
        }
    }
    Ok(ring)
}

async fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let location = parse_location(&args.image)?;
    let named = registry_host(&location).into_iter().collect();
    let options = registry_options(&args.registry, creds::Bare::NamedHere(named))?;
    let keys = keyring(&args.key, args.keys.as_deref())?;
    let (source_repository, source_commit) = match &args.source {
        // A commit is 40 (or 64) hex digits after the last `@`.
        Some(source) => match source.rsplit_once('@') {
            Some((url, commit))
                if commit.len() >= 7 && commit.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                (Some(url.to_owned()), Some(commit.to_owned()))
            }
            _ => (Some(source.clone()), None),
        },
        None => (None, None),
    };
    let policy = custody_provenance::policy::Policy {
        builder_id: args.builder_id.clone(),
        source_repository,
        source_commit,
        allowed_step_images: (!args.allow_step_images.is_empty())
            .then(|| args.allow_step_images.clone()),
        allow_dirty: args.allow_dirty,
        allow_inline_spec: args.allow_inline_spec,
        allowed_egress: (args.no_egress || !args.allow_egress.is_empty())
            .then(|| args.allow_egress.clone()),
    };
    let verified = custody_provenance::verify::verify(&location, &options, &keys, &policy).await?;
    if args.json {
        let report = serde_json::json!({
            "verified": true,
            "target": verified.target,
            "keyId": verified.statement.key_id(),
            "statement": verified.statement.statement(),
        });
        return print_line(&serde_json::to_string_pretty(&report).expect("json"));
    }
    let provenance = &verified.provenance;
    let source = custody_provenance::build_type::source(provenance)
        .map(|s| {
            format!(
                "{} @ {}{}",
                s.uri.as_deref().unwrap_or("?"),
                s.digest.get("gitCommit").map(String::as_str).unwrap_or("?"),
                if custody_provenance::build_type::is_dirty(Some(s)) {
                    " (dirty: built with uncommitted changes)"
                } else {
                    ""
                }
            )
        })
        .unwrap_or_else(|| "-".into());
    let invocation = provenance
        .run_details
        .metadata
        .as_ref()
        .map(|m| m.invocation_id.as_str())
        .unwrap_or("-");
    print_line(&format!(
        "verified {}\n  signed by    {}\n  builder      {}\n  source       {}\n  step images  {}\n  invocation   {}\n  egress       {}",
        verified.target,
        verified.statement.key_id(),
        provenance.run_details.builder.id,
        source,
        custody_provenance::build_type::step_images(provenance).count(),
        invocation,
        egress_summary(provenance),
    ))
}

/// What the steps reached through their egress proxies, for people: each
/// destination once, with the steps that reached it.
fn egress_summary(provenance: &custody_attest::statement::Provenance) -> String {
    let mut reached: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for record in custody_provenance::build_type::egress(provenance) {
        let steps = reached.entry(record.uri).or_default();
        if !steps.contains(&record.step) {
            steps.push(record.step);
        }
    }
    if reached.is_empty() {
        return "none (no step reached anything outside)".to_owned();
    }
    let lines: Vec<String> = reached
        .iter()
        .map(|(uri, steps)| format!("{uri} (step {})", steps.join(", ")))
        .collect();
    format!("{}:\n    {}", lines.len(), lines.join("\n    "))
}

async fn runner(args: RunnerArgs) -> anyhow::Result<()> {
    let token = match &args.token_file {
        Some(path) => {
            let text = fs_err::read_to_string(path)?;
            // One use only: the file goes as soon as it is read.
            fs_err::remove_file(path)?;
            custody_wire::JobToken::from_text(&text)
        }
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("failed to read the token from stdin")?;
            custody_wire::JobToken::from_text(&line)
        }
    };
    let certificate_pem = match &args.daemon_cert_file {
        Some(path) => fs_err::read_to_string(path)?,
        None => std::env::var("CUSTODY_DAEMON_CERT").context(
            "no daemon certificate: pass `--daemon-cert-file` or set `CUSTODY_DAEMON_CERT`",
        )?,
    };
    let settings = custody_runner::Settings {
        daemon: args.daemon,
        job_id: args.job_id.clone(),
        token,
        certificate_pem,
        workdir: args.workdir,
        connect_deadline: std::time::Duration::from_secs(args.connect_timeout),
    };
    custody_runner::run(settings)
        .await
        .with_context(|| format!("runner for job `{}` failed", args.job_id))
}

/// Prints one line of data; a closed pipe is not an error.
pub(crate) fn print_line(line: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("failed to write to stdout"),
    }
}

/// A `custody keys … --pkcs11` that the token refused.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} the PKCS#11 token")]
struct Pkcs11Failed {
    what: &'static str,
    #[source]
    source: custody_pkcs11::Error,
}

/// Whether errors go to stderr as one JSON object: the command was given
/// `--json`, so whoever reads it reads JSON.
static JSON_ERRORS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Prints `error:` / `Caused by:` / `hint:` (or, after `--json`, the same
/// as one JSON object) and picks the exit code.
fn report(err: &anyhow::Error) -> ExitCode {
    // Whoever read stdout stopped (`custody builds list | head -1`):
    // nothing went wrong, and there is no one to tell.
    let pipe_closed = err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if pipe_closed {
        return ExitCode::SUCCESS;
    }
    let unscoped = err.downcast_ref::<creds::Unscoped>();
    // A registry's hint holds wherever its error surfaced (a build's push,
    // a verification's fetch), not only from `push` and `pull`.
    let hint = err
        .chain()
        .find_map(registry_error)
        .and_then(custody_oci::Error::hint)
        .or_else(|| unscoped.map(creds::Unscoped::hint))
        .or_else(|| {
            err.chain()
                .find_map(|c| c.downcast_ref::<custody_pkcs11::Error>())
                .and_then(custody_pkcs11::Error::hint)
        });
    let exit = exit_code(err);
    let text = if JSON_ERRORS.load(std::sync::atomic::Ordering::Relaxed) {
        let api = err
            .downcast_ref::<custody_server::client::ClientError>()
            .and_then(|e| match e {
                custody_server::client::ClientError::Api { code, .. } => Some(code.to_string()),
                _ => None,
            });
        let code = api.unwrap_or_else(|| {
            match exit {
                2 => "usage",
                3 => "cannot_start",
                _ if err.downcast_ref::<build::BuildFailed>().is_some() => "build_failed",
                _ if err
                    .downcast_ref::<custody_provenance::verify::Rejection>()
                    .is_some() =>
                {
                    "not_verified"
                }
                _ => "failed",
            }
            .to_owned()
        });
        let object = serde_json::json!({
            "error": {
                "code": code,
                "message": err.to_string(),
                "causes": err.chain().skip(1).map(|c| c.to_string()).collect::<Vec<_>>(),
                "hint": hint,
                "exit": exit,
            }
        });
        format!("{object}\n")
    } else {
        let mut chain = err.chain();
        let mut text = String::new();
        if let Some(top) = chain.next() {
            text.push_str(&format!("error: {top}\n"));
        }
        for cause in chain {
            text.push_str(&format!("  Caused by: {cause}\n"));
        }
        if let Some(hint) = hint {
            text.push_str(&format!("hint: {hint}\n"));
        }
        text
    };
    let _ = std::io::stderr().write_all(text.as_bytes());
    ExitCode::from(exit)
}

/// The registry error `cause` is or stands for (a verification's fetch
/// wraps one transparently, which hides it from the chain).
fn registry_error<'a>(
    cause: &'a (dyn std::error::Error + 'static),
) -> Option<&'a custody_oci::Error> {
    cause.downcast_ref::<custody_oci::Error>().or_else(|| {
        match cause.downcast_ref::<custody_provenance::verify::VerifyError>()? {
            custody_provenance::verify::VerifyError::Oci(e) => Some(e),
            _ => None,
        }
    })
}

/// 2 when the fault is in how custody was called or set up, 3 when it
/// cannot start here, 1 for everything else (a failed build, a refused
/// verification, a registry that said no).
fn exit_code(err: &anyhow::Error) -> u8 {
    // A key or signer that cannot be used, however deep: the daemon
    // refuses to start (exit 2) rather than fail builds later.
    let key_problem = err.chain().any(|c| {
        c.downcast_ref::<custody_attest::Error>().is_some()
            || c.downcast_ref::<custody_pkcs11::Error>().is_some()
            || matches!(
                c.downcast_ref::<custody_server::serve::ServeError>(),
                Some(custody_server::serve::ServeError::Daemon(
                    custody_daemon::embedded::Error::Key(_)
                        | custody_daemon::embedded::Error::Signer { .. }
                ))
            )
            || matches!(
                c.downcast_ref::<custody_daemon::embedded::Error>(),
                Some(
                    custody_daemon::embedded::Error::Key(_)
                        | custody_daemon::embedded::Error::Signer { .. }
                )
            )
    });
    let misused = err.downcast_ref::<build::Usage>().is_some()
        || err.downcast_ref::<creds::Unscoped>().is_some()
        || err
            .downcast_ref::<custody_server::client::ClientError>()
            .is_some_and(|e| {
                matches!(
                    e,
                    custody_server::client::ClientError::Api { status: 400, .. }
                )
            })
        || err
            .downcast_ref::<custody_daemon::spec::SpecError>()
            .is_some();
    let usage = err
        .downcast_ref::<custody_oci::Error>()
        .or_else(|| registry_error(err.downcast_ref::<custody_provenance::verify::VerifyError>()?))
        .is_some_and(custody_oci::Error::is_usage);
    if usage || key_problem || misused {
        2
    } else if cannot_start(err) {
        3
    } else {
        1
    }
}

/// Whether custody could not set itself up on this machine (its data
/// directory, job store, a listener, the executor): not a failed build.
fn cannot_start(err: &anyhow::Error) -> bool {
    use custody_daemon::embedded::Error as Daemon;
    use custody_server::serve::ServeError;
    let daemon = |e: &Daemon| !matches!(e, Daemon::Key(_) | Daemon::Signer { .. });
    err.downcast_ref::<Daemon>().is_some_and(daemon)
        || err.downcast_ref::<ServeError>().is_some_and(|e| match e {
            ServeError::Daemon(e) => daemon(e),
            ServeError::Listen { .. } | ServeError::Http(_) => true,
        })
        || err
            .downcast_ref::<custody_daemon::store::StoreError>()
            .is_some()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::CommandFactory as _;

    use super::Cli;

    /// Every command and subcommand, with the path that reaches it.
    fn commands() -> Vec<(String, clap::Command)> {
        fn walk(path: String, command: &clap::Command, into: &mut Vec<(String, clap::Command)>) {
            into.push((path.clone(), command.clone()));
            for sub in command.get_subcommands() {
                walk(format!("{path} {}", sub.get_name()), sub, into);
            }
        }
        let mut all = Vec::new();
        walk("custody".into(), &Cli::command(), &mut all);
        all
    }

    #[test]
    fn every_flag_and_argument_says_what_it_is_for() {
        let mut silent = Vec::new();
        for (path, command) in commands() {
            if command.is_hide_set() {
                continue;
            }
            if command.get_about().is_none() && path != "custody" {
                silent.push(path.clone());
            }
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") || arg.is_hide_set() {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    silent.push(format!("{path} {id}"));
                }
            }
        }
        assert!(silent.is_empty(), "without help text: {silent:#?}");
    }

    #[test]
    fn a_short_flag_means_one_thing_everywhere() {
        let mut meanings: BTreeMap<char, BTreeMap<String, Vec<String>>> = BTreeMap::new();
        for (path, command) in commands() {
            for arg in command.get_arguments() {
                if let (Some(short), Some(long)) = (arg.get_short(), arg.get_long()) {
                    meanings
                        .entry(short)
                        .or_default()
                        .entry(long.to_owned())
                        .or_default()
                        .push(path.clone());
                }
            }
        }
        let clashes: Vec<_> = meanings
            .iter()
            .filter(|(_, longs)| longs.len() > 1)
            .collect();
        assert!(
            clashes.is_empty(),
            "short flags with two meanings: {clashes:#?}"
        );
    }

    #[test]
    fn commands_that_print_data_offer_json() {
        let mut without = Vec::new();
        for (path, command) in commands() {
            let prints_data = command.get_subcommands().next().is_none()
                && !command.is_hide_set()
                && !["custody serve", "custody builds provenance"].contains(&path.as_str());
            if prints_data
                && !command
                    .get_arguments()
                    .any(|a| a.get_long() == Some("json"))
            {
                without.push(path);
            }
        }
        assert!(without.is_empty(), "no --json: {without:#?}");
    }
}
