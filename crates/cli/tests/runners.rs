//! Runners started through the local executor, connecting back for real.

use std::sync::Arc;
use std::time::Duration;

use custody_daemon::dispatch::{Dispatcher, JobError};
use custody_daemon::local::LocalExecutor;
use custody_wire::events::{JobEnd, RunnerEvent, Stream};
use custody_wire::rpc::proto;
use custody_wire::{Connector, DaemonIdentity};
use tokio::net::TcpListener;

struct Daemon {
    dispatcher: Arc<Dispatcher>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn daemon_with(program: &str) -> Daemon {
    let identity = DaemonIdentity::generate().unwrap();
    let connector = Connector::new(&identity);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(connector.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    let dispatcher = Dispatcher {
        connector,
        executor: Arc::new(LocalExecutor::new(program.into())),
        daemon_addr: addr,
        connect_timeout: Duration::from_secs(20),
    };
    Daemon {
        dispatcher: Arc::new(dispatcher),
        _stop: stop,
    }
}

async fn daemon() -> Daemon {
    daemon_with(env!("CARGO_BIN_EXE_custody")).await
}

fn job(id: &str, steps: &[(&str, &str)]) -> proto::Job {
    proto::Job {
        job_id: id.to_owned(),
        steps: steps
            .iter()
            .map(|(name, run)| proto::Step {
                name: (*name).to_owned(),
                run: (*run).to_owned(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Why a job failed; panics if it did not.
fn failure(end: &JobEnd) -> &str {
    match end {
        JobEnd::Failed(error) => error,
        other => panic!("the job did not fail: {other:?}"),
    }
}

fn never() -> std::future::Pending<String> {
    std::future::pending()
}

fn log_text(events: &[(RunnerEvent, std::time::Instant)]) -> Vec<String> {
    events
        .iter()
        .filter_map(|(e, _)| match e {
            RunnerEvent::Log(l) => Some(String::from_utf8_lossy(&l.line).into_owned()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_and_its_logs_stream_as_they_are_written() {
    let d = daemon().await;
    let mut events = Vec::new();
    let report = d
        .dispatcher
        .run(
            job(
                "stream-1",
                &[
                    ("first", "echo one; sleep 1; echo two >&2"),
                    ("second", "echo three"),
                ],
            ),
            |e| events.push((e.clone(), std::time::Instant::now())),
            never(),
        )
        .await
        .unwrap();
    assert_eq!(report.end, JobEnd::Succeeded);
    assert!(report.peer.ip().is_loopback());
    assert_ne!(report.hello.as_ref().unwrap().1, 0);
    assert_eq!(log_text(&events), ["one", "two", "three"]);

    // `one` arrived a second before `two`: it was streamed, not batched.
    let at = |text: &str| {
        events
            .iter()
            .find(|(e, _)| matches!(e, RunnerEvent::Log(l) if l.line == text.as_bytes()))
            .unwrap()
            .1
    };
    assert!(at("two").duration_since(at("one")) >= Duration::from_millis(800));
    let stderr = events.iter().any(
        |(e, _)| matches!(e, RunnerEvent::Log(l) if l.line == b"two" && l.stream == Stream::Stderr),
    );
    assert!(stderr, "stderr lines are marked as such");
    let starts: Vec<String> = events
        .iter()
        .filter_map(|(e, _)| match e {
            RunnerEvent::StepStarted { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(starts, ["first", "second"]);
    assert_eq!(d.dispatcher.connector.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_step_ends_the_job_naming_the_step_and_code() {
    let d = daemon().await;
    let report = d
        .dispatcher
        .run(
            job(
                "fail-1",
                &[("compile", "exit 3"), ("never", "echo unreachable")],
            ),
            |_| {},
            never(),
        )
        .await
        .unwrap();
    let error = failure(&report.end);
    assert!(
        error.contains("`compile`") && error.contains('3'),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_kills_the_running_step() {
    let d = daemon().await;
    let (cancel, cancelled) = tokio::sync::oneshot::channel::<String>();
    let mut cancel = Some(cancel);
    let started = std::time::Instant::now();
    let report = d
        .dispatcher
        .run(
            job("cancel-1", &[("wait", "echo waiting; sleep 60 & wait")]),
            move |e| {
                if matches!(e, RunnerEvent::Log(_))
                    && let Some(cancel) = cancel.take()
                {
                    let _ = cancel.send("the user asked".into());
                }
            },
            async move { cancelled.await.unwrap_or_default() },
        )
        .await
        .unwrap();
    assert_eq!(report.end, JobEnd::Cancelled("the user asked".into()));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "cancel took {:?}",
        started.elapsed()
    );
}

/// The local executor, remembering the tokens it handed out.
struct Recording {
    inner: LocalExecutor,
    tokens: std::sync::Mutex<Vec<String>>,
}

impl custody_daemon::Executor for Recording {
    fn name(&self) -> &'static str {
        "recording"
    }
    fn start(
        &self,
        launch: custody_daemon::Launch,
    ) -> futures_util::future::BoxFuture<
        '_,
        Result<custody_daemon::RunnerProcess, custody_daemon::ExecutorError>,
    > {
        self.tokens
            .lock()
            .unwrap()
            .push(launch.token.expose().to_owned());
        self.inner.start(launch)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_token_is_not_in_the_runners_arguments_nor_in_any_steps_environment() {
    let mut d = daemon().await;
    let recording = Arc::new(Recording {
        inner: LocalExecutor::new(env!("CARGO_BIN_EXE_custody").into()),
        tokens: Default::default(),
    });
    Arc::get_mut(&mut d.dispatcher).unwrap().executor = recording.clone();
    let mut events = Vec::new();
    // The step reads every process it can see, and its own environment.
    let report = d
        .dispatcher
        .run(
            job(
                "secret-1",
                &[("snoop", "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; tr '\\0' '\\n' < $p/environ; done; env")],
            ),
            |e| events.push((e.clone(), std::time::Instant::now())),
            never(),
        )
        .await
        .unwrap();
    assert_eq!(report.end, JobEnd::Succeeded);
    let lines = log_text(&events);
    let token = recording.tokens.lock().unwrap()[0].clone();
    assert!(
        lines.iter().all(|l| !l.contains(&token)),
        "the token leaked: {lines:?}"
    );
    // In its own PID namespace the step cannot see the runner at all.
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("custody runner") && !l.contains("--token-stdin")),
        "{lines:?}"
    );
    // Nothing of the daemon's (here: the test's) environment reaches it.
    assert!(
        lines.iter().all(|l| !l.starts_with("NEXTEST")
            && !l.starts_with("CARGO")
            && !l.starts_with("CUSTODY")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l == "HOME=/workspace"), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_get_the_network_only_when_they_ask_and_a_read_only_host() {
    let d = daemon().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Directly, and (with network) through the egress proxy the step is given.
    let connect = format!(
        "/bin/bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && echo connected || echo refused; \
         if [ -n \"$HTTP_PROXY\" ]; then curl -s --noproxy '' -o /dev/null -w 'proxy %{{http_code}}\\n' http://127.0.0.1:{port}/; fi"
    );
    let step = |network: bool| proto::Step {
        name: "net".into(),
        run: connect.clone(),
        network,
        ..Default::default()
    };
    // The host's loopback is out of reach either way: the step has its own.
    for (network, expected) in [(false, "refused"), (true, "refused"), (true, "proxy 403")] {
        let mut events = Vec::new();
        let job = proto::Job {
            job_id: format!("net-{network}"),
            steps: vec![step(network)],
            ..Default::default()
        };
        let report = d
            .dispatcher
            .run(
                job,
                |e| events.push((e.clone(), std::time::Instant::now())),
                never(),
            )
            .await
            .unwrap();
        assert_eq!(report.end, JobEnd::Succeeded);
        assert!(
            log_text(&events).iter().any(|l| l == expected),
            "network={network}: {:?}",
            log_text(&events)
        );
    }

    let mut events = Vec::new();
    let job = job(
        "ro-1",
        &[(
            "probe",
            "touch /etc/custody-probe 2>/dev/null && echo wrote-etc; ls -A /root | wc -l; echo hi > /output/file && cat /output/file; pwd",
        )],
    );
    let report = d
        .dispatcher
        .run(
            job,
            |e| events.push((e.clone(), std::time::Instant::now())),
            never(),
        )
        .await
        .unwrap();
    assert_eq!(report.end, JobEnd::Succeeded);
    assert_eq!(log_text(&events), ["0", "hi", "/workspace"]);
    assert!(!std::path::Path::new("/etc/custody-probe").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_that_cannot_start_fails_the_job_with_the_reason() {
    let d = daemon_with("/nonexistent/custody").await;
    let err = d
        .dispatcher
        .run(job("nostart-1", &[("x", "true")]), |_| {}, never())
        .await
        .unwrap_err();
    assert!(matches!(err, JobError::Executor(_)), "{err}");
    assert!(err.to_string().contains("/nonexistent/custody"), "{err}");
    assert_eq!(d.dispatcher.connector.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runner_that_exits_before_connecting_fails_the_job_with_its_output() {
    let mut d = daemon().await;
    // Hand out an address where nothing listens: the runner gives up at once.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    Arc::get_mut(&mut d.dispatcher).unwrap().daemon_addr = format!("127.0.0.1:{port}");
    let err = d
        .dispatcher
        .run(job("early-1", &[("x", "true")]), |_| {}, never())
        .await
        .unwrap_err();
    assert!(matches!(err, JobError::RunnerEnded { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("before connecting") && text.contains("cannot reach the daemon"),
        "{text}"
    );
    assert_eq!(d.dispatcher.connector.waiting(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_jobs_leave_no_waiter_behind() {
    let d = daemon().await;
    let runs = (0..12).map(|i| {
        let dispatcher = d.dispatcher.clone();
        async move {
            let steps: &[(&str, &str)] = if i % 3 == 0 {
                &[("bad", "exit 1")]
            } else {
                &[("ok", "true")]
            };
            dispatcher
                .run(job(&format!("many-{i}"), steps), |_| {}, never())
                .await
        }
    });
    let results = futures_util::future::join_all(runs).await;
    for (i, result) in results.iter().enumerate() {
        let report = result.as_ref().unwrap();
        assert_eq!(
            report.end == JobEnd::Succeeded,
            i % 3 != 0,
            "job {i}: {:?}",
            report.end
        );
    }
    assert_eq!(d.dispatcher.connector.waiting(), 0);
}

/// The busybox image of testkit, pushed to `registry`; returns the pinned reference.
fn busybox_image(registry: &custody_testkit::Registry, dir: &std::path::Path) -> String {
    let (root, image) = custody_testkit::image::busybox_layout(dir);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_custody"))
        .args([
            "push",
            "--insecure-registry",
            registry.host(),
            &format!("oci:{}:v1", root.display()),
            &format!("{}/tools/busybox:v1", registry.host()),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    format!(
        "{}/tools/busybox@{}",
        registry.host(),
        image.manifest.digest
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_step_with_an_image_runs_on_that_image_and_sees_nothing_of_the_host() {
    let d = daemon().await;
    let registry = custody_testkit::Registry::builder().start();
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(&registry, dir.path());
    let step = proto::Step {
        name: "in-image".into(),
        image: image.clone(),
        run: "while read line; do echo $line; done < /etc/os-release; [ -d /usr ] && echo host-visible || echo host-hidden; echo made > /output/out; pwd".into(),
        ..Default::default()
    };
    let job = proto::Job {
        job_id: "image-1".into(),
        steps: vec![step],
        registries: Some(proto::RegistryAccess {
            insecure_hosts: vec![registry.host().to_owned()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut events = Vec::new();
    let report = d
        .dispatcher
        .run(
            job,
            |e| events.push((e.clone(), std::time::Instant::now())),
            never(),
        )
        .await
        .unwrap();
    assert!(
        report.end == JobEnd::Succeeded,
        "{:?} {:?}",
        report.end,
        log_text(&events)
    );
    assert_eq!(
        log_text(&events),
        ["ID=custody-test-image", "host-hidden", "/workspace"]
    );
    let digest = events.iter().find_map(|(e, _)| match e {
        RunnerEvent::StepStarted { image_digest, .. } => image_digest.clone(),
        _ => None,
    });
    assert_eq!(
        Some(image.split_once('@').unwrap().1.to_owned()),
        digest,
        "the image digest is reported"
    );

    // An image that cannot be pulled fails the build, naming it.
    let missing = format!("{}/tools/none@sha256:{}", registry.host(), "0".repeat(64));
    let job = proto::Job {
        job_id: "image-2".into(),
        steps: vec![proto::Step {
            name: "x".into(),
            image: missing.clone(),
            run: "true".into(),
            ..Default::default()
        }],
        registries: Some(proto::RegistryAccess {
            insecure_hosts: vec![registry.host().to_owned()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let report = d.dispatcher.run(job, |_| {}, never()).await.unwrap();
    assert!(failure(&report.end).contains(&missing), "{:?}", report.end);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runner_pushes_declared_outputs_and_reports_them() {
    use custody_testkit::image::{Image, LayoutWriter};
    let d = daemon().await;
    let registry = custody_testkit::Registry::builder().start();
    // A layout the step will copy into /output (the host root is visible read-only).
    let staged = tempfile::Builder::new()
        .prefix("custody-test-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let image = Image::random(31, &[3_000]);
    LayoutWriter::new(&staged.path().join("app"))
        .image(&image)
        .tag("v1", &image.manifest);
    let run = format!(
        "cp -r {}/app /output/app && mkdir dist && echo report > dist/report.txt",
        staged.path().display()
    );
    let app = format!("{}/team/app:v1", registry.host());
    let dist = format!("{}/team/app-dist:v1", registry.host());
    let job = proto::Job {
        job_id: "outputs-1".into(),
        steps: vec![proto::Step {
            name: "build".into(),
            run,
            ..Default::default()
        }],
        registries: Some(proto::RegistryAccess {
            insecure_hosts: vec![registry.host().to_owned()],
            ..Default::default()
        }),
        images: vec![proto::ImageOutput {
            from: "oci:/output/app:v1".into(),
            to: app.clone(),
        }],
        artifacts: vec![proto::ArtifactOutput {
            paths: vec!["dist/*.txt".into()],
            to: dist.clone(),
        }],
        ..Default::default()
    };
    let report = d.dispatcher.run(job, |_| {}, never()).await.unwrap();
    assert_eq!(report.end, JobEnd::Succeeded);
    assert_eq!(report.outputs.len(), 2, "{:?}", report.outputs);
    // By digest only: tags are the daemon's to write, after signing.
    assert_eq!(
        report.outputs[0].reference,
        format!("{}/team/app@{}", registry.host(), image.manifest.digest)
    );
    assert!(
        !registry.has_manifest("team/app", "v1"),
        "the runner tagged"
    );
    assert_eq!(report.outputs[0].digest, image.manifest.digest);
    for (output, repo) in report.outputs.iter().zip(["team/app", "team/app-dist"]) {
        // skopeo 1.9 takes a tag or a digest, not both.
        let pinned = format!("{}/{repo}@{}", registry.host(), output.digest);
        let raw = std::process::Command::new("skopeo")
            .args([
                "inspect",
                "--raw",
                "--tls-verify=false",
                &format!("docker://{pinned}"),
            ])
            .output()
            .unwrap();
        assert!(
            raw.status.success(),
            "{}",
            String::from_utf8_lossy(&raw.stderr)
        );
        assert_eq!(
            custody_testkit::image::sha256(&raw.stdout),
            output.digest,
            "{}",
            output.reference
        );
    }

    // An output that was declared but never written fails the build, naming it.
    let job = proto::Job {
        job_id: "outputs-2".into(),
        steps: vec![proto::Step {
            name: "build".into(),
            run: "true".into(),
            ..Default::default()
        }],
        registries: Some(proto::RegistryAccess {
            insecure_hosts: vec![registry.host().to_owned()],
            ..Default::default()
        }),
        images: vec![proto::ImageOutput {
            from: "oci:/output/never:v1".into(),
            to: app.clone(),
        }],
        ..Default::default()
    };
    let report = d.dispatcher.run(job, |_| {}, never()).await.unwrap();
    assert!(
        failure(&report.end).contains("/output/never"),
        "{:?}",
        report.end
    );
    assert!(report.outputs.is_empty());
}
