//! Build secrets attacked end to end: `custody build --secret` and
//! `custody serve`'s `[secrets]`, real bubblewrap, real stores. A step that
//! did not ask looks everywhere it can for the value; a step that did
//! prints it in every form it can think of; the value must be nowhere in
//! the logs, the store or the provenance.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use custody_server::api::{BuildState, ErrorCode, GitSource, SubmitRequest};
use custody_server::client::ClientError;
use custody_testkit::git;
use custody_testkit::postgres::Backend;

mod support;
use support::daemon::{Daemon, DaemonOptions};
use support::{custody, payload, text};

/// The value: characters base64, URL encoding and shells all treat
/// differently; the file ends with a newline, as files do.
const VALUE: &str = "s3cr3t-Vx9/+q=z&w%_T0KEN";

/// Where a secret file lives: outside `/tmp` (which steps see empty
/// anyway), so hiding it is shown to be on purpose.
fn secret_file(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("token.secret");
    fs_err::write(&path, format!("{VALUE}\n")).unwrap();
    path
}

/// A step that asked for `token` as a file and as `TOKEN_VAR` (the
/// file's bytes exactly, newline included) prints
/// proof it has it (digests the test checks) and then the value itself in
/// every usual form; a step that did not ask dumps everything it can read
/// in hex (which no redaction looks for), for the test to search.
fn spec(secret_path: &Path) -> String {
    format!(
        r#"steps:
  - name: asker
    secrets: [token]
    env: {{ TOKEN_VAR: {{ secret: token }} }}
    run: |
      echo "file: $(stat -c '%a %u' /run/secrets/token) $(sha256sum < /run/secrets/token | cut -c1-64)"
      echo "env: $(printf %s "$TOKEN_VAR" | sha256sum | cut -c1-64)"
      echo "plain: $(cat /run/secrets/token)"
      echo "env plain: $TOKEN_VAR"
      echo "base64: $(base64 -w0 /run/secrets/token)"
      echo "base64 bare: $(printf %s "$TOKEN_VAR" | base64 -w0)"
      echo "base64 in basic: $(printf 'user:%s' "$TOKEN_VAR" | base64 -w0)"
      echo "urlsafe: $(printf %s "$TOKEN_VAR" | base64 -w0 | tr '+/' '-_' | tr -d =)"
      echo "url: $(python3 -c 'import os,urllib.parse;print(urllib.parse.quote(os.environ["TOKEN_VAR"], safe=""))')"
      T=$(cat /run/secrets/token); printf 'split: %s' "${{T%T0KEN}}"; sleep 0.2; echo "T0KEN end"
      echo "mount: $(grep ' /run/secrets ' /proc/self/mounts | cut -d' ' -f3)"
  - name: other
    run: |
      ls /run/secrets/token 2>/dev/null && echo "other: FOUND /run/secrets/token" || echo "other: no file"
      env | grep -c TOKEN_VAR | sed 's/^/other: env hits /'
      echo "other: host file $(cat {secret} 2>/dev/null | wc -c) bytes"
      echo HEX-BEGIN
      cat /proc/*/environ /proc/*/cmdline /proc/self/mounts 2>/dev/null | od -An -tx1 -v
      env | od -An -tx1 -v
      echo HEX-END
"#,
        secret = secret_path.display()
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every form of the value a leak would take.
fn forms() -> Vec<String> {
    vec![
        VALUE.to_owned(),
        STANDARD.encode(VALUE),
        STANDARD.encode(format!("{VALUE}\n")),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(VALUE),
        "s3cr3t-Vx9%2F%2Bq%3Dz%26w%25_T0KEN".to_owned(),
        // The middle of the value, as a store would keep a piece of it.
        "Vx9/+q=z&w".to_owned(),
    ]
}

fn assert_nowhere(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for form in forms() {
        assert!(!text.contains(&form), "`{form}` is in {what}");
    }
}

/// What the steps said, checked as the attacker's view: the asker had the
/// value (file 0400 of its root on a tmpfs, and the variable), every form
/// it printed is masked, the other step found nothing.
fn check_log(lines: &[String]) {
    let log = lines.join("\n");
    assert_nowhere("the log", log.as_bytes());
    let file_digest = sha256_hex(format!("{VALUE}\n").as_bytes());
    assert!(
        lines
            .iter()
            .any(|l| l == &format!("file: 400 0 {file_digest}")),
        "{log}"
    );
    assert!(
        lines.iter().any(|l| l == &format!("env: {file_digest}")),
        "{log}"
    );
    for masked in [
        "plain: ***",
        "env plain: ***",
        "base64: ***",
        "base64 bare: ***",
        "urlsafe: ***",
        "url: ***",
        "split: *** end",
        "mount: tmpfs",
        "other: no file",
        "other: env hits 0",
        "other: host file 0 bytes",
    ] {
        assert!(lines.iter().any(|l| l == masked), "no `{masked}` in\n{log}");
    }
    let basic = lines
        .iter()
        .find_map(|l| l.strip_prefix("base64 in basic: "))
        .expect("the Basic header line");
    assert!(basic.contains("***"), "{basic}");
    // What the other step could read of /proc and its environment.
    let begin = lines.iter().position(|l| l == "HEX-BEGIN").expect("dump");
    let end = lines.iter().position(|l| l == "HEX-END").expect("dump end");
    let hex: String = lines[begin + 1..end]
        .iter()
        .flat_map(|l| l.split_whitespace())
        .collect();
    let dumped: Vec<u8> = (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(dumped.len() > 100, "the other step read /proc: {log}");
    assert_nowhere("what the other step read of /proc", &dumped);
}

#[test]
fn build_gives_a_secret_to_the_step_that_asked_and_masks_it_everywhere() {
    let dir = tempfile::Builder::new()
        .prefix("custody-secrets")
        .tempdir_in("/var/tmp")
        .unwrap();
    let secret = secret_file(dir.path());
    let src = dir.path().join("src");
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(src.join("custody.yaml"), spec(&secret)).unwrap();
    let data = dir.path().join("data");
    let envelope = dir.path().join("envelope.json");
    let output = custody(&[
        "build",
        src.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--secret",
        &format!("token=file:{}", secret.display()),
        "--provenance-out",
        envelope.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    assert_nowhere("custody build's output", text(&output).as_bytes());
    let lines: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.split_once("] ").map(|(_, rest)| rest.to_owned()))
        .collect();
    check_log(&lines);

    // The store, byte for byte (its write-ahead log too), and the
    // provenance: the secret's name for the step that had it, no value.
    for file in ["custody.db", "custody.db-wal"] {
        if let Ok(bytes) = fs_err::read(data.join(file)) {
            assert_nowhere(file, &bytes);
        }
    }
    let raw = fs_err::read(&envelope).unwrap();
    assert_nowhere("the envelope", &raw);
    let statement = payload(&envelope);
    assert_nowhere("the statement", statement.to_string().as_bytes());
    let steps =
        &statement["predicate"]["buildDefinition"]["internalParameters"]["sandbox"]["steps"];
    assert_eq!(steps[0]["secrets"], serde_json::json!(["token"]), "{steps}");
    assert_eq!(steps[1]["secrets"], serde_json::json!([]), "{steps}");
}

/// A secret that is a key file (many lines) printed through tools that
/// wrap their output (`base64`, `openssl base64`, `xxd -p`) and as is:
/// every whole line of each shows as `***`; only a last line too short
/// to tell apart (under 16 characters) may stay.
#[test]
fn a_key_file_secret_printed_through_wrapping_encoders_is_masked_line_by_line() {
    let dir = tempfile::Builder::new()
        .prefix("custody-secrets")
        .tempdir_in("/var/tmp")
        .unwrap();
    let key: String = (0..12)
        .map(|i| {
            let line: String = (0..64)
                .map(|j| (b'A' + ((i * 64 + j) * 7 % 26) as u8) as char)
                .collect();
            format!("{line}\n")
        })
        .collect();
    let key = format!("-----BEGIN TEST KEY-----\n{key}-----END TEST KEY-----\n");
    let path = dir.path().join("key.pem");
    fs_err::write(&path, &key).unwrap();
    let src = dir.path().join("src");
    fs_err::create_dir_all(&src).unwrap();
    fs_err::write(
        src.join("custody.yaml"),
        "steps:\n  - name: leak\n    secrets: [key]\n    run: |\n\
         \x20     for tool in 'cat' 'base64' 'openssl base64 -in' 'xxd -p'; do\n\
         \x20       echo \"== $tool\"; $tool /run/secrets/key\n\
         \x20     done\n\
         \x20     echo '== end'\n",
    )
    .unwrap();
    let output = custody(&[
        "build",
        src.to_str().unwrap(),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--secret",
        &format!("key=file:{}", path.display()),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let log: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("[leak] ").map(str::to_owned))
        .collect();
    let starts: Vec<usize> = (0..log.len())
        .filter(|&i| log[i].starts_with("== "))
        .collect();
    assert_eq!(starts.len(), 5, "{log:#?}");
    for pair in starts.windows(2) {
        let block = &log[pair[0] + 1..pair[1]];
        assert!(block.len() > 4, "{}: {block:#?}", log[pair[0]]);
        for (n, line) in block.iter().enumerate() {
            let last = n + 1 == block.len();
            assert!(
                line == "***" || (last && line.len() < 16),
                "{}: line {n} shows `{line}`",
                log[pair[0]]
            );
        }
    }
    let all = log.join("\n");
    for secret_line in key.lines().filter(|l| l.len() >= 16) {
        assert!(!all.contains(secret_line), "{all}");
    }
}

#[test]
fn an_unknown_secret_is_exit_2_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    fs_err::write(
        dir.path().join("custody.yaml"),
        "steps:\n  - name: a\n    run: true\n  - name: b\n    env: { X: { secret: nope } }\n    run: echo ran\n",
    )
    .unwrap();
    let defined = dir.path().join("defined");
    fs_err::write(&defined, "x").unwrap();
    let output = custody(&[
        "build",
        dir.path().to_str().unwrap(),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
        "--secret",
        &format!("other=file:{}", defined.display()),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("custody.yaml:5:25"), "{stderr}");
    assert!(stderr.contains("`nope`"), "{stderr}");
    assert!(
        !text(&output).contains("ran"),
        "no step ran: {}",
        text(&output)
    );
}

/// A git repository holding `custody.yaml`; returns its file URL.
fn repository(dir: &Path, spec: &str) -> String {
    fs_err::create_dir_all(dir).unwrap();
    fs_err::write(dir.join("custody.yaml"), spec).unwrap();
    git(dir, &["init", "-q", "-b", "main"]);
    git(dir, &["add", "."]);
    git(dir, &["commit", "-qm", "spec"]);
    format!("file://{}", dir.display())
}

fn request(git: &str, spec: Option<String>) -> SubmitRequest {
    SubmitRequest {
        spec_path: "custody.yaml".to_owned(),
        source: Some(GitSource {
            git: git.to_owned(),
            revision: "main".to_owned(),
            path: None,
        }),
        spec,
    }
}

custody_testkit::on_both!(serve_gives_secrets_only_to_allowed_sources_and_never_keeps_them);

async fn serve_gives_secrets_only_to_allowed_sources_and_never_keeps_them(backend: Backend) {
    let dir = tempfile::Builder::new()
        .prefix("custody-secrets")
        .tempdir_in("/var/tmp")
        .unwrap();
    let secret = secret_file(dir.path());
    let spec = spec(&secret);
    let team = repository(&dir.path().join("team/app"), &spec);
    let outsider = repository(&dir.path().join("outsider/app"), &spec);
    let data = dir.path().join("data");
    let mut options = DaemonOptions::new("secrets", &data);
    options.database_url = backend.url();
    options.config = format!(
        "allow_inline_specs = true\n\n[sources]\nschemes = [\"file\"]\n\n[secrets.token]\nfile = \"{}\"\nsources = [\"file://{}/team/*\"]\n",
        secret.display(),
        dir.path().display()
    );
    let daemon = Daemon::start(options);
    let client = daemon.client();

    // The allowed repository: followed live, then read back by the CLI.
    let build = client.submit(&request(&team, None)).await.unwrap();
    let mut live = Vec::new();
    let ended = client
        .logs(&build.id, true, |e| live.push(e.line))
        .await
        .unwrap();
    assert_eq!(ended.state, BuildState::Succeeded, "{ended:?}");
    check_log(&live);
    let out = daemon.cli(&["builds", "logs", &build.id]);
    assert!(out.status.success(), "{}", text(&out));
    let printed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_nowhere("`custody builds logs`", &out.stdout);
    assert!(
        printed.iter().any(|l| l.ends_with("plain: ***")),
        "{}",
        text(&out)
    );
    let envelope = client.provenance(&build.id).await.unwrap();
    assert_nowhere("the envelope", &envelope);
    let envelope: serde_json::Value = serde_json::from_slice(&envelope).unwrap();
    let statement = STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    assert_nowhere("the statement", &statement);
    let statement: serde_json::Value = serde_json::from_slice(&statement).unwrap();
    assert_eq!(
        statement["predicate"]["buildDefinition"]["internalParameters"]["sandbox"]["steps"][0]["secrets"],
        serde_json::json!(["token"])
    );

    // Another repository, its spec inline: refused at submit, at the line.
    match client.submit(&request(&outsider, Some(spec.clone()))).await {
        Err(ClientError::Api {
            status: 400,
            code,
            line,
            column,
            ..
        }) => {
            assert_eq!(code, ErrorCode::SecretNotAllowed);
            assert_eq!((line, column), (Some(3), Some(15)));
        }
        other => panic!("{other:?}"),
    }
    // An inline spec naming the allowed repository is the submitter's
    // commands all the same: refused too.
    match client.submit(&request(&team, Some(spec.clone()))).await {
        Err(ClientError::Api {
            status: 400,
            code,
            message,
            ..
        }) => {
            assert_eq!(code, ErrorCode::SecretNotAllowed);
            assert!(message.contains("came with the request"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    match client
        .submit(&request(
            &team,
            Some(spec.replace("secrets: [token]", "secrets: [nope]")),
        ))
        .await
    {
        Err(ClientError::Api {
            status: 400, code, ..
        }) => assert_eq!(code, ErrorCode::UnknownSecret),
        other => panic!("{other:?}"),
    }
    // …its spec in the source: known only at plan, where it fails before
    // any runner starts, naming the secret; no step printed anything.
    let refused = client.submit(&request(&outsider, None)).await.unwrap();
    let mut lines = Vec::new();
    let ended = client
        .logs(&refused.id, true, |e| lines.push(e.line))
        .await
        .unwrap();
    assert_eq!(ended.state, BuildState::Failed, "{ended:?}");
    let error = ended.error.unwrap_or_default();
    assert!(
        error.contains("custody.yaml:3:15") && error.contains("`token`"),
        "{error}"
    );
    assert!(lines.is_empty(), "a step ran: {lines:?}");
    assert!(!ended.has_provenance);

    // Nothing of the value in the store: SQLite's files byte for byte, or
    // PostgreSQL's dump.
    match &backend {
        Backend::Sqlite => {
            for file in ["custody.db", "custody.db-wal"] {
                if let Ok(bytes) = fs_err::read(data.join(file)) {
                    assert_nowhere(file, &bytes);
                }
            }
        }
        Backend::Postgres { cluster, .. } => {
            // Log lines are `bytea`, dumped as hex: search that too.
            let dump = cluster.dump("custody");
            let hex = |text: &str| -> String { text.bytes().map(|b| format!("{b:02x}")).collect() };
            let dumped = String::from_utf8_lossy(&dump);
            assert!(
                dumped.contains(&hex("plain: ***")),
                "the dump holds the log"
            );
            assert_nowhere("pg_dump", &dump);
            for form in forms() {
                assert!(
                    !dumped.contains(&hex(&form)),
                    "`{form}` is in pg_dump (hex)"
                );
            }
        }
    }
    assert_nowhere("the daemon's log", daemon.log().as_bytes());
}
