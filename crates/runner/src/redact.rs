//! Secrets out of the log: every form of a job's secret values a step is
//! likely to print — as is, base64 (standard and URL-safe, padded or not,
//! inside a longer base64 text, and each line of it wrapped at 76 or 64
//! columns), hex (on one line, or wrapped as `xxd -p` does), URL-encoded —
//! is replaced by `***` in what the runner sends the daemon, before it is
//! stored or streamed.
//!
//! The log reaches here as whole lines (`logs.rs` joins what a step wrote
//! across reads of its pipes before sending a line), so a value split
//! across two reads is still found; a value split across two lines is not.
//! Searching is one Aho-Corasick automaton over every pattern.

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use custody_wire::rpc::proto;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};

/// What a secret is replaced by.
pub const MASK: &[u8] = b"***";
/// Parts of a value shorter than this are not searched for on their own
/// (a line of a multi-line value, the base64 core of a short one).
const MIN_PART: usize = 4;
/// Lines of a wrapped encoding shorter than this (the last one) are not
/// searched for: they are too likely to be something else.
const MIN_WRAPPED_LINE: usize = 16;
/// Where encoders wrap: `base64` (coreutils) at 76, `openssl base64` and
/// PEM at 64, `xxd -p` at 60 hex digits.
const BASE64_WRAPS: [usize; 2] = [76, 64];
const HEX_WRAP: usize = 60;

/// RFC 3986's unreserved characters stay as they are (what most encoders,
/// `encodeURIComponent`, Python's `quote(safe="")`, leave alone).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');
/// `encodeURIComponent` also leaves `!'()*` alone.
const COMPONENT: &AsciiSet = &UNRESERVED
    .remove(b'!')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*');

/// Replaces a job's secret values in text.
pub struct Redactor {
    automaton: AhoCorasick,
    /// Every form searched for, for [`Redactor::redact_cut`].
    patterns: Vec<Vec<u8>>,
}

impl Redactor {
    /// The redactor for every secret any step of `job` receives; `None`
    /// when there is none.
    pub fn for_job(job: &proto::Job) -> Option<Self> {
        let values: Vec<&[u8]> = job
            .steps
            .iter()
            .flat_map(|step| &step.secrets)
            .map(|secret| secret.value.as_slice())
            .collect();
        Self::new(&values)
    }

    /// The redactor for `values`; `None` when there is nothing to find.
    pub fn new(values: &[&[u8]]) -> Option<Self> {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for value in values {
            patterns.extend(forms(value));
        }
        patterns.retain(|p| !p.is_empty());
        patterns.sort();
        patterns.dedup();
        if patterns.is_empty() {
            return None;
        }
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&patterns)
            .expect("byte patterns always build");
        Some(Self {
            automaton,
            patterns,
        })
    }

    /// [`Redactor::redact`] for text cut off at its end (a line past the
    /// log's line limit): a value the cut split in two is not found whole,
    /// so an end of `text` that begins a form ([`MIN_PART`] bytes or more)
    /// is masked too.
    pub fn redact_cut(&self, text: &[u8]) -> Vec<u8> {
        let begun = self
            .patterns
            .iter()
            .filter_map(|pattern| begun_at(text, pattern))
            .min()
            .unwrap_or(text.len());
        let mut out = self.redact(&text[..begun]);
        if begun < text.len() {
            out.extend_from_slice(MASK);
        }
        out
    }

    /// `text` with every occurrence of a secret replaced by [`MASK`].
    pub fn redact(&self, text: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len());
        self.automaton
            .replace_all_with_bytes(text, &mut out, |_, _, out| {
                out.extend_from_slice(MASK);
                true
            });
        out
    }

    /// As [`Redactor::redact`], for text.
    pub fn redact_str(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned()
    }
}

/// The forms of one value searched for.
fn forms(value: &[u8]) -> Vec<Vec<u8>> {
    // The value, the value without the newline a file usually ends with,
    // and each line of a multi-line value.
    let mut variants: Vec<&[u8]> = vec![value];
    let trimmed = trim_newlines(value);
    variants.push(trimmed);
    variants.extend(
        trimmed
            .split(|b| *b == b'\n')
            .map(trim_newlines)
            .filter(|line| line.len() >= MIN_PART),
    );
    let mut forms = Vec::new();
    // Encodings printed over several lines: each line of the value's
    // base64 as `base64` or `openssl base64` wraps it, and of its hex as
    // `xxd -p` does; the hex of the value on one line, either case.
    let mut with_newline = trimmed.to_vec();
    with_newline.push(b'\n');
    for whole in [trimmed, with_newline.as_slice()] {
        if trimmed.is_empty() {
            break;
        }
        let encoded = STANDARD.encode(whole);
        for width in BASE64_WRAPS {
            forms.extend(wrapped(&encoded, width));
        }
        let hex: String = whole.iter().map(|b| format!("{b:02x}")).collect();
        forms.extend(wrapped(&hex, HEX_WRAP));
        forms.push(hex.to_ascii_uppercase().into_bytes());
        forms.push(hex.into_bytes());
    }
    for variant in variants {
        if variant.is_empty() {
            continue;
        }
        forms.push(variant.to_vec());
        // `echo "$TOKEN" | base64` encodes the newline `echo` adds.
        let mut with_newline = variant.to_vec();
        with_newline.push(b'\n');
        for encoded in [variant, with_newline.as_slice()] {
            for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                forms.push(engine.encode(encoded).into_bytes());
            }
        }
        // Inside a longer base64 text (`user:TOKEN` in a Basic header) the
        // value's bytes are encoded from wherever a 3-byte group starts:
        // the encoding of the aligned middle, at each of the 3 offsets,
        // is in it whatever comes before and after.
        for skip in 0..3 {
            let Some(rest) = variant.get(skip..) else {
                continue;
            };
            let whole = rest.len() / 3 * 3;
            if whole * 4 / 3 < MIN_PART {
                continue;
            }
            forms.push(STANDARD_NO_PAD.encode(&rest[..whole]).into_bytes());
            forms.push(URL_SAFE_NO_PAD.encode(&rest[..whole]).into_bytes());
        }
        for set in [NON_ALPHANUMERIC, UNRESERVED, COMPONENT] {
            let upper = percent_encoding::percent_encode(variant, set).to_string();
            forms.push(lower_escapes(&upper).into_bytes());
            // Form encoding writes spaces as `+`.
            forms.push(upper.replace("%20", "+").into_bytes());
            forms.push(upper.into_bytes());
        }
    }
    forms
}

/// Where the longest end of `text` that is a beginning of `pattern` (at
/// least [`MIN_PART`] bytes, shorter than the pattern) starts, if any.
fn begun_at(text: &[u8], pattern: &[u8]) -> Option<usize> {
    let first = *pattern.first()?;
    let window = text.len().saturating_sub(pattern.len() - 1);
    let mut at = window;
    while let Some(found) = memchr::memchr(first, &text[at..]) {
        let start = at + found;
        let end = &text[start..];
        if end.len() >= MIN_PART && pattern.starts_with(end) {
            return Some(start);
        }
        at = start + 1;
    }
    None
}

/// The lines of `text` wrapped at `width`, but for one too short to tell.
fn wrapped(text: &str, width: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    text.as_bytes()
        .chunks(width)
        .filter(|line| line.len() >= MIN_WRAPPED_LINE)
        .map(<[u8]>::to_vec)
}

fn trim_newlines(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && matches!(bytes[end - 1], b'\n' | b'\r') {
        end -= 1;
    }
    &bytes[..end]
}

/// `%2F` as `%2f`: some encoders write lower-case hex.
fn lower_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut chars = encoded.chars();
    while let Some(c) = chars.next() {
        out.push(c);
        if c == '%' {
            for _ in 0..2 {
                if let Some(hex) = chars.next() {
                    out.push(hex.to_ascii_lowercase());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"npm_T0ken/with+odd=chars&more\n";

    fn redacted(text: &str) -> String {
        Redactor::new(&[SECRET]).unwrap().redact_str(text)
    }

    #[test]
    fn every_usual_form_is_masked() {
        let plain = "npm_T0ken/with+odd=chars&more";
        let forms = [
            plain.to_owned(),
            STANDARD.encode(plain),
            STANDARD.encode(format!("{plain}\n")),
            URL_SAFE_NO_PAD.encode(plain),
            percent_encoding::percent_encode(plain.as_bytes(), NON_ALPHANUMERIC).to_string(),
            lower_escapes(
                &percent_encoding::percent_encode(plain.as_bytes(), UNRESERVED).to_string(),
            ),
        ];
        for form in forms {
            let line = format!("token: {form} (end)");
            let shown = redacted(&line);
            assert_eq!(shown, "token: *** (end)", "{form}");
        }
    }

    #[test]
    fn a_value_inside_a_longer_base64_text_is_masked() {
        let plain = "npm_T0ken/with+odd=chars&more";
        for prefix in ["", "u", "us", "user:"] {
            let header = STANDARD.encode(format!("{prefix}{plain}@host"));
            let shown = redacted(&format!("Authorization: Basic {header}"));
            assert!(shown.contains("***"), "{prefix}: {shown}");
            let decoded = STANDARD
                .decode(shown.rsplit(' ').next().unwrap().replace("***", ""))
                .unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&decoded).contains("T0ken/with+odd"),
                "{shown}"
            );
        }
    }

    /// A multi-line value (a key file) printed through encoders that wrap
    /// their output: no line of it shows, nor any run of its bytes.
    #[test]
    fn wrapped_base64_and_hex_lines_are_masked() {
        let key: Vec<u8> = (0..300u32)
            .map(|i| b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\n"[(i * 7 % 37) as usize])
            .collect();
        let redactor = Redactor::new(&[&key]).unwrap();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let printed = [
            // `base64 key`, `openssl base64 -in key`, `xxd -p key`
            STANDARD.encode(&key),
            STANDARD.encode(&key),
            hex.clone(),
        ];
        for (text, width) in printed.iter().zip([76, 64, 60]) {
            let lines: Vec<&[u8]> = text.as_bytes().chunks(width).collect();
            for line in &lines[..lines.len() - 1] {
                let shown = redactor.redact(line);
                assert_eq!(shown, MASK, "{}", String::from_utf8_lossy(line));
            }
        }
        for one_line in [hex.clone(), hex.to_ascii_uppercase()] {
            assert_eq!(redactor.redact_str(&format!("k={one_line}")), "k=***");
        }
    }

    /// A line cut in the middle of a value keeps no beginning of it.
    #[test]
    fn a_value_cut_off_at_the_end_is_masked() {
        let redactor = Redactor::new(&[SECRET]).unwrap();
        let text = b"npm_T0ken/with+odd=chars&more and then npm_T0ke";
        assert_eq!(redactor.redact_cut(text), b"*** and then ***");
        // An end too short to tell (`np`) stays, as does text with none.
        assert_eq!(redactor.redact_cut(b"log np"), b"log np");
        assert_eq!(redactor.redact_cut(b"nothing"), b"nothing");
    }

    #[test]
    fn text_without_a_secret_is_unchanged() {
        assert_eq!(redacted("nothing to see"), "nothing to see");
        assert!(Redactor::new(&[]).is_none());
    }
}
