//! `custody build`: the embedded daemon runs one build and prints it live.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use custody_daemon::build::{BuildRequest, Outcome, Progress};
use custody_daemon::embedded;
use custody_wire::events::{RunnerEvent, StepEnd, Stream};

use crate::RegistryArgs;

#[derive(Args)]
pub struct BuildArgs {
    /// The directory to build: its `custody.yaml` is the spec, and unless the
    /// spec names a git `source`, the directory itself is the source.
    #[arg(value_name = "DIR", default_value = ".")]
    dir: PathBuf,
    /// The spec file (default: `DIR/custody.yaml`).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    file: Option<PathBuf>,
    /// Where the job store, step logs and (unless `--signing-key`) the
    /// signing key live [default: $XDG_DATA_HOME/custody or
    /// ~/.local/share/custody].
    #[arg(long, value_name = "DIR", env = "CUSTODY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The key that signs the provenance: a PKCS#8 PEM file, or a key in a
    /// PKCS#11 token as an RFC 7512 URI
    /// (`pkcs11:token=T;object=K?module-path=/…so&pin-source=file:/…`; keep
    /// the PIN in a file, not in the URI) [default: the data directory's
    /// `keys/custody.key`, created on first use].
    #[arg(long, value_name = "PEM|URI")]
    signing_key: Option<custody_daemon::signer::KeySource>,
    /// This builder's identity, recorded as `runDetails.builder.id` and
    /// checked by `custody verify --builder-id` [default:
    /// custody+local://HOSTNAME].
    #[arg(long, value_name = "URI", env = "CUSTODY_BUILDER_ID")]
    builder_id: Option<String>,
    /// Also write the signed DSSE envelope here.
    #[arg(long, value_name = "FILE")]
    provenance_out: Option<PathBuf>,
    /// Also write the digest of each image and artifact pushed
    /// (`sha256:…`), one per line in the spec's order.
    #[arg(long, value_name = "FILE")]
    digestfile: Option<PathBuf>,
    /// Print JSON on stdout: each step's log line as one JSON object, then
    /// the build's result (`id`, `state`, `subjects`, `provenance`); errors
    /// as a JSON object on stderr.
    #[arg(long)]
    json: bool,
    /// A secret steps may ask for by NAME (`secrets: [NAME]`, or
    /// `env: { VAR: { secret: NAME } }`), its value read from a file or
    /// from this environment's variable; never stored, logged or signed.
    /// Repeatable.
    #[arg(long = "secret", value_name = "NAME=file:PATH|env:VAR")]
    secrets: Vec<String>,
    #[command(flatten)]
    registry: RegistryArgs,
    #[command(flatten)]
    bounds: crate::bounds::BoundsArgs,
}

impl BuildArgs {
    /// Warns when `--signing-key` carries the token's PIN.
    pub fn warn_if_pin_in_arguments(&self) {
        if let Some(custody_daemon::signer::KeySource::Pkcs11(uri)) = &self.signing_key {
            crate::warn_if_pin_in_arguments(uri);
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }
}

/// The build ran and failed (exit 1), as opposed to custody being misused.
#[derive(Debug, thiserror::Error)]
#[error("build {id} {state}: {reason}")]
pub struct BuildFailed {
    id: String,
    state: &'static str,
    reason: String,
}

impl BuildFailed {
    pub fn new(id: impl ToString, state: &'static str, reason: String) -> Self {
        Self {
            id: id.to_string(),
            state,
            reason,
        }
    }
}

/// A problem with how `build` was called (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

pub async fn build(args: BuildArgs) -> anyhow::Result<()> {
    let request = read_request(&args)?;
    let secrets = secrets(&args.secrets, &request)?;
    let bounds = args.bounds.resolve(Default::default())?;
    let data_dir = match args.data_dir.clone() {
        Some(dir) => dir,
        None => embedded::default_data_dir().ok_or_else(|| {
            Usage("no data directory: set HOME, XDG_DATA_HOME or pass `--data-dir`".into())
        })?,
    };
    let builder_id = args
        .builder_id
        .clone()
        .unwrap_or_else(|| format!("custody+local://{}", custody_runner::hostname()));
    let mut config = embedded::Config::local(
        data_dir.clone(),
        builder_id,
        crate::registry_options(
            &args.registry,
            crate::creds::Bare::Refused { command: "build" },
        )?,
        std::env::current_exe().context("cannot find the custody binary")?,
    );
    config.signing_key = args.signing_key.clone();
    config.bounds = bounds;
    config.secrets = secrets;
    let connector = embedded::bind_connector(&config).await?;
    let daemon = embedded::start(config, connector).await?;
    if daemon.key_created {
        say!(
            "created a signing key at `{}`; its public key, for `custody verify --key`, is `{}`",
            daemon.key_source,
            daemon
                .public_key_path
                .as_deref()
                .map_or_else(String::new, |p| p.display().to_string())
        );
    }
    let step_names: Vec<String> = request
        .given_spec()
        .map(|spec| spec.steps.iter().map(|s| s.name.clone()).collect())
        .unwrap_or_default();
    let mut printer = Printer {
        step_names,
        pushes: Default::default(),
        json: args.json,
    };
    let cancel = async {
        let _ = tokio::signal::ctrl_c().await;
        "interrupted (Ctrl-C)".to_owned()
    };
    let outcome = daemon
        .service
        .run(request, |progress| printer.show(progress), cancel)
        .await?;
    daemon.service.store.close().await;

    let (id, envelope, subjects) = match outcome {
        Outcome::Succeeded {
            id,
            envelope,
            subjects,
        } => (id, envelope, subjects),
        Outcome::Failed { id, error } => {
            return Err(BuildFailed::new(id, "failed", error).into());
        }
        Outcome::Cancelled { id, reason } => {
            return Err(BuildFailed::new(id, "cancelled", reason).into());
        }
    };
    let stored = embedded::provenance_file(&data_dir, &id);
    write_file(&stored, &envelope)?;
    if let Some(out) = &args.provenance_out {
        fs_err::write(out, &envelope)?;
    }
    if let Some(path) = &args.digestfile {
        let digests: String = subjects
            .iter()
            .filter(|s| {
                use custody_provenance::build_type::SubjectKind;
                matches!(
                    SubjectKind::of(s),
                    Some(SubjectKind::Image | SubjectKind::Artifact)
                )
            })
            .filter_map(|s| s.digest.iter().next())
            .map(|(alg, hex)| format!("{alg}:{hex}\n"))
            .collect();
        fs_err::write(path, digests)?;
    }
    if args.json {
        let report = serde_json::json!({
            "id": id.as_str(),
            "state": "succeeded",
            "subjects": subjects,
            "provenance": stored,
        });
        return crate::print_line(&serde_json::to_string(&report)?);
    }
    let mut summary = format!("build {id} succeeded\n");
    for subject in &subjects {
        let digest = subject
            .digest
            .iter()
            .map(|(alg, hex)| format!("{alg}:{hex}"))
            .next()
            .unwrap_or_default();
        summary.push_str(&format!(
            "  {digest}  {}\n",
            subject.name.as_deref().unwrap_or("")
        ));
    }
    summary.push_str(&format!("provenance: {}", stored.display()));
    if let Some(out) = &args.provenance_out {
        summary.push_str(&format!(" and {}", out.display()));
    }
    summary.push_str(&format!(
        " (also in the job store; attached to every pushed image)\nverify with: custody verify IMAGE --key {}",
        daemon
            .public_key_path
            .as_deref()
            .map_or_else(|| "PUBLIC.pem".to_owned(), |p| p.display().to_string())
    ));
    crate::print_line(&summary)
}

/// The build request for `args`: the spec read once (the bytes whose
/// digest the provenance records are the bytes parsed and run; a pipe is
/// fine, `-f <(generate-spec)`).
fn read_request(args: &BuildArgs) -> anyhow::Result<BuildRequest> {
    if !args.dir.is_dir() {
        return Err(Usage(format!("`{}` is not a directory", args.dir.display())).into());
    }
    let spec_path = args
        .file
        .clone()
        .unwrap_or_else(|| args.dir.join("custody.yaml"));
    if !spec_path.exists() || spec_path.is_dir() {
        return Err(Usage(format!(
            "no build spec at `{}`: write a custody.yaml there, or name one with `-f`",
            spec_path.display()
        ))
        .into());
    }
    let spec_bytes = fs_err::read(&spec_path)?;
    Ok(BuildRequest::parse(
        spec_path.canonicalize().unwrap_or(spec_path.clone()),
        spec_bytes,
        &args.dir,
    )?)
}

/// The `--secret` definitions, checked against the spec: a secret the
/// spec names that is not defined is a spec error at its line (exit 2),
/// and one that cannot be read is said now, before anything runs.
fn secrets(
    definitions: &[String],
    request: &BuildRequest,
) -> anyhow::Result<custody_daemon::secrets::Secrets> {
    use custody_daemon::build::SpecInput;
    use custody_daemon::secrets::{SecretDefinition, SecretSource, Secrets};
    let mut secrets = Secrets::default();
    for definition in definitions {
        let (name, source) = definition.split_once('=').ok_or_else(|| {
            Usage(format!(
                "`--secret {definition}`: write `NAME=file:PATH` or `NAME=env:VAR`"
            ))
        })?;
        let source =
            SecretSource::parse(source).map_err(|e| Usage(format!("`--secret {name}`: {e}")))?;
        secrets
            .define(
                name,
                SecretDefinition {
                    source,
                    allowed: None,
                },
            )
            .map_err(|e| Usage(format!("`--secret`: {e}")))?;
    }
    let SpecInput::Given { bytes, spec, .. } = &request.spec else {
        return Ok(secrets);
    };
    // No allow-lists here: the user's own secrets, for the user's own spec.
    if let Err(refusal) = secrets.check(spec, None, false) {
        let (line, column) = refusal.location();
        let text = String::from_utf8_lossy(bytes);
        return Err(custody_daemon::spec::error_at(
            &text,
            &request.spec_path,
            line,
            column,
            format!(
                "{refusal}; define it with `--secret NAME=file:PATH` or `--secret NAME=env:VAR`"
            ),
        )
        .into());
    }
    for used in spec.secret_uses() {
        secrets
            .read(used)
            .map_err(|e| Usage(format!("the secret `{}` cannot be read: {e}", used.name)))?;
    }
    Ok(secrets)
}

/// Prints what happens: the daemon's progress on stderr, the steps' output
/// prefixed with the step's name on stdout or stderr as they wrote it.
struct Printer {
    step_names: Vec<String>,
    /// When each push was first heard of, for its rate.
    pushes: std::collections::HashMap<String, Instant>,
    /// Log lines as JSON objects on stdout (`--json`).
    json: bool,
}

impl Printer {
    fn show(&mut self, progress: Progress) {
        match progress {
            Progress::Queued { id } => say!("==> build {id}"),
            Progress::Source { description } => say!("==> source: {description}"),
            Progress::StepImage { step, pinned } => {
                say!("==> step `{step}` image: {pinned}");
            }
            Progress::Checked {
                destination,
                digest,
            } => say!("==> checked {destination} is {digest}"),
            Progress::Attached { destination } => {
                say!("==> attached provenance to {destination}");
            }
            Progress::Tagged { destination } => say!("==> tagged {destination}"),
            Progress::Runner(event) => match event {
                RunnerEvent::Hello { hostname, pid, .. } => {
                    say!("==> runner on {hostname} (pid {pid})");
                }
                RunnerEvent::StepStarted { name, .. } => say!("==> step `{name}`"),
                RunnerEvent::Log(line) => {
                    let name = self
                        .step_names
                        .get(line.step as usize)
                        .map_or("?", String::as_str);
                    if self.json {
                        let event = serde_json::json!({
                            "step": name,
                            "stream": match line.stream {
                                Stream::Stdout => "stdout",
                                Stream::Stderr => "stderr",
                            },
                            "line": String::from_utf8_lossy(&line.line),
                        });
                        let _ = writeln!(std::io::stdout(), "{event}");
                        return;
                    }
                    let mut text = format!("[{name}] ").into_bytes();
                    text.extend_from_slice(&line.line);
                    text.push(b'\n');
                    // A closed pipe must not stop the build.
                    let _ = match line.stream {
                        Stream::Stderr => std::io::stderr().write_all(&text),
                        Stream::Stdout => std::io::stdout().write_all(&text),
                    };
                }
                RunnerEvent::StepFinished {
                    index,
                    end: StepEnd::TimedOut,
                } => {
                    say!("==> step {index} timed out");
                }
                RunnerEvent::Pushing {
                    destination,
                    bytes,
                    total,
                } => {
                    // Plain lines every few seconds (the runner's pace),
                    // readable in a CI log as on a terminal.
                    let began = *self
                        .pushes
                        .entry(destination.clone())
                        .or_insert_with(Instant::now);
                    say!(
                        "==> pushing {destination}: {}",
                        crate::progress::how_far(bytes, total, began)
                    );
                }
                RunnerEvent::Pushed(pushed) => {
                    say!(
                        "==> pushed {} ({} of blobs sent)",
                        pushed.reference,
                        custody_runner::human_bytes(pushed.bytes_sent)
                    );
                }
                _ => {}
            },
        }
    }
}

/// Writes a file, making its directory.
fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        fs_err::create_dir_all(dir)?;
    }
    fs_err::write(path, bytes)?;
    Ok(())
}
