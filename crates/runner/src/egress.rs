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

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use custody_net::Policy;
use custody_net::host_addresses;

/// The most a request head may take.
const MAX_HEAD: usize = 64 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the proxy on `listener` until the returned task is aborted;
/// `note` gets a line for the build log for every refused destination.
pub fn serve(
    listener: TcpListener,
    policy: Arc<Policy>,
    note: impl Fn(String) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let note = Arc::new(note);
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
            let (policy, note, own) = (policy.clone(), note.clone(), own.clone());
            connections.spawn(async move {
                if let Err(refusal) = handle(client, &policy, &own).await {
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
        return Ok((
            Target {
                host,
                port,
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
    Ok((
        Target {
            host,
            port,
            head: Some(head),
        },
        head_end,
    ))
}

/// One client connection: one CONNECT tunnel, or one plain HTTP request.
/// `Err` is a refusal worth telling the build log.
async fn handle(mut client: TcpStream, policy: &Policy, own: &[IpAddr]) -> Result<(), String> {
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
        head: forwarded_head,
    } = target;
    let upstream = match connect(&host, port, policy, own).await {
        Ok(stream) => stream,
        Err(Refused { status, reason }) => {
            let message = format!("egress to `{host}:{port}` refused: {reason}");
            let _ = respond(&mut client, status, &format!("custody: {message}")).await;
            return Err(message);
        }
    };
    let mut upstream = upstream;
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
        }
    }
    if !leftover.is_empty() && upstream.write_all(leftover).await.is_err() {
        return Ok(());
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    Ok(())
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

/// `HOST:PORT` (or `[V6]:PORT`); `default` when the port is absent.
fn split_authority(authority: &str, default: Option<u16>) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None => default?,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host.to_owned(), port.parse().ok()?)),
        _ => Some((authority.to_owned(), default?)),
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
