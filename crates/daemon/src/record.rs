//! The values a build's record is made of, as types: its id, the times it
//! went through, and the clock they are read from.

use std::fmt;
use std::time::{Duration, SystemTime};

/// A build's id: a UUIDv7 (ids sort by when they were made), in its
/// lowercase hyphenated form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BuildId(String);

impl BuildId {
    /// A fresh id, later than every id made before it here.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7().hyphenated().to_string())
    }

    /// An id someone handed in (an API path, a command line); `None` if it
    /// cannot be a build id.
    pub fn parse(text: &str) -> Option<Self> {
        let uuid = uuid::Uuid::try_parse(text).ok()?;
        Some(Self(uuid.hyphenated().to_string()))
    }

    /// An id the store gave back: it wrote it.
    pub(crate) fn stored(text: String) -> Self {
        Self(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The start of a build id, as people type one (like a git commit's):
/// at least [`BuildIdPrefix::MIN`] characters of the id's lowercase
/// hyphenated form. Ids begin with the time they were made, so builds
/// queued the same minute share their first eight or nine characters;
/// `builds list` shows how much tells them apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildIdPrefix(String);

impl BuildIdPrefix {
    pub const MIN: usize = 4;

    /// `None` unless `text` could begin a build id.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.to_ascii_lowercase();
        let fits = (Self::MIN..=36).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-');
        fits.then_some(Self(text))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BuildIdPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Default for BuildId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A moment, to the millisecond, in UTC. Shown (and stored where people
/// read it) as RFC 3339; leases and log lines keep its Unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_unix_millis(millis: i64) -> Self {
        Self(millis)
    }

    fn from_system(time: SystemTime) -> Self {
        Self(
            time.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        )
    }

    pub fn unix_millis(self) -> i64 {
        self.0
    }

    /// `2026-12-01T20:26:00.000Z`.
    pub fn rfc3339(self) -> String {
        let since_epoch = Duration::from_millis(u64::try_from(self.0).unwrap_or(0));
        humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + since_epoch).to_string()
    }

    /// Reads what [`Timestamp::rfc3339`] wrote (any precision, `Z` only).
    pub fn parse_rfc3339(text: &str) -> Result<Self, humantime::TimestampError> {
        humantime::parse_rfc3339(text).map(Self::from_system)
    }

    /// This moment plus `duration`.
    pub fn after(self, duration: Duration) -> Self {
        let millis = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(millis))
    }

    /// How long after `earlier` this is (zero if it is not after it).
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis(u64::try_from(self.0 - earlier.0).unwrap_or(0))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

/// The time leases are written and judged by, and builds are stamped
/// with: passed in, so a test can move it (several daemons sharing one
/// store must agree on it roughly; the system clock is what they use).
pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;
}

/// The system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_ids_are_uuids_in_one_spelling() {
        let id = BuildId::new();
        assert_eq!(BuildId::parse(id.as_str()), Some(id.clone()));
        assert_eq!(
            BuildId::parse(&id.as_str().to_uppercase()),
            Some(id.clone())
        );
        assert!(BuildId::new() > id, "later ids sort later");
        for bad in [
            "",
            "1",
            "../etc/passwd",
            "0196f7a0-aaaa-7bbb-8ccc-ddddeeeeffff0",
        ] {
            assert_eq!(BuildId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn prefixes_are_the_start_of_an_id_and_nothing_else() {
        let id = BuildId::new();
        let prefix = BuildIdPrefix::parse(&id.as_str()[..6].to_uppercase()).unwrap();
        assert!(id.as_str().starts_with(prefix.as_str()));
        for bad in ["", "019", "019a%", "019a_", "../x", &"0".repeat(37)] {
            assert_eq!(BuildIdPrefix::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn timestamps_read_back_what_they_write() {
        let t = Timestamp::from_unix_millis(1_796_156_760_123);
        assert_eq!(t.rfc3339(), "2026-12-01T20:26:00.123Z");
        assert_eq!(Timestamp::parse_rfc3339(&t.rfc3339()).unwrap(), t);
        assert_eq!(
            Timestamp::parse_rfc3339("2026-12-01T20:26:00Z").unwrap(),
            Timestamp::from_unix_millis(1_796_156_760_000)
        );
        assert!(Timestamp::parse_rfc3339("yesterday").is_err());
        assert_eq!(
            t.after(Duration::from_secs(2)).since(t),
            Duration::from_secs(2)
        );
        assert_eq!(t.since(t.after(Duration::from_secs(1))), Duration::ZERO);
    }
}
