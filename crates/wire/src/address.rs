//! What counts as one client when limiting what a client may do: its IPv4
//! address (also when mapped into IPv6), or its IPv6 /64 — one host
//! commonly has a whole /64 to pick addresses from. Shared by the runner
//! connector and the API, as the token digests are.

use std::net::{IpAddr, Ipv6Addr};

/// One client, for counting.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct ClientAddress(IpAddr);

impl ClientAddress {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

impl std::fmt::Display for ClientAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(text: &str) -> ClientAddress {
        ClientAddress::of(text.parse().unwrap())
    }

    #[test]
    fn one_ipv6_host_is_one_client_and_mapped_ipv4_is_ipv4() {
        assert_eq!(of("2001:db8::1"), of("2001:db8::ffff:1234"));
        assert_ne!(of("2001:db8::1"), of("2001:db8:0:1::1"));
        assert_eq!(of("::ffff:127.0.0.2"), of("127.0.0.2"));
        assert_eq!(of("2001:db8::1").to_string(), "2001:db8::/64");
    }
}
