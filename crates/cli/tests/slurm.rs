//! Runners scheduled on a real Slurm cluster whose nodes live in their own
//! network namespaces, connecting back to the daemon over the bridge.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use custody_daemon::dispatch::{Dispatcher, JobError};
use custody_daemon::slurm::SlurmExecutor;
use custody_testkit::slurm::SlurmCluster;
use custody_wire::rpc::proto;
use custody_wire::{Connector, DaemonIdentity};
use tokio::net::TcpListener;

fn job(id: &str, run: &str) -> proto::Job {
    proto::Job {
        job_id: id.to_owned(),
        steps: vec![proto::Step {
            name: "step".into(),
            run: run.into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_run_on_different_slurm_nodes_and_authenticate() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cluster = SlurmCluster::up(&workspace, 2);
    let spool = tempfile::Builder::new()
        .prefix("custody-spool-")
        .tempdir_in("/tmp")
        .unwrap();

    let identity = DaemonIdentity::generate().unwrap();
    let connector = Connector::new(&identity);
    let listener = TcpListener::bind((cluster.host_addr.as_str(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(connector.clone().serve(listener, std::future::pending()));
    let mut executor = SlurmExecutor::new(
        env!("CARGO_BIN_EXE_custody").into(),
        spool.path().to_owned(),
    );
    executor
        .command_env
        .push(("SLURM_CONF".into(), cluster.conf.clone()));
    executor.poll_interval = Duration::from_millis(200);
    let dispatcher = Arc::new(Dispatcher {
        connector: connector.clone(),
        executor: Arc::new(executor.clone()),
        daemon_addr: addr,
        connect_timeout: Duration::from_secs(60),
    });

    // Four one-CPU jobs at once on two one-CPU nodes: both nodes get work.
    let runs = (0..4).map(|i| {
        let dispatcher = dispatcher.clone();
        async move {
            dispatcher
                .run(
                    job(&format!("slurm-{i}"), "sleep 1; echo ran"),
                    |_| {},
                    std::future::pending(),
                )
                .await
        }
    });
    let reports = futures_util::future::join_all(runs).await;
    let mut peers = Vec::new();
    for report in reports {
        let report = report.unwrap();
        assert_eq!(report.end, custody_wire::events::JobEnd::Succeeded);
        assert!(report.runner.starts_with("slurm job "), "{}", report.runner);
        peers.push(report.peer.ip().to_string());
    }
    let node_addrs: Vec<&str> = cluster.nodes.iter().map(|(_, a)| a.as_str()).collect();
    for addr in &node_addrs {
        assert!(
            peers.iter().any(|p| p == addr),
            "no job connected from node {addr}: {peers:?}"
        );
    }
    assert!(
        peers.iter().all(|p| node_addrs.contains(&p.as_str())),
        "{peers:?}"
    );

    // A runner that cannot start on the node fails the job with Slurm's word for it.
    let mut broken = executor.clone();
    broken.program = "/nonexistent/custody".into();
    let dispatcher = Dispatcher {
        executor: Arc::new(broken),
        ..Arc::try_unwrap(dispatcher).ok().unwrap()
    };
    let err = dispatcher
        .run(job("slurm-broken", "true"), |_| {}, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, JobError::RunnerEnded { .. }), "{err}");
    assert!(
        err.to_string().contains("FAILED") && err.to_string().contains("/nonexistent/custody"),
        "{err}"
    );
    assert_eq!(connector.waiting(), 0);

    // Token files never outlive their job.
    let left: Vec<_> = fs_err::read_dir(spool.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "spool files left: {left:?}");

    serve_builds_on_the_cluster(&cluster).await;

    drop(cluster);
    let running = std::process::Command::new("pgrep")
        .args(["-x", "slurmd|slurmctld"])
        .output()
        .unwrap();
    assert!(
        running.stdout.is_empty(),
        "Slurm daemons survived the tear-down"
    );
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&namespaces.stdout).contains("cstdy-"),
        "namespaces survived the tear-down"
    );
}

/// `custody serve --executor slurm`: a submitted build's runner is a Slurm
/// job on a node and the provenance says so.
async fn serve_builds_on_the_cluster(cluster: &SlurmCluster) {
    use custody_server::api::{BuildState, GitSource, SubmitRequest};
    use custody_server::client::Client;

    let dir = tempfile::Builder::new()
        .prefix("custody-serve-slurm-")
        .tempdir_in("/tmp")
        .unwrap();
    let spool = dir.path().join("spool");
    fs_err::create_dir_all(&spool).unwrap();
    let src = dir.path().join("src");
    fs_err::create_dir_all(&src).unwrap();
    // The step boundary holds on the nodes too: an unprivileged id range,
    // a network namespace with only `lo`.
    let spec = "steps:\n  - name: s\n    run: |\n      echo built on slurm\n      echo map $(cat /proc/self/uid_map)\n      head -1 /etc/shadow 2>/dev/null || echo shadow-refused\n      echo interfaces $(tail -n +3 /proc/net/dev | cut -d: -f1)\n";
    fs_err::write(src.join("custody.yaml"), spec).unwrap();
    custody_testkit::git(&src, &["init", "-q"]);
    custody_testkit::git(&src, &["add", "."]);
    custody_testkit::git(&src, &["commit", "-qm", "spec"]);

    // The test's repository is local: the service must be told it may
    // fetch `file:` sources.
    let config = dir.path().join("serve.toml");
    fs_err::write(&config, "[sources]\nschemes = [\"file\"]\n").unwrap();
    let port = custody_testkit::free_port();
    let token = "slurm-test-token";
    let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_custody"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--data-dir", &dir.path().join("data").display().to_string()])
        .args(["--executor", "slurm"])
        .args(["--slurm-spool-dir", &spool.display().to_string()])
        .args(["--runner-listen", &format!("{}:0", cluster.host_addr)])
        .args(["--config", &config.display().to_string()])
        .env("SLURM_CONF", &cluster.conf)
        .env("CUSTODY_TOKEN", token)
        .spawn()
        .unwrap();
    let client = Client::new(&format!("http://127.0.0.1:{port}"), Some(token.into())).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.keys().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "custody serve did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let build = client
        .submit(&SubmitRequest {
            spec: None,
            spec_path: "custody.yaml".into(),
            source: Some(GitSource {
                git: format!("file://{}", src.display()),
                revision: "main".into(),
                path: None,
            }),
        })
        .await
        .unwrap();
    let mut lines = Vec::new();
    let ended = client
        .logs(&build.id, true, |e| lines.push(e.line))
        .await
        .unwrap();
    let envelope = client.provenance(&build.id).await;
    let _ = serve.kill();
    let _ = serve.wait();
    assert_eq!(ended.state, BuildState::Succeeded, "{ended:?}");
    assert_eq!(lines[0], "built on slurm", "{lines:?}");
    let map = lines[1]
        .strip_prefix("map ")
        .expect("the step printed its uid map");
    let host_root = map.split_whitespace().nth(1).unwrap();
    assert_ne!(host_root, "0", "the step is host root on the node: {map}");
    assert_eq!(lines[2], "shadow-refused");
    assert_eq!(lines[3], "interfaces lo");
    let envelope: serde_json::Value = serde_json::from_slice(&envelope.unwrap()).unwrap();
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    let internal = &statement["predicate"]["buildDefinition"]["internalParameters"];
    assert_eq!(internal["executor"], "slurm");
    assert_eq!(internal["sandbox"]["user"]["uidMap"], map);
    assert_eq!(internal["sandbox"]["network"], "private");
    assert!(
        internal["sandbox"]["diskBytes"].as_u64().unwrap() > 0,
        "{internal}"
    );
}
