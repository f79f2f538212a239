//! Who may hold a connection to the API, and for how long: the accept loop
//! that serves the router over HTTP/1.1 (hyper), with a total and a
//! per-client-address cap on open connections and a deadline for every
//! request's headers.
//!
//! Half-sent requests used to be held for ever, a task and its buffers
//! each: ~21,000 of them exhausted the daemon's file descriptors and left
//! it at 555 MB. Now headers (of the first request, and of each next one
//! on a kept-alive connection, so an idle connection too) must arrive
//! within [`HEADER_READ_TIMEOUT`], and each connection's buffers are
//! bounded. A connection from an address holding its share already is
//! closed as soon as it is accepted, before a byte is read. At the total
//! cap, the connection that has waited longest for a request is closed to
//! make room: slow or silent clients, from however many addresses, wait
//! longer than any client that sends its request at once, so they cannot
//! keep one out. Request bodies have their own deadline where they are
//! read (`http::BODY_READ_TIMEOUT`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use custody_wire::ClientAddress;
use hyper::body::{Body, Frame, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// How long a client has to send a request's headers, counted from the
/// connection's start or, kept alive, from the end of its last response:
/// also how long an idle connection stays open.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections at most, unless the configuration says otherwise; never
/// more than the open-file limit leaves room for (see
/// [`ConnectionLimits::within_open_files`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Open connections one client address (an IPv4 address, an IPv6 /64) may
/// hold, unless the configuration says otherwise. Behind a reverse proxy
/// every client has the proxy's address: raise it there.
pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
/// File descriptors kept for everything else the daemon opens (its store,
/// runner connections, job files, logs) when the open-file limit caps the
/// connections.
const RESERVED_FILES: u64 = 512;
/// The most a connection buffers in either direction. Requests are small
/// (headers, specs up to 1 MiB streamed through); hyper's default is about
/// 400 KiB per connection.
const MAX_BUFFER: usize = 64 * 1024;
/// How long to wait before accepting again after `accept` failed (out of
/// file descriptors, say), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this about refused connections.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The caps on open connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections at most.
    pub total: usize,
    /// Open connections one client address may hold.
    pub per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            total: DEFAULT_MAX_CONNECTIONS,
            per_address: DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        }
    }
}

impl ConnectionLimits {
    /// These limits, the total lowered so that connections leave
    /// [`RESERVED_FILES`] descriptors of `open_files` (the soft
    /// `RLIMIT_NOFILE`) free: past it `accept` would fail and the daemon
    /// could open nothing else.
    pub fn within_open_files(self, open_files: u64) -> Self {
        let room = open_files.saturating_sub(RESERVED_FILES).max(1);
        let total = self.total.min(usize::try_from(room).unwrap_or(usize::MAX));
        Self {
            total,
            per_address: self.per_address.min(total),
        }
    }
}

/// The soft limit on open files of this process, if it can be read.
pub fn open_files_limit() -> Option<u64> {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .ok()
        .map(|(soft, _hard)| soft)
}

/// Serves `router` on `listener` until `stop` resolves, then lets open
/// connections finish their current request and returns once they have
/// all closed (callers bound that wait: a log stream may be long).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()>,
) {
    let admission = Arc::new(Admission::new(limits));
    let service = TowerToHyperService::new(router);
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUFFER)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let mut warned: Option<Instant> = None;
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "accepting an API connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let permit = match admission.admit(peer, Instant::now()) {
            Ok(permit) => permit,
            Err(refused) => {
                // Closed unread: no task, no buffer, nothing to wait for.
                drop(stream);
                if warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                    warned = Some(Instant::now());
                    tracing::warn!(%peer, "refusing API connections: {refused}");
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let slot = permit.slot.clone();
        let router = service.clone();
        // Each request marks its connection busy until its response's body
        // is done with (a log stream, until it ends), so that only
        // connections waiting for a request can be closed to make room.
        let tracked = hyper::service::service_fn(move |request| {
            let busy = Busy::start(slot.clone());
            let response = hyper::service::Service::call(&router, request);
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| TrackedBody { body, _busy: busy }))
            }
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), tracked));
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(err) = ended {
                    tracing::debug!(%peer, %err, "API connection ended");
                },
                () = permit.slot.evicted.notified() => {
                    tracing::debug!(%peer, "closed an API connection waiting for a request, to make room");
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
enum Refused {
    #[error("{0} connections are open and every one is answering a request")]
    Total(usize),
    #[error("this address holds {0} connections, the most one address may")]
    PerAddress(usize),
}

/// Counts open connections, in all and by client address, and knows which
/// of them are waiting for a request (and since when).
struct Admission {
    limits: ConnectionLimits,
    /// What `idle_since` counts from.
    epoch: Instant,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    by_client: HashMap<ClientAddress, usize>,
    /// Every open connection, by its number; the total is its length.
    slots: HashMap<u64, Arc<Slot>>,
    next: u64,
}

/// One open connection as the admission sees it.
struct Slot {
    id: u64,
    client: ClientAddress,
    /// Requests it is answering now (one at a time on HTTP/1.1).
    busy: AtomicUsize,
    /// When it began waiting for its next request: accepted, or its last
    /// response done. Nanoseconds since the admission's epoch.
    idle_since: AtomicU64,
    epoch: Instant,
    /// Told to close, to make room for a new connection.
    evicted: Notify,
}

impl Slot {
    fn idle_since(&self) -> Option<u64> {
        (self.busy.load(Ordering::Acquire) == 0).then(|| self.idle_since.load(Ordering::Acquire))
    }
}

impl Admission {
    fn new(limits: ConnectionLimits) -> Self {
        Self {
            limits,
            epoch: Instant::now(),
            open: Mutex::default(),
        }
    }

    /// A permit for one more connection from `peer`, held as long as the
    /// connection is open. An address at its cap is refused. At the total
    /// cap the connection that has waited longest for a request is closed
    /// to make room (a slow or silent client's, which has been waiting
    /// since it connected, before any that is being answered); only when
    /// every one is being answered is the new one refused.
    fn admit(self: &Arc<Self>, peer: SocketAddr, now: Instant) -> Result<Permit, Refused> {
        let client = ClientAddress::of(peer.ip());
        let mut open = self.lock();
        let held = open.by_client.get(&client).copied().unwrap_or(0);
        if held >= self.limits.per_address {
            return Err(Refused::PerAddress(held));
        }
        if open.slots.len() >= self.limits.total {
            let longest_idle = open
                .slots
                .values()
                .filter_map(|slot| slot.idle_since().map(|since| (since, slot.id)))
                .min();
            let Some((_, id)) = longest_idle else {
                return Err(Refused::Total(open.slots.len()));
            };
            if let Some(slot) = open.remove(id) {
                slot.evicted.notify_one();
            }
        }
        let id = open.next;
        open.next += 1;
        let slot = Arc::new(Slot {
            id,
            client,
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.nanos(now)),
            epoch: self.epoch,
            evicted: Notify::new(),
        });
        open.slots.insert(id, slot.clone());
        *open.by_client.entry(client).or_default() += 1;
        Ok(Permit {
            admission: self.clone(),
            slot,
        })
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open
            .lock()
            .expect("the connection counts are never poisoned")
    }
}

impl Open {
    /// Stops counting connection `id`; `None` if it was not counted (it
    /// was closed to make room, and counted out then).
    fn remove(&mut self, id: u64) -> Option<Arc<Slot>> {
        let slot = self.slots.remove(&id)?;
        if let Some(held) = self.by_client.get_mut(&slot.client) {
            *held -= 1;
            if *held == 0 {
                self.by_client.remove(&slot.client);
            }
        }
        Some(slot)
    }
}

/// One open connection, counted until it is dropped.
struct Permit {
    admission: Arc<Admission>,
    slot: Arc<Slot>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.lock().remove(self.slot.id);
    }
}

/// A request being answered on a connection, until its response's body is
/// dropped.
struct Busy(Arc<Slot>);

impl Busy {
    fn start(slot: Arc<Slot>) -> Self {
        slot.busy.fetch_add(1, Ordering::AcqRel);
        Self(slot)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let slot = &self.0;
        let now = u64::try_from(slot.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        slot.idle_since.store(now, Ordering::Release);
        slot.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its connection marked busy while it lives.
struct TrackedBody<B> {
    body: B,
    _busy: Busy,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt as _;

    use super::*;

    fn peer(text: &str) -> SocketAddr {
        SocketAddr::new(text.parse().unwrap(), 40000)
    }

    #[test]
    fn an_address_gets_its_share_and_no_more() {
        let admission = Arc::new(Admission::new(ConnectionLimits {
            total: 10,
            per_address: 2,
        }));
        let now = Instant::now();
        let a1 = admission.admit(peer("127.0.0.2"), now).unwrap();
        let _a2 = admission.admit(peer("127.0.0.2"), now).unwrap();
        assert_eq!(
            admission.admit(peer("127.0.0.2"), now).err(),
            Some(Refused::PerAddress(2))
        );
        let _b1 = admission.admit(peer("127.0.0.1"), now).unwrap();
        drop(a1);
        let _a3 = admission.admit(peer("::ffff:127.0.0.2"), now).unwrap();
        let open = admission.lock();
        assert_eq!((open.slots.len(), open.by_client.len()), (3, 2));
    }

    #[test]
    fn at_the_total_cap_the_longest_waiting_connection_makes_room() {
        let admission = Arc::new(Admission::new(ConnectionLimits {
            total: 3,
            per_address: 3,
        }));
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let silent = admission.admit(peer("127.0.1.1"), at(1)).unwrap();
        let answering = admission.admit(peer("127.0.1.2"), at(0)).unwrap();
        let _busy = Busy::start(answering.slot.clone());
        let _newer = admission.admit(peer("127.0.1.3"), at(2)).unwrap();

        // Full: the oldest connection waiting for a request goes, not the
        // older one being answered.
        let _probe = admission.admit(peer("127.0.0.1"), at(3)).unwrap();
        assert!(silent.slot.evicted.notified().now_or_never().is_some());
        assert!(answering.slot.evicted.notified().now_or_never().is_none());
        assert_eq!(admission.lock().slots.len(), 3);
        // Counted out once: its permit's drop changes nothing.
        drop(silent);
        assert_eq!(admission.lock().slots.len(), 3);
        assert_eq!(
            admission
                .lock()
                .by_client
                .get(&ClientAddress::of(peer("127.0.1.1").ip())),
            None
        );
    }

    #[test]
    fn when_every_connection_is_answering_a_new_one_is_refused() {
        let admission = Arc::new(Admission::new(ConnectionLimits {
            total: 2,
            per_address: 2,
        }));
        let now = Instant::now();
        let a = admission.admit(peer("127.0.0.2"), now).unwrap();
        let b = admission.admit(peer("127.0.0.3"), now).unwrap();
        let _busy = (Busy::start(a.slot.clone()), Busy::start(b.slot.clone()));
        assert_eq!(
            admission.admit(peer("127.0.0.4"), now).err(),
            Some(Refused::Total(2))
        );
    }

    #[test]
    fn the_open_file_limit_caps_the_total() {
        let limits = ConnectionLimits::default().within_open_files(1024);
        assert_eq!(limits.total, 512);
        assert_eq!(limits.per_address, DEFAULT_MAX_CONNECTIONS_PER_ADDRESS);
        let tight = ConnectionLimits::default().within_open_files(600);
        assert_eq!((tight.total, tight.per_address), (88, 88));
        assert_eq!(
            ConnectionLimits::default().within_open_files(1 << 20),
            ConnectionLimits::default()
        );
    }
}
