//! The egress guard: the one check every outbound connection of every service passes.
//!
//! It decides on **resolved addresses** (names are resolved first, asynchronously, and the
//! connection is then made to the exact address that was checked, so DNS rebinding between
//! check and connect cannot switch it). Refused unless explicitly allowed: loopback, RFC 1918,
//! CGNAT, link-local, multicast, broadcast, unspecified, reserved and documentation ranges,
//! ULA, and the IPv6 forms that embed an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64,
//! 6to4, Teredo) whenever the embedded address is refused. Cloud metadata endpoints
//! (`169.254.169.254`, `fd00:ec2::254`, `100.100.100.200`, …) are refused even when a
//! surrounding range is allowed, unless the exact address is allowed. The guard also refuses
//! the process's own listeners (forward-proxy loops).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::{Error, ErrorCode};

/// An IP network in CIDR form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }

    /// True when this network is exactly one address.
    pub fn is_host(&self) -> bool {
        self.prefix == if self.addr.is_ipv4() { 32 } else { 128 }
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| format!("invalid address in {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p.parse::<u8>().map_err(|_| format!("invalid prefix in {s:?}"))?,
            None => max,
        };
        Cidr::new(addr, prefix).ok_or_else(|| format!("prefix too long in {s:?}"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why an address is not public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Public,
    Loopback,
    Private,
    SharedCgnat,
    LinkLocal,
    Multicast,
    Broadcast,
    Unspecified,
    Reserved,
    Documentation,
    UniqueLocal,
    Metadata,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Public => "public",
            Class::Loopback => "loopback",
            Class::Private => "private",
            Class::SharedCgnat => "cgnat",
            Class::LinkLocal => "link_local",
            Class::Multicast => "multicast",
            Class::Broadcast => "broadcast",
            Class::Unspecified => "unspecified",
            Class::Reserved => "reserved",
            Class::Documentation => "documentation",
            Class::UniqueLocal => "unique_local",
            Class::Metadata => "metadata",
        }
    }
}

const METADATA: &[IpAddr] = &[
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)), // AWS, GCP, Azure, OpenStack, …
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),   // AWS ECS task metadata
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 123)), // AWS time sync
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)), // Alibaba Cloud
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),     // Oracle Cloud
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)), // AWS IMDS IPv6
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0023)), // AWS DNS IPv6
];

fn is_metadata(ip: IpAddr) -> bool {
    METADATA.contains(&ip)
}

fn classify_v4(ip: Ipv4Addr) -> Class {
    let o = ip.octets();
    if is_metadata(IpAddr::V4(ip)) {
        return Class::Metadata;
    }
    match o {
        [0, ..] => Class::Unspecified,
        [127, ..] => Class::Loopback,
        [10, ..] => Class::Private,
        [172, b, ..] if (16..=31).contains(&b) => Class::Private,
        [192, 168, ..] => Class::Private,
        [100, b, ..] if (64..=127).contains(&b) => Class::SharedCgnat,
        [169, 254, ..] => Class::LinkLocal,
        [192, 0, 0, _] => Class::Reserved, // IETF protocol assignments
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Class::Documentation,
        [198, 18..=19, ..] => Class::Reserved, // benchmarking
        [192, 88, 99, _] => Class::Reserved,   // 6to4 relay anycast (deprecated)
        [255, 255, 255, 255] => Class::Broadcast,
        [224..=239, ..] => Class::Multicast,
        [240..=255, ..] => Class::Reserved,
        _ => Class::Public,
    }
}

/// The IPv4 address an IPv6 address embeds, for the forms that route to IPv4 space.
pub fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // ::ffff:a.b.c.d (mapped) and ::ffff:0:a.b.c.d (translated)
    if s[0..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff) {
        return Some(v4(s[6], s[7]));
    }
    if s[0..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        return Some(v4(s[6], s[7]));
    }
    // ::a.b.c.d (IPv4-compatible, deprecated) — but not :: and ::1 themselves
    if s[0..6] == [0, 0, 0, 0, 0, 0] && (s[6] != 0 || s[7] > 1) {
        return Some(v4(s[6], s[7]));
    }
    // NAT64 well-known prefix 64:ff9b::/96 and local-use 64:ff9b:1::/48
    if s[0] == 0x64 && s[1] == 0xff9b && (s[2..6] == [0, 0, 0, 0] || s[2] == 1) {
        return Some(v4(s[6], s[7]));
    }
    // 6to4 2002:AABB:CCDD::/48
    if s[0] == 0x2002 {
        return Some(v4(s[1], s[2]));
    }
    // Teredo 2001:0000::/32: client address is the last 32 bits, inverted
    if s[0] == 0x2001 && s[1] == 0 {
        return Some(v4(!s[6], !s[7]));
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Class {
    if is_metadata(IpAddr::V6(ip)) {
        return Class::Metadata;
    }
    if ip.is_unspecified() {
        return Class::Unspecified;
    }
    if ip.is_loopback() {
        return Class::Loopback;
    }
    let s = ip.segments();
    if s[0] & 0xff00 == 0xff00 {
        return Class::Multicast;
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return Class::LinkLocal;
    }
    if s[0] & 0xffc0 == 0xfec0 {
        return Class::Reserved; // site-local, deprecated
    }
    if s[0] & 0xfe00 == 0xfc00 {
        return Class::UniqueLocal;
    }
    if s[0] == 0x2001 && s[1] == 0x0db8 {
        return Class::Documentation;
    }
    if s[0] == 0x0100 && s[1..4] == [0, 0, 0] {
        return Class::Reserved; // discard-only 100::/64
    }
    if let Some(v4) = embedded_v4(ip) {
        let c = classify_v4(v4);
        if c != Class::Public {
            return c;
        }
        // Translation forms to a public v4 are still refused: they bypass v4 allowlists and
        // nothing legitimate in this product needs them.
        return Class::Reserved;
    }
    Class::Public
}

pub fn classify(ip: IpAddr) -> Class {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// What may be reached, beyond the public internet.
#[derive(Debug, Clone, Default)]
pub struct EgressPolicy {
    /// Ranges explicitly allowed even though they are not public (e.g. an internal upstream).
    pub allow: Vec<Cidr>,
    /// Addresses refused whatever else is allowed (the process's own listeners).
    pub deny: Vec<SocketAddr>,
    /// Allow everything (CLI talking to a configured endpoint; never for services).
    pub allow_all: bool,
}

impl EgressPolicy {
    pub fn public_only() -> Self {
        EgressPolicy::default()
    }

    pub fn allowing(ranges: impl IntoIterator<Item = Cidr>) -> Self {
        EgressPolicy {
            allow: ranges.into_iter().collect(),
            ..Default::default()
        }
    }

    /// Decide on one resolved address.
    pub fn check(&self, addr: SocketAddr) -> Result<(), Denied> {
        let ip = canonical(addr.ip());
        if self.deny.iter().any(|d| same_endpoint(*d, addr)) {
            return Err(Denied {
                addr,
                class: "own_listener",
            });
        }
        if self.allow_all {
            return Ok(());
        }
        let class = classify(addr.ip());
        if class == Class::Public {
            return Ok(());
        }
        let allowed = if class == Class::Metadata {
            // Only an exact host entry unlocks a metadata address.
            self.allow
                .iter()
                .any(|c| c.is_host() && (c.contains(addr.ip()) || c.contains(ip)))
        } else {
            self.allow.iter().any(|c| c.contains(addr.ip()) || c.contains(ip))
        };
        if allowed {
            Ok(())
        } else {
            Err(Denied {
                addr,
                class: class.as_str(),
            })
        }
    }
}

/// IPv4-mapped IPv6 addresses compare as their IPv4 form.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

fn same_endpoint(listener: SocketAddr, target: SocketAddr) -> bool {
    if listener.port() != target.port() {
        return false;
    }
    let l = canonical(listener.ip());
    let t = canonical(target.ip());
    // A wildcard listener answers on every local address.
    l == t || (l.is_unspecified() && (t.is_loopback() || t.is_unspecified() || classify(t) != Class::Public))
}

#[derive(Debug, Clone)]
pub struct Denied {
    pub addr: SocketAddr,
    pub class: &'static str,
}

impl From<Denied> for Error {
    fn from(d: Denied) -> Error {
        Error::new(
            ErrorCode::EgressDenied,
            format!("destination {} is not allowed ({})", d.addr.ip(), d.class),
        )
        .with_details(serde_json::json!({ "reason": d.class }))
    }
}

/// Name resolution, replaceable in tests by a stub that maps names to loopback canaries.
#[async_trait]
pub trait Resolver: Send + Sync + 'static {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>>;
}

/// The system resolver (getaddrinfo on tokio's blocking pool).
pub struct SystemResolver;

#[async_trait]
impl Resolver for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
        let addrs = tokio::net::lookup_host((host, port)).await?;
        Ok(addrs.collect())
    }
}

/// Parse a host the way `inet_aton` would (decimal, octal, hex and shortened dotted forms), so
/// the guard sees `2130706433`, `0x7f.1` and `0177.0.0.1` as the 127.0.0.1 they are.
pub fn parse_numeric_host(host: &str) -> Option<IpAddr> {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Some(ip);
    }
    let parts: Vec<&str> = h.split('.').collect();
    if parts.is_empty() || parts.len() > 4 || parts.iter().any(|p| p.is_empty()) {
        return None;
    }
    let mut nums = Vec::with_capacity(parts.len());
    for p in &parts {
        let lower = p.to_ascii_lowercase();
        let v = if let Some(hex) = lower.strip_prefix("0x") {
            if hex.is_empty() {
                0
            } else {
                u64::from_str_radix(hex, 16).ok()?
            }
        } else if lower.len() > 1 && lower.starts_with('0') {
            u64::from_str_radix(&lower[1..], 8).ok()?
        } else {
            lower.parse::<u64>().ok()?
        };
        nums.push(v);
    }
    let (last, head) = nums.split_last()?;
    let mut value: u64 = 0;
    for (i, n) in head.iter().enumerate() {
        if *n > 255 {
            return None;
        }
        value |= n << (24 - 8 * i);
    }
    let rest_bits = 32 - 8 * head.len() as u32;
    if rest_bits < 64 && *last >= (1u64 << rest_bits) {
        return None;
    }
    value |= last;
    u32::try_from(value).ok().map(|v| IpAddr::V4(Ipv4Addr::from(v)))
}

/// Resolve and check: every returned address passed the policy. Connect to one of these and
/// never re-resolve.
pub struct EgressGuard {
    pub policy: EgressPolicy,
    resolver: Arc<dyn Resolver>,
}

impl EgressGuard {
    pub fn new(policy: EgressPolicy, resolver: Arc<dyn Resolver>) -> Self {
        EgressGuard { policy, resolver }
    }

    pub fn system(policy: EgressPolicy) -> Self {
        EgressGuard::new(policy, Arc::new(SystemResolver))
    }

    /// Resolve `host:port` and return the addresses that pass. If any resolved address is
    /// refused the whole name is refused: a name that mixes public and private answers is an
    /// attack, not a fallback.
    pub async fn resolve_checked(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, Error> {
        if host.is_empty() {
            return Err(Error::new(ErrorCode::EgressDenied, "empty destination host"));
        }
        let addrs = if let Some(ip) = parse_numeric_host(host) {
            vec![SocketAddr::new(ip, port)]
        } else {
            match self.resolver.resolve(host, port).await {
                Ok(a) if !a.is_empty() => a,
                Ok(_) | Err(_) => {
                    return Err(Error::new(
                        ErrorCode::UpstreamUnreachable,
                        format!("cannot resolve {host}"),
                    ));
                }
            }
        };
        for a in &addrs {
            self.policy.check(*a)?;
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(s: &str) -> bool {
        let ip: IpAddr = s.parse().unwrap();
        EgressPolicy::public_only().check(SocketAddr::new(ip, 443)).is_err()
    }

    #[test]
    fn refuses_every_non_public_form() {
        for s in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.0.1",
            "169.254.169.254",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::ffff:0:10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "2001:db8::1",
        ] {
            assert!(denied(s), "{s} must be refused");
        }
        for s in [
            "93.184.216.34",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "172.32.0.1",
            "100.128.0.1",
        ] {
            assert!(!denied(s), "{s} must be allowed");
        }
    }

    #[test]
    fn teredo_embeds_inverted_client() {
        // Client 127.0.0.1 inverted is 0x80ff:0xfffe.
        let ip: Ipv6Addr = "2001:0:4136:e378:8000:63bf:80ff:fffe".parse().unwrap();
        assert_eq!(embedded_v4(ip), Some(Ipv4Addr::new(127, 0, 0, 1)));
    }

    #[test]
    fn allowlist_opens_ranges_but_metadata_needs_an_exact_entry() {
        let p = EgressPolicy::allowing(["169.254.0.0/16".parse().unwrap(), "10.0.0.0/8".parse().unwrap()]);
        let at = |s: &str| SocketAddr::new(s.parse().unwrap(), 80);
        assert!(p.check(at("10.1.2.3")).is_ok());
        assert!(p.check(at("169.254.1.1")).is_ok());
        assert!(p.check(at("169.254.169.254")).is_err());
        let p = EgressPolicy::allowing(["169.254.169.254".parse().unwrap()]);
        assert!(p.check(at("169.254.169.254")).is_ok());
    }

    #[test]
    fn own_listeners_are_refused() {
        let mut p = EgressPolicy::allowing(["127.0.0.0/8".parse().unwrap()]);
        p.deny.push("0.0.0.0:7400".parse().unwrap());
        assert!(p.check("127.0.0.1:7400".parse().unwrap()).is_err());
        assert!(p.check("127.0.0.1:7401".parse().unwrap()).is_ok());
        assert!(p.check("[::ffff:127.0.0.1]:7400".parse().unwrap()).is_err());
    }

    #[test]
    fn numeric_host_forms() {
        let lo = Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)));
        for h in [
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "0x7f.1",
            "127.1",
            "127.0.1",
            "[::ffff:127.0.0.1]",
        ] {
            let got = parse_numeric_host(h).map(canonical);
            assert_eq!(got, lo, "{h}");
        }
        assert_eq!(parse_numeric_host("example.com"), None);
        assert_eq!(parse_numeric_host("256.0.0.1"), None);
        assert_eq!(parse_numeric_host("1.2.3.4.5"), None);
        assert_eq!(parse_numeric_host("4294967296"), None);
    }

    struct Stub(Vec<SocketAddr>);
    #[async_trait]
    impl Resolver for Stub {
        async fn resolve(&self, _h: &str, _p: u16) -> std::io::Result<Vec<SocketAddr>> {
            Ok(self.0.clone())
        }
    }

    #[tokio::test]
    async fn names_resolving_to_private_addresses_are_refused() {
        let g = EgressGuard::new(
            EgressPolicy::public_only(),
            Arc::new(Stub(vec![
                "93.184.216.34:80".parse().unwrap(),
                "10.0.0.1:80".parse().unwrap(),
            ])),
        );
        let e = g.resolve_checked("mixed.example", 80).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::EgressDenied);
        let e = g.resolve_checked("2130706433", 80).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::EgressDenied);
    }
}
