//! The CLI's conventions as a script would meet them (docs/cli.md): JSON on
//! stdout and only JSON, errors as JSON after `--json`, build ids by unique
//! prefix, a service log a collector can read.

use std::path::Path;

use custody_testkit::git;

mod support;

use support::daemon::{Daemon, DaemonOptions};
use support::text;

/// A checkout whose `origin` is itself, holding `spec` as custody.yaml.
fn checkout(dir: &Path, spec: &str) -> String {
    let src = dir.join("src");
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(src.join("custody.yaml"), spec).unwrap();
    git(&src, &["init", "-q"]);
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "spec"]);
    let url = format!("file://{}", src.display());
    git(&src, &["remote", "add", "origin", &url]);
    src.display().to_string()
}

/// Each line of `bytes`, parsed: the test fails naming a line that is not JSON.
fn json_lines(bytes: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
        })
        .collect()
}

/// The one JSON error object a failed `--json` command wrote to stderr.
fn json_error(output: &std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let value: serde_json::Value = serde_json::from_str(stderr.trim())
        .unwrap_or_else(|e| panic!("stderr is not one JSON object ({e}): {}", text(output)));
    assert!(output.stdout.is_empty(), "{}", text(output));
    value["error"].clone()
}

#[tokio::test]
async fn json_means_only_json_and_ids_can_be_shortened() {
    let dir = tempfile::tempdir().unwrap();
    let spec = "steps:\n  - name: greet\n    run: echo hello; echo warned >&2\n";
    let src = checkout(dir.path(), spec);
    let mut options = DaemonOptions::new("json", dir.path());
    options.extra = vec!["--log-format".into(), "json".into()];
    let daemon = Daemon::start(options);

    // submit --json --follow: log events, then the build, one per line.
    let submitted = daemon.cli(&["submit", &src, "--json", "--follow"]);
    assert!(submitted.status.success(), "{}", text(&submitted));
    let lines = json_lines(&submitted.stdout);
    let (build, events) = lines.split_last().expect("some output");
    assert_eq!(build["state"], "succeeded", "{build}");
    // Both streams, as JSON, on stdout (the two pipes are read apart, so
    // in either order).
    let mut said: Vec<_> = events.iter().map(|e| e["line"].as_str().unwrap()).collect();
    said.sort_unstable();
    assert_eq!(said, ["hello", "warned"]);
    let id = build["id"].as_str().unwrap().to_owned();

    // builds logs --json: the same events, nothing else.
    let logs = daemon.cli(&["builds", "logs", &id, "--json"]);
    assert!(logs.status.success(), "{}", text(&logs));
    assert_eq!(json_lines(&logs.stdout).len(), 2, "{}", text(&logs));

    // Enough of the id to name one build finds it (git-like).
    let second = daemon.cli(&["submit", &src, "--json", "--follow"]);
    let second_id = json_lines(&second.stdout).last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let unique = (4..=36)
        .map(|n| &id[..n])
        .find(|prefix| !second_id.starts_with(prefix))
        .unwrap();
    let shown = daemon.cli(&["builds", "show", unique, "--json"]);
    assert!(shown.status.success(), "{}", text(&shown));
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["id"], id.as_str());

    // A prefix both begin with names neither: a usage error naming both.
    let common = &id[..unique.len() - 1];
    if common.len() >= 4 {
        let ambiguous = daemon.cli(&["builds", "show", common, "--json"]);
        assert_eq!(ambiguous.status.code(), Some(2), "{}", text(&ambiguous));
        let error = json_error(&ambiguous);
        assert_eq!(error["code"], "ambiguous_id", "{error}");
        let message = error["message"].as_str().unwrap();
        assert!(
            message.contains(&id) && message.contains(&second_id),
            "{message}"
        );
    }

    // Errors after --json are one JSON object on stderr with the API's code.
    let missing = daemon.cli(&["builds", "show", "ffffffff", "--json"]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing));
    assert_eq!(json_error(&missing)["code"], "not_found");
    // Not an id at all: a usage error, before anything is asked.
    let bad = daemon.cli(&["builds", "show", "../../keys"]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("is not a build id"),
        "{}",
        text(&bad)
    );

    // The service log: one JSON object per line, each build's life in it,
    // no terminal colour codes in a file.
    let log = daemon.log();
    assert!(
        !log.contains('\x1b'),
        "colour codes in the log file:\n{log}"
    );
    let records = json_lines(log.as_bytes());
    let about = |message: &str| {
        records.iter().any(|r| {
            r["fields"]["message"] == message && r["fields"]["id"].as_str() == Some(id.as_str())
        })
    };
    for message in ["build started", "step started", "build ended"] {
        assert!(about(message), "no `{message}` for {id} in:\n{log}");
    }
}

#[test]
fn build_json_prints_the_log_and_the_result_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    fs_err::create_dir_all(&work).unwrap();
    fs_err::write(
        work.join("custody.yaml"),
        "steps:\n  - name: make\n    run: echo data > out.txt; echo made\nartifacts:\n  - paths: [out.txt]\n    to: oci:out/art:v1\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let digestfile = dir.path().join("digests");
    let output = support::custody(&[
        "build",
        &work.display().to_string(),
        "--data-dir",
        &data.display().to_string(),
        "--json",
        "--digestfile",
        &digestfile.display().to_string(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let lines = json_lines(&output.stdout);
    let (result, events) = lines.split_last().unwrap();
    assert_eq!(events[0]["step"], "make");
    assert_eq!(events[0]["line"], "made");
    assert_eq!(result["state"], "succeeded");
    let pushed: Vec<_> = result["subjects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["annotations"]["kind"] == "artifact")
        .map(|s| format!("sha256:{}\n", s["digest"]["sha256"].as_str().unwrap()))
        .collect();
    assert_eq!(pushed.len(), 1, "{result}");
    assert_eq!(
        fs_err::read_to_string(&digestfile).unwrap(),
        pushed.concat()
    );
    // The push says how far it got and what it sent: the file (5 bytes)
    // and the artifact's empty config (2), not the manifest's size.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let destination = format!("oci:{}:v1", work.join("out/art").display());
    assert!(
        stderr.contains(&format!("==> pushing {destination}: 7 bytes of 7 bytes (")),
        "{stderr}"
    );
    assert!(stderr.contains("(7 bytes of blobs sent)"), "{stderr}");

    // A spec error after --json: one JSON object on stderr, exit 2.
    fs_err::write(work.join("custody.yaml"), "steps: 3\n").unwrap();
    let output = support::custody(&[
        "build",
        &work.display().to_string(),
        "--data-dir",
        &data.display().to_string(),
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let error = json_error(&output);
    assert_eq!(error["code"], "usage", "{error}");
    assert!(
        error["message"].as_str().unwrap().contains("custody.yaml"),
        "{error}"
    );
}

#[test]
fn a_malformed_flag_value_is_a_usage_error_naming_it() {
    let output = support::custody(&[
        "verify",
        "--key",
        "k.pub",
        "--allow-step-image",
        "abc123",
        "127.0.0.1:1/x:v1",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr
            .contains("`abc123` is not an image digest: write `sha256:` followed by 64 hex digits"),
        "{stderr}"
    );
}
