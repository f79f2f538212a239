//! The way out for a step with `network: true`: an HTTP(S) proxy the runner
//! serves on the step's own loopback (its only interface), reached through
//! `HTTP_PROXY`/`HTTPS_PROXY`. The runner resolves the name, checks every
//! address it would connect to and connects from the host's namespace:
//!
//! never loopback, link-local, multicast, private ranges or the build
//! host's own addresses unless the operator allows the destination
//! (`--egress-allow`), and never the daemon's runner port ([`Policy`], from
//! `custody-net`). The check is made on the address actually connected to,
//! after DNS, so a name that resolves (or rebinds) to a forbidden address
//! gets nowhere.
//! TLS is tunnelled with `CONNECT` and never intercepted; plain HTTP comes
//! as absolute-form requests and is forwarded once per connection.
//!
//! A step whose `network:` is a host list reaches only the names it lists
//! (matched on the name asked for, before DNS; the address rules still
//! apply to what it resolves to).
//!
//! Every destination reached is recorded ([`Contact`]): a tunnel as
//! `tcp://HOST:PORT`, a plain HTTP request as its URL with the sha256 of
//! the response body as it went to the step, each with the bytes the proxy
//! forwarded either way. The record is made when the connection ends, or
//! when the proxy is stopped with it still open, so the step cannot leave
//! a contact unrecorded by keeping it open.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use custody_net::{HostPattern, Policy};
use custody_net::{host_addresses, split_authority};

/// The most a request head may take.
const MAX_HEAD: usize = 64 * 1024;
/// The most one read of a forwarded stream takes: large, so a fast
/// download costs few system calls.
const CHUNK: usize = 256 * 1024;
/// Chunks a response may be ahead of its hash: the hash runs on its own
/// thread, beside the copy, and this bounds what waits for it.
const HASH_QUEUE: usize = 8;
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where one step's proxy may connect.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// The address rules (the operator's, for every step).
    pub policy: Arc<Policy>,
    /// The step's `network:` host list; empty: any name.
    pub hosts: Vec<HostPattern>,
}

impl Rules {
    /// Why `host:port` is not in the step's list, or `None`.
    fn unlisted(&self, host: &str, port: u16) -> Option<String> {
        if self.hosts.is_empty() || self.hosts.iter().any(|h| h.matches(host, port)) {
            return None;
        }
        let listed: Vec<String> = self.hosts.iter().map(|h| format!("`{h}`")).collect();
        Some(format!(
            "it is not in the step's `network` list ({})",
            listed.join(", ")
        ))
    }
}

/// A destination a step reached: one tunnel or one plain HTTP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contact {
    /// `tcp://HOST:PORT` for a tunnel, the `http://` URL (without
    /// credentials) for plain HTTP.
    pub uri: String,
    /// For plain HTTP, the sha256 (hex) of the response body received.
    pub sha256: Option<String>,
    /// Bytes the proxy forwarded to the destination (for plain HTTP, the
    /// request head as forwarded and the body).
    pub bytes_sent: u64,
    /// Bytes it forwarded back to the step (heads included).
    pub bytes_received: u64,
}

/// Serves the proxy on `listener` until the returned task is aborted;
/// `note` gets a line for the build log for every refused destination,
/// `record` every destination reached, when its connection ends (or is
/// dropped with the task: await the aborted task, then every record made).
pub fn serve(
    listener: TcpListener,
    rules: Rules,
    note: impl Fn(String) + Send + Sync + 'static,
    record: impl Fn(Contact) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let note = Arc::new(note);
    let record: Arc<dyn Fn(Contact) + Send + Sync> = Arc::new(record);
    let rules = Arc::new(rules);
    tokio::spawn(async move {
        let own: Arc<[IpAddr]> = host_addresses().into();
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let client = match listener.accept().await {
                Ok((client, _)) => client,
                Err(_) => {
                    // Out of descriptors, say: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (rules, note, own) = (rules.clone(), note.clone(), own.clone());
            let record = record.clone();
            connections.spawn(async move {
                if let Err(refusal) = handle(client, &rules, &own, record).await {
                    note(refusal);
                }
            });
            // Reap what finished, so a long build does not pile them up.
            while connections.try_join_next().is_some() {}
        }
    })
}

/// Where a client asked to go, read from its request head.
struct Target {
    host: String,
    port: u16,
    /// What is recorded: `tcp://HOST:PORT` or the URL without credentials.
    uri: String,
    /// For plain HTTP, the head to send upstream; `None` for a CONNECT tunnel.
    head: Option<Vec<u8>>,
}

/// Reads and parses the request head in `buffer`; a bad request is the
/// message to answer it with (400).
async fn read_target(
    client: &mut TcpStream,
    buffer: &mut Vec<u8>,
) -> Result<(Target, usize), &'static str> {
    let head_end = match tokio::time::timeout(HEAD_TIMEOUT, read_head(client, buffer)).await {
        Ok(Ok(Some(end))) => end,
        _ => return Err("custody's egress proxy: an incomplete or oversized request head"),
    };
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(
        request.parse(&buffer[..head_end]),
        Ok(httparse::Status::Complete(_))
    ) {
        return Err("custody's egress proxy: a malformed request");
    }
    let method = request.method.unwrap_or_default();
    let target = request.path.unwrap_or_default();
    if method.eq_ignore_ascii_case("CONNECT") {
        let (host, port) = split_authority(target, None)
            .ok_or("custody's egress proxy: CONNECT needs HOST:PORT")?;
        let uri = if host.contains(':') {
            format!("tcp://[{host}]:{port}")
        } else {
            format!("tcp://{}:{port}", host.to_ascii_lowercase())
        };
        return Ok((
            Target {
                host,
                port,
                uri,
                head: None,
            },
            head_end,
        ));
    }
    let url = url::Url::parse(target)
        .map_err(|_| "custody's egress proxy: send absolute URLs (http://HOST/...) or CONNECT")?;
    if url.scheme() != "http" {
        return Err("custody's egress proxy: only http:// URLs are forwarded; use CONNECT for TLS");
    }
    let host = url
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_owned())
        .ok_or("custody's egress proxy: the URL names no host")?;
    let port = url.port_or_known_default().unwrap_or(80);
    let head = origin_form(method, &url, request.headers);
    let mut recorded = url.clone();
    // Credentials in a URL are the step's business, never the provenance's.
    let _ = recorded.set_username("");
    let _ = recorded.set_password(None);
    recorded.set_fragment(None);
    Ok((
        Target {
            host,
            port,
            uri: recorded.to_string(),
            head: Some(head),
        },
        head_end,
    ))
}

/// One client connection: one CONNECT tunnel, or one plain HTTP request.
/// `Err` is a refusal worth telling the build log.
async fn handle(
    mut client: TcpStream,
    rules: &Rules,
    own: &[IpAddr],
    record: Arc<dyn Fn(Contact) + Send + Sync>,
) -> Result<(), String> {
    let mut buffer = Vec::with_capacity(4096);
    let (target, head_end) = match read_target(&mut client, &mut buffer).await {
        Ok(target) => target,
        Err(message) => {
            let _ = respond(&mut client, 400, message).await;
            return Ok(());
        }
    };
    let Target {
        host,
        port,
        uri,
        head: forwarded_head,
    } = target;
    let connected = match rules.unlisted(&host, port) {
        Some(reason) => Err(Refused {
            status: 403,
            reason,
        }),
        None => connect(&host, port, &rules.policy, own).await,
    };
    let mut upstream = match connected {
        Ok(stream) => stream,
        Err(Refused { status, reason }) => {
            let message = format!("egress to `{host}:{port}` refused: {reason}");
            let _ = respond(&mut client, status, &format!("custody: {message}")).await;
            return Err(message);
        }
    };
    // From here on the destination was reached: recorded whatever happens,
    // dropped midway included.
    let mut recording = Recording {
        contact: Contact {
            uri,
            sha256: None,
            bytes_sent: 0,
            bytes_received: 0,
        },
        body: forwarded_head.is_some().then(BodyHasher::start),
        record,
    };
    let leftover = &buffer[head_end..];
    match forwarded_head {
        None => {
            if client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        Some(head) => {
            if upstream.write_all(&head).await.is_err() {
                return Ok(());
            }
            recording.contact.bytes_sent += head.len() as u64;
        }
    }
    if !leftover.is_empty() {
        if upstream.write_all(leftover).await.is_err() {
            return Ok(());
        }
        recording.contact.bytes_sent += leftover.len() as u64;
    }
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let Recording { contact, body, .. } = &mut recording;
    let up = pump(
        &mut client_read,
        &mut upstream_write,
        &mut contact.bytes_sent,
        None,
    );
    let down = pump(
        &mut upstream_read,
        &mut client_write,
        &mut contact.bytes_received,
        body.as_ref().map(|b| &b.feed),
    );
    tokio::join!(up, down);
    Ok(())
}

/// A contact being made; recorded when dropped, however its connection
/// ended.
struct Recording {
    contact: Contact,
    /// The response being hashed, for plain HTTP.
    body: Option<BodyHasher>,
    record: Arc<dyn Fn(Contact) + Send + Sync>,
}

impl Drop for Recording {
    fn drop(&mut self) {
        let mut contact = self.contact.clone();
        contact.sha256 = self.body.take().map(BodyHasher::finish);
        (self.record)(contact);
    }
}

/// A response body hashed on a thread of its own, so hashing overlaps the
/// copy instead of taking turns with it; it is at most [`HASH_QUEUE`]
/// chunks behind what went to the step.
struct BodyHasher {
    feed: tokio::sync::mpsc::Sender<bytes::Bytes>,
    thread: Option<std::thread::JoinHandle<ResponseBody>>,
}

impl BodyHasher {
    fn start() -> Self {
        let (feed, mut chunks) = tokio::sync::mpsc::channel::<bytes::Bytes>(HASH_QUEUE);
        let thread = std::thread::Builder::new()
            .name("egress-hash".into())
            .spawn(move || {
                let mut body = ResponseBody::default();
                while let Some(chunk) = chunks.blocking_recv() {
                    body.feed(&chunk);
                }
                body
            })
            .ok();
        Self { feed, thread }
    }

    /// The digest of everything fed. Waits for the thread, which has at
    /// most [`HASH_QUEUE`] chunks left: `feed` is the only sender (the copy
    /// borrows it), so dropping it ends the thread's loop.
    fn finish(self) -> String {
        let Self { feed, thread } = self;
        drop(feed);
        match thread.map(std::thread::JoinHandle::join) {
            Some(Ok(body)) => body.finish(),
            // No thread could be started, or it panicked: no digest of the
            // bytes is known, and an empty string matches none.
            _ => String::new(),
        }
    }
}

/// Copies `from` to `to` until either ends, counting into `count` and
/// sending each chunk to `hash` once it was written; then closes `to` for
/// writing.
async fn pump(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    count: &mut u64,
    mut hash: Option<&tokio::sync::mpsc::Sender<bytes::Bytes>>,
) {
    let mut buffer = bytes::BytesMut::new();
    loop {
        if hash.is_none() {
            // Nothing keeps a chunk: the one buffer is reused.
            buffer.clear();
        }
        buffer.reserve(CHUNK);
        let n = match from.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        *count += n as u64;
        if let Some(feed) = &hash {
            let chunk = buffer.split().freeze();
            if feed.send(chunk).await.is_err() {
                hash = None;
            }
        }
    }
    let _ = to.shutdown().await;
}

/// A plain HTTP response as it streams to the step: its head(s) skipped
/// (interim 1xx ones too), its body hashed without the chunked transfer
/// coding, so the digest is of the bytes the resource has.
#[derive(Default)]
struct ResponseBody {
    /// Bytes of a head not yet complete.
    head: Vec<u8>,
    /// Past the final head: how the body is framed.
    framing: Option<Framing>,
    hasher: Sha256,
}

enum Framing {
    /// Everything to the end (or `Content-Length` bytes, then nothing).
    Plain {
        remaining: Option<u64>,
    },
    Chunked(Chunked),
}

/// Where a chunked body stands.
enum Chunked {
    /// Reading a chunk-size line.
    Size(Vec<u8>),
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd(u8),
    /// After the last chunk: trailers, ignored.
    Done,
}

impl ResponseBody {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.framing {
                None => {
                    self.head.extend_from_slice(bytes);
                    bytes = &[];
                    let Some(end) = memchr::memmem::find(&self.head, b"\r\n\r\n") else {
                        if self.head.len() > MAX_HEAD {
                            // No head to speak of: hash what comes as is.
                            let head = std::mem::take(&mut self.head);
                            self.framing = Some(Framing::Plain { remaining: None });
                            self.feed(&head);
                        }
                        return;
                    };
                    let head = std::mem::take(&mut self.head);
                    let (framing, interim) = framing_of(&head[..end + 4]);
                    if !interim {
                        self.framing = Some(framing);
                    }
                    // What followed the head is fed again.
                    let rest = head[end + 4..].to_vec();
                    self.feed(&rest);
                }
                Some(Framing::Plain { remaining }) => {
                    let take =
                        remaining.map_or(bytes.len(), |r| r.min(bytes.len() as u64) as usize);
                    self.hasher.update(&bytes[..take]);
                    if let Some(r) = remaining {
                        *r -= take as u64;
                    }
                    bytes = &[];
                }
                Some(Framing::Chunked(state)) => {
                    let used = state.feed(bytes, &mut self.hasher);
                    bytes = &bytes[used..];
                }
            }
        }
    }

    fn finish(self) -> String {
        self.hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// How a response head frames its body, and whether it is an interim
/// (1xx) response another head follows.
fn framing_of(head: &[u8]) -> (Framing, bool) {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut response = httparse::Response::new(&mut headers);
    if !matches!(response.parse(head), Ok(httparse::Status::Complete(_))) {
        return (Framing::Plain { remaining: None }, false);
    }
    let code = response.code.unwrap_or(200);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    let framing = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        Framing::Chunked(Chunked::Size(Vec::new()))
    } else {
        Framing::Plain {
            remaining: header("content-length").and_then(|v| v.trim().parse().ok()),
        }
    };
    // 101 switches protocols: what follows is no HTTP body, hashed as is.
    (framing, (100..200).contains(&code) && code != 101)
}

impl Chunked {
    /// Consumes from `bytes`; returns how many were used.
    fn feed(&mut self, bytes: &[u8], hasher: &mut Sha256) -> usize {
        match self {
            Chunked::Size(line) => match memchr::memchr(b'\n', bytes) {
                Some(end) => {
                    line.extend_from_slice(&bytes[..end]);
                    let text = String::from_utf8_lossy(line);
                    let size = text.split(';').next().unwrap_or("").trim();
                    *self = match u64::from_str_radix(size, 16) {
                        Ok(0) | Err(_) => Chunked::Done,
                        Ok(n) => Chunked::Data(n),
                    };
                    end + 1
                }
                None => {
                    line.extend_from_slice(bytes);
                    bytes.len()
                }
            },
            Chunked::Data(remaining) => {
                let take = (*remaining).min(bytes.len() as u64) as usize;
                hasher.update(&bytes[..take]);
                *remaining -= take as u64;
                if *remaining == 0 {
                    *self = Chunked::DataEnd(2);
                }
                take
            }
            Chunked::DataEnd(left) => {
                let take = usize::from(*left).min(bytes.len());
                *left -= take as u8;
                if *left == 0 {
                    *self = Chunked::Size(Vec::new());
                }
                take
            }
            Chunked::Done => bytes.len(),
        }
    }
}

struct Refused {
    status: u16,
    reason: String,
}

/// Resolves `host`, checks each address, connects to the first allowed one.
async fn connect(
    host: &str,
    port: u16,
    policy: &Policy,
    own: &[IpAddr],
) -> Result<TcpStream, Refused> {
    let addresses: Vec<SocketAddr> = match tokio::net::lookup_host((host, port)).await {
        Ok(found) => found.collect(),
        Err(e) => {
            return Err(Refused {
                status: 502,
                reason: format!("cannot resolve `{host}`: {e}"),
            });
        }
    };
    let mut refusal = None;
    let mut failure = None;
    for addr in addresses {
        if let Some(reason) = policy.refusal(host, addr, own) {
            refusal.get_or_insert_with(|| {
                format!("`{}` {reason}; an operator may allow it with `--egress-allow` (`egress_allow` in the service's configuration)", addr.ip())
            });
            continue;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => failure = Some(format!("connecting to `{addr}`: {e}")),
            Err(_) => failure = Some(format!("connecting to `{addr}` timed out")),
        }
    }
    Err(match (refusal, failure) {
        (_, Some(failure)) => Refused {
            status: 502,
            reason: failure,
        },
        (Some(refusal), None) => Refused {
            status: 403,
            reason: refusal,
        },
        (None, None) => Refused {
            status: 502,
            reason: format!("`{host}` has no address"),
        },
    })
}

/// Reads until the end of the request head; `None` if the client stopped
/// or the head is too large.
async fn read_head(client: &mut TcpStream, buffer: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    loop {
        if let Some(end) = memchr::memmem::find(buffer, b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        if buffer.len() >= MAX_HEAD {
            return Ok(None);
        }
        let mut chunk = [0u8; 8192];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// The request head for the origin server: origin-form target, proxy
/// headers dropped, one request per connection.
fn origin_form(method: &str, url: &url::Url, headers: &[httparse::Header<'_>]) -> Vec<u8> {
    let mut target = url.path().to_owned();
    if let Some(query) = url.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut head = format!("{method} {target} HTTP/1.1\r\n").into_bytes();
    let mut has_host = false;
    for header in headers {
        let name = header.name.to_ascii_lowercase();
        if name.starts_with("proxy-") || name == "connection" || name == "keep-alive" {
            continue;
        }
        has_host |= name == "host";
        head.extend_from_slice(header.name.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(header.value);
        head.extend_from_slice(b"\r\n");
    }
    if !has_host {
        let host = url.host_str().unwrap_or_default();
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        head.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
    }
    head.extend_from_slice(b"Connection: close\r\n\r\n");
    head
}

async fn respond(client: &mut TcpStream, status: u16, message: &str) -> std::io::Result<()> {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        _ => "Bad Gateway",
    };
    let body = format!("{message}\n");
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client.write_all(response.as_bytes()).await?;
    client.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256_hex(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Feeds `response` in pieces of `step` bytes; the body's digest.
    fn hashed(response: &[u8], step: usize) -> String {
        let mut body = ResponseBody::default();
        for piece in response.chunks(step) {
            body.feed(piece);
        }
        body.finish()
    }

    #[test]
    fn a_response_body_is_hashed_without_its_heads_or_chunk_framing() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let chunked = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nhe\r\n3\r\nllo\r\n0\r\nTrailer: t\r\n\r\n";
        let to_close = b"HTTP/1.0 200 OK\r\n\r\nhello";
        for step in [1, 2, 7, 4096] {
            for response in [&plain[..], &chunked[..], &to_close[..]] {
                assert_eq!(
                    hashed(response, step),
                    sha256_hex(b"hello"),
                    "{}",
                    String::from_utf8_lossy(response)
                );
            }
        }
        // Nothing past Content-Length counts.
        let extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        assert_eq!(hashed(extra, 3), sha256_hex(b"hello"));
    }

    /// One HTTP server on loopback answering every connection with `body`
    /// (chunked), and a proxy allowed to reach it, limited to `hosts`.
    async fn proxy_to_origin(
        body: &'static [u8],
        hosts: &[&str],
    ) -> (
        SocketAddr,
        u16,
        tokio::sync::mpsc::UnboundedReceiver<Contact>,
    ) {
        let origin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let origin_port = origin.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = origin.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let _ = read_head_of(&mut stream, &mut head).await;
                    let mut response =
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                    response.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                    response.extend_from_slice(body);
                    response.extend_from_slice(b"\r\n0\r\n\r\n");
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = listener.local_addr().unwrap();
        let rules = Rules {
            policy: Arc::new(Policy::new(&["127.0.0.1".into()], Vec::new()).unwrap()),
            hosts: hosts
                .iter()
                .map(|h| HostPattern::parse(h).unwrap())
                .collect(),
        };
        let (sender, contacts) = tokio::sync::mpsc::unbounded_channel();
        serve(
            listener,
            rules,
            |_| {},
            move |contact| {
                let _ = sender.send(contact);
            },
        );
        (proxy, origin_port, contacts)
    }

    async fn read_head_of(stream: &mut TcpStream, head: &mut Vec<u8>) -> std::io::Result<()> {
        read_head(stream, head).await.map(|_| ())
    }

    async fn exchange(proxy: SocketAddr, request: String) -> Vec<u8> {
        let mut client = TcpStream::connect(proxy).await.unwrap();
        client.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        client.read_to_end(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn plain_http_and_tunnels_are_recorded_with_their_bytes_and_digest() {
        let (proxy, port, mut contacts) = proxy_to_origin(b"the body", &[]).await;
        let response = exchange(
            proxy,
            format!(
                "GET http://user:secret@127.0.0.1:{port}/f?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            ),
        )
        .await;
        let contact = contacts.recv().await.unwrap();
        assert_eq!(contact.uri, format!("http://127.0.0.1:{port}/f?x=1"));
        assert_eq!(contact.sha256, Some(sha256_hex(b"the body")));
        assert_eq!(contact.bytes_received, response.len() as u64);
        assert!(contact.bytes_sent > 0);

        let request = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let response = exchange(
            proxy,
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n{request}"),
        )
        .await;
        let contact = contacts.recv().await.unwrap();
        assert_eq!(contact.uri, format!("tcp://127.0.0.1:{port}"));
        assert_eq!(contact.sha256, None);
        assert_eq!(contact.bytes_sent, request.len() as u64);
        let established = b"HTTP/1.1 200 Connection established\r\n\r\n".len();
        assert_eq!(
            contact.bytes_received,
            (response.len() - established) as u64
        );
    }

    #[tokio::test]
    async fn a_host_list_refuses_names_outside_it_before_connecting() {
        let (proxy, port, mut contacts) = proxy_to_origin(b"x", &["localhost"]).await;
        let refused = exchange(
            proxy,
            format!("GET http://127.0.0.1:{port}/ HTTP/1.1\r\n\r\n"),
        )
        .await;
        let refused = String::from_utf8_lossy(&refused);
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        assert!(
            refused.contains("not in the step's `network` list (`localhost`)"),
            "{refused}"
        );
        let listed = exchange(
            proxy,
            format!("GET http://localhost:{port}/ HTTP/1.1\r\n\r\n"),
        )
        .await;
        assert!(listed.starts_with(b"HTTP/1.1 200"));
        // Only the listed request reached anything.
        let contact = contacts.recv().await.unwrap();
        assert_eq!(contact.uri, format!("http://localhost:{port}/"));
        assert!(contacts.try_recv().is_err());
    }
}
