//! The address guard: load goes only to loopback, or to a test network the
//! operator names explicitly with `--allow-net`.
//!
//! A load generator pointed at the wrong address is a denial-of-service
//! tool, so a [`Target`] can only be built through this check. `--allow-net`
//! takes a CIDR inside the private or benchmarking ranges (10/8, 172.16/12,
//! 192.168/16, 100.64/10, 198.18/15, fc00::/7) and at least a /16 (IPv4) or
//! /48 (IPv6): the size of a test network namespace or a lab subnet, never a
//! blanket "all of 10/8".

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target {0:?} is not HOST:PORT (e.g. 127.0.0.1:50051)")]
    Syntax(String),
    #[error("target {target:?} did not resolve: {reason}")]
    Resolve { target: String, reason: String },
    #[error(
        "refusing to send load to {addr} ({target}): only loopback (127.0.0.0/8, ::1) and networks given \
         with --allow-net are allowed{allowed}"
    )]
    NotAllowed { target: String, addr: IpAddr, allowed: String },
    #[error("--allow-net {0:?} is not a CIDR (e.g. 10.200.0.0/24)")]
    CidrSyntax(String),
    #[error(
        "--allow-net {0} is not a test network: it must lie inside 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, \
         100.64.0.0/10, 198.18.0.0/15 or fc00::/7"
    )]
    NotPrivate(AllowedNet),
    #[error("--allow-net {0} is too broad: use at least a /16 (IPv4) or /48 (IPv6)")]
    TooBroad(AllowedNet),
}

/// A network load may go to, checked to be a test network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedNet {
    net: IpAddr,
    prefix: u8,
}

impl AllowedNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => masked_v4(a, self.prefix) == masked_v4(n, self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => masked_v6(a, self.prefix) == masked_v6(n, self.prefix),
            _ => false,
        }
    }
}

fn masked_v4(a: Ipv4Addr, prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::from(a) & (u32::MAX << (32 - u32::from(prefix))) }
}

fn masked_v6(a: Ipv6Addr, prefix: u8) -> u128 {
    if prefix == 0 { 0 } else { u128::from(a) & (u128::MAX << (128 - u32::from(prefix))) }
}

/// The ranges `--allow-net` must fall inside, with their minimum prefix.
fn private_ranges() -> [AllowedNet; 6] {
    let v4 = |a, b, c, d, prefix| AllowedNet { net: IpAddr::V4(Ipv4Addr::new(a, b, c, d)), prefix };
    [
        v4(10, 0, 0, 0, 8),
        v4(172, 16, 0, 0, 12),
        v4(192, 168, 0, 0, 16),
        v4(100, 64, 0, 0, 10),
        v4(198, 18, 0, 0, 15),
        AllowedNet { net: IpAddr::V6(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0)), prefix: 7 },
    ]
}

impl FromStr for AllowedNet {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<AllowedNet, TargetError> {
        let syntax = || TargetError::CidrSyntax(s.to_string());
        let (ip, prefix) = s.trim().split_once('/').ok_or_else(syntax)?;
        let net: IpAddr = ip.parse().map_err(|_| syntax())?;
        let net = net.to_canonical();
        let prefix: u8 = prefix.parse().map_err(|_| syntax())?;
        let (bits, min) = if net.is_ipv4() { (32, 16) } else { (128, 48) };
        if prefix > bits {
            return Err(syntax());
        }
        let cidr = AllowedNet { net, prefix };
        if !private_ranges().iter().any(|r| prefix >= r.prefix && r.contains(net)) {
            return Err(TargetError::NotPrivate(cidr));
        }
        if prefix < min {
            return Err(TargetError::TooBroad(cidr));
        }
        Ok(cidr)
    }
}

impl fmt::Display for AllowedNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// An address load may be sent to. Only [`Target::parse`] and
/// [`Target::loopback`] build one, and both apply the guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    addr: SocketAddr,
}

impl Target {
    /// Parses `HOST:PORT` (an `http://` prefix is accepted), resolves it, and
    /// accepts it only if every address it resolves to is loopback or inside
    /// one of `allowed`: a name that resolves to both is refused.
    pub fn parse(target: &str, allowed: &[AllowedNet]) -> Result<Target, TargetError> {
        let hostport = target.trim().trim_start_matches("http://").trim_end_matches('/');
        if !hostport.contains(':') {
            return Err(TargetError::Syntax(target.to_string()));
        }
        let addrs: Vec<SocketAddr> = hostport
            .to_socket_addrs()
            .map_err(|e| TargetError::Resolve { target: target.to_string(), reason: e.to_string() })?
            .collect();
        let first = *addrs
            .first()
            .ok_or_else(|| TargetError::Resolve { target: target.to_string(), reason: "no addresses".into() })?;
        for a in &addrs {
            check(target, a.ip(), allowed)?;
        }
        Ok(Target { addr: first })
    }

    /// A loopback address (what the scenario runner's own nodes listen on).
    pub fn loopback(addr: SocketAddr) -> Result<Target, TargetError> {
        check(&addr.to_string(), addr.ip(), &[])?;
        Ok(Target { addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn check(target: &str, ip: IpAddr, allowed: &[AllowedNet]) -> Result<(), TargetError> {
    if ip.to_canonical().is_loopback() || allowed.iter().any(|n| n.contains(ip)) {
        return Ok(());
    }
    let allowed = match allowed {
        [] => String::new(),
        nets => format!(" (allowed: {})", nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")),
    };
    Err(TargetError::NotAllowed { target: target.to_string(), addr: ip, allowed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_allowed_everything_else_is_not() {
        assert!(Target::parse("127.0.0.1:50051", &[]).is_ok());
        assert!(Target::parse("http://127.3.2.1:9/", &[]).is_ok());
        assert!(Target::parse("[::1]:50051", &[]).is_ok());
        assert!(Target::parse("[::ffff:127.0.0.1]:50051", &[]).is_ok());
        for bad in ["8.8.8.8:53", "0.0.0.0:50051", "10.1.2.3:50051", "[2001:db8::1]:80", "192.168.1.5:1"] {
            let e = Target::parse(bad, &[]).unwrap_err();
            assert!(matches!(e, TargetError::NotAllowed { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("refusing to send load"), "{e}");
        }
        assert!(matches!(Target::parse("127.0.0.1", &[]), Err(TargetError::Syntax(_))));
    }

    #[test]
    fn allow_net_admits_only_its_range() {
        let net: AllowedNet = "10.200.0.0/24".parse().unwrap();
        assert!(Target::parse("10.200.0.7:50051", &[net]).is_ok());
        let e = Target::parse("10.200.1.7:50051", &[net]).unwrap_err();
        assert!(e.to_string().contains("allowed: 10.200.0.0/24"), "{e}");
        let v6: AllowedNet = "fd00:1:2::/48".parse().unwrap();
        assert!(Target::parse("[fd00:1:2::9]:80", &[v6]).is_ok());
        assert!(Target::parse("[fd00:1:3::9]:80", &[v6]).is_err());
    }

    #[test]
    fn allow_net_must_be_a_narrow_private_range() {
        assert!(matches!("10.0.0.0/8".parse::<AllowedNet>(), Err(TargetError::TooBroad(_))));
        assert!(matches!("172.16.0.0/12".parse::<AllowedNet>(), Err(TargetError::TooBroad(_))));
        assert!(matches!("8.8.8.0/24".parse::<AllowedNet>(), Err(TargetError::NotPrivate(_))));
        assert!(matches!("0.0.0.0/0".parse::<AllowedNet>(), Err(TargetError::NotPrivate(_))));
        assert!(matches!("2001:db8::/48".parse::<AllowedNet>(), Err(TargetError::NotPrivate(_))));
        assert!(matches!("10.1.0.0/33".parse::<AllowedNet>(), Err(TargetError::CidrSyntax(_))));
        assert!(matches!("10.1.0.0".parse::<AllowedNet>(), Err(TargetError::CidrSyntax(_))));
        assert!("192.168.50.0/24".parse::<AllowedNet>().is_ok());
        assert!("172.20.0.0/16".parse::<AllowedNet>().is_ok());
    }
}
