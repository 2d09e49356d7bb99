//! Which networks the gateway may proxy to (`gateway.upstream_allow` minus
//! `gateway.upstream_deny`).
//!
//! A gateway that proxies to whatever address is registered is an SSRF
//! amplifier: registering `169.254.169.254:80` would expose the cloud metadata
//! service to every client. The list is enforced twice: the registry API
//! refuses such a registration (403 naming the address, through the
//! registry's own `NetworkPolicy`), and discovery drops
//! such an instance before any route sees it, so an address that got into a
//! shared store another way is still never connected to.
//!
//! The default allows loopback and private networks (RFC 1918, unique local
//! IPv6) and denies link-local networks and the known metadata addresses,
//! which a deny entry overrides even inside an allowed network (AWS's IPv6
//! metadata endpoint `fd00:ec2::254` sits inside `fc00::/7`).
//!
//! Both lists are read at start: a config reload keeps the running lists
//! (and warns), because the registry's validation is fixed when it opens.

use std::net::IpAddr;

use ipnet::IpNet;

/// Networks allowed by default.
pub const DEFAULT_ALLOW: &[&str] = &[
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "::1/128",
    "fc00::/7",
];

/// Networks denied by default: link-local (cloud metadata lives there) and the
/// metadata addresses of clouds that put them elsewhere.
pub const DEFAULT_DENY: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
];

/// An allow list minus a deny list; deny wins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl Default for UpstreamPolicy {
    fn default() -> Self {
        let parse = |l: &[&str]| l.iter().filter_map(|s| parse_net(s).ok()).collect();
        Self {
            allow: parse(DEFAULT_ALLOW),
            deny: parse(DEFAULT_DENY),
        }
    }
}

impl UpstreamPolicy {
    /// A policy from already parsed networks.
    pub fn new(allow: Vec<IpNet>, deny: Vec<IpNet>) -> Self {
        Self { allow, deny }
    }

    /// True when the gateway may connect to `ip`. IPv4-mapped IPv6 addresses
    /// are judged as the IPv4 address they carry.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|n| n.contains(&ip)) && !self.deny.iter().any(|n| n.contains(&ip))
    }

    /// The same lists as the registry's policy for registrations (hostnames
    /// stay accepted there: the gateway never resolves them, so it never
    /// proxies to them).
    pub fn to_registry(&self) -> switchboard_registry::NetworkPolicy {
        let mut p = switchboard_registry::NetworkPolicy::default();
        p.allowed.clone_from(&self.allow);
        p.denied.clone_from(&self.deny);
        p
    }

    /// Why `ip` is refused, for error messages; `None` when it is permitted.
    pub fn refusal(&self, ip: IpAddr) -> Option<String> {
        if self.permits(ip) {
            return None;
        }
        Some(format!(
            "upstream address {ip} is not in an allowed network (gateway.upstream_allow = [{}], gateway.upstream_deny = [{}])",
            join(&self.allow),
            join(&self.deny)
        ))
    }
}

fn join(nets: &[IpNet]) -> String {
    nets.iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses `10.0.0.0/8`, `::1/128`, or a bare address (a single host).
/// Host bits set below the prefix are an error: `10.0.0.1/8` is almost
/// always a typo for something else.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("`{s}` is not a network (use CIDR like `10.0.0.0/8`)"))?;
    if net.trunc() != net {
        return Err(format!(
            "`{s}` has host bits set below the prefix (did you mean `{}`?)",
            net.trunc()
        ));
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_refuses_metadata_and_allows_private() {
        let p = UpstreamPolicy::default();
        for ok in ["127.0.0.1", "10.1.2.3", "192.168.1.1", "::1", "fd12::1"] {
            assert!(p.permits(ok.parse().unwrap()), "{ok}");
        }
        for bad in [
            "169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "8.8.8.8",
            "0.0.0.0",
            "::ffff:169.254.169.254",
            "fe80::1",
        ] {
            assert!(!p.permits(bad.parse().unwrap()), "{bad}");
        }
        let why = p.refusal("169.254.169.254".parse().unwrap()).unwrap();
        assert!(why.contains("169.254.169.254"), "{why}");
    }

    #[test]
    fn parse_errors_name_the_input() {
        assert!(parse_net("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse_net("nope").unwrap_err().contains("`nope`"));
        assert_eq!(
            parse_net("10.0.0.7").unwrap(),
            "10.0.0.7/32".parse().unwrap()
        );
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_net(&s);
        }

        #[test]
        fn v4_networks_round_trip(a in proptest::prelude::any::<u32>(), len in 0u8..=32) {
            let net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(a), len).unwrap().trunc();
            let parsed = parse_net(&net.to_string()).unwrap();
            proptest::prop_assert_eq!(parsed, IpNet::V4(net));
            let p = UpstreamPolicy::new(vec![parsed], vec![]);
            proptest::prop_assert!(p.permits(IpAddr::V4(net.network())));
            proptest::prop_assert!(p.permits(IpAddr::V4(net.broadcast())));
        }

        #[test]
        fn deny_always_wins(a in proptest::prelude::any::<u32>()) {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(a));
            let all: IpNet = "0.0.0.0/0".parse().unwrap();
            let p = UpstreamPolicy::new(vec![all], vec![IpNet::from(ip)]);
            proptest::prop_assert!(!p.permits(ip));
        }
    }
}
