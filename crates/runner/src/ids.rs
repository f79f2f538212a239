//! Which host ids a step runs as.
//!
//! A step is root inside its user namespace, and that root must be nobody
//! on the host. Where the runner is root it maps the step's ids `0..COUNT`
//! onto an unprivileged host range (like rootless podman's `/etc/subuid`),
//! so host files owned by root stay unreadable unless they are
//! world-readable, and what a step writes is owned by the range's first id.
//! Where the runner is not root, bubblewrap can only map the runner's own
//! ids: the step's root is the runner's user.

use std::path::Path;

/// The host range steps run as by default when `/etc/subuid` names no
/// `custody` range and nothing else claims this one.
pub const DEFAULT_START: u32 = 100_000;
/// 65536 ids: enough for images whose files belong to system users.
pub const DEFAULT_COUNT: u32 = 65_536;

/// The host ids of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepIds {
    /// The host uid and gid the step's root maps to.
    pub uid: u32,
    pub gid: u32,
    /// How many consecutive ids are mapped (1 when the runner is not root).
    pub count: u32,
    /// Whether the runner is root, writes the maps itself and starts
    /// bubblewrap as `uid`.
    pub privileged: bool,
}

impl StepIds {
    /// The ids for this runner: `requested` (`START:COUNT`, from the
    /// daemon's configuration) when root, else `/etc/subuid`'s `custody`
    /// range, else the first free range from [`DEFAULT_START`]; the runner's
    /// own ids when it is not root.
    pub fn for_runner(requested: Option<&str>) -> Result<Self, String> {
        let euid = nix::unistd::geteuid().as_raw();
        if euid != 0 {
            return Ok(Self {
                uid: euid,
                gid: nix::unistd::getegid().as_raw(),
                count: 1,
                privileged: false,
            });
        }
        let (uid, gid, count) = match requested {
            Some(text) if !text.is_empty() => {
                let (start, count) = parse_range(text)?;
                (start, start, count)
            }
            _ => {
                let subuid = read_ranges(Path::new("/etc/subuid"));
                let subgid = read_ranges(Path::new("/etc/subgid"));
                let named = |ranges: &[(String, u32, u32)]| {
                    ranges
                        .iter()
                        .find(|(name, _, _)| name == "custody")
                        .map(|(_, start, count)| (*start, *count))
                };
                match (named(&subuid), named(&subgid)) {
                    (Some((uid, uids)), Some((gid, gids))) if uid > 0 && gid > 0 => {
                        (uid, gid, uids.min(gids))
                    }
                    _ => {
                        let start = free_start(&subuid, &subgid);
                        (start, start, DEFAULT_COUNT)
                    }
                }
            }
        };
        Ok(Self {
            uid,
            gid,
            count,
            privileged: true,
        })
    }

    /// The line written to the step's `uid_map`.
    pub fn uid_map(&self) -> String {
        format!("0 {} {}", self.uid, self.count)
    }

    /// The line written to the step's `gid_map`.
    pub fn gid_map(&self) -> String {
        format!("0 {} {}", self.gid, self.count)
    }

    /// The host id of `inside` (an owner in an image), if the step can own it.
    pub fn host_uid(&self, inside: u64) -> Option<u32> {
        shift(self.uid, self.count, inside)
    }

    pub fn host_gid(&self, inside: u64) -> Option<u32> {
        shift(self.gid, self.count, inside)
    }
}

fn shift(base: u32, count: u32, inside: u64) -> Option<u32> {
    (inside < u64::from(count)).then(|| base + inside as u32)
}

/// `START:COUNT`, both non-zero, not overflowing, never starting at 0.
pub fn parse_range(text: &str) -> Result<(u32, u32), String> {
    let bad =
        || format!("`{text}` is not a host id range: write `START:COUNT`, e.g. `100000:65536`");
    let (start, count) = text.split_once(':').ok_or_else(bad)?;
    let start: u32 = start.trim().parse().map_err(|_| bad())?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    if start == 0 {
        return Err(format!(
            "`{text}` starts at host id 0: steps must never be root on the host"
        ));
    }
    if count == 0 || start.checked_add(count).is_none() {
        return Err(bad());
    }
    Ok((start, count))
}

/// `name:start:count` lines of a subordinate id file; missing file: none.
fn read_ranges(path: &Path) -> Vec<(String, u32, u32)> {
    let text = fs_err::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut parts = line.trim().split(':');
            let name = parts.next()?.to_owned();
            let start = parts.next()?.parse().ok()?;
            let count = parts.next()?.parse().ok()?;
            Some((name, start, count))
        })
        .collect()
}

/// The first 65536-aligned range at or above [`DEFAULT_START`] that no
/// subordinate range of another user overlaps (their rootless containers
/// must not share ids with build steps).
fn free_start(subuid: &[(String, u32, u32)], subgid: &[(String, u32, u32)]) -> u32 {
    let mut start = DEFAULT_START;
    loop {
        let end = u64::from(start) + u64::from(DEFAULT_COUNT);
        let overlaps = subuid.iter().chain(subgid).any(|(_, s, c)| {
            let (s, e) = (u64::from(*s), u64::from(*s) + u64::from(*c));
            s < end && u64::from(start) < e
        });
        if !overlaps {
            return start;
        }
        start = start.saturating_add(DEFAULT_COUNT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_and_never_include_host_root() {
        assert_eq!(parse_range("100000:65536"), Ok((100_000, 65_536)));
        assert!(
            parse_range("0:65536")
                .unwrap_err()
                .contains("root on the host")
        );
        assert!(parse_range("100000").is_err());
        assert!(parse_range("4294967295:2").is_err());
        assert!(parse_range("1:0").is_err());
    }

    #[test]
    fn the_default_range_avoids_other_users_ranges() {
        let alice = vec![("alice".to_owned(), 100_000, 65_536)];
        assert_eq!(free_start(&alice, &[]), 165_536);
        assert_eq!(free_start(&[], &[]), 100_000);
        let bob = vec![("bob".to_owned(), 170_000, 10)];
        assert_eq!(free_start(&alice, &bob), 231_072);
    }

    #[test]
    fn image_owners_shift_into_the_range() {
        let ids = StepIds {
            uid: 100_000,
            gid: 200_000,
            count: 65_536,
            privileged: true,
        };
        assert_eq!(ids.host_uid(0), Some(100_000));
        assert_eq!(ids.host_gid(33), Some(200_033));
        assert_eq!(ids.host_uid(65_536), None);
        assert_eq!(ids.uid_map(), "0 100000 65536");
    }
}
