//! The way out for a step with `network: true`: an HTTP(S) proxy the runner
//! serves on the step's own loopback (its only interface), reached through
//! `HTTP_PROXY`/`HTTPS_PROXY`. The runner resolves the name, checks every
//! address it would connect to and connects from the host's namespace:
//!
//! - never loopback, unspecified, link-local (169.254.0.0/16, fe80::/10:
//!   cloud metadata), multicast, or an address of the build host itself;
//! - never private ranges (RFC 1918, 100.64.0.0/10, fc00::/7);
//! - unless the operator allows the destination (`--egress-allow
//!   HOST[:PORT]|CIDR[:PORT]`);
//! - and never the daemon's runner port, allowed or not.
//!
//! The check is made on the address actually connected to, after DNS, so a
//! name that resolves (or rebinds) to a forbidden address gets nowhere.
//! TLS is tunnelled with `CONNECT` and never intercepted; plain HTTP comes
//! as absolute-form requests and is forwarded once per connection.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most a request head may take.
const MAX_HEAD: usize = 64 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where steps may connect.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    allowed: Vec<Allowed>,
    /// Never reachable, whatever is allowed: the daemon's runner port.
    never: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    /// A host name (as the step asked for it), any address it resolves to.
    Host { name: String, port: Option<u16> },
    /// Addresses in a network.
    Net {
        network: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
}

impl Policy {
    /// Parses the operator's allow list (`HOST[:PORT]`, `IP[:PORT]`,
    /// `[V6][:PORT]`, `CIDR[:PORT]`); `never` are addresses no step reaches.
    pub fn new(allow: &[String], never: Vec<SocketAddr>) -> Result<Self, String> {
        let allowed = allow
            .iter()
            .map(|entry| parse_allowed(entry))
            .collect::<Result<_, _>>()?;
        Ok(Self { allowed, never })
    }

    /// Why connecting to `addr` for `host` is refused, or `None`.
    pub fn refusal(&self, host: &str, addr: SocketAddr, own: &[IpAddr]) -> Option<&'static str> {
        if self.never.contains(&addr) {
            return Some("is custody's own runner port");
        }
        let ip = canonical(addr.ip());
        let allowed = self.allowed.iter().any(|allowed| match allowed {
            Allowed::Host { name, port } => {
                name.eq_ignore_ascii_case(host.trim_end_matches('.'))
                    && port.is_none_or(|p| p == addr.port())
            }
            Allowed::Net {
                network,
                prefix,
                port,
            } => contains(*network, *prefix, ip) && port.is_none_or(|p| p == addr.port()),
        });
        if allowed {
            return None;
        }
        if ip.is_loopback() || ip.is_unspecified() {
            return Some("is a loopback address");
        }
        if is_link_local(ip) {
            return Some("is a link-local address (where cloud metadata services live)");
        }
        if own.iter().any(|own| canonical(*own) == ip) {
            return Some("is an address of the build host");
        }
        if ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
            return Some("is a multicast or broadcast address");
        }
        if is_private(ip) {
            return Some("is a private address");
        }
        None
    }
}

fn parse_allowed(entry: &str) -> Result<Allowed, String> {
    let bad = |why: &str| {
        format!("egress allow entry `{entry}`: {why}; write HOST[:PORT], IP[:PORT] or CIDR[:PORT]")
    };
    let entry = entry.trim();
    if entry.is_empty() {
        return Err(bad("it is empty"));
    }
    // `[v6]:port`, `[v6]/len:port`
    let (address, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or_else(|| bad("no closing `]`"))?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(bad("unexpected text after `]`")),
        };
        (inside.to_owned(), port)
    } else if entry.matches(':').count() > 1 {
        (entry.to_owned(), None) // a bare IPv6 address or network
    } else {
        match entry.rsplit_once(':') {
            Some((address, port)) => (address.to_owned(), Some(port)),
            None => (entry.to_owned(), None),
        }
    };
    let port = match port {
        Some(port) => Some(
            port.parse::<u16>()
                .map_err(|_| bad("the port is not a number"))?,
        ),
        None => None,
    };
    if let Some((network, prefix)) = address.split_once('/') {
        let network: IpAddr = network.parse().map_err(|_| bad("not a network address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| bad("the prefix length is out of range"))?;
        return Ok(Allowed::Net {
            network: canonical(network),
            prefix,
            port,
        });
    }
    if let Ok(ip) = address.parse::<IpAddr>() {
        let ip = canonical(ip);
        return Ok(Allowed::Net {
            network: ip,
            prefix: if ip.is_ipv4() { 32 } else { 128 },
            port,
        });
    }
    let valid = address
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !valid {
        return Err(bad("not a host name"));
    }
    Ok(Allowed::Host {
        name: address.trim_end_matches('.').to_ascii_lowercase(),
        port,
    })
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn contains(network: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (network, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_private() || contains(IpAddr::V4(Ipv4Addr::new(100, 64, 0, 0)), 10, ip)
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// The build host's own addresses, on every interface.
pub fn host_addresses() -> Vec<IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addresses
        .filter_map(|interface| {
            let address = interface.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_host_its_neighbours_and_the_metadata_service_are_refused() {
        let policy = Policy::new(&[], vec![addr("127.0.0.1:4000")]).unwrap();
        let own = [IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9))];
        for (target, reason) in [
            ("127.0.0.1:80", "loopback"),
            ("[::1]:80", "loopback"),
            ("[::ffff:127.0.0.1]:80", "loopback"),
            ("0.0.0.0:80", "loopback"),
            ("169.254.169.254:80", "link-local"),
            ("[fe80::1]:80", "link-local"),
            ("203.0.113.9:22", "build host"),
            ("10.1.2.3:443", "private"),
            ("172.16.0.1:443", "private"),
            ("192.168.1.1:443", "private"),
            ("100.64.0.1:443", "private"),
            ("[fd00::1]:443", "private"),
            ("127.0.0.1:4000", "runner port"),
        ] {
            let refused = policy.refusal("example", addr(target), &own);
            assert!(
                refused.is_some_and(|r| r.contains(reason)),
                "{target}: {refused:?}"
            );
        }
        assert_eq!(
            policy.refusal("example.org", addr("93.184.216.34:443"), &own),
            None
        );
        assert_eq!(
            policy.refusal("example.org", addr("[2606:2800::1]:443"), &own),
            None
        );
    }

    #[test]
    fn operators_allow_hosts_networks_and_ports_but_never_the_runner_port() {
        let policy = Policy::new(
            &[
                "10.200.0.0/16".into(),
                "mirror.internal:8080".into(),
                "127.0.0.1".into(),
                "[fd00::5]:443".into(),
            ],
            vec![addr("127.0.0.1:4000")],
        )
        .unwrap();
        assert_eq!(policy.refusal("x", addr("10.200.3.4:443"), &[]), None);
        assert!(policy.refusal("x", addr("10.201.3.4:443"), &[]).is_some());
        assert_eq!(
            policy.refusal("MIRROR.internal", addr("10.9.9.9:8080"), &[]),
            None
        );
        assert!(
            policy
                .refusal("mirror.internal", addr("10.9.9.9:8081"), &[])
                .is_some()
        );
        assert_eq!(policy.refusal("x", addr("127.0.0.1:5000"), &[]), None);
        assert!(policy.refusal("x", addr("127.0.0.1:4000"), &[]).is_some());
        assert_eq!(policy.refusal("x", addr("[fd00::5]:443"), &[]), None);
        for bad in ["", "10.0.0.0/33", "a b", "host:port", "[::1"] {
            assert!(Policy::new(&[bad.into()], Vec::new()).is_err(), "{bad}");
        }
    }
}
