//! `bench/sign`: the signing latency of one build's provenance, with a
//! key file and with a key in a PKCS#11 token, in the same run.
//!
//! `sign URI [RUNS]`: URI names a key to make (or reuse) in an initialised
//! token, SOFTHSM2_CONF already pointing at it for SoftHSM. Each run signs
//! a provenance-sized statement (one DSSE envelope, as a build's publish
//! stage does) and checks the signature. Prints one line:
//! `sign file_p50_ms=N pkcs11_p50_ms=N pkcs11_added_ms=N`.

use std::time::{Duration, Instant};

use custody_attest::dsse;
use custody_attest::keys::{Algorithm, Signer, SigningKey};
use custody_pkcs11::{Pkcs11Signer, Pkcs11Uri};

const KIND: &str = "application/vnd.in-toto+json";

fn main() {
    let mut args = std::env::args().skip(1);
    let uri: Pkcs11Uri = args
        .next()
        .expect("usage: sign URI [RUNS]")
        .parse()
        .unwrap_or_else(|e| panic!("{e}"));
    let runs: usize = args
        .next()
        .map_or(100, |n| n.parse().expect("RUNS is a number"));

    // About the size of the example build's statement: subjects, resolved
    // dependencies, the sandbox record.
    let payload = format!(
        "{{\"_type\":\"https://in-toto.io/Statement/v1\",\"pad\":\"{}\"}}",
        "x".repeat(6 * 1024)
    );

    let (file, _) = SigningKey::generate(Algorithm::EcdsaP256).expect("a key");
    if custody_pkcs11::public_key(&uri).is_err() {
        custody_pkcs11::generate(&uri, Algorithm::EcdsaP256).unwrap_or_else(|e| panic!("{e}"));
    }
    let token = Pkcs11Signer::open(&uri).unwrap_or_else(|e| panic!("{e}"));

    let file_p50 = p50(&file, payload.as_bytes(), runs);
    let token_p50 = p50(&token, payload.as_bytes(), runs);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "{runs} signatures each: file key p50 {:.3} ms, PKCS#11 ({}) p50 {:.3} ms",
        ms(file_p50),
        uri.module_path.display(),
        ms(token_p50)
    );
    println!(
        "sign file_p50_ms={:.3} pkcs11_p50_ms={:.3} pkcs11_added_ms={:.3}",
        ms(file_p50),
        ms(token_p50),
        ms(token_p50.saturating_sub(file_p50))
    );
}

/// The median time of `runs` envelopes, each checked.
fn p50(signer: &dyn Signer, payload: &[u8], runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let envelope = dsse::sign(KIND, payload, signer).expect("signing works");
            let took = start.elapsed();
            dsse::verify(&envelope, signer.verifying_key(), KIND).expect("it verifies");
            took
        })
        .collect();
    times.sort();
    times[times.len() / 2]
}
