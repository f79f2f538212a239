//! The daemon side of the runner connection: a TLS 1.3 listener where
//! runners authenticate with their one-time job token, and the waiters that
//! hand each authenticated connection to the job that expects it.
//!
//! An address that keeps failing the handshake (wrong tokens, unknown
//! jobs, no hello in time) is shut out for a while: its connections are
//! closed as soon as they are accepted, before TLS costs anything (every
//! guess used to be answered, as fast as it came). Other addresses are not
//! affected.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

use crate::Error;
use crate::address::ClientAddress;
use crate::handshake::{self, Parse, Verdict};
use crate::identity::DaemonIdentity;
use crate::rpc::{self, RunnerClient};
use crate::token::{JobToken, TokenDigest};

/// How long a connection may take from TCP accept to `OK` (TLS handshake,
/// hello and the start of the RPC session) before it is dropped.
pub const DEFAULT_HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Failed handshakes one address may have within [`FAILURE_WINDOW`]
/// before it is refused for [`REFUSED_FOR`]. A runner fails only when its
/// job was withdrawn (and then once), so this is far above what runners
/// sharing an address do.
pub const MAX_FAILED_HANDSHAKES: u32 = 50;
/// The window failed handshakes are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long an address that failed too often is refused.
pub const REFUSED_FOR: Duration = Duration::from_secs(300);
/// Addresses tracked at most: past it (after forgetting the stale ones) a
/// new address's failures are not counted, so the table stays bounded.
const MAX_TRACKED: usize = 65_536;

/// An authenticated runner, ready to be called.
pub struct RunnerSession {
    /// Where the runner connected from.
    pub peer: SocketAddr,
    /// When the daemon said `OK`.
    pub authenticated_at: std::time::Instant,
    pub client: RunnerClient,
}

struct Waiter {
    token: TokenDigest,
    deliver: oneshot::Sender<RunnerSession>,
}

/// Accepts runners and matches them to the jobs waiting for them.
pub struct Connector {
    acceptor: TlsAcceptor,
    certificate_pem: String,
    waiters: Mutex<HashMap<String, Waiter>>,
    deadline: Duration,
    strikes: Mutex<Strikes>,
}

impl Connector {
    pub fn new(identity: &DaemonIdentity) -> Arc<Self> {
        Self::with_deadline(identity, DEFAULT_HANDSHAKE_DEADLINE)
    }

    pub fn with_deadline(identity: &DaemonIdentity, deadline: Duration) -> Arc<Self> {
        Arc::new(Self {
            acceptor: TlsAcceptor::from(identity.server_config()),
            certificate_pem: identity.certificate_pem().to_owned(),
            waiters: Mutex::new(HashMap::new()),
            deadline,
            strikes: Mutex::default(),
        })
    }

    /// The certificate to hand to runners.
    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// Expects a runner for `job_id`: returns the fresh token to give it and
    /// a future that resolves when it has authenticated. Registering the
    /// same job id again replaces (and so withdraws) the earlier waiter.
    pub fn register(&self, job_id: &str) -> Result<(JobToken, Pending), Error> {
        if !handshake::is_valid_job_id(job_id) {
            return Err(Error::InvalidJobId(job_id.to_owned()));
        }
        let token = JobToken::generate();
        let (deliver, receive) = oneshot::channel();
        self.lock().insert(
            job_id.to_owned(),
            Waiter {
                token: token.digest(),
                deliver,
            },
        );
        Ok((token, Pending { receive }))
    }

    /// Stops expecting a runner for `job_id` (the job was cancelled, timed
    /// out, or its executor failed): its token is dead from now on.
    pub fn withdraw(&self, job_id: &str) -> bool {
        self.lock().remove(job_id).is_some()
    }

    /// How many jobs are waiting for their runner.
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.waiters
            .lock()
            .expect("the waiter map is never poisoned")
    }

    fn strikes(&self) -> std::sync::MutexGuard<'_, Strikes> {
        self.strikes
            .lock()
            .expect("the failure counts are never poisoned")
    }

    /// Accepts runners on `listener` until `shutdown` resolves. Each
    /// connection is handled on its own task, so a slow or silent client
    /// delays nobody else.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if self.strikes().refuses(peer, Instant::now()) {
                            // Before TLS: the handshake is what costs.
                            drop(stream);
                            continue;
                        }
                        let connector = self.clone();
                        tokio::spawn(async move {
                            if let Err(err) = connector.handle(stream, peer).await {
                                tracing::info!(%peer, %err, "runner connection refused");
                            }
                        });
                    }
                    Err(err) => {
                        // Out of file descriptors and the like: back off briefly.
                        tracing::warn!(%err, "accepting a runner connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    }

    async fn handle(&self, stream: TcpStream, peer: SocketAddr) -> Result<(), Error> {
        let _ = stream.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + self.deadline;
        let outcome = tokio::time::timeout_at(deadline, async {
            let failed = |e: Error| {
                self.strikes().fail(peer, Instant::now());
                e
            };
            let mut tls = self
                .acceptor
                .accept(stream)
                .await
                .map_err(|e| failed(Error::Handshake(format!("TLS: {e}"))))?;
            let hello = read_hello(&mut tls).await.map_err(failed)?;
            let (verdict, waiter) = self.check(&hello);
            if waiter.is_none() {
                // Counted before the answer, so the next attempt sees it.
                self.strikes().fail(peer, Instant::now());
            }
            tls.write_all(verdict.as_bytes())
                .await
                .map_err(|e| Error::Handshake(e.to_string()))?;
            tls.flush()
                .await
                .map_err(|e| Error::Handshake(e.to_string()))?;
            let Some(waiter) = waiter else {
                let _ = tls.shutdown().await;
                return Err(Error::Refused {
                    job_id: hello.job_id,
                    verdict,
                });
            };
            let authenticated_at = std::time::Instant::now();
            let client = rpc::client_over(tls).await?;
            Ok((waiter, client, authenticated_at))
        })
        .await
        .map_err(|_| {
            self.strikes().fail(peer, Instant::now());
            Error::Handshake(format!("no complete handshake within {:?}", self.deadline))
        })?;
        let (waiter, client, authenticated_at) = outcome?;
        // The job may have given up meanwhile; then the session just drops.
        let _ = waiter.deliver.send(RunnerSession {
            peer,
            authenticated_at,
            client,
        });
        Ok(())
    }

    /// Looks the job up (its id is public) and compares token digests in
    /// constant time; a match consumes the waiter.
    fn check(&self, hello: &handshake::Hello) -> (Verdict, Option<Waiter>) {
        let mut waiters = self.lock();
        let Some(waiter) = waiters.get(&hello.job_id) else {
            return (Verdict::UnknownJob, None);
        };
        if !waiter
            .token
            .matches(&TokenDigest::of(hello.token.as_bytes()))
        {
            return (Verdict::WrongToken, None);
        }
        let waiter = waiters.remove(&hello.job_id);
        (Verdict::Ok, waiter)
    }
}

/// Failed handshakes by address, and the addresses refused for them.
#[derive(Default)]
struct Strikes {
    by_client: HashMap<ClientAddress, Record>,
}

#[derive(Clone, Copy)]
struct Record {
    /// When the window being counted began.
    since: Instant,
    failures: u32,
    refused_until: Option<Instant>,
}

impl Strikes {
    /// Whether `peer`'s address is refused now.
    fn refuses(&mut self, peer: SocketAddr, now: Instant) -> bool {
        let client = ClientAddress::of(peer.ip());
        self.by_client
            .get(&client)
            .and_then(|record| record.refused_until)
            .is_some_and(|until| now < until)
    }

    /// Counts a failed handshake from `peer`; the one that reaches
    /// [`MAX_FAILED_HANDSHAKES`] within the window shuts its address out.
    fn fail(&mut self, peer: SocketAddr, now: Instant) {
        let client = ClientAddress::of(peer.ip());
        if !self.by_client.contains_key(&client) && self.by_client.len() >= MAX_TRACKED {
            self.forget_stale(now);
            if self.by_client.len() >= MAX_TRACKED {
                return;
            }
        }
        let record = self.by_client.entry(client).or_insert(Record {
            since: now,
            failures: 0,
            refused_until: None,
        });
        if now.duration_since(record.since) >= FAILURE_WINDOW {
            record.since = now;
            record.failures = 0;
        }
        record.failures += 1;
        if record.failures >= MAX_FAILED_HANDSHAKES {
            record.refused_until = Some(now + REFUSED_FOR);
            record.since = now;
            record.failures = 0;
            tracing::warn!(
                %client,
                "refusing runner connections from this address for {REFUSED_FOR:?}: \
                 {MAX_FAILED_HANDSHAKES} failed handshakes within {FAILURE_WINDOW:?}"
            );
        }
    }

    /// Drops addresses neither refused nor counting a recent failure.
    fn forget_stale(&mut self, now: Instant) {
        self.by_client.retain(|_, record| {
            record.refused_until.is_some_and(|until| now < until)
                || now.duration_since(record.since) < FAILURE_WINDOW
        });
    }
}

async fn read_hello<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<handshake::Hello, Error> {
    let mut received = Vec::with_capacity(64);
    let mut buf = [0u8; 2 * handshake::MAX_LINE + 2];
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| Error::Handshake(e.to_string()))?;
        if n == 0 {
            return Err(Error::Handshake(
                "the runner closed the connection before its hello".into(),
            ));
        }
        received.extend_from_slice(&buf[..n]);
        match handshake::parse_hello(&received) {
            Parse::Incomplete => continue,
            Parse::Complete(hello) => return Ok(hello),
            Parse::Invalid(reason) => return Err(Error::Handshake(reason.into())),
        }
    }
}

/// Resolves when the runner for a registered job has authenticated, or
/// with [`Error::Withdrawn`] once the job stopped waiting.
pub struct Pending {
    receive: oneshot::Receiver<RunnerSession>,
}

impl Future for Pending {
    type Output = Result<RunnerSession, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receive)
            .poll(cx)
            .map(|r| r.map_err(|_| Error::Withdrawn))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(text: &str) -> SocketAddr {
        SocketAddr::new(text.parse().unwrap(), 50000)
    }

    #[test]
    fn failures_within_the_window_shut_an_address_out_for_a_while() {
        let mut strikes = Strikes::default();
        let start = Instant::now();
        let guesser = peer("192.0.2.7");
        for n in 1..MAX_FAILED_HANDSHAKES {
            strikes.fail(guesser, start + Duration::from_millis(u64::from(n)));
        }
        assert!(!strikes.refuses(guesser, start + Duration::from_secs(1)));
        strikes.fail(guesser, start + Duration::from_secs(1));
        assert!(strikes.refuses(guesser, start + Duration::from_secs(2)));
        assert!(strikes.refuses(peer("::ffff:192.0.2.7"), start + Duration::from_secs(2)));
        assert!(!strikes.refuses(peer("192.0.2.8"), start + Duration::from_secs(2)));
        // Refused for a while, not for ever.
        let later = start + Duration::from_secs(1) + REFUSED_FOR;
        assert!(!strikes.refuses(guesser, later));
    }

    #[test]
    fn failures_spread_wider_than_the_window_are_forgiven() {
        let mut strikes = Strikes::default();
        let start = Instant::now();
        let slow = peer("192.0.2.9");
        let spacing = FAILURE_WINDOW / (MAX_FAILED_HANDSHAKES / 2);
        for n in 0..MAX_FAILED_HANDSHAKES * 3 {
            let at = start + spacing * n;
            strikes.fail(slow, at);
            assert!(!strikes.refuses(slow, at), "after {n} failures");
        }
        strikes.forget_stale(start + spacing * MAX_FAILED_HANDSHAKES * 3 + FAILURE_WINDOW);
        assert!(strikes.by_client.is_empty());
    }
}
