//! The job store and its queue, the same tests on SQLite and on a real
//! PostgreSQL cluster.

use std::collections::HashSet;

use custody_daemon::record::{BuildId, Timestamp};
use custody_daemon::source::BuildSource;
use custody_daemon::spec::{GitSource, GitUrl};
use custody_daemon::store::{
    CancelOutcome, Ending, LogLine, NewBuild, Output, Renewal, State, StepEnding, StepState, Store,
};
use custody_testkit::Postgres;

/// A store on each backend; the PostgreSQL cluster lives as long as the
/// returned guard.
enum Backend {
    Sqlite(tempfile::TempDir),
    /// The cluster, and a database of its own for the test.
    Postgres {
        _cluster: Postgres,
        url: String,
    },
}

/// Opens the test's store; each call is a new pool, as a separate daemon
/// would have.
async fn open(backend: &Backend) -> Store {
    match backend {
        Backend::Sqlite(dir) => Store::open(&dir.path().join("custody.db").display().to_string())
            .await
            .unwrap(),
        Backend::Postgres { url, .. } => Store::open(url).await.unwrap(),
    }
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let backend = super::Backend::Sqlite(tempfile::tempdir().unwrap());
                super::$name(&backend).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let cluster = custody_testkit::Postgres::start();
                let url = cluster.create_database("custody");
                let backend = super::Backend::Postgres { _cluster: cluster, url };
                super::$name(&backend).await;
            })*
        }
    };
}

on_both!(
    concurrent_claimers_take_each_build_once,
    an_expired_lease_requeues_or_fails,
    cancel_reaches_queued_and_running_builds,
    logs_keep_their_order_across_batches,
    list_filters_and_pages,
    specs_from_the_source_are_queued_without_bytes,
    the_record_keeps_the_commit_steps_outputs_and_retries,
);

/// A moment `millis` after the tests' epoch.
fn at(millis: i64) -> Timestamp {
    Timestamp::from_unix_millis(1_796_156_760_000 + millis)
}

/// Far enough ahead that no lease runs out in a test.
fn never() -> Timestamp {
    at(i64::from(u32::MAX))
}

async fn enqueue(store: &Store, n: usize) -> Vec<BuildId> {
    let source = BuildSource::Git(GitSource {
        git: GitUrl::parse("file:///src").unwrap(),
        revision: "main".into(),
        path: Default::default(),
    });
    let mut ids = Vec::new();
    for _ in 0..n {
        let id = BuildId::new();
        store
            .enqueue(&NewBuild {
                id: &id,
                spec_path: "custody.yaml",
                spec: Some(b"steps: []"),
                source: &source,
                created_at: at(0),
                retry_of: None,
            })
            .await
            .unwrap();
        ids.push(id);
    }
    ids
}

fn succeeded() -> Ending<'static> {
    Ending {
        state: State::Succeeded,
        finished_at: at(1),
        error: None,
        outputs: &[],
        provenance: None,
    }
}

async fn concurrent_claimers_take_each_build_once(backend: &Backend) {
    let store = open(backend).await;
    let ids = enqueue(&store, 200).await;
    let mut claimers = Vec::new();
    for k in 0..8 {
        let store = open(backend).await;
        claimers.push(tokio::spawn(async move {
            let owner = format!("daemon-{k}");
            let mut got = Vec::new();
            while let Some(claimed) = store.claim(&owner, never(), at(0)).await.unwrap() {
                assert!(
                    store
                        .finish(&claimed.id, Some(&owner), &succeeded())
                        .await
                        .unwrap()
                );
                got.push(claimed.id);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for claimer in claimers {
        all.extend(claimer.await.unwrap());
    }
    assert_eq!(all.len(), ids.len(), "every build claimed, none twice");
    let unique: HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), ids.len());
    for id in &ids {
        let record = store.build(id).await.unwrap().unwrap();
        assert_eq!(record.state, State::Succeeded);
        assert_eq!(record.claims, 1, "{id} was claimed {} times", record.claims);
    }
}

async fn an_expired_lease_requeues_or_fails(backend: &Backend) {
    let store = open(backend).await;
    let ids = enqueue(&store, 2).await;

    // Claimed, but the daemon died before starting a runner: back in the queue.
    let first = store
        .claim("dead", at(1_000), at(0))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.id, ids[0], "the oldest build first");
    assert_eq!(
        store.reap(at(999)).await.unwrap(),
        vec![],
        "lease not over yet"
    );
    let reaped = store.reap(at(1_001)).await.unwrap();
    assert_eq!(reaped.len(), 1);
    assert!(reaped[0].requeued);
    assert_eq!(
        store.build(&ids[0]).await.unwrap().unwrap().state,
        State::Queued
    );
    assert_eq!(
        store.renew(&ids[0], "dead", at(5_000)).await.unwrap(),
        Renewal::Lost
    );

    // Claimed again, runner started, then the daemon died: failed, naming it.
    let again = store
        .claim("alive", at(2_000), at(1_001))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.id, ids[0]);
    store.mark_runner_started(&again.id).await.unwrap();
    assert_eq!(
        store.renew(&again.id, "alive", at(3_000)).await.unwrap(),
        Renewal::Held
    );
    let reaped = store.reap(at(3_001)).await.unwrap();
    assert_eq!(reaped.len(), 1);
    assert!(!reaped[0].requeued);
    let record = store.build(&ids[0]).await.unwrap().unwrap();
    assert_eq!(record.state, State::Failed);
    assert_eq!(record.claims, 2);
    let error = record.error.unwrap();
    assert!(
        error.contains("`alive`") && error.contains("lease"),
        "{error}"
    );
    // The late owner's own ending no longer counts.
    assert!(
        !store
            .finish(&ids[0], Some("alive"), &succeeded())
            .await
            .unwrap()
    );
    assert_eq!(
        store.build(&ids[0]).await.unwrap().unwrap().state,
        State::Failed
    );
    // The other build was never touched.
    assert_eq!(
        store.build(&ids[1]).await.unwrap().unwrap().state,
        State::Queued
    );
}

async fn cancel_reaches_queued_and_running_builds(backend: &Backend) {
    let store = open(backend).await;
    let ids = enqueue(&store, 2).await;
    let running = store.claim("d", never(), at(0)).await.unwrap().unwrap();
    assert_eq!(
        store.cancel(&ids[1], "not needed", at(5)).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let record = store.build(&ids[1]).await.unwrap().unwrap();
    assert_eq!(record.state, State::Cancelled);
    assert_eq!(record.error.as_deref(), Some("not needed"));
    assert_eq!(
        store.cancel(&running.id, "stop it", at(5)).await.unwrap(),
        CancelOutcome::Requested
    );
    assert_eq!(
        store.renew(&running.id, "d", never()).await.unwrap(),
        Renewal::CancelRequested("stop it".into())
    );
    assert_eq!(
        store.cancel(&ids[1], "again", at(5)).await.unwrap(),
        CancelOutcome::AlreadyEnded(State::Cancelled)
    );
    assert_eq!(
        store.cancel(&BuildId::new(), "x", at(5)).await.unwrap(),
        CancelOutcome::NotFound
    );
    assert!(
        store.claim("d", never(), at(0)).await.unwrap().is_none(),
        "nothing left"
    );
}

async fn logs_keep_their_order_across_batches(backend: &Backend) {
    let store = open(backend).await;
    let id = enqueue(&store, 1).await.remove(0);
    let line = |n: usize| LogLine {
        step: (n % 3) as u32,
        stream: (n % 2) as i32,
        line: format!("line {n} \u{1F980}").into_bytes(),
        time: at(n as i64),
    };
    // One big batch (more rows than one statement carries), then small ones.
    store
        .append_logs(&id, &(0..250).map(line).collect::<Vec<_>>())
        .await
        .unwrap();
    for n in 250..260 {
        store.append_logs(&id, &[line(n)]).await.unwrap();
    }
    let all = store.logs(&id).await.unwrap();
    assert_eq!(all, (0..260).map(line).collect::<Vec<_>>());
    let after = store.logs_after(&id, 254, 3).await.unwrap();
    assert_eq!(
        after
            .iter()
            .map(|(seq, l)| (*seq, l.clone()))
            .collect::<Vec<_>>(),
        vec![(255, line(255)), (256, line(256)), (257, line(257))]
    );
}

async fn list_filters_and_pages(backend: &Backend) {
    let store = open(backend).await;
    let ids = enqueue(&store, 5).await;
    let claimed = store.claim("d", never(), at(0)).await.unwrap().unwrap();
    assert_eq!(claimed.id, ids[0]);

    let page = store.list(None, None, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|b| &b.id).collect::<Vec<_>>(),
        vec![&ids[4], &ids[3]]
    );
    let next = store.list(None, Some(&page[1].id), 2).await.unwrap();
    assert_eq!(
        next.iter().map(|b| &b.id).collect::<Vec<_>>(),
        vec![&ids[2], &ids[1]]
    );
    let running = store.list(Some(State::Running), None, 10).await.unwrap();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0].id, ids[0]);
    assert_eq!(running[0].owner.as_deref(), Some("d"));

    let mut counts = store.count_by_state().await.unwrap();
    counts.sort_by_key(|(s, _)| s.as_str());
    assert_eq!(counts, vec![(State::Queued, 4), (State::Running, 1)]);
}

async fn specs_from_the_source_are_queued_without_bytes(backend: &Backend) {
    let store = open(backend).await;
    let inline = enqueue(&store, 1).await.remove(0);
    let from_source = BuildId::new();
    store
        .enqueue(&NewBuild {
            id: &from_source,
            spec_path: "ci/custody.yaml",
            spec: None,
            source: &BuildSource::Git(GitSource {
                git: GitUrl::parse("https://git.example.org/app.git").unwrap(),
                revision: "v1".into(),
                path: Default::default(),
            }),
            created_at: at(0),
            retry_of: None,
        })
        .await
        .unwrap();
    let first = store.claim("d", never(), at(1)).await.unwrap().unwrap();
    assert_eq!(
        (first.id, first.spec.as_deref()),
        (inline, Some(&b"steps: []"[..]))
    );
    let second = store.claim("d", never(), at(1)).await.unwrap().unwrap();
    assert_eq!(second.id, from_source);
    assert_eq!(second.spec, None, "read from the source when it runs");
    assert_eq!(second.spec_path, "ci/custody.yaml");
}

async fn the_record_keeps_the_commit_steps_outputs_and_retries(backend: &Backend) {
    let store = open(backend).await;
    let ids = enqueue(&store, 3).await;
    let (built, failed, untouched) = (&ids[0], &ids[1], &ids[2]);
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let image = custody_oci::digest::sha256(b"step image");
    for id in [built, failed] {
        store.claim("d", never(), at(1)).await.unwrap().unwrap();
        store.record_commit(id, commit).await.unwrap();
        // Planned twice (requeued before its runner started): one set of steps.
        for _ in 0..2 {
            store
                .record_steps(
                    id,
                    &[
                        ("compile".to_owned(), Some(image.clone())),
                        ("test".to_owned(), None),
                    ],
                )
                .await
                .unwrap();
        }
    }
    store
        .step_started(built, 0, "compile", None, at(10))
        .await
        .unwrap();
    // A running build shows what has finished so far.
    store
        .step_finished(built, 0, StepEnding::Exited(0), at(1_510))
        .await
        .unwrap();
    let detail = store.build_detail(built).await.unwrap().unwrap();
    assert_eq!(detail.record.commit.as_deref(), Some(commit));
    let states: Vec<_> = detail.steps.iter().map(|s| s.state).collect();
    assert_eq!(states, [StepState::Succeeded, StepState::Pending]);
    assert_eq!(
        detail.steps[0].image.as_ref(),
        Some(&image),
        "kept from the plan"
    );
    assert_eq!(detail.steps[0].exit_code, Some(0));
    assert_eq!(detail.steps[0].duration_ms, Some(1_500));
    assert_eq!(detail.steps[1].image, None);
    let other = custody_oci::digest::sha256(b"the runner's word");
    store
        .step_started(built, 1, "test", Some(&other), at(2_000))
        .await
        .unwrap();
    store
        .step_finished(built, 1, StepEnding::Exited(0), at(2_250))
        .await
        .unwrap();
    let outputs = [Output {
        reference: "registry.example.org/app:v1".into(),
        digest: custody_oci::digest::sha256(b"manifest"),
        size: 8,
    }];
    let ending = Ending {
        outputs: &outputs,
        ..succeeded()
    };
    assert!(store.finish(built, Some("d"), &ending).await.unwrap());

    store
        .step_started(failed, 0, "compile", None, at(10))
        .await
        .unwrap();
    store
        .step_finished(failed, 0, StepEnding::Exited(3), at(20))
        .await
        .unwrap();

    // The list's page, with its outputs and steps in two queries.
    let page = store.list(None, None, 10).await.unwrap();
    let details = store.details(page).await.unwrap();
    let by_id = |id: &BuildId| details.iter().find(|d| &d.record.id == id).unwrap();
    assert_eq!(by_id(built).outputs, outputs);
    assert_eq!(by_id(built).steps[1].image.as_ref(), Some(&other));
    assert_eq!(by_id(built).steps[1].duration_ms, Some(250));
    assert_eq!(by_id(failed).outputs, []);
    assert_eq!(by_id(failed).steps[0].state, StepState::Failed);
    assert_eq!(by_id(failed).steps[0].exit_code, Some(3));
    assert!(by_id(untouched).steps.is_empty());
    assert_eq!(by_id(untouched).record.commit, None);

    // A retry names what it retries; the original request is kept.
    let recorded = store.recorded(built).await.unwrap().unwrap();
    assert_eq!(recorded.commit.as_deref(), Some(commit));
    assert_eq!(recorded.spec.as_deref(), Some(&b"steps: []"[..]));
    let retry = BuildId::new();
    store
        .enqueue(&NewBuild {
            id: &retry,
            spec_path: &recorded.spec_path,
            spec: recorded.spec.as_deref(),
            source: &recorded.source,
            created_at: at(3),
            retry_of: Some(built),
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .build(&retry)
            .await
            .unwrap()
            .unwrap()
            .retry_of
            .as_ref(),
        Some(built)
    );
    let claimed = loop {
        let claimed = store.claim("d", never(), at(4)).await.unwrap().unwrap();
        if claimed.id == retry {
            break claimed;
        }
    };
    assert_eq!(claimed.retry_of.as_ref(), Some(built));
}
