//! Measures how fast a queued job gets a runner through the local executor:
//! queued → runner authenticated, and → first RPC answer (the runner's hello),
//! at 1 and at 50 jobs at a time, next to the floor: spawning the same binary
//! plus a bare TLS 1.3 handshake with the daemon, measured in the same run.
//!
//! Usage: connect RUNNER_BINARY [JOBS]   (run by bench/connect)

use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_daemon::dispatch::Dispatcher;
use custody_daemon::local::LocalExecutor;
use custody_wire::rpc::proto;
use custody_wire::{Connector, DaemonIdentity};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let runner = args.next().expect("usage: connect RUNNER_BINARY [JOBS]");
    let jobs: usize = args
        .next()
        .map(|n| n.parse().expect("JOBS is a number"))
        .unwrap_or(500);

    let identity = DaemonIdentity::generate().unwrap();
    let connector = Connector::new(&identity);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(connector.clone().serve(listener, std::future::pending()));
    let dispatcher = Arc::new(Dispatcher {
        connector: connector.clone(),
        executor: Arc::new(LocalExecutor::new(runner.clone().into())),
        daemon_addr: addr.clone(),
        connect_timeout: Duration::from_secs(60),
    });

    // The floor: spawn the binary (it exits at once) and a bare TLS handshake.
    let mut spawn = Vec::new();
    let mut tls = Vec::new();
    let client_config =
        custody_wire::identity::runner_tls_config(identity.certificate_pem()).unwrap();
    for _ in 0..50 {
        let started = Instant::now();
        let status = tokio::process::Command::new(&runner)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(status.success());
        spawn.push(started.elapsed());
        let started = Instant::now();
        let tcp = TcpStream::connect(&addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let name =
            rustls::pki_types::ServerName::try_from(custody_wire::identity::SERVER_NAME).unwrap();
        let stream = tokio_rustls::TlsConnector::from(client_config.clone())
            .connect(name, tcp)
            .await
            .unwrap();
        tls.push(started.elapsed());
        drop(stream);
    }
    let floor = percentile(&mut spawn, 50.0) + percentile(&mut tls, 50.0);

    let mut report = Vec::new();
    for concurrency in [1usize, 50] {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = Vec::new();
        for i in 0..jobs {
            let dispatcher = dispatcher.clone();
            let permit = semaphore.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let job = proto::Job {
                    job_id: format!("bench-{concurrency}-{i}"),
                    steps: Vec::new(),
                    ..Default::default()
                };
                let result = dispatcher.run(job, |_| {}, std::future::pending()).await;
                drop(permit);
                let report = result.expect("a bench job failed");
                assert_eq!(report.end, custody_wire::events::JobEnd::Succeeded);
                (report.timings.authenticated, report.timings.first_event)
            }));
        }
        let mut authenticated = Vec::new();
        let mut first_event = Vec::new();
        for task in tasks {
            let (a, f) = task.await.unwrap();
            authenticated.push(a);
            first_event.push(f);
        }
        report.push((
            concurrency,
            percentile(&mut authenticated, 50.0),
            percentile(&mut authenticated, 99.0),
            percentile(&mut first_event, 50.0),
            percentile(&mut first_event, 99.0),
        ));
    }
    assert_eq!(connector.waiting(), 0, "waiters leaked");

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "floor: spawn p50 {:.2} ms + TLS handshake p50 {:.2} ms = {:.2} ms",
        ms(percentile(&mut spawn, 50.0)),
        ms(percentile(&mut tls, 50.0)),
        ms(floor)
    );
    eprintln!(
        "{:>11} {:>16} {:>16} {:>16} {:>16}",
        "concurrency", "auth p50 ms", "auth p99 ms", "first-rpc p50", "first-rpc p99"
    );
    for (c, a50, a99, f50, f99) in &report {
        eprintln!(
            "{c:>11} {:>16.2} {:>16.2} {:>16.2} {:>16.2}",
            ms(*a50),
            ms(*a99),
            ms(*f50),
            ms(*f99)
        );
    }
    let (_, p50_at_1, ..) = report[0];
    let (_, _, p99_at_50, ..) = report[1];
    println!(
        "connect p50_vs_floor={:.2} p99_at_50_over_p50={:.2}",
        p50_at_1.as_secs_f64() / floor.as_secs_f64(),
        p99_at_50.as_secs_f64() / p50_at_1.as_secs_f64()
    );
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[index]
}
