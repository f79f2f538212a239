//! The job-token handshake, spoken right after the TLS 1.3 handshake and
//! before any RPC: the runner writes `JOBID\nTOKEN\n`; the daemon answers
//! exactly three bytes, `OK\n`, `IJ\n` (unknown job id) or `IT\n` (wrong
//! token), and closes the connection unless it said `OK`.

/// The longest line either side accepts, newline excluded.
pub const MAX_LINE: usize = 256;

/// The daemon's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    UnknownJob,
    WrongToken,
}

impl Verdict {
    pub fn as_bytes(self) -> &'static [u8; 3] {
        match self {
            Verdict::Ok => b"OK\n",
            Verdict::UnknownJob => b"IJ\n",
            Verdict::WrongToken => b"IT\n",
        }
    }

    pub fn parse(bytes: &[u8; 3]) -> Option<Self> {
        match bytes {
            b"OK\n" => Some(Verdict::Ok),
            b"IJ\n" => Some(Verdict::UnknownJob),
            b"IT\n" => Some(Verdict::WrongToken),
            _ => None,
        }
    }
}

/// What the runner said, once it is all there.
#[derive(Debug, PartialEq, Eq)]
pub struct Hello {
    pub job_id: String,
    pub token: String,
}

/// The state of reading a runner's hello from the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// More bytes are needed.
    Incomplete,
    Complete(Hello),
    /// The bytes can never become a valid hello.
    Invalid(&'static str),
}

/// Parses `JOBID\nTOKEN\n` from everything received so far. Anything after
/// the second newline is invalid: a runner sends nothing more until `OK`.
pub fn parse_hello(received: &[u8]) -> Parse {
    let mut lines = received.splitn(3, |b| *b == b'\n');
    let job_id = lines.next().unwrap_or_default();
    let Some(token) = lines.next() else {
        return if job_id.len() > MAX_LINE {
            Parse::Invalid("the job id line is too long")
        } else {
            Parse::Incomplete
        };
    };
    if job_id.len() > MAX_LINE {
        return Parse::Invalid("the job id line is too long");
    }
    if !job_id.iter().all(|b| is_job_id_byte(*b)) || job_id.is_empty() {
        return Parse::Invalid("the job id has characters outside [A-Za-z0-9._-]");
    }
    let Some(rest) = lines.next() else {
        return if token.len() > MAX_LINE {
            Parse::Invalid("the token line is too long")
        } else {
            Parse::Incomplete
        };
    };
    if token.len() > MAX_LINE {
        return Parse::Invalid("the token line is too long");
    }
    if !rest.is_empty() {
        return Parse::Invalid("bytes follow the token before the daemon answered");
    }
    if token.is_empty()
        || !token
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
    {
        return Parse::Invalid("the token is not base64url");
    }
    Parse::Complete(Hello {
        // Both checked ASCII above.
        job_id: String::from_utf8_lossy(job_id).into_owned(),
        token: String::from_utf8_lossy(token).into_owned(),
    })
}

/// Job ids are public names: letters, digits, `.`, `_`, `-`.
pub fn is_valid_job_id(job_id: &str) -> bool {
    !job_id.is_empty() && job_id.len() <= MAX_LINE && job_id.bytes().all(is_job_id_byte)
}

fn is_job_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_parse_incrementally() {
        let full = b"job-1\nabcDEF_-123\n";
        for cut in 0..full.len() {
            assert_eq!(parse_hello(&full[..cut]), Parse::Incomplete, "cut at {cut}");
        }
        assert_eq!(
            parse_hello(full),
            Parse::Complete(Hello {
                job_id: "job-1".into(),
                token: "abcDEF_-123".into()
            })
        );
    }

    #[test]
    fn bad_hellos_are_invalid_as_early_as_possible() {
        assert!(matches!(
            parse_hello(&[b'a'; MAX_LINE + 1]),
            Parse::Invalid(_)
        ));
        let mut long_token = b"job\n".to_vec();
        long_token.extend([b'a'; MAX_LINE + 1]);
        assert!(matches!(parse_hello(&long_token), Parse::Invalid(_)));
        assert!(matches!(parse_hello(b"../etc\ntoken\n"), Parse::Invalid(_)));
        assert!(matches!(parse_hello(b"\ntoken\n"), Parse::Invalid(_)));
        assert!(matches!(parse_hello(b"job\ntok en\n"), Parse::Invalid(_)));
        assert!(matches!(
            parse_hello(b"job\ntoken\nPRI * HTTP/2.0"),
            Parse::Invalid(_)
        ));
    }

    #[test]
    fn verdicts_round_trip() {
        for v in [Verdict::Ok, Verdict::UnknownJob, Verdict::WrongToken] {
            assert_eq!(Verdict::parse(v.as_bytes()), Some(v));
        }
        assert_eq!(Verdict::parse(b"NO\n"), None);
    }
}
