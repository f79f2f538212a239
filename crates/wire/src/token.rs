//! One-time job tokens: 128 random bits, compared by digest in constant time.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// A job token. It never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct JobToken(String);

impl JobToken {
    /// 128 fresh random bits, base64url without padding (22 characters).
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source works");
        Self(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    /// A token received from elsewhere (a file, a pipe).
    pub fn from_text(text: &str) -> Self {
        Self(text.trim().to_owned())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub(crate) fn digest(&self) -> TokenDigest {
        TokenDigest::of(self.0.as_bytes())
    }
}

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobToken(<redacted>)")
    }
}

/// What a daemon keeps of a token (a job's, or an API token): its
/// SHA-256. Comparing fixed-size digests in constant time leaks neither the
/// token nor its length. The one place custody compares secrets.
#[derive(Clone, Copy)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    pub fn matches(&self, other: &TokenDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// Whether `presented` is one of `known`. Every one is compared, each
    /// in constant time, so timing says nothing about which or how much
    /// matched.
    pub fn any_matches(known: &[TokenDigest], presented: &[u8]) -> bool {
        Self::position(known, presented).is_some()
    }

    /// Which of `known` `presented` is (the first, if it is there twice).
    /// Every one is compared, each in constant time, and the index is
    /// chosen without branching, so timing says nothing about which or how
    /// much matched.
    pub fn position(known: &[TokenDigest], presented: &[u8]) -> Option<usize> {
        use subtle::ConditionallySelectable as _;
        let presented = Self::of(presented);
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, k) in known.iter().enumerate() {
            let first = k.0.ct_eq(&presented.0) & !found;
            index.conditional_assign(&(i as u64), first);
            found |= first;
        }
        bool::from(found).then_some(index as usize)
    }
}

impl std::fmt::Debug for TokenDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenDigest(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_never_print() {
        let a = JobToken::generate();
        let b = JobToken::generate();
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 22);
        assert!(!format!("{a:?}").contains(a.expose()));
        assert!(a.digest().matches(&TokenDigest::of(a.expose().as_bytes())));
        assert!(!a.digest().matches(&b.digest()));
        let known = [a.digest(), b.digest()];
        assert!(TokenDigest::any_matches(&known, b.expose().as_bytes()));
        assert!(!TokenDigest::any_matches(&known, b"guess"));
        let twice = [b.digest(), a.digest(), a.digest()];
        assert_eq!(
            TokenDigest::position(&twice, a.expose().as_bytes()),
            Some(1)
        );
        assert_eq!(
            TokenDigest::position(&twice, b.expose().as_bytes()),
            Some(0)
        );
        assert_eq!(TokenDigest::position(&twice, b"guess"), None);
    }
}
