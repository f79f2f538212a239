//! `custody artifacts get`: an artifact's files back from a registry.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use custody_oci::Reference;
use custody_oci::artifact::{self, ArtifactError};
use custody_oci::beneath::Dir;
use custody_oci::oci_spec::image::MediaType;
use custody_oci::registry;

use crate::build::Usage;
use crate::{RegistryArgs, creds};

#[derive(Subcommand)]
pub enum ArtifactsCommand {
    /// Write an artifact's files into a directory.
    ///
    /// Reads the artifact manifest REF names (as custody pushes a spec's
    /// `artifacts`, or oras does: one layer per file, titled with its
    /// path) and writes each file beneath DIR, each verified against its
    /// digest while it streams. A file name that is absolute or climbs
    /// out with `..` refuses the whole artifact before anything is
    /// written; an existing file is never overwritten without `--force`.
    /// Prints each path written.
    Get(GetArgs),
}

#[derive(Args)]
pub struct GetArgs {
    #[command(flatten)]
    registry: RegistryArgs,
    /// The directory to write into (created if absent).
    #[arg(long, short = 'o', value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Replace files that exist already (never through a symlink).
    #[arg(long)]
    force: bool,
    /// Print the paths written as one JSON array; errors as JSON on stderr.
    #[arg(long)]
    json: bool,
    /// The artifact: `host[:port]/repo:tag` or `…@sha256:…`.
    #[arg(value_name = "REF")]
    reference: String,
}

impl ArtifactsCommand {
    pub fn json(&self) -> bool {
        match self {
            ArtifactsCommand::Get(args) => args.json,
        }
    }
}

pub async fn artifacts(command: ArtifactsCommand) -> anyhow::Result<()> {
    match command {
        ArtifactsCommand::Get(args) => get(args).await,
    }
}

async fn get(args: GetArgs) -> anyhow::Result<()> {
    let reference: Reference = args.reference.parse()?;
    let options = crate::registry_options(
        &args.registry,
        creds::Bare::NamedHere(vec![reference.host()]),
    )?;
    let what = format!("failed to get the files of `{reference}`");
    let client = registry::Client::new(reference.api_host(), &options)
        .await
        .context(what.clone())?;
    let (descriptor, bytes) = client
        .manifest(reference.repository(), &reference.manifest_ref())
        .await
        .context(what.clone())?;
    if *descriptor.media_type() != MediaType::ImageManifest {
        return Err(anyhow::Error::new(ArtifactError::NotFiles {
            reason: format!(
                "it is a `{}`, not an image manifest",
                descriptor.media_type()
            ),
        })
        .context(what));
    }
    let files = artifact::files(&bytes).context(what.clone())?;
    let out = Dir::create_all(&args.out)
        .map_err(|e| Usage(format!("cannot write into `{}`: {e}", args.out.display())))?;
    let written = artifact::write_files(&client, reference.repository(), &files, &out, args.force)
        .await
        .map_err(|e| match e {
            ArtifactError::Exists { path } => anyhow::Error::new(Usage(format!(
                "`{}` exists already; pass `--force` to replace it",
                path.display()
            ))),
            other => anyhow::Error::new(other).context(what.clone()),
        })?;
    let paths: Vec<String> = written
        .iter()
        .map(|path| args.out.join(path).display().to_string())
        .collect();
    if args.json {
        return crate::print_line(&serde_json::to_string(&paths)?);
    }
    for path in paths {
        crate::print_line(&path)?;
    }
    Ok(())
}
