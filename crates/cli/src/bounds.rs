//! The step boundary's settings on the command line (`custody build`) and
//! in the service's configuration (`custody serve`), checked up front.

use clap::Args;
use custody_daemon::bounds::StepBounds;
use custody_daemon::spec::parse_size;

use crate::build::Usage;

#[derive(Args, Clone, Debug, Default)]
pub struct BoundsArgs {
    /// Let `network: true` steps reach this destination although it is
    /// private, local or link-local (repeatable): `HOST[:PORT]`,
    /// `IP[:PORT]` or `CIDR[:PORT]`. Without it steps reach only public
    /// addresses, through the runner's egress proxy; the runner's own port
    /// is never reachable.
    #[arg(long = "egress-allow", value_name = "DEST")]
    pub egress_allow: Vec<String>,
    /// The disk of a build whose spec sets no `disk:` (workspace, /output
    /// and step image roots together) [default: 20GiB].
    #[arg(long, value_name = "SIZE")]
    pub disk: Option<String>,
    /// How much of a build's log is stored: past it the middle is cut, the
    /// first and last halves kept [default: 64MiB].
    #[arg(long, value_name = "SIZE")]
    pub log_limit: Option<String>,
    /// The host ids steps run as, `START:COUNT` (root runners only)
    /// [default: /etc/subuid's `custody` range, else the first free range
    /// of 65536 from 100000].
    #[arg(long, value_name = "START:COUNT")]
    pub step_ids: Option<String>,
    /// Step images larger than this uncompressed are refused [default: 16GiB].
    #[arg(long, value_name = "SIZE")]
    pub max_image_size: Option<String>,
    /// Step images with more layers are refused [default: 256].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_image_layers: Option<u32>,
}

impl BoundsArgs {
    /// These settings over `base`; every value checked, errors name the flag.
    pub fn resolve(&self, base: StepBounds) -> Result<StepBounds, Usage> {
        let size = |flag: &str, value: &Option<String>, default: u64| -> Result<u64, Usage> {
            match value {
                None => Ok(default),
                Some(text) => parse_size(text).ok_or_else(|| {
                    Usage(format!(
                        "`{flag} {text}` is not a size: use bytes, or a number with `MiB` or `GiB`"
                    ))
                }),
            }
        };
        let mut bounds = base;
        bounds
            .egress_allow
            .extend(self.egress_allow.iter().cloned());
        custody_runner::egress::Policy::new(&bounds.egress_allow, Vec::new()).map_err(Usage)?;
        bounds.disk_bytes = size("--disk", &self.disk, bounds.disk_bytes)?;
        if bounds.disk_bytes < custody_daemon::spec::MIN_DISK_BYTES {
            return Err(Usage("the build's disk must be at least 64MiB".into()));
        }
        bounds.log_bytes = size("--log-limit", &self.log_limit, bounds.log_bytes)?;
        bounds.image_max_bytes = size(
            "--max-image-size",
            &self.max_image_size,
            bounds.image_max_bytes,
        )?;
        if let Some(layers) = self.max_image_layers {
            bounds.image_max_layers = layers;
        }
        if let Some(ids) = &self.step_ids {
            custody_runner::ids::parse_range(ids).map_err(Usage)?;
            bounds.step_ids = Some(ids.clone());
        }
        Ok(bounds)
    }
}
