//! Where custody may connect on someone else's behalf — a step's egress,
//! a build's source — judged on the address actually connected to, after
//! DNS, so a name that resolves (or rebinds) to a forbidden address gets
//! nowhere:
//!
//! - never loopback, unspecified, link-local (169.254.0.0/16, fe80::/10:
//!   cloud metadata), multicast, or an address of the host itself;
//! - never private ranges (RFC 1918, 100.64.0.0/10, fc00::/7);
//! - unless the operator lists the destination (`HOST[:PORT]`,
//!   `*.DOMAIN[:PORT]`, `IP[:PORT]`, `CIDR[:PORT]`);
//! - and never an address on the `never` list, listed or not.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Where custody may connect on someone else's behalf.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    allowed: Vec<Allowed>,
    /// Never reachable, whatever is allowed (the daemon's runner port).
    never: Vec<SocketAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    /// A host name (as it was asked for), any address it resolves to;
    /// `*.NAME` is any name below NAME.
    Host { name: String, port: Option<u16> },
    /// Addresses in a network.
    Net {
        network: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
}

impl Policy {
    /// Parses the operator's allow list (`HOST[:PORT]`, `*.DOMAIN[:PORT]`,
    /// `IP[:PORT]`, `[V6][:PORT]`, `CIDR[:PORT]`); `never` are addresses
    /// nothing reaches.
    pub fn new(allow: &[String], never: Vec<SocketAddr>) -> Result<Self, String> {
        let allowed = allow
            .iter()
            .map(|entry| parse_allowed(entry))
            .collect::<Result<_, _>>()?;
        Ok(Self { allowed, never })
    }

    /// Whether the allow list is empty.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_empty()
    }

    /// Whether the allow list names `host`, or `addr` (when given).
    pub fn lists(&self, host: &str, addr: Option<SocketAddr>) -> bool {
        let host = host.trim_end_matches('.');
        self.allowed.iter().any(|allowed| match (allowed, addr) {
            (Allowed::Host { name, port }, _) => {
                host_matches(name, host) && port.is_none_or(|p| addr.is_none_or(|a| a.port() == p))
            }
            (
                Allowed::Net {
                    network,
                    prefix,
                    port,
                },
                Some(addr),
            ) => {
                contains(*network, *prefix, canonical(addr.ip()))
                    && port.is_none_or(|p| p == addr.port())
            }
            (
                Allowed::Net {
                    network, prefix, ..
                },
                None,
            ) => host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| contains(*network, *prefix, canonical(ip))),
        })
    }

    /// Why connecting to `addr` for `host` is refused, or `None`: the
    /// allow list wins over everything but `never`.
    pub fn refusal(&self, host: &str, addr: SocketAddr, own: &[IpAddr]) -> Option<&'static str> {
        if self.never.contains(&addr) {
            return Some("is custody's own runner port");
        }
        if self.lists(host, Some(addr)) {
            return None;
        }
        let ip = canonical(addr.ip());
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
        format!(
            "allow entry `{entry}`: {why}; write HOST[:PORT], *.DOMAIN[:PORT], IP[:PORT] or CIDR[:PORT]"
        )
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
    let name = address.strip_prefix("*.").unwrap_or(&address);
    let valid = !name.is_empty()
        && name
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

/// A destination named by host, as a spec's `network:` list and
/// `custody verify --allow-egress` write it: `HOST[:PORT]`,
/// `*.DOMAIN[:PORT]` (any name below DOMAIN), `IP[:PORT]` or `[V6][:PORT]`.
/// Matched against the name a client asked for, never against an address
/// it resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower case, without a trailing dot or brackets; `*.DOMAIN` kept as is.
    name: String,
    port: Option<u16>,
}

impl HostPattern {
    /// Parses `HOST[:PORT]`, `*.DOMAIN[:PORT]`, `IP[:PORT]` or `[V6][:PORT]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("host pattern `{text}`: {why}; write HOST[:PORT], *.DOMAIN[:PORT] or IP[:PORT]")
        };
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(bad("it is empty"));
        }
        let (name, port) = if let Some(rest) = trimmed.strip_prefix('[') {
            let (inside, after) = rest.split_once(']').ok_or_else(|| bad("no closing `]`"))?;
            if inside.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad("not an IPv6 address"));
            }
            match after.strip_prefix(':') {
                Some(port) => (inside, Some(port)),
                None if after.is_empty() => (inside, None),
                None => return Err(bad("unexpected text after `]`")),
            }
        } else if trimmed.parse::<std::net::Ipv6Addr>().is_ok() {
            (trimmed, None)
        } else {
            match trimmed.rsplit_once(':') {
                Some((name, port)) => (name, Some(port)),
                None => (trimmed, None),
            }
        };
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))
            })
            .transpose()?;
        let bare = name.strip_prefix("*.").unwrap_or(name);
        let valid = name.parse::<IpAddr>().is_ok()
            || (!bare.is_empty()
                && !bare.starts_with('.')
                && bare
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')));
        if !valid {
            return Err(bad("not a host name"));
        }
        Ok(Self {
            name: name.trim_end_matches('.').to_ascii_lowercase(),
            port,
        })
    }

    /// Whether this names `host` (a name or an IP literal, brackets
    /// allowed) at `port`.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        let host = host.trim_matches(['[', ']']).trim_end_matches('.');
        host_matches(&self.name, host) && self.port.is_none_or(|p| p == port)
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.port, self.name.contains(':')) {
            (Some(port), true) => write!(f, "[{}]:{port}", self.name),
            (Some(port), false) => write!(f, "{}:{port}", self.name),
            (None, _) => f.write_str(&self.name),
        }
    }
}

/// `pattern` (a name, or `*.DOMAIN` for the names below DOMAIN) names `host`.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            host.len() > domain.len() + 1
                && host.to_ascii_lowercase().ends_with(&format!(".{domain}"))
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
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

/// `HOST:PORT` (or `[V6]:PORT`) split in two; `default` when the port is
/// absent. `None` for a port that is not a number, or no port and no
/// default.
pub fn split_authority(authority: &str, default: Option<u16>) -> Option<(String, u16)> {
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

/// This host's own addresses, on every interface.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(
            split_authority("Example.org:8443", None),
            Some(("Example.org".into(), 8443))
        );
        assert_eq!(split_authority("[::1]:80", None), Some(("::1".into(), 80)));
        assert_eq!(split_authority("[::1]", Some(80)), Some(("::1".into(), 80)));
        assert_eq!(split_authority("host", Some(80)), Some(("host".into(), 80)));
        for bad in ["host", "host:x", ":80", "[::1]:x"] {
            assert_eq!(split_authority(bad, None), None, "{bad}");
        }
    }

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
        for bad in ["", "10.0.0.0/33", "a b", "host:port", "[::1", "*.", "*"] {
            assert!(Policy::new(&[bad.into()], Vec::new()).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_patterns_name_hosts_and_ports_never_what_they_resolve_to() {
        let pattern = |text: &str| HostPattern::parse(text).unwrap();
        assert!(pattern("pypi.org").matches("PyPI.org.", 443));
        assert!(!pattern("pypi.org").matches("evil-pypi.org", 443));
        assert!(pattern("*.pythonhosted.org").matches("files.pythonhosted.org", 443));
        assert!(!pattern("*.pythonhosted.org").matches("pythonhosted.org", 443));
        assert!(!pattern("*.pythonhosted.org").matches("pythonhosted.org.evil", 443));
        assert!(pattern("example.org:8443").matches("example.org", 8443));
        assert!(!pattern("example.org:8443").matches("example.org", 443));
        assert!(pattern("10.1.2.3").matches("10.1.2.3", 80));
        assert!(pattern("[fd00::1]:443").matches("[fd00::1]", 443));
        assert!(pattern("fd00::1").matches("fd00::1", 1));
        assert_eq!(
            pattern("*.Example.org:8080").to_string(),
            "*.example.org:8080"
        );
        for bad in ["", "a b", "host:port", "*.", "*", "[::1", "x/y", "h:99999"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcards_name_the_hosts_below_a_domain_only() {
        let policy =
            Policy::new(&["*.example.org".into(), "10.0.0.0/8".into()], Vec::new()).unwrap();
        assert!(policy.lists("git.example.org", None));
        assert!(policy.lists("A.B.EXAMPLE.ORG", None));
        assert!(!policy.lists("example.org", None));
        assert!(!policy.lists("badexample.org", None));
        assert!(policy.lists("10.1.2.3", None));
        assert!(!policy.lists("11.1.2.3", None));
        assert!(policy.lists("elsewhere", Some(addr("10.9.9.9:22"))));
        assert!(!Policy::default().lists("example.org", None));
    }
}
