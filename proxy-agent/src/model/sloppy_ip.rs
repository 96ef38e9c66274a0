//! Parsing addresses as kube-proxy does (`netutils.ParseIPSloppy`, `ParseCIDRSloppy`): IPv4 octets may carry
//! leading zeros, read as decimal (`10.032.0.041` is 10.32.0.41). Go's parser accepted them before Go 1.17
//! and the API server before Kubernetes 1.23; objects written then are still in old clusters, and
//! kube-proxy serves them. Rust's parser (like Go's since 1.17) refuses them, as octal ambiguity.

use std::net::{IpAddr, Ipv4Addr};

/// An IP address, IPv4 octets with leading zeros allowed.
#[must_use]
pub fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok().or_else(|| parse_ipv4_with_leading_zeros(s).map(IpAddr::V4))
}

/// A CIDR `ADDR/LEN`, the address as [`parse_ip`] reads it and the length in decimal (`/025` is /25).
/// The address is returned as written (host bits kept); callers mask it.
#[must_use]
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let addr = parse_ip(addr)?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.trim_start_matches('0');
    let len: u8 = if len.is_empty() { 0 } else { len.parse().ok()? };
    (len <= max).then_some((addr, len))
}

/// Four dot-separated decimal octets, each all digits with a value of at most 255.
fn parse_ipv4_with_leading_zeros(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = part.trim_start_matches('0');
        *octet = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_zeros_are_decimal_as_in_kube_proxy() {
        // The addresses of kube-proxy's own leading-zero cases.
        assert_eq!(parse_ip("10.32.0.041"), Some(IpAddr::V4(Ipv4Addr::new(10, 32, 0, 41))));
        assert_eq!(parse_ip("192.168.099.022"), Some(IpAddr::V4(Ipv4Addr::new(192, 168, 99, 22))));
        assert_eq!(parse_ip("010.000.000.001"), Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(parse_cidr("203.0.113.000/025"), Some((IpAddr::V4(Ipv4Addr::new(203, 0, 113, 0)), 25)));
        assert_eq!(parse_ip("fd00::1"), Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn what_is_not_an_address_stays_refused() {
        for bad in ["10.32.0.256", "10.32.0", "10.32.0.1.2", "10..0.1", "10.32.0.-1", "10.32.0.1 ", "0x0a.0.0.1", ""] {
            assert_eq!(parse_ip(bad), None, "{bad:?}");
        }
        for bad in ["10.0.0.0/33", "10.0.0.0/", "10.0.0.0", "10.0.0.0/-1", "10.0.0.0/2a", "fd00::/129"] {
            assert_eq!(parse_cidr(bad), None, "{bad:?}");
        }
    }
}
