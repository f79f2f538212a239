//! Every outcome of the runner handshake, over real TLS on 127.0.0.1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use custody_wire::handshake::MAX_LINE;
use custody_wire::{Connector, DaemonIdentity, DialError, JobToken, dial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Daemon {
    connector: Arc<Connector>,
    addr: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn daemon(deadline: Duration) -> Daemon {
    let identity = DaemonIdentity::generate().unwrap();
    let connector = Connector::with_deadline(&identity, deadline);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(connector.clone().serve(listener, async {
        let _ = stopped.await;
    }));
    Daemon {
        connector,
        addr,
        _stop: stop,
    }
}

const LONG: Duration = Duration::from_secs(10);

async fn try_dial(d: &Daemon, job: &str, token: &JobToken) -> Result<(), DialError> {
    dial(&d.addr, d.connector.certificate_pem(), job, token, LONG)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn the_right_token_connects_once() {
    let d = daemon(LONG).await;
    let (token, pending) = d.connector.register("job-1").unwrap();
    try_dial(&d, "job-1", &token).await.unwrap();
    let session = tokio::time::timeout(LONG, pending).await.unwrap().unwrap();
    assert!(session.peer.ip().is_loopback());
    assert_eq!(d.connector.waiting(), 0);

    // The token was used: the job is unknown now.
    assert!(matches!(
        try_dial(&d, "job-1", &token).await,
        Err(DialError::UnknownJob { .. })
    ));
}

#[tokio::test]
async fn unknown_jobs_and_wrong_tokens_are_told_apart() {
    let d = daemon(LONG).await;
    let (_token, _pending) = d.connector.register("job-2").unwrap();
    let err = try_dial(&d, "job-3", &JobToken::generate())
        .await
        .unwrap_err();
    assert!(matches!(err, DialError::UnknownJob { .. }), "{err}");
    assert!(err.to_string().contains("`job-3`"), "{err}");
    let err = try_dial(&d, "job-2", &JobToken::generate())
        .await
        .unwrap_err();
    assert!(matches!(err, DialError::WrongToken { .. }), "{err}");
    // A wrong guess does not consume the waiter.
    assert_eq!(d.connector.waiting(), 1);
}

#[tokio::test]
async fn a_withdrawn_job_token_is_dead() {
    let d = daemon(LONG).await;
    let (token, pending) = d.connector.register("job-4").unwrap();
    assert!(d.connector.withdraw("job-4"));
    assert!(matches!(
        try_dial(&d, "job-4", &token).await,
        Err(DialError::UnknownJob { .. })
    ));
    assert!(matches!(pending.await, Err(custody_wire::Error::Withdrawn)));
}

#[tokio::test]
async fn another_daemons_certificate_is_refused_by_the_runner() {
    let d = daemon(LONG).await;
    let (token, _pending) = d.connector.register("job-5").unwrap();
    let other = DaemonIdentity::generate().unwrap();
    let err = dial(&d.addr, other.certificate_pem(), "job-5", &token, LONG)
        .await
        .unwrap_err();
    assert!(
        matches!(err, DialError::CertificateMismatch { .. }),
        "{err}"
    );
    // The daemon never saw a hello: the job still waits.
    assert_eq!(d.connector.waiting(), 1);
}

#[tokio::test]
async fn an_unreachable_daemon_is_named() {
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let identity = DaemonIdentity::generate().unwrap();
    let addr = format!("127.0.0.1:{port}");
    let err = dial(
        &addr,
        identity.certificate_pem(),
        "job",
        &JobToken::generate(),
        LONG,
    )
    .await
    .unwrap_err();
    assert!(matches!(err, DialError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
}

#[tokio::test]
async fn a_tls_1_2_client_is_refused() {
    let d = daemon(LONG).await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls::pki_types::CertificateDer::pem_slice_iter(d.connector.certificate_pem().as_bytes())
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(&d.addr).await.unwrap();
    let name =
        rustls::pki_types::ServerName::try_from(custody_wire::identity::SERVER_NAME).unwrap();
    let result = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    let err = result.expect_err("a TLS 1.2 handshake must fail");
    assert!(
        err.to_string().to_lowercase().contains("version") || err.to_string().contains("alert"),
        "{err}"
    );
}

use rustls::pki_types::pem::PemObject;

#[tokio::test]
async fn slow_and_oversized_clients_are_cut_off_while_a_good_runner_connects() {
    let deadline = Duration::from_millis(500);
    let d = daemon(deadline).await;
    let (token, pending) = d.connector.register("job-6").unwrap();

    // A client that connects and says nothing.
    let mut silent = TcpStream::connect(&d.addr).await.unwrap();
    // A client that finishes TLS and then sends an endless line.
    let identity_pem = d.connector.certificate_pem().to_owned();
    let config = custody_wire::identity::runner_tls_config(&identity_pem).unwrap();
    let tcp = TcpStream::connect(&d.addr).await.unwrap();
    let name =
        rustls::pki_types::ServerName::try_from(custody_wire::identity::SERVER_NAME).unwrap();
    let mut flooder = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let _ = flooder.write_all(&vec![b'a'; MAX_LINE + 10]).await;
    let _ = flooder.flush().await;

    // Meanwhile the real runner gets through at once.
    let started = Instant::now();
    try_dial(&d, "job-6", &token).await.unwrap();
    pending.await.unwrap();
    assert!(
        started.elapsed() < deadline,
        "the good runner waited {:?}",
        started.elapsed()
    );

    // The flooder is dropped without an answer.
    let mut buf = [0u8; 3];
    let read = tokio::time::timeout(LONG, flooder.read(&mut buf))
        .await
        .expect("the over-long line was not cut off");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the flooder got an answer: {read:?} {buf:?}"
    );

    // The silent client is closed once the deadline passes.
    let started = Instant::now();
    let read = tokio::time::timeout(LONG, silent.read(&mut buf))
        .await
        .expect("the silent client was never cut off");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert!(started.elapsed() < deadline + Duration::from_millis(500));
}

/// A TCP connection to `addr` from `source` (any address of 127/8 is this
/// machine).
async fn connect_from(source: &str, addr: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
}

/// One handshake from `source` as a runner makes it; the daemon's answer,
/// or the error that ended it first.
async fn handshake_from(
    d: &Daemon,
    source: &str,
    job: &str,
    token: &JobToken,
) -> std::io::Result<[u8; 3]> {
    let config = custody_wire::identity::runner_tls_config(d.connector.certificate_pem()).unwrap();
    let name =
        rustls::pki_types::ServerName::try_from(custody_wire::identity::SERVER_NAME).unwrap();
    let tcp = connect_from(source, &d.addr).await;
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    tls.write_all(format!("{job}\n{}\n", token.expose()).as_bytes())
        .await?;
    let mut verdict = [0u8; 3];
    tls.read_exact(&mut verdict).await?;
    Ok(verdict)
}

/// The runner port used to answer every token guess. After
/// `MAX_FAILED_HANDSHAKES` wrong tokens from one address, its next
/// connection is closed before TLS (even with the right token), while a
/// runner from another address connects at once.
#[tokio::test]
async fn an_address_guessing_tokens_is_shut_out_before_tls() {
    use custody_wire::connector::MAX_FAILED_HANDSHAKES;
    let d = daemon(LONG).await;
    let (token, pending) = d.connector.register("job-7").unwrap();
    let attacker = "127.0.0.2";
    for attempt in 0..MAX_FAILED_HANDSHAKES {
        let verdict = handshake_from(&d, attacker, "job-7", &JobToken::generate()).await;
        assert_eq!(verdict.unwrap(), *b"IT\n", "guess {attempt}");
    }

    // Closed at once: no ClientHello needed (the daemon would wait LONG for one).
    let mut tcp = connect_from(attacker, &d.addr).await;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut byte))
        .await
        .expect("the connection was left open, waiting for TLS");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // The right token from there gets no answer either, and stays unused.
    let refused = handshake_from(&d, attacker, "job-7", &token).await;
    assert!(refused.is_err(), "answered {refused:?}");
    assert_eq!(d.connector.waiting(), 1);

    // A runner from elsewhere connects at once.
    let started = Instant::now();
    try_dial(&d, "job-7", &token).await.unwrap();
    let session = tokio::time::timeout(LONG, pending).await.unwrap().unwrap();
    assert_eq!(session.peer.ip().to_string(), "127.0.0.1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the good runner waited {:?}",
        started.elapsed()
    );
}
