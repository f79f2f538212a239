//! What the `custody build` tests share: running the binary, reading what
//! it printed and the provenance it wrote.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub const CUSTODY: &str = env!("CARGO_BIN_EXE_custody");

/// Runs `custody ARGS` with a canary secret in its environment.
pub fn custody(args: &[&str]) -> Output {
    Command::new(CUSTODY)
        .args(args)
        .env("CANARY_SECRET", "canary-f00d-d00d")
        .output()
        .expect("custody runs")
}

/// Exit code, stdout and stderr, for assertion messages.
pub fn text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The in-toto statement inside a DSSE envelope file.
pub fn payload(envelope_file: &Path) -> serde_json::Value {
    use base64::Engine as _;
    let envelope: serde_json::Value =
        serde_json::from_slice(&fs_err::read(envelope_file).unwrap()).unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The build id `custody build` announced (`==> build ID`).
pub fn build_id(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("==> build "))
        .map(|id| id.trim().to_owned())
        .expect("custody build names its build")
}
