//! `custody.yaml`: what a build is. Parsed strictly: unknown fields, wrong
//! types, missing fields and values that make no sense are errors that name
//! the file, line and column, with the offending line shown.
//!
//! ```yaml
//! source:                      # optional when building a local directory
//!   git: https://example.org/app.git
//!   revision: main             # resolved to a commit; the commit is recorded
//! disk: 5GiB                   # the build's disk (default: the daemon's, 20GiB)
//! steps:
//!   - name: build
//!     image: registry.example.org/tools/builder@sha256:…   # omitted: the host's root, read-only
//!     run: make image OUT=/output/app                        # or args: [make, image]
//!     env: { KEY: value, NPM_TOKEN: { secret: npm_token } }        # a secret as a variable
//!     secrets: [npm_token]                                   # `/run/secrets/npm_token`, this step only
//!     network: false                                         # default: only `lo`; true: the egress proxy
//!                                                            # or a host list: ["pypi.org", "*.pythonhosted.org"]
//!     timeout: 10m                                           # seconds, or 90s / 10m / 2h
//!     memory: 2GiB                                           # cgroup limits (defaults 4GiB, 4096)
//!     pids: 512
//!     user_namespaces: false                                 # default: the step cannot make user namespaces;
//!                                                            # true for rootless container builders (buildah, podman)
//! images:
//!   - from: oci:/output/app           # or docker-archive:/output/app.tar
//!     to: registry.example.org/team/app:{revision}
//! artifacts:
//!   - paths: ["dist/*.tar.gz"]        # globs in the workspace
//!     to: registry.example.org/team/app-dist:{revision}
//! pushes:                             # steps push here themselves
//!   - name: app                       # `$CUSTODY_REGISTRY/app[:TAG]` in every step
//!     to: registry.example.org/team/app   # pushed there after the last step, tags kept
//! pulls:                              # steps read here, read-only
//!   - name: base                      # `$CUSTODY_REGISTRY/base:TAG` or `@sha256:…`
//!     from: registry.example.org/library/debian   # every manifest read is recorded
//! ```
//!
//! Destinations may use `{revision}` (the revision asked for), `{commit}`
//! (the full commit), `{short_commit}` (its first 12 characters) and `{job}`
//! (the job id).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use custody_oci::{Location, Reference};
pub use custody_source::{GitUrl, GitUrlError};
use serde::Deserialize;
use serde_saphyr::Spanned;

/// Where step outputs are written, inside the sandbox.
pub const OUTPUT_DIR: &str = "/output";
/// A step's memory limit when the spec sets none.
pub const DEFAULT_MEMORY_BYTES: u64 = 4 << 30;
/// A step's process limit when the spec sets none.
pub const DEFAULT_PIDS: u32 = 4096;
/// The smallest disk a build may ask for.
pub const MIN_DISK_BYTES: u64 = 64 << 20;
/// The placeholders destinations may use.
pub const PLACEHOLDERS: &[&str] = &["revision", "commit", "short_commit", "job"];

/// A parsed, checked build spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub source: Option<GitSource>,
    /// The build's disk (workspace, `/output`, step image roots) in bytes;
    /// `None` leaves the daemon's default.
    pub disk: Option<u64>,
    pub steps: Vec<Step>,
    pub images: Vec<ImageOutput>,
    pub artifacts: Vec<ArtifactOutput>,
    /// Repositories steps push to themselves, through the runner's gateway.
    pub pushes: Vec<Push>,
    /// Repositories steps read through the runner's gateway.
    pub pulls: Vec<Pull>,
}

impl Spec {
    /// Where the runner pushes the declared outputs: each image's `to`,
    /// then each artifact's, in the spec's order.
    pub fn output_destinations(&self) -> impl Iterator<Item = &Destination> {
        self.images
            .iter()
            .map(|i| &i.to)
            .chain(self.artifacts.iter().map(|a| &a.to))
    }
}

/// A repository steps read as `$CUSTODY_REGISTRY/NAME:TAG` (or `@DIGEST`),
/// served from a registry repository with the platform's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pull {
    pub name: custody_gateway::Repository,
    /// `host[:port]/path`: no tag, no digest, no placeholder.
    pub from: Reference,
    /// Where the spec says `from`, for errors found later.
    pub line: u64,
    pub column: u64,
}

/// A repository steps push to as `$CUSTODY_REGISTRY/NAME[:TAG]`, and the
/// registry repository what they pushed goes to once every step succeeded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Push {
    pub name: custody_gateway::Repository,
    /// `host[:port]/path`: no tag (the step's tags are kept), no digest.
    pub to: Destination,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitSource {
    /// Never with credentials: they would be stored and signed.
    pub git: GitUrl,
    /// Branch, tag or commit; `HEAD` when not given.
    pub revision: String,
    /// The directory of the repository the build runs in: the steps'
    /// working directory, and what artifact `paths` are relative to
    /// (`custody submit DIR` sends DIR's path in its checkout).
    pub path: WorkDir,
}

/// A directory inside a source, as a path relative to its root: only
/// plain names, `/`-separated (no `..`, `.`, empty or absolute parts);
/// empty for the root itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkDir(String);

impl WorkDir {
    /// `text` as a directory inside a source; `""`, `.` and `./` are the
    /// root; a trailing `/` is dropped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim_end_matches('/');
        if trimmed.is_empty() || trimmed == "." {
            return Ok(Self::default());
        }
        let plain = |part: &str| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && !part.contains(['\\', '\0'])
                && !part.chars().any(char::is_control)
        };
        if text.starts_with('/') || trimmed.len() > 1024 || !trimmed.split('/').all(plain) {
            return Err(format!(
                "`{text}` is not a directory inside the source: write a relative path of plain names (`examples/hello`), without `..`"
            ));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// `""` for the root.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for WorkDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_root() { "." } else { &self.0 })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub name: String,
    /// The step's root filesystem; `None` runs on the host's root, read-only.
    pub image: Option<Reference>,
    pub command: Command,
    pub env: BTreeMap<String, String>,
    /// Secrets the step gets as files, `/run/secrets/NAME`.
    pub secrets: Vec<SecretUse>,
    /// Environment variables whose value is a secret: `VAR → secret`.
    pub secret_env: BTreeMap<String, SecretUse>,
    /// Whether the step gets the egress proxy (`network: true`, or a list).
    pub network: bool,
    /// With `network` as a list: the only hosts the proxy connects to.
    pub hosts: Vec<custody_net::HostPattern>,
    pub timeout: Option<Duration>,
    /// Memory limit in bytes; `None` leaves the runner's default.
    pub memory: Option<u64>,
    /// Process limit; `None` leaves the runner's default.
    pub pids: Option<u32>,
    /// Whether the step may make user namespaces (`user_namespaces: true`).
    pub user_namespaces: bool,
}

/// A secret a step names, and where, for errors found later (an unknown
/// secret, one the build's source may not use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretUse {
    pub name: String,
    pub line: u64,
    pub column: u64,
}

impl Spec {
    /// Every secret the spec names, in the order written.
    pub fn secret_uses(&self) -> impl Iterator<Item = &SecretUse> {
        self.steps
            .iter()
            .flat_map(|step| step.secrets.iter().chain(step.secret_env.values()))
    }
}

impl Step {
    /// The names of the secrets the step receives, as a file or a
    /// variable, sorted, each once.
    pub fn secret_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .secrets
            .iter()
            .chain(self.secret_env.values())
            .map(|used| used.name.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// A shell command line (`sh -c`).
    Run(String),
    /// An argument vector, run as is.
    Args(Vec<String>),
}

/// An image a step wrote under `/output`, and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageOutput {
    /// `oci:` layout or `docker-archive:` path, under `/output`.
    pub from: Location,
    pub to: Destination,
}

/// Workspace files that go out as one OCI artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactOutput {
    /// Globs relative to the workspace.
    pub paths: Vec<String>,
    pub to: Destination,
}

/// A destination with placeholders still in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    template: String,
    /// Where the spec says it, for errors found later (`file:line:column`).
    pub line: u64,
    pub column: u64,
}

/// The values placeholders stand for in one build.
pub struct Values<'a> {
    pub revision: &'a str,
    pub commit: &'a str,
    pub job: &'a str,
}

impl Destination {
    pub fn template(&self) -> &str {
        &self.template
    }

    /// The destination for one build.
    pub fn resolve(&self, values: &Values<'_>) -> Result<Location, custody_oci::Error> {
        let short = &values.commit[..values.commit.len().min(12)];
        substitute(&self.template, |name| match name {
            "revision" => Some(values.revision),
            "commit" => Some(values.commit),
            "short_commit" => Some(short),
            "job" => Some(values.job),
            _ => None,
        })
        .expect("placeholders were checked when the spec was read")
        .parse()
    }
}

/// A spec that cannot be used, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.render())]
pub struct SpecError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
    /// The offending line, when known.
    pub snippet: Option<String>,
}

impl SpecError {
    fn render(&self) -> String {
        let mut text = format!(
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        );
        if let Some(line) = &self.snippet {
            let gutter = self.line.to_string();
            text.push_str(&format!(
                "\n{pad} |\n{gutter} | {line}\n{pad} | {caret:>col$}",
                pad = " ".repeat(gutter.len()),
                caret = "^",
                col = self.column.max(1) as usize
            ));
        }
        text
    }
}

/// An error at `line:column` of the spec `text` read from `file`, with
/// the line shown (for what is found wrong after parsing).
pub fn error_at(text: &str, file: &Path, line: u64, column: u64, message: String) -> SpecError {
    at(text, file, line, column, message)
}

/// Reads `file`.
pub fn load(file: &Path) -> Result<Spec, SpecError> {
    let text = fs_err::read_to_string(file).map_err(|e| SpecError {
        file: file.to_owned(),
        line: 0,
        column: 0,
        message: e.to_string(),
        snippet: None,
    })?;
    parse(&text, file)
}

/// Parses `text`, naming `file` in errors.
pub fn parse(text: &str, file: &Path) -> Result<Spec, SpecError> {
    let raw: RawSpec = serde_saphyr::from_str(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let message = e.without_snippet().to_string();
        // The library prefixes `line L column C: `; we say it as file:line:col.
        let message = message
            .split_once(": ")
            .filter(|(head, _)| head.starts_with("line "))
            .map_or(message.clone(), |(_, rest)| rest.to_owned());
        let message = message.trim_start_matches("error: ");
        // …and sometimes appends ` at line L, column C`, which we also drop.
        let message = message
            .rfind(" at line ")
            .map_or(message, |i| &message[..i]);
        // The scanner reports a tab where the token it was reading began,
        // often a line early: point at the tab itself.
        if let Some((line, column)) = message
            .contains("tab")
            .then(|| indenting_tab(text, line))
            .flatten()
        {
            return at(
                text,
                file,
                line,
                column,
                "a tab in the indentation: YAML indents with spaces only".to_owned(),
            );
        }
        at(text, file, line, column, message.to_owned())
    })?;
    let at = Locator { text, file };
    if raw.steps.is_empty() {
        return Err(at.error(
            1,
            1,
            "`steps` is empty: a build needs at least one step".into(),
        ));
    }
    let mut names = std::collections::HashSet::new();
    let steps = raw
        .steps
        .into_iter()
        .map(|step| parse_step(step, &mut names, &at))
        .collect::<Result<_, _>>()?;
    Ok(Spec {
        source: raw.source.map(|s| parse_source(s, &at)).transpose()?,
        disk: raw.disk.map(|d| parse_disk(&d, &at)).transpose()?,
        steps,
        images: raw
            .images
            .into_iter()
            .map(|i| parse_image(i, &at))
            .collect::<Result<_, _>>()?,
        artifacts: raw
            .artifacts
            .into_iter()
            .map(|a| parse_artifact(a, &at))
            .collect::<Result<_, _>>()?,
        pulls: parse_pulls(raw.pulls, &raw.pushes, &at)?,
        pushes: parse_pushes(raw.pushes, &at)?,
    })
}

/// Errors located in one spec's text.
struct Locator<'a> {
    text: &'a str,
    file: &'a Path,
}

impl Locator<'_> {
    fn error(&self, line: u64, column: u64, message: String) -> SpecError {
        at(self.text, self.file, line, column, message)
    }

    fn located<T>(&self, spanned: &Spanned<T>, message: String) -> SpecError {
        self.error(
            spanned.referenced.line(),
            spanned.referenced.column(),
            message,
        )
    }
}

fn parse_step(
    step: RawStep,
    names: &mut std::collections::HashSet<String>,
    at: &Locator<'_>,
) -> Result<Step, SpecError> {
    let name = &step.name;
    let problem = |message: String| Err(at.located(name, message));
    if name.value.is_empty()
        || !name
            .value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return problem(format!(
            "step name `{}` must be letters, digits, `-`, `_` or `.`",
            name.value
        ));
    }
    if !names.insert(name.value.clone()) {
        return problem(format!(
            "a step named `{}` already exists; names must be unique",
            name.value
        ));
    }
    let command = match (step.run, step.args) {
        (Some(run), None) => Command::Run(run),
        (None, Some(args)) if !args.is_empty() => Command::Args(args),
        (None, Some(_)) => return problem(format!("step `{}` has an empty `args`", name.value)),
        (Some(_), Some(_)) => {
            return problem(format!(
                "step `{}` has both `run` and `args`; give one",
                name.value
            ));
        }
        (None, None) => return problem(format!("step `{}` needs `run` or `args`", name.value)),
    };
    if let Some(key) = step
        .env
        .keys()
        .find(|key| key.is_empty() || key.contains('=') || key.contains('\0'))
    {
        return problem(format!(
            "step `{}` has an invalid environment variable name `{key}`",
            name.value
        ));
    }
    let image = step
        .image
        .map(|image| {
            image
                .value
                .parse::<Reference>()
                .map_err(|e| at.located(&image, e.to_string()))
        })
        .transpose()?;
    let timeout = step
        .timeout
        .map(|t| {
            parse_duration(&t.value).ok_or_else(|| {
                at.located(
                    &t,
                    format!(
                        "`{}` is not a duration: use seconds, or a number with `s`, `m` or `h`",
                        t.value
                    ),
                )
            })
        })
        .transpose()?;
    let memory = step
        .memory
        .map(|m| {
            parse_size(&m.value).ok_or_else(|| {
                at.located(
                    &m,
                    format!(
                        "`{}` is not a memory size: use bytes, or a number with `KiB`, `MiB` or `GiB`",
                        m.value
                    ),
                )
            })
        })
        .transpose()?;
    let pids = match step.pids {
        Some(p) if p.value < 8 => {
            return Err(at.located(
                &p,
                format!(
                    "`pids: {}` is too low for a shell to start; use 8 or more",
                    p.value
                ),
            ));
        }
        other => other.map(|p| p.value),
    };
    if let Some(Spanned {
        value: RawNetwork::Other(what),
        ..
    }) = &step.network
    {
        let spanned = step.network.as_ref().expect("just matched");
        return Err(at.located(
            spanned,
            format!("`network` is {what}: give a boolean or a list of host patterns"),
        ));
    }
    let (network, hosts) = match step.network.map(|n| n.value) {
        None | Some(RawNetwork::Flag(false) | RawNetwork::Other(_)) => (false, Vec::new()),
        Some(RawNetwork::Flag(true)) => (true, Vec::new()),
        Some(RawNetwork::Hosts(hosts)) if hosts.is_empty() => {
            return problem(format!(
                "step `{}` has an empty `network` list: write `network: false` for no network",
                name.value
            ));
        }
        Some(RawNetwork::Hosts(hosts)) => {
            let hosts = hosts
                .iter()
                .map(|host| {
                    custody_net::HostPattern::parse(&host.value).map_err(|e| at.located(host, e))
                })
                .collect::<Result<_, _>>()?;
            (true, hosts)
        }
    };
    let secret = |spanned: &Spanned<String>| {
        if crate::secrets::valid_name(&spanned.value) {
            Ok(SecretUse {
                name: spanned.value.clone(),
                line: spanned.referenced.line(),
                column: spanned.referenced.column(),
            })
        } else {
            Err(at.located(
                spanned,
                format!(
                    "`{}` is not a secret name: use letters, digits, `-`, `_` or `.`",
                    spanned.value
                ),
            ))
        }
    };
    let mut secrets: Vec<SecretUse> = Vec::new();
    for name in &step.secrets {
        let used = secret(name)?;
        if secrets.iter().any(|s| s.name == used.name) {
            return Err(at.located(name, format!("the secret `{}` is listed twice", used.name)));
        }
        secrets.push(used);
    }
    let mut env = BTreeMap::new();
    let mut secret_env = BTreeMap::new();
    for (key, value) in step.env {
        match value {
            RawEnvValue::Plain(value) => {
                env.insert(key, value);
            }
            RawEnvValue::Secret(name) => {
                secret_env.insert(key, secret(&name)?);
            }
        }
    }
    Ok(Step {
        name: name.value.clone(),
        image,
        command,
        env,
        secrets,
        secret_env,
        network,
        hosts,
        timeout,
        memory,
        pids,
        user_namespaces: step.user_namespaces,
    })
}

fn parse_disk(disk: &Spanned<String>, at: &Locator<'_>) -> Result<u64, SpecError> {
    parse_size(&disk.value)
        .filter(|bytes| *bytes >= MIN_DISK_BYTES)
        .ok_or_else(|| {
            at.located(
                disk,
                format!(
                    "`{}` is not a disk size of at least 64MiB: use bytes, or a number with `MiB` or `GiB`",
                    disk.value
                ),
            )
        })
}

fn parse_image(image: RawImage, at: &Locator<'_>) -> Result<ImageOutput, SpecError> {
    let from = image
        .from
        .value
        .parse::<Location>()
        .map_err(|e| at.located(&image.from, e.to_string()))?;
    let path = match &from {
        Location::Layout { path, .. } | Location::DockerArchive { path } => path.clone(),
        Location::Registry(_) => {
            return Err(at.located(
                &image.from,
                "`from` must be `oci:/output/…` or `docker-archive:/output/…`".into(),
            ));
        }
    };
    if !is_under(&path, Path::new(OUTPUT_DIR)) {
        return Err(at.located(
            &image.from,
            format!(
                "`{}` is not under `{OUTPUT_DIR}`, where steps write images",
                path.display()
            ),
        ));
    }
    Ok(ImageOutput {
        from,
        to: destination(&image.to).map_err(|m| at.located(&image.to, m))?,
    })
}

fn parse_artifact(artifact: RawArtifact, at: &Locator<'_>) -> Result<ArtifactOutput, SpecError> {
    if artifact.paths.is_empty() {
        return Err(at.located(&artifact.to, "`paths` is empty".into()));
    }
    let mut paths = Vec::new();
    for glob in &artifact.paths {
        let relative = Path::new(&glob.value);
        if relative.is_absolute()
            || relative.components().any(|c| c == Component::ParentDir)
            || glob.value.is_empty()
        {
            return Err(at.located(
                glob,
                format!(
                    "`{}` must be a glob inside the workspace: relative, without `..`",
                    glob.value
                ),
            ));
        }
        paths.push(glob.value.clone());
    }
    Ok(ArtifactOutput {
        paths,
        to: destination(&artifact.to).map_err(|m| at.located(&artifact.to, m))?,
    })
}

fn parse_pushes(pushes: Vec<RawPush>, at: &Locator<'_>) -> Result<Vec<Push>, SpecError> {
    let mut parsed: Vec<Push> = Vec::new();
    for push in pushes {
        let name = push
            .name
            .value
            .parse::<custody_gateway::Repository>()
            .map_err(|e| at.located(&push.name, e.to_string()))?;
        if parsed.iter().any(|p| p.name == name) {
            return Err(at.located(
                &push.name,
                format!("`{name}` is already declared; each push needs its own name"),
            ));
        }
        let to = destination(&push.to).map_err(|m| at.located(&push.to, m))?;
        let sample = to
            .resolve(&Values {
                revision: "main",
                commit: "0123456789ab",
                job: "job-1",
            })
            .map_err(|e| at.located(&push.to, e.to_string()))?;
        match sample {
            Location::Registry(reference)
                if reference.tag().is_none() && reference.digest().is_none() => {}
            _ => {
                return Err(at.located(
                    &push.to,
                    format!(
                        "`{}` must be a registry repository `host[:port]/path`, without tag or digest: steps push their own tags",
                        push.to.value
                    ),
                ));
            }
        }
        parsed.push(Push { name, to });
    }
    Ok(parsed)
}

fn parse_pulls(
    pulls: Vec<RawPull>,
    pushes: &[RawPush],
    at: &Locator<'_>,
) -> Result<Vec<Pull>, SpecError> {
    let mut parsed: Vec<Pull> = Vec::new();
    for pull in pulls {
        let name = pull
            .name
            .value
            .parse::<custody_gateway::Repository>()
            .map_err(|e| at.located(&pull.name, e.to_string()))?;
        if parsed.iter().any(|p| p.name == name) {
            return Err(at.located(
                &pull.name,
                format!("`{name}` is already declared; each pull needs its own name"),
            ));
        }
        if pushes.iter().any(|p| p.name.value == name.as_str()) {
            return Err(at.located(
                &pull.name,
                format!(
                    "`{name}` is also declared in `pushes`; a repository steps read is not one they push to: give one of them another name"
                ),
            ));
        }
        let from = match pull.from.value.trim().parse::<Reference>() {
            Ok(from) if from.tag().is_none() && from.digest().is_none() => from,
            Ok(_) => {
                return Err(at.located(
                    &pull.from,
                    format!(
                        "`{}` must be a registry repository `host[:port]/path`, without tag or digest: steps name the tag or digest they read",
                        pull.from.value
                    ),
                ));
            }
            Err(e) => return Err(at.located(&pull.from, e.to_string())),
        };
        parsed.push(Pull {
            name,
            from,
            line: pull.from.referenced.line(),
            column: pull.from.referenced.column(),
        });
    }
    Ok(parsed)
}

fn parse_source(source: RawSource, at: &Locator<'_>) -> Result<GitSource, SpecError> {
    let git = GitUrl::parse(&source.git.value).map_err(|e| {
        let message = match e.hint() {
            Some(hint) => format!("{e}; {hint}"),
            None => e.to_string(),
        };
        let mut error = at.located(&source.git, message);
        // The line shown must not repeat the secret either.
        if let GitUrlError::Credentials { redacted } = &e {
            error.snippet = error
                .snippet
                .map(|line| line.replace(source.git.value.trim(), redacted));
        }
        error
    })?;
    Ok(GitSource {
        path: WorkDir::default(),
        git,
        revision: source.revision.unwrap_or_else(|| "HEAD".into()),
    })
}

fn destination(to: &Spanned<String>) -> Result<Destination, String> {
    // Check placeholders and the shape of the result with sample values.
    let sample = substitute(&to.value, |name| match name {
        "revision" => Some("main"),
        "commit" | "short_commit" => Some("0123456789ab"),
        "job" => Some("job-1"),
        _ => None,
    })
    .map_err(|unknown| {
        format!(
            "unknown placeholder `{{{unknown}}}`; use one of {}",
            PLACEHOLDERS
                .iter()
                .map(|p| format!("`{{{p}}}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let location: Location = sample
        .parse()
        .map_err(|e: custody_oci::Error| e.to_string())?;
    location.check_writable().map_err(|e| e.to_string())?;
    Ok(Destination {
        template: to.value.clone(),
        line: to.referenced.line(),
        column: to.referenced.column(),
    })
}

/// Replaces `{name}` placeholders; `Err(name)` for an unknown one.
fn substitute<'a>(
    template: &str,
    value: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| after.to_owned())?;
        let name = &after[..close];
        out.push_str(value(name).ok_or_else(|| name.to_owned())?);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_under(path: &Path, dir: &Path) -> bool {
    path.starts_with(dir) && path != dir && !path.components().any(|c| c == Component::ParentDir)
}

fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&text[..i], &text[i..]),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    (seconds > 0).then(|| Duration::from_secs(seconds))
}

/// A size such as `512MiB`, `2GiB` or bytes, of at least 1 MiB.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&text[..i], text[i..].trim()),
        None => (text, ""),
    };
    let n: u64 = number.parse().ok()?;
    let shift = match unit {
        "" | "B" => 0,
        "KiB" | "K" | "k" => 10,
        "MiB" | "M" => 20,
        "GiB" | "G" => 30,
        _ => return None,
    };
    n.checked_mul(1 << shift).filter(|&bytes| bytes >= 1 << 20)
}

/// The first tab in a line's indentation, from line `from` on (1-based
/// line and column).
fn indenting_tab(text: &str, from: u64) -> Option<(u64, u64)> {
    text.lines()
        .enumerate()
        .skip((from as usize).saturating_sub(1))
        .find_map(|(i, line)| {
            let indent = &line[..line.len() - line.trim_start().len()];
            indent
                .find('\t')
                .map(|column| (i as u64 + 1, column as u64 + 1))
        })
}

fn at(text: &str, file: &Path, line: u64, column: u64, message: String) -> SpecError {
    let snippet = (line > 0)
        .then(|| text.lines().nth(line as usize - 1).map(str::to_owned))
        .flatten();
    SpecError {
        file: file.to_owned(),
        line,
        column,
        message,
        snippet,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(default)]
    source: Option<RawSource>,
    #[serde(default)]
    disk: Option<Spanned<String>>,
    steps: Vec<RawStep>,
    #[serde(default)]
    images: Vec<RawImage>,
    #[serde(default)]
    artifacts: Vec<RawArtifact>,
    #[serde(default)]
    pushes: Vec<RawPush>,
    #[serde(default)]
    pulls: Vec<RawPull>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPull {
    name: Spanned<String>,
    from: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPush {
    name: Spanned<String>,
    to: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    git: Spanned<String>,
    #[serde(default)]
    revision: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    #[serde(default)]
    image: Option<Spanned<String>>,
    #[serde(default)]
    run: Option<String>,
    #[serde(default)]
    args: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, RawEnvValue>,
    #[serde(default)]
    secrets: Vec<Spanned<String>>,
    #[serde(default)]
    network: Option<Spanned<RawNetwork>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    memory: Option<Spanned<String>>,
    #[serde(default)]
    pids: Option<Spanned<u32>>,
    #[serde(default)]
    user_namespaces: bool,
}

/// An environment variable's value: text, or `{ secret: NAME }`.
enum RawEnvValue {
    Plain(String),
    Secret(Spanned<String>),
}

impl<'de> Deserialize<'de> for RawEnvValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawEnvValue;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or `{ secret: NAME }`")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<RawEnvValue, E> {
                Ok(RawEnvValue::Plain(value.to_owned()))
            }

            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<RawEnvValue, E> {
                Ok(RawEnvValue::Plain(value.to_string()))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<RawEnvValue, E> {
                Ok(RawEnvValue::Plain(value.to_string()))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<RawEnvValue, E> {
                Ok(RawEnvValue::Plain(value.to_string()))
            }

            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<RawEnvValue, E> {
                Ok(RawEnvValue::Plain(value.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawEnvValue, A::Error> {
                let mut secret = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key != "secret" || secret.is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "unexpected `{key}`: an environment variable is a string or `{{ secret: NAME }}`"
                        )));
                    }
                    secret = Some(map.next_value::<Spanned<String>>()?);
                }
                secret.map(RawEnvValue::Secret).ok_or_else(|| {
                    serde::de::Error::custom(
                        "an environment variable is a string or `{ secret: NAME }`",
                    )
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// `network: true | false | [HOST-PATTERN, …]`; anything else is told
/// where it stands (the error of a visitor is located at the key).
enum RawNetwork {
    Flag(bool),
    Hosts(Vec<Spanned<String>>),
    /// What was there instead, for the error.
    Other(String),
}

impl<'de> Deserialize<'de> for RawNetwork {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawNetwork;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a boolean or a list of host patterns")
            }

            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<RawNetwork, E> {
                Ok(RawNetwork::Flag(value))
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<RawNetwork, E> {
                Ok(RawNetwork::Other(format!("the string `{value}`")))
            }

            fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<RawNetwork, E> {
                Ok(RawNetwork::Other(format!("the number `{value}`")))
            }

            fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<RawNetwork, E> {
                Ok(RawNetwork::Other(format!("the number `{value}`")))
            }

            fn visit_f64<E: serde::de::Error>(self, value: f64) -> Result<RawNetwork, E> {
                Ok(RawNetwork::Other(format!("the number `{value}`")))
            }

            fn visit_unit<E: serde::de::Error>(self) -> Result<RawNetwork, E> {
                Ok(RawNetwork::Other("empty".into()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawNetwork, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(RawNetwork::Other("a mapping".into()))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawNetwork, A::Error> {
                let mut hosts = Vec::new();
                while let Some(host) = seq.next_element::<Spanned<String>>()? {
                    hosts.push(host);
                }
                Ok(RawNetwork::Hosts(hosts))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    from: Spanned<String>,
    to: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArtifact {
    paths: Vec<Spanned<String>>,
    to: Spanned<String>,
}
