//! Picks the private IP from the host's interfaces, as `--private_ip_selector` asks.

use std::fmt::Write as _;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use crate::NodeError;

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    /// The interface name, e.g. `eth0`.
    pub name: String,
    /// The address.
    pub ip: IpAddr,
    /// The prefix length of the address's network.
    pub prefix: u8,
    /// Whether this is a loopback interface.
    pub loopback: bool,
}

/// The chosen private IP, and what was passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The private IP.
    pub ip: IpAddr,
    /// The interface that holds it.
    pub iface: String,
    /// Other addresses inside the selector, higher than the chosen one.
    pub skipped: Vec<IpAddr>,
}

/// Lists the host's interface addresses.
pub fn system_interfaces() -> Result<Vec<Iface>, NodeError> {
    let list = if_addrs::get_if_addrs().map_err(NodeError::Interfaces)?;
    Ok(list
        .into_iter()
        .map(|i| {
            let prefix = match &i.addr {
                if_addrs::IfAddr::V4(a) => a.prefixlen,
                if_addrs::IfAddr::V6(a) => a.prefixlen,
            };
            Iface {
                loopback: i.is_loopback(),
                ip: i.ip(),
                prefix,
                name: i.name,
            }
        })
        .collect())
}

/// Whether an address is private: RFC 1918 for IPv4, ULA (`fc00::/7`) for IPv6.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Whether an address is IPv6 link-local unicast (`fe80::/10`). Such an address means
/// something only together with an interface (a scope), which member addresses do not carry,
/// so it is never chosen as the private IP.
pub fn is_link_local(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
}

fn describe(ifaces: &[Iface]) -> String {
    let mut names: Vec<&str> = ifaces.iter().map(|i| i.name.as_str()).collect();
    names.dedup();
    let mut out = String::new();
    let mut seen = Vec::new();
    for name in names {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let addrs: Vec<String> = ifaces
            .iter()
            .filter(|i| i.name == name)
            .map(|i| format!("{}/{}", i.ip, i.prefix))
            .collect();
        let _ = write!(out, "\n  {name}: {}", addrs.join(", "));
    }
    if out.is_empty() {
        out.push_str("\n  (no interface has an address)");
    }
    out
}

/// Chooses the private IP.
///
/// - With a selector: the lowest interface address inside it. On Linux every address of
///   `127.0.0.0/8` answers on `lo`, so a single-host selector such as `127.0.0.21/32` inside a
///   loopback network selects that address; this lets several nodes share one host in tests.
///   IPv6 link-local addresses (`fe80::/10`) are never chosen, even by a selector that covers
///   them such as `::/0`: peers could not reach them without the interface's scope.
/// - Without one: the only non-loopback private address, if there is exactly one.
pub fn choose(selector: Option<IpNetwork>, ifaces: &[Iface]) -> Result<Choice, NodeError> {
    match selector {
        Some(net) => {
            let inside = ifaces.iter().filter(|i| net.contains(i.ip));
            let link_local: Vec<&Iface> = inside.clone().filter(|i| is_link_local(i.ip)).collect();
            let mut matches: Vec<(IpAddr, &str)> = inside
                .filter(|i| !is_link_local(i.ip))
                .map(|i| (i.ip, i.name.as_str()))
                .collect();
            let host_prefix = if net.is_ipv4() { 32 } else { 128 };
            if matches.is_empty() && net.prefix() == host_prefix {
                let ip = net.ip();
                if let Some(lo) = ifaces.iter().find(|i| {
                    i.loopback && IpNetwork::new(i.ip, i.prefix).is_ok_and(|n| n.contains(ip))
                }) {
                    matches.push((ip, lo.name.as_str()));
                }
            }
            matches.sort();
            matches.dedup();
            if matches.is_empty() && !link_local.is_empty() {
                let list: Vec<String> = link_local
                    .iter()
                    .map(|i| format!("{} on {}", i.ip, i.name))
                    .collect();
                return Err(NodeError::Address(format!(
                    "--private_ip_selector {net} matches only IPv6 link-local addresses ({}), which peers cannot reach without an interface scope; the interfaces are:{}\ngive the interface a global or ULA IPv6 address and set --private_ip_selector (or NODE_PRIVATE_IP_SELECTOR) to a CIDR that holds it, e.g. its /64",
                    list.join(", "),
                    describe(ifaces)
                )));
            }
            let Some(&(ip, iface)) = matches.first() else {
                return Err(NodeError::Address(format!(
                    "no interface address is inside --private_ip_selector {net}; the interfaces are:{}\nset --private_ip_selector (or NODE_PRIVATE_IP_SELECTOR) to a CIDR that holds exactly the address peers should use",
                    describe(ifaces)
                )));
            };
            Ok(Choice {
                ip,
                iface: iface.to_owned(),
                skipped: matches[1..].iter().map(|m| m.0).collect(),
            })
        }
        None => {
            let mut private: Vec<&Iface> = ifaces
                .iter()
                .filter(|i| !i.loopback && is_private(i.ip))
                .collect();
            private.sort_by_key(|i| i.ip);
            private.dedup_by_key(|i| i.ip);
            match private.as_slice() {
                [one] => Ok(Choice {
                    ip: one.ip,
                    iface: one.name.clone(),
                    skipped: Vec::new(),
                }),
                [] => Err(NodeError::Address(format!(
                    "--private_ip_selector is not set and no interface has a private (RFC 1918 or ULA) address; the interfaces are:{}\nset --private_ip_selector (or NODE_PRIVATE_IP_SELECTOR) to the CIDR of the network peers share, e.g. 10.0.0.0/8",
                    describe(ifaces)
                ))),
                many => {
                    let list: Vec<String> = many
                        .iter()
                        .map(|i| format!("{} on {}", i.ip, i.name))
                        .collect();
                    Err(NodeError::Address(format!(
                        "--private_ip_selector is not set and the host has {} private addresses: {}\nset --private_ip_selector (or NODE_PRIVATE_IP_SELECTOR) to a CIDR that holds the one peers should use, e.g. {}/32",
                        many.len(),
                        list.join(", "),
                        many[0].ip
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn i(name: &str, ip: &str, prefix: u8, loopback: bool) -> Iface {
        Iface {
            name: name.into(),
            ip: ip.parse().unwrap(),
            prefix,
            loopback,
        }
    }

    fn host() -> Vec<Iface> {
        vec![
            i("lo", "127.0.0.1", 8, true),
            i("lo", "::1", 128, true),
            i("eth0", "10.0.0.9", 24, false),
            i("eth0", "10.0.0.5", 24, false),
            i("eth1", "192.168.7.2", 24, false),
            i("eth2", "203.0.113.4", 24, false),
            i("eth2", "fd12::4", 64, false),
        ]
    }

    #[test]
    fn several_matches_take_the_lowest_and_report_the_rest() {
        let c = choose(Some("10.0.0.0/8".parse().unwrap()), &host()).unwrap();
        assert_eq!(c.ip, "10.0.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(c.iface, "eth0");
        assert_eq!(c.skipped, vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn ipv6_selectors_work() {
        let c = choose(Some("fd00::/8".parse().unwrap()), &host()).unwrap();
        assert_eq!(c.ip, "fd12::4".parse::<IpAddr>().unwrap());
    }

    fn v6_host() -> Vec<Iface> {
        vec![
            i("lo", "::1", 128, true),
            // Link-local addresses sort before every global one.
            i("eth0", "fe80::1", 64, false),
            i("eth0", "2001:2:0:1::5", 64, false),
            i("eth1", "fe80::2", 64, false),
            i("eth1", "fd00::7", 64, false),
        ]
    }

    #[test]
    fn ipv6_selectors_pick_a_global_address_and_never_a_link_local_one() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (selector, want, iface) in [
            ("2001:2::/48", "2001:2:0:1::5", "eth0"),
            ("2001:2:0:1::5/128", "2001:2:0:1::5", "eth0"),
            ("fd00::/8", "fd00::7", "eth1"),
            // These cover the link-local addresses too, which sort before the rest.
            ("::/0", "::1", "lo"),
            ("8000::/1", "fd00::7", "eth1"),
        ] {
            let c = choose(Some(selector.parse().unwrap()), &v6_host()).unwrap();
            assert_eq!((c.ip, c.iface.as_str()), (ip(want), iface), "{selector}");
            assert!(c.skipped.iter().all(|s| !is_link_local(*s)), "{c:?}");
        }
        // Without loopback, `::/0` picks the lowest global address.
        let no_lo: Vec<Iface> = v6_host().into_iter().filter(|i| !i.loopback).collect();
        let c = choose(Some("::/0".parse().unwrap()), &no_lo).unwrap();
        assert_eq!(c.ip, ip("2001:2:0:1::5"));
        assert_eq!(c.iface, "eth0");
        assert_eq!(c.skipped, vec![ip("fd00::7")]);
    }

    #[test]
    fn a_selector_matching_only_link_local_addresses_names_them_and_the_fix() {
        for selector in ["fe80::/10", "fe80::1/128", "fe00::/7"] {
            let e = choose(Some(selector.parse().unwrap()), &v6_host())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("--private_ip_selector {selector}")),
                "{e}"
            );
            assert!(e.contains("link-local"), "{e}");
            assert!(e.contains("fe80::1 on eth0"), "{e}");
            if selector != "fe80::1/128" {
                assert!(e.contains("fe80::2 on eth1"), "{e}");
            }
            assert!(e.contains("eth0: fe80::1/64, 2001:2:0:1::5/64"), "{e}");
            assert!(e.contains("global or ULA"), "{e}");
        }
        assert!(is_link_local("fe80::1".parse().unwrap()));
        assert!(is_link_local("febf::1".parse().unwrap()));
        assert!(!is_link_local("fec0::1".parse().unwrap()));
        assert!(!is_link_local("169.254.0.1".parse().unwrap()));
    }

    #[test]
    fn no_match_lists_every_interface_and_names_the_flag() {
        let e = choose(Some("172.16.0.0/12".parse().unwrap()), &host())
            .unwrap_err()
            .to_string();
        assert!(e.contains("172.16.0.0/12"), "{e}");
        assert!(e.contains("eth0: 10.0.0.9/24, 10.0.0.5/24"), "{e}");
        assert!(e.contains("lo: 127.0.0.1/8, ::1/128"), "{e}");
        assert!(e.contains("--private_ip_selector"), "{e}");
    }

    #[test]
    fn a_single_loopback_host_selects_that_address() {
        let c = choose(Some("127.0.0.21/32".parse().unwrap()), &host()).unwrap();
        assert_eq!(c.ip, "127.0.0.21".parse::<IpAddr>().unwrap());
        assert_eq!(c.iface, "lo");
        // Only host selectors get that treatment.
        assert!(choose(Some("127.0.1.0/24".parse().unwrap()), &host()).is_err());
    }

    #[test]
    fn without_a_selector_exactly_one_private_address_is_needed() {
        let e = choose(None, &host()).unwrap_err().to_string();
        assert!(e.contains("4 private addresses"), "{e}");
        assert!(e.contains("10.0.0.5 on eth0"), "{e}");
        let one: Vec<Iface> = host()
            .into_iter()
            .filter(|i| i.name == "lo" || i.ip.to_string() == "192.168.7.2")
            .collect();
        assert_eq!(
            choose(None, &one).unwrap().ip,
            "192.168.7.2".parse::<IpAddr>().unwrap()
        );
        let none: Vec<Iface> = host().into_iter().filter(|i| i.loopback).collect();
        let e = choose(None, &none).unwrap_err().to_string();
        assert!(e.contains("no interface has a private"), "{e}");
    }
}
