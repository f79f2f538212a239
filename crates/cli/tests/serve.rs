//! `custody serve` as users run it: real daemon processes, real runners,
//! SQLite and a real PostgreSQL cluster, the HTTP API and the CLI clients.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use custody_daemon::store::Store;
use custody_server::api::{Build, BuildState, GitSource, SubmitRequest};
use custody_server::client::{Client, ClientError};
use custody_testkit::postgres::Backend;
use custody_testkit::{Registry, git};

mod support;

use support::CUSTODY;
use support::daemon::{Daemon, DaemonOptions, TOKEN};

fn text(output: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A git repository holding each `(path, spec)`; returns its file URL.
fn repository(dir: &Path, specs: &[(&str, &str)]) -> String {
    let src = dir.join("src");
    fs_err::create_dir_all(&src).unwrap();
    for (path, spec) in specs {
        fs_err::write(src.join(path), spec).unwrap();
    }
    git(&src, &["init", "-q"]);
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "spec"]);
    format!("file://{}", src.display())
}

/// A build of the spec at `spec_path` in `git`'s `main`.
fn request(git: &str, spec_path: &str) -> SubmitRequest {
    SubmitRequest {
        spec_path: spec_path.to_owned(),
        source: Some(GitSource {
            git: git.to_owned(),
            revision: "main".to_owned(),
            path: None,
        }),
        spec: None,
    }
}

/// Submits `request` and follows its log to the end: the ended build and
/// the lines its steps printed.
async fn run_to_end(client: &Client, request: &SubmitRequest) -> (Build, Vec<String>) {
    let build = client.submit(request).await.unwrap();
    let mut lines = Vec::new();
    let ended = client
        .logs(&build.id, true, |e| lines.push(e.line))
        .await
        .unwrap();
    (ended, lines)
}

/// Polls until `id` has ended.
async fn wait_ended(client: &Client, id: &str, within: Duration) -> Build {
    let deadline = Instant::now() + within;
    loop {
        let build = client.show(id).await.unwrap();
        if build.state.is_final() {
            return build;
        }
        assert!(Instant::now() < deadline, "{id} still {:?}", build.state);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

custody_testkit::on_both!(
    builds_run_stream_their_logs_and_cancel,
    sigterm_lets_running_builds_finish_and_leaves_the_queue,
    the_record_shows_the_commit_steps_and_outputs_and_a_retry_builds_the_same_commit,
);

async fn builds_run_stream_their_logs_and_cancel(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let spec = "steps:\n  - name: count\n    run: for i in 1 2 3; do echo line $i; sleep 0.3; done; echo done >&2\n";
    let slow = "steps:\n  - name: wait\n    run: echo waiting; sleep 60\n";
    let git = repository(dir.path(), &[("custody.yaml", spec), ("slow.yaml", slow)]);
    let mut options = DaemonOptions::new("d1", dir.path());
    options.database_url = backend.url();
    options.concurrency = 1;
    let daemon = Daemon::start(options);
    let client = daemon.client();

    let build = client.submit(&request(&git, "custody.yaml")).await.unwrap();
    // Queued, or already claimed by the daemon's poll.
    assert!(
        matches!(build.state, BuildState::Queued | BuildState::Running),
        "{build:?}"
    );
    // Followed live: the lines arrive before the build ends, in order.
    let mut lines = Vec::new();
    let ended = client
        .logs(&build.id, true, |event| lines.push(event))
        .await
        .unwrap();
    assert_eq!(ended.state, BuildState::Succeeded, "{ended:?}");
    assert_eq!(ended.daemon.as_deref(), Some("d1"));
    assert!(ended.has_provenance);
    let texts: Vec<&str> = lines.iter().map(|l| l.line.as_str()).collect();
    assert_eq!(texts, ["line 1", "line 2", "line 3", "done"]);
    assert!(lines.windows(2).all(|w| w[0].seq < w[1].seq));
    // A late reader gets the same backlog.
    let mut late = Vec::new();
    client
        .logs(&build.id, false, |event| late.push(event.line))
        .await
        .unwrap();
    assert_eq!(late, texts);

    // Provenance and keys: the envelope is signed by the listed key.
    let envelope = client.provenance(&build.id).await.unwrap();
    let envelope: serde_json::Value = serde_json::from_slice(&envelope).unwrap();
    let keys = client.keys().await.unwrap();
    assert_eq!(envelope["signatures"][0]["keyid"], keys.keys[0].key_id);

    // Cancel: a running build stops, a queued one never starts.
    let running = client.submit(&request(&git, "slow.yaml")).await.unwrap();
    let queued = client.submit(&request(&git, "slow.yaml")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.show(&running.id).await.unwrap().state != BuildState::Running {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = daemon.cli(&["builds", "cancel", &queued.id]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        client.show(&queued.id).await.unwrap().state,
        BuildState::Cancelled
    );
    let begun = Instant::now();
    client.cancel(&running.id).await.unwrap();
    let ended = wait_ended(&client, &running.id, Duration::from_secs(20)).await;
    assert_eq!(ended.state, BuildState::Cancelled, "{ended:?}");
    assert!(
        begun.elapsed() < Duration::from_secs(15),
        "took {:?}",
        begun.elapsed()
    );
    assert!(!ended.has_provenance);
    match client.cancel(&running.id).await {
        Err(ClientError::Api {
            status: 409, code, ..
        }) => assert_eq!(code, custody_server::api::ErrorCode::AlreadyEnded),
        other => panic!("{other:?}"),
    }
    // Listing: newest first, filtered by state, paged.
    let all = client.list(None, 2, None).await.unwrap();
    assert_eq!(
        all.builds.iter().map(|b| &b.id).collect::<Vec<_>>(),
        [&queued.id, &running.id]
    );
    let rest = client.list(None, 2, all.next.as_deref()).await.unwrap();
    assert_eq!(rest.builds.len(), 1);
    assert_eq!(rest.builds[0].id, build.id);
    let cancelled = client
        .list(Some(BuildState::Cancelled), 50, None)
        .await
        .unwrap();
    assert_eq!(cancelled.builds.len(), 2);
}

async fn sigterm_lets_running_builds_finish_and_leaves_the_queue(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let short = "steps:\n  - name: s\n    run: echo begun; sleep 2; echo finished\n";
    let slow = "steps:\n  - name: s\n    run: echo begun; sleep 60\n";
    let git = repository(dir.path(), &[("custody.yaml", short), ("slow.yaml", slow)]);
    let mut options = DaemonOptions::new("d1", dir.path());
    options.database_url = backend.url();
    options.concurrency = 1;
    let mut daemon = Daemon::start(options);
    let client = daemon.client();
    let first = client.submit(&request(&git, "custody.yaml")).await.unwrap();
    let second = client.submit(&request(&git, "custody.yaml")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.show(&first.id).await.unwrap().state != BuildState::Running {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(daemon.terminate(), Some(0), "{}", daemon.log());

    // The running build finished; the queued one waits for the next daemon.
    let mut options = DaemonOptions::new("d2", dir.path());
    options.database_url = backend.url();
    options.concurrency = 1;
    options.grace_seconds = 1;
    let mut again = Daemon::start(options);
    let client = again.client();
    let first = client.show(&first.id).await.unwrap();
    assert_eq!(first.state, BuildState::Succeeded, "{first:?}");
    assert_eq!(first.daemon.as_deref(), Some("d1"));
    let second = wait_ended(&client, &second.id, Duration::from_secs(30)).await;
    assert_eq!(second.state, BuildState::Succeeded, "{second:?}");
    assert_eq!(second.daemon.as_deref(), Some("d2"));

    // Past the grace period a running build is cancelled, with the reason.
    let third = client.submit(&request(&git, "slow.yaml")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.show(&third.id).await.unwrap().state != BuildState::Running {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let begun = Instant::now();
    assert_eq!(again.terminate(), Some(0), "{}", again.log());
    assert!(
        begun.elapsed() < Duration::from_secs(15),
        "{:?}",
        begun.elapsed()
    );
    let store = open_store(&backend, dir.path()).await;
    let record = store.build(&stored(&third.id)).await.unwrap().unwrap();
    assert_eq!(record.state.as_str(), "cancelled");
    assert!(
        record.error.as_deref().unwrap().contains("shut down"),
        "{record:?}"
    );
}

/// The id the API answered with, as the store knows it.
fn stored(id: &str) -> custody_daemon::record::BuildId {
    custody_daemon::record::BuildId::parse(id).expect("the API answers with build ids")
}

async fn open_store(backend: &Backend, data_dir: &Path) -> Store {
    match backend.url() {
        Some(url) => Store::open(url).await.unwrap(),
        None => Store::open_sqlite(&data_dir.join("custody.db"))
            .await
            .unwrap(),
    }
}

/// Two daemons on one PostgreSQL queue: 300 builds, each run exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_run_each_of_300_builds_exactly_once() {
    let backend = Backend::postgres();
    let dir = tempfile::tempdir().unwrap();
    let spec = "steps:\n  - name: s\n    run: echo ran\n";
    let git = repository(dir.path(), &[("custody.yaml", spec)]);
    let daemons: Vec<Daemon> = ["a", "b"]
        .iter()
        .map(|name| {
            let mut options = DaemonOptions::new(name, dir.path());
            options.database_url = backend.url();
            options.concurrency = 4;
            Daemon::start(options)
        })
        .collect();
    let mut ids = Vec::new();
    for n in 0..300 {
        // Half submitted to each daemon.
        let client = daemons[n % 2].client();
        ids.push(
            client
                .submit(&request(&git, "custody.yaml"))
                .await
                .unwrap()
                .id,
        );
    }
    let client = daemons[0].client();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let page = client
            .list(Some(BuildState::Succeeded), 500, None)
            .await
            .unwrap();
        if page.builds.len() == ids.len() {
            break;
        }
        let failed = client
            .list(Some(BuildState::Failed), 5, None)
            .await
            .unwrap();
        assert!(failed.builds.is_empty(), "{:?}", failed.builds[0]);
        assert!(
            Instant::now() < deadline,
            "{} of 300 succeeded",
            page.builds.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let store = Store::open(backend.url().unwrap()).await.unwrap();
    let mut by_daemon = std::collections::HashMap::<String, usize>::new();
    for id in &ids {
        let record = store.build(&stored(id)).await.unwrap().unwrap();
        assert_eq!(record.claims, 1, "{id} claimed {} times", record.claims);
        *by_daemon.entry(record.owner.unwrap()).or_default() += 1;
        let logs = store.logs(&stored(id)).await.unwrap();
        assert_eq!(logs.len(), 1, "{id}: {logs:?}");
        assert_eq!(logs[0].line, b"ran");
    }
    assert_eq!(by_daemon.values().sum::<usize>(), 300);
    assert!(
        by_daemon.len() == 2 && by_daemon.values().all(|&n| n > 0),
        "both daemons worked the queue: {by_daemon:?}"
    );
}

/// `kill -9` in the middle of a build: another daemon ends it with the
/// reason within the lease, its logs up to the kill are kept, and the
/// queued builds still run.
#[tokio::test]
async fn a_killed_daemons_build_is_ended_by_another() {
    let backend = Backend::postgres();
    let dir = tempfile::tempdir().unwrap();
    let slow = "steps:\n  - name: s\n    run: echo before the kill; sleep 120\n";
    let quick = "steps:\n  - name: q\n    run: echo quick\n";
    let git = repository(dir.path(), &[("custody.yaml", slow), ("quick.yaml", quick)]);
    let mut options = DaemonOptions::new("doomed", dir.path());
    options.database_url = backend.url();
    options.concurrency = 1;
    options.lease_seconds = 3;
    let mut doomed = Daemon::start(options);
    let client = doomed.client();
    let victim = client.submit(&request(&git, "custody.yaml")).await.unwrap();
    let mut queued = Vec::new();
    for _ in 0..3 {
        queued.push(
            client
                .submit(&request(&git, "quick.yaml"))
                .await
                .unwrap()
                .id,
        );
    }
    // Wait until its first line is stored, then kill the daemon.
    let store = Store::open(backend.url().unwrap()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.logs(&stored(&victim.id)).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "{}", doomed.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    doomed.kill9();
    let killed_at = Instant::now();

    let mut options = DaemonOptions::new("survivor", dir.path());
    options.database_url = backend.url();
    options.lease_seconds = 3;
    let survivor = Daemon::start(options);
    let client = survivor.client();
    let ended = wait_ended(&client, &victim.id, Duration::from_secs(20)).await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "ended {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(ended.state, BuildState::Failed, "{ended:?}");
    let reason = ended.error.unwrap();
    assert!(
        reason.contains("`doomed`") && reason.contains("lease"),
        "{reason}"
    );
    assert!(!ended.has_provenance);
    let logs = store.logs(&stored(&victim.id)).await.unwrap();
    assert_eq!(logs[0].line, b"before the kill");
    for id in &queued {
        let build = wait_ended(&client, id, Duration::from_secs(30)).await;
        assert_eq!(build.state, BuildState::Succeeded, "{build:?}");
        assert_eq!(build.daemon.as_deref(), Some("survivor"));
    }
}

/// The same on SQLite, where the restarted daemon is the one that notices.
#[tokio::test]
async fn a_restarted_daemon_ends_the_build_it_was_killed_in() {
    let dir = tempfile::tempdir().unwrap();
    let slow = "steps:\n  - name: s\n    run: echo before the kill; sleep 120\n";
    let git = repository(dir.path(), &[("custody.yaml", slow)]);
    let mut options = DaemonOptions::new("first-life", dir.path());
    options.lease_seconds = 2;
    let mut daemon = Daemon::start(options);
    let client = daemon.client();
    let victim = client.submit(&request(&git, "custody.yaml")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut lines = Vec::new();
        client
            .logs(&victim.id, false, |e| lines.push(e.line))
            .await
            .unwrap();
        if !lines.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.kill9();
    let mut options = DaemonOptions::new("second-life", dir.path());
    options.lease_seconds = 2;
    let daemon = Daemon::start(options);
    let client = daemon.client();
    let ended = wait_ended(&client, &victim.id, Duration::from_secs(15)).await;
    assert_eq!(ended.state, BuildState::Failed);
    assert!(ended.error.unwrap().contains("`first-life`"));
    let mut lines = Vec::new();
    client
        .logs(&victim.id, false, |e| lines.push(e.line))
        .await
        .unwrap();
    assert_eq!(lines, ["before the kill"]);
}

/// The round trip a user makes: submit the example to a server, follow its
/// log, fetch the server's key, verify the pushed image with it.
#[tokio::test]
async fn submit_follow_and_verify_the_example() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    // A checkout holding the example where this repository has it, pushing
    // to the registry rather than to layouts beside it.
    let repo = dir.path().join("repo");
    let src = repo.join("examples/hello");
    fs_err::create_dir_all(&src).unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello");
    for name in ["custody.yaml", "hello.sh", ".gitignore"] {
        fs_err::copy(example.join(name), src.join(name)).unwrap();
    }
    let as_shipped = fs_err::read_to_string(src.join("custody.yaml")).unwrap();
    fs_err::write(
        repo.join("custody.yaml"),
        "steps: [{name: wrong, run: exit 7}]\n",
    )
    .unwrap();
    git(&repo, &["init", "-q"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "example"]);
    let url = format!("file://{}", repo.display());
    git(&repo, &["remote", "add", "origin", &url]);

    let mut options = DaemonOptions::new("round-trip", dir.path());
    options.extra = vec!["--insecure-registry".into(), registry.host().into()];
    let daemon = Daemon::start(options);

    // As shipped, the example writes layouts next to its spec: a service
    // cannot, and says so before anything is queued.
    let refused = daemon.cli(&["submit", &src.display().to_string()]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused));
    let line = as_shipped
        .lines()
        .position(|l| l.contains("to: oci:out/hello:"))
        .unwrap()
        + 1;
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains(&format!(
            "{}:{line}:9: destination `oci:out/hello:{{short_commit}}` is a layout next to the spec",
            src.join("custody.yaml").display()
        )),
        "{}",
        text(&refused)
    );
    assert!(
        daemon
            .client()
            .list(None, 10, None)
            .await
            .unwrap()
            .builds
            .is_empty()
    );

    let spec = as_shipped.replace("oci:out/", &format!("{}/", registry.host()));
    fs_err::write(src.join("custody.yaml"), spec).unwrap();
    git(&repo, &["commit", "-qam", "to the registry"]);
    let commit = git(&repo, &["rev-parse", "HEAD"]);

    // `submit DIR` as `build DIR`: DIR's spec, the steps in DIR (hello.sh
    // is found), the checkout's origin at its commit.
    let submitted = daemon.cli(&["submit", &src.display().to_string(), "--follow"]);
    let output = text(&submitted);
    assert!(submitted.status.success(), "{output}\n{}", daemon.log());
    // Each line is named by its step, as `custody build` names it.
    assert!(
        output.contains("[image] image written to /output/hello"),
        "{output}"
    );
    assert!(output.contains("hello.sh"), "{output}");

    let listed = daemon.cli(&["builds", "list", "--json"]);
    let page: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let build = &page["builds"][0];

    // Whoever reads stdout may stop (`custody builds list | head -1`): not
    // an error, with stderr open or closed too.
    let id = build["id"].as_str().unwrap();
    let source = src.display().to_string();
    for args in [
        &["builds", "list"][..],
        &["builds", "list", "--json"],
        &["builds", "show", id],
        &["builds", "logs", id],
        &["submit", &source],
    ] {
        let (code, stderr) = daemon.cli_to_closed_pipes(args, false);
        // `submit` says which build it queued; nothing else speaks.
        let said = stderr.trim_start_matches("queued build ");
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(
            said.is_empty() || args[0] == "submit" && !said.contains(' '),
            "{args:?}: {stderr}"
        );
        let (code, _) = daemon.cli_to_closed_pipes(args, true);
        assert_eq!(code, Some(0), "{args:?} with stderr closed");
    }
    assert_eq!(build["state"], "succeeded");
    assert_eq!(build["source"]["revision"], commit.as_str());

    let keys = daemon.client().keys().await.unwrap();
    let key = dir.path().join("server.pub");
    fs_err::write(&key, &keys.keys[0].pem).unwrap();
    let image = format!("{}/hello:{}", registry.host(), &commit[..12]);
    let verified = Command::new(CUSTODY)
        .args(["verify", &image, "--insecure-registry", registry.host()])
        .args(["--key", &key.display().to_string()])
        .args(["--source", &format!("{url}@{commit}")])
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", text(&verified));
    let shown = daemon.cli(&["builds", "show", build["id"].as_str().unwrap()]);
    let shown = text(&shown);
    assert!(
        shown.contains(&format!("pushed    {image}@sha256:")),
        "{shown}"
    );

    // The provenance says where in the repository it ran, and the files
    // are named as `custody build examples/hello` names them.
    let envelope = daemon.cli(&["builds", "provenance", id]);
    let envelope: serde_json::Value = serde_json::from_slice(&envelope.stdout).unwrap();
    use base64::Engine as _;
    let statement: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(envelope["payload"].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let source = &statement["predicate"]["buildDefinition"]["externalParameters"]["source"];
    assert_eq!(source["path"], "examples/hello", "{source}");
    let files: Vec<&str> = statement["subject"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["annotations"]["kind"] == "file")
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with("hello.sh"))
            && !files.iter().any(|f| f.contains("examples/")),
        "{files:?}"
    );
}

/// Property-based testing of the API from its own OpenAPI document
/// (schemathesis): whatever it sends, no 5xx comes back.
#[tokio::test]
async fn schemathesis_finds_no_server_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = DaemonOptions::new("fuzzed", dir.path());
    options.concurrency = 1;
    let daemon = Daemon::start(options);
    let openapi = reqwest::Client::new()
        .get(format!("{}/api/v1/openapi.json", daemon.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let schema = dir.path().join("openapi.json");
    fs_err::write(&schema, &openapi).unwrap();
    let output = Command::new("st")
        .arg("run")
        .arg(&schema)
        .args(["--url", &daemon.url()])
        .args(["--header", &format!("Authorization: Bearer {TOKEN}")])
        .args(["--checks", "not_a_server_error"])
        .args(["--max-examples", "40", "--request-timeout", "10"])
        .arg("--generation-deterministic")
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(dir.path())
        .output()
        .expect("schemathesis (`st`) runs; scripts/setup installs it");
    assert!(
        output.status.success(),
        "{}\n--- daemon\n{}",
        text(&output),
        daemon.log()
    );
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(report.contains("passed"), "{report}");
}

/// The service's secrets stay out of steps: the configuration file (tokens)
/// and the daemon's environment (CUSTODY_TOKEN) are not theirs to read,
/// though the host's other files are.
#[tokio::test]
async fn steps_cannot_read_the_service_tokens() {
    // Outside /tmp, which steps see empty anyway.
    let dir = tempfile::Builder::new()
        .prefix("custody-serve-test")
        .tempdir_in("/var/tmp")
        .unwrap();
    let config = dir.path().join("serve.toml");
    fs_err::write(&config, "tokens = [\"config-token-7d1e\"]\n").unwrap();
    let neighbour = dir.path().join("readable.txt");
    fs_err::write(&neighbour, "visible\n").unwrap();
    let spec = format!(
        "steps:\n  - name: snoop\n    run: cat {} {} 2>&1; env; echo end\n",
        config.display(),
        neighbour.display()
    );
    let git = repository(dir.path(), &[("custody.yaml", &spec)]);
    // The data directory is hidden whole; the configuration sits elsewhere.
    let data = dir.path().join("data");
    let mut options = DaemonOptions::new("secretive", &data);
    options.config = format!(
        "{}{}",
        fs_err::read_to_string(&config).unwrap(),
        options.config
    );
    options.config_path = Some(config.clone());
    let daemon = Daemon::start(options);
    let client = daemon.client();
    let (ended, lines) = run_to_end(&client, &request(&git, "custody.yaml")).await;
    assert_eq!(ended.state, BuildState::Succeeded, "{ended:?}");
    let log = lines.join("\n");
    assert!(log.contains("visible") && log.ends_with("end"), "{log}");
    assert!(!log.contains("config-token-7d1e"), "{log}");
    assert!(!log.contains(TOKEN), "{log}");
    // The token in the file does work for the API.
    let other = Client::new(&daemon.url(), Some("config-token-7d1e".into())).unwrap();
    other.show(&ended.id).await.unwrap();
}

/// An address already in use is the machine's problem, not a bad
/// configuration or a failed build: exit 3, naming the address.
#[test]
fn an_address_in_use_exits_3_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let data = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(["serve", "--listen", &addr, "--data-dir"])
        .arg(data.path())
        .env("CUSTODY_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on `{addr}`")),
        "{stderr}"
    );
}

/// A server that accepts connections and never answers; its address.
fn tarpit() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    addr
}

/// `custody verify` of a pushed output with the service's key.
async fn verify(
    daemon: &Daemon,
    registry: &Registry,
    output: &str,
    extra: &[&str],
) -> std::process::Output {
    let keys = daemon.client().keys().await.unwrap();
    let key = daemon.log.with_extension("pub");
    fs_err::write(&key, &keys.keys[0].pem).unwrap();
    Command::new(CUSTODY)
        .args(["verify", output, "--insecure-registry", registry.host()])
        .args(["--key", &key.display().to_string()])
        .args(extra)
        .output()
        .unwrap()
}

/// Regression (attack): with a valid token, a submitted spec that wrote
/// `BACKDOOR` into the artifact passed `custody verify --source
/// SOURCE@COMMIT` just as the repository's own spec did. The spec now comes
/// from the source; where inline specs are allowed, the provenance says so
/// and `--source` fails unless `--allow-inline-spec`.
#[tokio::test]
async fn a_spec_from_the_source_verifies_and_an_inline_one_must_be_allowed() {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let artifact = |word: &str| {
        format!(
            "steps:\n  - name: make\n    run: echo {word} > out.txt\nartifacts:\n  - paths: [out.txt]\n    to: {}/team/app:{{job}}\n",
            registry.host()
        )
    };
    let git = repository(dir.path(), &[("custody.yaml", &artifact("GOOD"))]);
    let commit = git_head(&dir);
    let mut options = DaemonOptions::new("inline", dir.path());
    options.config = format!("allow_inline_specs = true\n{}", options.config);
    options.extra = vec!["--insecure-registry".into(), registry.host().into()];
    let daemon = Daemon::start(options);
    let client = daemon.client();

    let from_source = client.submit(&request(&git, "custody.yaml")).await.unwrap();
    let mut inline = request(&git, "custody.yaml");
    inline.spec = Some(artifact("BACKDOOR"));
    let inline = client.submit(&inline).await.unwrap();
    let source = format!("{git}@{commit}");
    let mut verdicts = Vec::new();
    for build in [&from_source, &inline] {
        let ended = wait_ended(&client, &build.id, Duration::from_secs(60)).await;
        assert_eq!(
            ended.state,
            BuildState::Succeeded,
            "{ended:?}\n{}",
            daemon.log()
        );
        let output = &ended.outputs[0];
        let pinned = format!("{}@{}", output.reference, output.digest);
        let strict = verify(&daemon, &registry, &pinned, &["--source", &source]).await;
        let lenient = verify(
            &daemon,
            &registry,
            &pinned,
            &["--source", &source, "--allow-inline-spec"],
        )
        .await;
        verdicts.push((strict, lenient));
    }
    let [(good, good_lenient), (backdoor, backdoor_lenient)] = verdicts.as_slice() else {
        unreachable!()
    };
    assert!(good.status.success(), "{}", text(good));
    assert!(good_lenient.status.success(), "{}", text(good_lenient));
    assert_eq!(backdoor.status.code(), Some(1), "{}", text(backdoor));
    assert!(
        text(backdoor).contains("not read from the source"),
        "{}",
        text(backdoor)
    );
    assert!(
        backdoor_lenient.status.success(),
        "{}",
        text(backdoor_lenient)
    );
}

/// The commit `repository` made.
fn git_head(dir: &tempfile::TempDir) -> String {
    git(&dir.path().join("src"), &["rev-parse", "HEAD"])
}

/// Regression (attack): stored errors told a refused port from an HTTP
/// error from an SSH banner, making the service a port scanner. Whatever
/// answered, a submitter learns only that the source could not be fetched;
/// the operator's log has the reason.
#[tokio::test]
async fn a_failed_fetch_tells_the_submitter_nothing_of_what_answered() {
    let dir = tempfile::tempdir().unwrap();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let banner = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let banner_addr = banner.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        for stream in banner.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
        }
    });
    let mut options = DaemonOptions::new("opaque", dir.path());
    options.config = "[sources]\nschemes = [\"https\"]\nhosts = [\"127.0.0.1\"]\n".into();
    let daemon = Daemon::start(options);
    let client = daemon.client();
    let mut errors = Vec::new();
    for addr in [closed, banner_addr] {
        let mut submitted = request(&format!("https://{addr}/team/app.git"), "custody.yaml");
        submitted.source.as_mut().unwrap().revision = "main".into();
        let build = client.submit(&submitted).await.unwrap();
        let ended = wait_ended(&client, &build.id, Duration::from_secs(60)).await;
        assert_eq!(ended.state, BuildState::Failed, "{ended:?}");
        errors.push(ended.error.unwrap());
    }
    assert_eq!(errors[0], errors[1], "the two failures can be told apart");
    assert!(errors[0].contains("could not be fetched"), "{}", errors[0]);
    for word in ["refused", "SSH", "SSL", "TLS", &closed.port().to_string()] {
        assert!(!errors[0].contains(word), "{word} in {}", errors[0]);
    }
    let log = daemon.log();
    assert!(
        log.contains(&banner_addr.to_string()),
        "the operator's log has the reason:\n{log}"
    );
}

/// Regression (attack): any absolute `oci:` path was a destination. A spec
/// from the source that names one outside `destinations.oci_roots` fails
/// before any step runs, naming the rule and the spec's line.
#[tokio::test]
async fn a_destination_outside_the_policy_fails_before_any_step_runs() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("evil");
    let spec = format!(
        "steps:\n  - name: a\n    run: echo STEP RAN > x\nartifacts:\n  - paths: [x]\n    to: oci:{}:v1\n",
        target.display()
    );
    let git = repository(dir.path(), &[("custody.yaml", &spec)]);
    let daemon = Daemon::start(DaemonOptions::new("fenced", dir.path()));
    let client = daemon.client();
    let (ended, lines) = run_to_end(&client, &request(&git, "custody.yaml")).await;
    assert_eq!(ended.state, BuildState::Failed, "{ended:?}");
    let error = ended.error.unwrap();
    assert!(error.contains("custody.yaml:6:9"), "{error}");
    assert!(error.contains("destinations.oci_roots"), "{error}");
    assert!(lines.is_empty(), "a step ran: {lines:?}");
    assert!(!target.exists(), "the layout was written");
}

/// Regression (attack): three builds whose source was a tarpit held all
/// three slots for minutes and cancel did nothing. Cancel now ends each
/// within a second, and the queue moves on; a build stuck past
/// `max_build_seconds` (a tarpit source, a registry that never answers) is
/// failed naming the phase.
#[tokio::test]
async fn tarpits_are_cancelled_at_once_and_bounded_by_the_build_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let pit = tarpit();
    let quick = "steps:\n  - name: q\n    run: echo quick\n";
    let stuck_image =
        format!("steps:\n  - name: s\n    image: {pit}/tools/img:latest\n    run: 'true'\n");
    let git = repository(
        dir.path(),
        &[("custody.yaml", quick), ("image.yaml", &stuck_image)],
    );
    let pit_source = format!("https://{pit}/team/app.git");
    let mut options = DaemonOptions::new("pits", dir.path());
    options.concurrency = 3;
    options.config = "[sources]\nschemes = [\"https\", \"file\"]\nhosts = [\"127.0.0.1\"]\n".into();
    options.extra = vec!["--insecure-registry".into(), pit.to_string()];
    let daemon = Daemon::start(options);
    let client = daemon.client();
    let mut stuck = Vec::new();
    for _ in 0..3 {
        stuck.push(
            client
                .submit(&request(&pit_source, "custody.yaml"))
                .await
                .unwrap(),
        );
    }
    let fourth = client.submit(&request(&git, "custody.yaml")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    for build in &stuck {
        while client.show(&build.id).await.unwrap().state != BuildState::Running {
            assert!(Instant::now() < deadline, "{}", daemon.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // In the tarpit, holding every slot: the fourth waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        client.show(&fourth.id).await.unwrap().state,
        BuildState::Queued
    );
    for build in &stuck {
        let begun = Instant::now();
        client.cancel(&build.id).await.unwrap();
        let ended = wait_ended(&client, &build.id, Duration::from_secs(5)).await;
        assert_eq!(ended.state, BuildState::Cancelled, "{ended:?}");
        assert!(
            begun.elapsed() < Duration::from_secs(1),
            "{:?}",
            begun.elapsed()
        );
    }
    let fourth = wait_ended(&client, &fourth.id, Duration::from_secs(30)).await;
    assert_eq!(fourth.state, BuildState::Succeeded, "{fourth:?}");
    drop(daemon);

    let mut options = DaemonOptions::new("deadline", dir.path());
    options.config = "[sources]\nschemes = [\"https\", \"file\"]\nhosts = [\"127.0.0.1\"]\n".into();
    options.extra = vec![
        "--insecure-registry".into(),
        pit.to_string(),
        "--max-build-seconds".into(),
        "2".into(),
    ];
    let daemon = Daemon::start(options);
    let client = daemon.client();
    for submitted in [
        request(&pit_source, "custody.yaml"),
        request(&git, "image.yaml"),
    ] {
        let begun = Instant::now();
        let build = client.submit(&submitted).await.unwrap();
        let ended = wait_ended(&client, &build.id, Duration::from_secs(20)).await;
        assert_eq!(ended.state, BuildState::Failed, "{ended:?}");
        let error = ended.error.unwrap();
        assert!(
            error.contains("ran past its limit of 2s while planning"),
            "{error}"
        );
        assert!(
            begun.elapsed() < Duration::from_secs(6),
            "{:?}",
            begun.elapsed()
        );
    }
}

#[tokio::test]
async fn a_build_directory_must_be_a_real_directory_of_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let spec = "steps:\n  - name: look\n    run: pwd; ls\n";
    let git_url = repository(dir.path(), &[("custody.yaml", spec)]);
    let src = dir.path().join("src");
    fs_err::create_dir_all(src.join("sub")).unwrap();
    fs_err::write(src.join("sub/custody.yaml"), spec).unwrap();
    std::os::unix::fs::symlink("/etc", src.join("linked")).unwrap();
    git(&src, &["add", "."]);
    git(&src, &["commit", "-qm", "sub and a link"]);
    let daemon = Daemon::start(DaemonOptions::new("workdir", dir.path()));
    let client = daemon.client();

    let mut asked = request(&git_url, "sub/custody.yaml");
    asked.source.as_mut().unwrap().path = Some("sub".into());
    let (ended, lines) = run_to_end(&client, &asked).await;
    assert_eq!(ended.state, BuildState::Succeeded, "{ended:?}");
    assert_eq!(
        lines[0], "/workspace/sub",
        "the step starts in the build's directory"
    );
    assert_eq!(ended.source["path"], "sub");

    // A link planted in the source leads nowhere, and no step runs.
    let mut asked = request(&git_url, "custody.yaml");
    asked.source.as_mut().unwrap().path = Some("linked".into());
    let (ended, lines) = run_to_end(&client, &asked).await;
    assert_eq!(ended.state, BuildState::Failed);
    assert!(lines.is_empty(), "{lines:?}");
    let error = ended.error.unwrap();
    assert!(
        error.contains("`linked`, which is not a directory of the source"),
        "{error}"
    );

    // A path out of the source is refused at submit.
    let mut asked = request(&git_url, "custody.yaml");
    asked.source.as_mut().unwrap().path = Some("sub/../../x".into());
    match client.submit(&asked).await {
        Err(ClientError::Api {
            status: 400,
            message,
            ..
        }) => {
            assert!(message.contains("`source.path`"), "{message}")
        }
        other => panic!("{other:?}"),
    }
}

/// `custody builds show ID --json`, parsed.
fn show_json(daemon: &Daemon, id: &str) -> serde_json::Value {
    let shown = daemon.cli(&["builds", "show", id, "--json"]);
    assert!(shown.status.success(), "{}", text(&shown));
    serde_json::from_slice(&shown.stdout).unwrap()
}

/// What a build resolved and did, as `builds show` (text and JSON), the
/// list and the API tell it; the 201's `Location` leads to the build; a
/// retry after the branch moved on builds the commit the first build did.
async fn the_record_shows_the_commit_steps_and_outputs_and_a_retry_builds_the_same_commit(
    backend: Backend,
) {
    let registry = Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let (image, tagged) = support::push_busybox(&registry, dir.path());
    let host = registry.host();
    let spec = format!(
        "steps:\n  - name: compile\n    image: {tagged}\n    run: echo built > out.txt\n\
         \x20 - name: on-host\n    run: cat out.txt\n\
         artifacts:\n  - paths: [out.txt]\n    to: {host}/t/files:v1\n"
    );
    let failing = "steps:\n  - name: fine\n    run: 'true'\n  - name: broken\n    run: exit 3\n  - name: never\n    run: 'true'\n";
    let git = repository(
        dir.path(),
        &[("custody.yaml", &spec), ("failing.yaml", failing)],
    );
    let src = dir.path().join("src");
    git_cmd(&src, &["branch", "-M", "main"]);
    let first_commit = git_cmd(&src, &["rev-parse", "HEAD"]);
    let mut options = DaemonOptions::new("recorder", dir.path());
    options.database_url = backend.url();
    options.concurrency = 1;
    options.extra = vec!["--insecure-registry".into(), host.into()];
    let daemon = Daemon::start(options);
    let client = daemon.client();

    // 201 with `Location`, and following it gets the build.
    // No pooled connections: the server closes idle ones (its header
    // deadline) while the builds run, and a stale one fails the next request.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let response = http
        .post(format!("{}/api/v1/builds", daemon.url()))
        .bearer_auth(TOKEN)
        .json(&request(&git, "custody.yaml"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let submitted: Build = response.json().await.unwrap();
    assert_eq!(location, format!("/api/v1/builds/{}", submitted.id));
    let followed: Build = http
        .get(format!("{}{location}", daemon.url()))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(followed.id, submitted.id);
    let ended = wait_ended(&client, &submitted.id, Duration::from_secs(120)).await;
    assert_eq!(
        ended.state,
        BuildState::Succeeded,
        "{ended:?}\n{}",
        daemon.log()
    );

    // JSON: the resolved commit, not the revision asked for; each step.
    let shown = show_json(&daemon, &submitted.id);
    assert_eq!(shown["source"]["revision"], "main");
    assert_eq!(shown["commit"], first_commit.as_str());
    let steps = shown["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{shown}");
    assert_eq!(steps[0]["name"], "compile");
    assert_eq!(steps[0]["state"], "succeeded");
    assert_eq!(steps[0]["exit_code"], 0);
    assert!(steps[0]["duration_ms"].is_u64(), "{shown}");
    assert_eq!(steps[0]["image"], image.manifest.digest.as_str());
    assert_eq!(steps[1]["name"], "on-host");
    assert_eq!(steps[1]["exit_code"], 0);
    assert!(steps[1]["duration_ms"].is_u64(), "{shown}");
    assert!(steps[1].get("image").is_none(), "{shown}");
    let output = &shown["outputs"][0];
    assert_eq!(output["reference"], format!("{host}/t/files:v1"));
    assert!(output["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(output["size"].as_u64().unwrap() > 0);

    // The list carries the outputs too.
    let listed = daemon.cli(&["builds", "list", "--json"]);
    let page: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let in_list = page["builds"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == submitted.id.as_str())
        .unwrap();
    assert_eq!(in_list["outputs"], shown["outputs"]);
    assert_eq!(in_list["steps"], shown["steps"]);

    // Text, for people.
    let text_shown = daemon.cli(&["builds", "show", &submitted.id]);
    let said = String::from_utf8_lossy(&text_shown.stdout).into_owned();
    assert!(
        said.contains(&format!("commit    {first_commit}\n")),
        "{said}"
    );
    let compile = said
        .lines()
        .find(|l| l.starts_with("step      compile"))
        .unwrap_or_else(|| panic!("{said}"));
    assert!(compile.contains("succeeded  exit 0  "), "{compile}");
    assert!(
        compile.ends_with(&format!("image {}", image.manifest.digest)),
        "{compile}"
    );
    assert!(
        compile.contains(" ms  ") || compile.contains(" s  "),
        "{compile}"
    );
    assert!(
        said.contains(&format!("pushed    {host}/t/files:v1@sha256:")),
        "{said}"
    );

    // A failing step shows its exit code; the step after it never ran.
    let failed = client.submit(&request(&git, "failing.yaml")).await.unwrap();
    let failed = wait_ended(&client, &failed.id, Duration::from_secs(60)).await;
    assert_eq!(failed.state, BuildState::Failed);
    let states: Vec<_> = failed
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.state.as_str(), s.exit_code))
        .collect();
    assert_eq!(
        states,
        [
            ("fine", "succeeded", Some(0)),
            ("broken", "failed", Some(3)),
            ("never", "skipped", None)
        ]
    );
    let said =
        String::from_utf8_lossy(&daemon.cli(&["builds", "show", &failed.id]).stdout).into_owned();
    assert!(said.contains("broken  failed  exit 3"), "{said}");

    // The branch moves on; the retry builds the commit the build resolved.
    fs_err::write(
        src.join("custody.yaml"),
        "steps:\n  - name: moved\n    run: exit 1\n",
    )
    .unwrap();
    git_cmd(&src, &["commit", "-qam", "moved on"]);
    let retried = daemon.cli(&["builds", "retry", &submitted.id]);
    assert!(retried.status.success(), "{}", text(&retried));
    let retry_id = String::from_utf8_lossy(&retried.stdout).trim().to_owned();
    let retry = wait_ended(&client, &retry_id, Duration::from_secs(120)).await;
    assert_eq!(
        retry.state,
        BuildState::Succeeded,
        "{retry:?}\n{}",
        daemon.log()
    );
    assert_eq!(retry.commit.as_deref(), Some(first_commit.as_str()));
    assert_eq!(retry.source["revision"], first_commit.as_str());
    assert_eq!(retry.retry_of.as_deref(), Some(submitted.id.as_str()));
    assert_eq!(retry.steps[0].name, "compile");
    let said =
        String::from_utf8_lossy(&daemon.cli(&["builds", "show", &retry_id]).stdout).into_owned();
    assert!(
        said.contains(&format!("retry of  {}\n", submitted.id)),
        "{said}"
    );
    let envelope: serde_json::Value =
        serde_json::from_slice(&client.provenance(&retry_id).await.unwrap()).unwrap();
    let statement: serde_json::Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::STANDARD,
            envelope["payload"].as_str().unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        statement["predicate"]["buildDefinition"]["internalParameters"]["retryOf"],
        submitted.id.as_str()
    );
    // `--json` prints the new build; the API answers 201 with `Location`.
    let again = daemon.cli(&["builds", "retry", &failed.id, "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["retry_of"], failed.id.as_str());
    let response = http
        .post(format!(
            "{}/api/v1/builds/{}/retry",
            daemon.url(),
            failed.id
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(
        response.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/api/v1/builds/")
    );

    // A build that never resolved a commit is retried as it was asked for.
    let mut unknown = request(&git, "custody.yaml");
    unknown.source.as_mut().unwrap().revision = "no-such-branch".into();
    let unresolved = client.submit(&unknown).await.unwrap();
    let unresolved = wait_ended(&client, &unresolved.id, Duration::from_secs(60)).await;
    assert_eq!(unresolved.state, BuildState::Failed);
    assert_eq!(unresolved.commit, None);
    assert!(unresolved.steps.is_empty());
    let again = client.retry(&unresolved.id).await.unwrap();
    assert_eq!(again.source["revision"], "no-such-branch");
    assert_eq!(again.retry_of.as_deref(), Some(unresolved.id.as_str()));
}

fn git_cmd(dir: &Path, args: &[&str]) -> String {
    git(dir, args).trim().to_owned()
}

/// Steps are recorded as the runner reports them: while the build runs,
/// the API shows the step that finished and the one running; a cancel
/// leaves the running one interrupted and the next one skipped.
#[tokio::test]
async fn a_running_build_shows_the_steps_it_finished() {
    let dir = tempfile::tempdir().unwrap();
    let spec = "steps:\n  - name: quick\n    run: exit 0\n  - name: slow\n    run: sleep 60\n  - name: after\n    run: 'true'\n";
    let git = repository(dir.path(), &[("custody.yaml", spec)]);
    let mut options = DaemonOptions::new("stepper", dir.path());
    options.concurrency = 1;
    let daemon = Daemon::start(options);
    let client = daemon.client();
    let build = client.submit(&request(&git, "custody.yaml")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let running = loop {
        let now = client.show(&build.id).await.unwrap();
        if now
            .steps
            .get(1)
            .is_some_and(|s| s.state.as_str() == "running")
        {
            break now;
        }
        assert!(Instant::now() < deadline, "{now:?}\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(running.state, BuildState::Running);
    assert_eq!(running.steps[0].state.as_str(), "succeeded");
    assert_eq!(running.steps[0].exit_code, Some(0));
    assert!(running.steps[0].duration_ms.is_some());
    assert_eq!(running.steps[2].state.as_str(), "pending");
    client.cancel(&build.id).await.unwrap();
    let ended = wait_ended(&client, &build.id, Duration::from_secs(30)).await;
    assert_eq!(ended.state, BuildState::Cancelled);
    let states: Vec<_> = ended.steps.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states, ["succeeded", "interrupted", "skipped"]);
}
