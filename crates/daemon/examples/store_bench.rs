//! The job store under load, for bench/serve.
//!
//! ```text
//! store_bench seed --url URL --builds N
//! store_bench claims --daemons K --jobs N [--url URL]
//! ```
//!
//! `seed` fills a store (a `postgres://` URL or a SQLite path, migrated on
//! open like the daemon does) with N builds that look finished: recorded
//! running, then succeeded with two outputs and a ~1 KiB provenance
//! envelope. It writes several builds at once (as many as the store's pool
//! has connections), checks the store holds exactly N more succeeded builds
//! than before, and prints the id of the middle build on stdout (for a
//! show-one benchmark).
//!
//! `claims` queues N no-op builds on PostgreSQL (a throwaway durable
//! cluster, fsync on, unless `--url` names an empty database), then starts
//! K "daemons": K processes (this binary again, `claim-worker`), each with
//! its own store and connection pool, each looping `claim` → `finish`
//! (succeeded, no outputs) one build at a time until the queue is empty,
//! which is what a daemon's claim loop does per build when the build does
//! nothing. The workers connect first and are released together; the time
//! is from the release until the last one exits. Then every build must have
//! succeeded and been claimed exactly once. The last stdout line is
//! `claims daemons=K jobs=N seconds=S jobs_per_s=R`.

use std::collections::HashMap;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use custody_daemon::record::{BuildId, Timestamp};
use custody_daemon::source::BuildSource;
use custody_daemon::spec::{GitSource, GitUrl};
use custody_daemon::store::{Ending, NewBuild, Output, State, Store};
use custody_testkit::Postgres;
use futures_util::{TryStreamExt as _, stream};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

const USAGE: &str = "usage: store_bench seed --url URL --builds N\n       \
                     store_bench claims --daemons K --jobs N [--url URL]";

const SPEC: &[u8] = b"steps:\n  - name: build\n    run: make -j4 all\n  - name: test\n    \
    run: make check\nimages:\n  - from: oci:/output/app:latest\n    \
    to: registry.example/team/app:{job}\n";
fn source() -> BuildSource {
    BuildSource::Git(GitSource {
        git: GitUrl::parse("https://git.example/team/app.git").expect("a plain https URL"),
        revision: "4f3c2a1b9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b".to_owned(),
        path: Default::default(),
    })
}

/// How long a claim holds, as the daemon's default lease.
const LEASE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("seed") => seed(&args[1..]).await,
        Some("claims") => claims(&args[1..]).await,
        Some("claim-worker") => claim_worker(&args[1..]).await,
        _ => Err(USAGE.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("store_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` or `--name=value` pairs, only the names in `allowed`.
fn flags(args: &[String], allowed: &[&str]) -> Result<HashMap<String, String>> {
    let mut flags = HashMap::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let Some(name) = arg.strip_prefix("--") else {
            return Err(format!("unexpected argument `{arg}`\n{USAGE}").into());
        };
        let (name, value) = match name.split_once('=') {
            Some((name, value)) => (name, value.to_owned()),
            None => match args.next() {
                Some(value) => (name, value.clone()),
                None => return Err(format!("`--{name}` needs a value\n{USAGE}").into()),
            },
        };
        if !allowed.contains(&name) {
            return Err(format!("unknown flag `--{name}`\n{USAGE}").into());
        }
        flags.insert(name.to_owned(), value);
    }
    Ok(flags)
}

fn required(flags: &HashMap<String, String>, name: &str) -> Result<String> {
    flags
        .get(name)
        .cloned()
        .ok_or_else(|| format!("`--{name}` is required\n{USAGE}").into())
}

fn number(flags: &HashMap<String, String>, name: &str) -> Result<usize> {
    let value = required(flags, name)?;
    match value.parse() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`--{name} {value}`: expected a positive number").into()),
    }
}

fn total(counts: &[(State, i64)]) -> i64 {
    counts.iter().map(|(_, n)| n).sum()
}

fn count_of(counts: &[(State, i64)], state: State) -> i64 {
    counts
        .iter()
        .filter(|(s, _)| *s == state)
        .map(|(_, n)| n)
        .sum()
}

// ---------- seed ----------

async fn seed(args: &[String]) -> Result<()> {
    let flags = flags(args, &["url", "builds"])?;
    let url = required(&flags, "url")?;
    let builds = number(&flags, "builds")?;
    let store = Store::open(&url).await?;
    let before = store.count_by_state().await?;

    let provenance = provenance_envelope();
    let ids: Vec<BuildId> = (0..builds).map(|_| BuildId::new()).collect();
    // One build a minute, ending now.
    let first =
        Timestamp::from_unix_millis(Timestamp::now().unix_millis() - 60_000 * builds as i64);
    // As many builds at once as the pool has connections (SQLite has one
    // writer at a time anyway; PostgreSQL overlaps the commits).
    let at_once = if store.is_postgres() { 16 } else { 4 };
    let started = Instant::now();
    stream::iter(ids.iter().enumerate().map(Ok))
        .try_for_each_concurrent(at_once, |(i, id)| {
            let store = &store;
            let provenance = &provenance;
            async move {
                let created = first.after(Duration::from_secs(60 * i as u64));
                seed_one(store, id, created, provenance).await
            }
        })
        .await?;
    let took = started.elapsed();

    let after = store.count_by_state().await?;
    let added = total(&after) - total(&before);
    let succeeded = count_of(&after, State::Succeeded) - count_of(&before, State::Succeeded);
    if added != builds as i64 || succeeded != builds as i64 {
        return Err(format!(
            "seeded {builds} builds, but the store gained {added} ({succeeded} succeeded)"
        )
        .into());
    }
    let middle = &ids[builds / 2];
    let record = store
        .build(middle)
        .await?
        .ok_or_else(|| format!("the seeded build {middle} is not in the store"))?;
    let outputs = store.outputs(middle).await?;
    if record.state != State::Succeeded || !record.has_provenance || outputs.len() != 2 {
        return Err(format!(
            "the seeded build {middle} reads back as {:?} with provenance {} and {} outputs",
            record.state,
            record.has_provenance,
            outputs.len()
        )
        .into());
    }
    store.close().await;
    eprintln!(
        "seeded {builds} finished builds in {:.2} s ({:.0} builds/s, {at_once} at once)",
        took.as_secs_f64(),
        builds as f64 / took.as_secs_f64()
    );
    println!("{middle}");
    Ok(())
}

async fn seed_one(
    store: &Store,
    id: &BuildId,
    created: Timestamp,
    provenance: &[u8],
) -> Result<(), Box<dyn std::error::Error>> {
    store
        .insert_running(
            &NewBuild {
                id,
                spec_path: "custody.yaml",
                spec: Some(SPEC),
                source: &source(),
                created_at: created,
                retry_of: None,
            },
            created.after(Duration::from_secs(2)),
        )
        .await?;
    let text = id.as_str();
    let short = &text[text.len() - 12..];
    let outputs = [
        Output {
            reference: format!("registry.example/team/app:{short}"),
            digest: format!("sha256:{:0>64}", text.replace('-', "")).parse()?,
            size: 52_428_917,
        },
        Output {
            reference: format!("registry.example/team/app-debug:{short}"),
            digest: format!("sha256:{:f>64}", text.replace('-', "")).parse()?,
            size: 1_532,
        },
    ];
    let ended = store
        .finish(
            id,
            None,
            &Ending {
                state: State::Succeeded,
                finished_at: created.after(Duration::from_secs(47)),
                error: None,
                outputs: &outputs,
                provenance: Some(provenance),
            },
        )
        .await?;
    if !ended {
        return Err(format!("finishing the seeded build {id} changed nothing").into());
    }
    Ok(())
}

/// A DSSE-shaped envelope of about 1 KiB (its payload is filler).
fn provenance_envelope() -> Vec<u8> {
    let payload: String = "eyJfdHlwZSI6Imh0dHBzOi8vaW4tdG90by5pby9TdGF0ZW1lbnQvdjEi"
        .chars()
        .cycle()
        .take(820)
        .collect();
    format!(
        r#"{{"payloadType":"application/vnd.in-toto+json","payload":"{payload}","signatures":[{{"keyid":"custody-bench","sig":"MEUCIQDbench0signature0filler0filler0filler0filler0filler0AiBbench0signature0filler0filler0filler0filler0filler0"}}]}}"#
    )
    .into_bytes()
}

// ---------- claims ----------

async fn claims(args: &[String]) -> Result<()> {
    let flags = flags(args, &["daemons", "jobs", "url"])?;
    let daemons = number(&flags, "daemons")?;
    let jobs = number(&flags, "jobs")?;
    // From here on SIGINT and SIGTERM end the run through the cleanup below
    // (workers killed, the cluster stopped and deleted) instead of killing
    // this process on the spot.
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;

    // Dropped last: stopped and deleted after the workers are gone, also
    // when something fails.
    let cluster = match flags.get("url") {
        Some(_) => None,
        None => {
            let cluster = Postgres::start_durable();
            eprintln!(
                "PostgreSQL: a throwaway cluster with default durability (fsync on) on port {}",
                cluster.port()
            );
            Some(cluster)
        }
    };
    let url = match (&cluster, flags.get("url")) {
        (_, Some(url)) => url.clone(),
        (Some(cluster), None) => cluster.create_database("claims"),
        (None, None) => unreachable!("a cluster starts when there is no URL"),
    };
    tokio::select! {
        result = run_claims(&url, daemons, jobs) => result,
        _ = interrupt.recv() => Err("interrupted".into()),
        _ = terminate.recv() => Err("terminated".into()),
    }
}

async fn run_claims(url: &str, daemons: usize, jobs: usize) -> Result<()> {
    let store = Store::open(url).await?;
    if !store.is_postgres() {
        return Err("claims measures PostgreSQL: pass a postgres:// URL or none".into());
    }
    let existing = total(&store.count_by_state().await?);
    if existing != 0 {
        return Err(
            format!("the database already holds {existing} builds: give an empty one").into(),
        );
    }
    let started = Instant::now();
    let ids: Vec<BuildId> = (0..jobs).map(|_| BuildId::new()).collect();
    let created_at = Timestamp::now();
    let source = source();
    stream::iter(ids.iter().map(Ok))
        .try_for_each_concurrent(16, |id| {
            let store = &store;
            let source = &source;
            async move {
                store
                    .enqueue(&NewBuild {
                        id,
                        spec_path: "custody.yaml",
                        spec: Some(b"steps: []\n"),
                        source,
                        created_at,
                        retry_of: None,
                    })
                    .await
            }
        })
        .await?;
    eprintln!(
        "queued {jobs} no-op builds in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // Start every worker and wait until each has its store open.
    let exe = std::env::current_exe()?;
    let mut workers = Vec::new();
    for k in 0..daemons {
        let owner = format!("bench-daemon-{k}");
        let mut child = tokio::process::Command::new(&exe)
            .args(["claim-worker", "--url", url, "--owner", &owner])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        match stdout.next_line().await? {
            Some(line) if line == "ready" => {}
            other => return Err(format!("worker {owner} did not start: {other:?}").into()),
        }
        workers.push((owner, child, stdin, stdout));
    }

    // Release them together; the clock stops when the last one has exited.
    let started = Instant::now();
    for (_, _, stdin, _) in &mut workers {
        stdin.write_all(b"go\n").await?;
        stdin.flush().await?;
    }
    let mut claimed = Vec::new();
    for (owner, child, _stdin, stdout) in &mut workers {
        let status = child.wait().await?;
        let mut count = None;
        while let Some(line) = stdout.next_line().await? {
            if let Some(n) = line.strip_prefix("claimed ") {
                count = n.parse::<usize>().ok();
            }
        }
        match count {
            Some(n) if status.success() => claimed.push((owner.clone(), n)),
            _ => return Err(format!("worker {owner} failed ({status})").into()),
        }
    }
    let seconds = started.elapsed().as_secs_f64();

    // Every build succeeded, and exactly one daemon claimed each, once.
    let sum: usize = claimed.iter().map(|(_, n)| n).sum();
    if sum != jobs {
        return Err(format!("the workers claimed {sum} builds of {jobs}: {claimed:?}").into());
    }
    let mut seen = 0usize;
    let mut before: Option<BuildId> = None;
    loop {
        let page = store.list(None, before.as_ref(), 1000).await?;
        let Some(last) = page.last() else { break };
        before = Some(last.id.clone());
        for record in &page {
            if record.state != State::Succeeded || record.claims != 1 {
                return Err(format!(
                    "build {} ended {:?} after {} claims (owner {:?})",
                    record.id, record.state, record.claims, record.owner
                )
                .into());
            }
            seen += 1;
        }
    }
    if seen != jobs {
        return Err(format!("the store holds {seen} builds, {jobs} were queued").into());
    }
    store.close().await;

    let per_worker: Vec<String> = claimed.iter().map(|(_, n)| n.to_string()).collect();
    eprintln!(
        "{daemons} daemon(s): {jobs} builds claimed and finished in {seconds:.2} s \
         (per daemon: {}); every build succeeded, each claimed once",
        per_worker.join(" ")
    );
    println!(
        "claims daemons={daemons} jobs={jobs} seconds={seconds:.3} jobs_per_s={:.1}",
        jobs as f64 / seconds
    );
    Ok(())
}

/// One "daemon": its own store and pool; says `ready`, waits for `go` on
/// stdin, then claims and finishes builds one at a time until none is
/// queued, and says `claimed N`.
async fn claim_worker(args: &[String]) -> Result<()> {
    let flags = flags(args, &["url", "owner"])?;
    let url = required(&flags, "url")?;
    let owner = required(&flags, "owner")?;
    let store = Store::open(&url).await?;
    store.ping().await?;
    println!("ready");
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    if line.trim() != "go" {
        return Err(format!("{owner}: stdin closed before `go`").into());
    }
    let mut claimed = 0usize;
    loop {
        let now = Timestamp::now();
        let Some(build) = store.claim(&owner, now.after(LEASE), now).await? else {
            break;
        };
        let ended = store
            .finish(
                &build.id,
                Some(&owner),
                &Ending {
                    state: State::Succeeded,
                    finished_at: Timestamp::now(),
                    error: None,
                    outputs: &[],
                    provenance: None,
                },
            )
            .await?;
        if !ended {
            return Err(format!("{owner}: finishing {} changed nothing", build.id).into());
        }
        claimed += 1;
    }
    store.close().await;
    println!("claimed {claimed}");
    Ok(())
}
