//! The daemon side of the runner handshake parser, fed arbitrary bytes the
//! way a connection delivers them: any prefix, in any split.
//!
//! Run: `cd crates/wire/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run handshake`

#![no_main]

use custody_wire::handshake::{MAX_LINE, Parse, parse_hello};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let whole = parse_hello(data);
    if let Parse::Complete(hello) = &whole {
        // A complete hello is exactly what it claims: two bounded lines.
        assert!(!hello.job_id.is_empty() && hello.job_id.len() <= MAX_LINE);
        assert!(!hello.token.is_empty() && hello.token.len() <= MAX_LINE);
        assert_eq!(data, format!("{}\n{}\n", hello.job_id, hello.token).as_bytes());
    }
    // A strict prefix of a complete hello is incomplete, never refused nor
    // complete; and once refused, more bytes never make it acceptable.
    let mut refused = false;
    for cut in 0..data.len() {
        let prefix = parse_hello(&data[..cut]);
        if matches!(whole, Parse::Complete(_)) {
            assert_eq!(prefix, Parse::Incomplete, "prefix of {cut} bytes");
        }
        refused |= matches!(prefix, Parse::Invalid(_));
        if refused {
            assert!(!matches!(parse_hello(&data[..cut]), Parse::Complete(_)));
        }
    }
    if refused {
        assert!(!matches!(whole, Parse::Complete(_)), "a refused prefix became a valid hello");
    }
});
