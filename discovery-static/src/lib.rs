//! Static discovery: `--static_members`, a comma list of IPs, `IP:port`s and DNS names.
//!
//! IPv6 addresses are written bare (`fd00::5`) or in brackets (`[fd00::5]`, `[fd00::5]:8081`);
//! an unbracketed one whose last group could be a port (`fd00::5:8081`) is refused as
//! ambiguous, and link-local ones (`fe80::/10`) are refused because they need an interface.
//!
//! DNS names are resolved again at every refresh, so a peer that moves is followed; a name that
//! fails to resolve keeps its last good addresses, so a DNS hiccup never drops a peer. A port,
//! when given, is the peer's `--private_port`; otherwise the local one is assumed. The list is
//! the operator's own, so only `self` is excluded: `--private_ip_selector` picks the local
//! address and does not filter listed peers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use discovery::{BoxFuture, Context, Discover, DiscoveryError, Exclusion, Report};

/// Why a static member list is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StaticError {
    /// The list has no entries.
    #[error(
        "--static_members is empty: list the peers as IP, IP:port, host or host:port, separated by commas"
    )]
    Empty,
    /// One entry cannot be parsed.
    #[error("invalid --static_members entry `{entry}`: {reason}")]
    BadEntry {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<StaticError> for DiscoveryError {
    fn from(e: StaticError) -> Self {
        DiscoveryError::Config(Box::new(e))
    }
}

/// One parsed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A literal address.
    Ip(IpAddr, Option<u16>),
    /// A DNS name, resolved at every refresh.
    Host(String, Option<u16>),
}

impl Entry {
    fn port(&self) -> Option<u16> {
        match self {
            Entry::Ip(_, p) | Entry::Host(_, p) => *p,
        }
    }
}

fn parse_port(entry: &str, p: &str) -> Result<u16, StaticError> {
    let n: u32 = p.parse().map_err(|_| StaticError::BadEntry {
        entry: entry.into(),
        reason: format!("`{p}` is not a port number"),
    })?;
    if n == 0 || n > 65535 - 2000 {
        return Err(StaticError::BadEntry {
            entry: entry.into(),
            reason: format!(
                "port {n} is out of range: it is the peer's --private_port, which must be 1..=63535 so that +2000 fits"
            ),
        });
    }
    Ok(n as u16)
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !label.starts_with('-')
        })
}

/// Refuses a link-local IPv6 address: without an interface (which member addresses do not
/// carry) no peer can reach it.
fn routable(entry: &str, ip: IpAddr) -> Result<IpAddr, StaticError> {
    match ip {
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Err(StaticError::BadEntry {
            entry: entry.into(),
            reason: format!(
                "{v6} is an IPv6 link-local address, usable only with an interface scope: list the peer's global or ULA address instead"
            ),
        }),
        _ => Ok(ip),
    }
}

/// An unbracketed IPv6 address whose last group could be a port, e.g. `fd00::5:8081`: both
/// `fd00::5:8081` and `fd00::5` port 8081 read that way. Only a last group of 4 or 5 decimal
/// digits after a valid address counts, so `fd00::5` or `2001:db8::1:1` are taken as written.
fn ambiguous_v6(s: &str) -> Option<(&str, &str)> {
    let (head, tail) = s.rsplit_once(':')?;
    let port_like = (4..=5).contains(&tail.len())
        && tail.bytes().all(|b| b.is_ascii_digit())
        && tail.parse::<u16>().is_ok_and(|p| p > 0);
    (port_like && head.parse::<std::net::Ipv6Addr>().is_ok()).then_some((head, tail))
}

/// Parses one entry: `IP`, `IP:port`, `[IPv6]`, `[IPv6]:port`, `host` or `host:port`.
pub fn parse_entry(raw: &str) -> Result<Entry, StaticError> {
    let s = raw.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        if let Some((head, tail)) = ambiguous_v6(s) {
            return Err(StaticError::BadEntry {
                entry: s.into(),
                reason: format!(
                    "ambiguous IPv6 entry: write [{head}]:{tail} for address {head} and port {tail}, or [{s}] for the whole address"
                ),
            });
        }
        return Ok(Entry::Ip(routable(s, ip)?, None));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(Entry::Ip(
            routable(s, sa.ip())?,
            Some(parse_port(s, &sa.port().to_string())?),
        ));
    }
    if let Some(rest) = s.strip_prefix('[') {
        // A bracketed IPv6 address without a port, or with a bad one.
        let (inner, tail) = rest.split_once(']').ok_or_else(|| StaticError::BadEntry {
            entry: s.into(),
            reason: "missing `]`".into(),
        })?;
        let ip: IpAddr = inner.parse().map_err(|_| StaticError::BadEntry {
            entry: s.into(),
            reason: format!("`{inner}` is not an IPv6 address"),
        })?;
        let ip = routable(s, ip)?;
        return match tail.strip_prefix(':') {
            None if tail.is_empty() => Ok(Entry::Ip(ip, None)),
            Some(p) => Ok(Entry::Ip(ip, Some(parse_port(s, p)?))),
            None => Err(StaticError::BadEntry {
                entry: s.into(),
                reason: "unexpected text after `]`".into(),
            }),
        };
    }
    if let Some((head, tail)) = s.rsplit_once(':').filter(|(h, _)| h.contains(':')) {
        // Two colons or more and not an address: an IPv6 address with a port, unbracketed.
        return Err(StaticError::BadEntry {
            entry: s.into(),
            reason: format!(
                "an IPv6 address with a port must be written in brackets, as [addr]:port (e.g. [{head}]:{tail}), and a bare one must be a valid IPv6 address"
            ),
        });
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(parse_port(s, p)?)),
        None => (s, None),
    };
    if !valid_host(host) {
        return Err(StaticError::BadEntry {
            entry: s.into(),
            reason: "not an IP address or a DNS name".into(),
        });
    }
    Ok(Entry::Host(host.to_owned(), port))
}

/// Parses the whole comma list. Empty items (a trailing comma) are ignored; an empty list is
/// an error.
pub fn parse_list(raw: &str) -> Result<Vec<Entry>, StaticError> {
    let entries: Vec<Entry> = raw
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_entry)
        .collect::<Result<_, _>>()?;
    if entries.is_empty() {
        return Err(StaticError::Empty);
    }
    Ok(entries)
}

/// Resolves a DNS name to addresses; replaced in tests so that they send no DNS queries.
pub type Resolver =
    Arc<dyn Fn(String, u16) -> BoxFuture<'static, std::io::Result<Vec<IpAddr>>> + Send + Sync>;

/// The system resolver (`getaddrinfo`, through tokio).
pub fn system_resolver() -> Resolver {
    Arc::new(|host: String, port: u16| {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), port)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    })
}

/// The static backend.
pub struct StaticDiscovery {
    entries: Vec<(String, Entry)>,
    ctx: Context,
    resolver: Resolver,
    /// The addresses each DNS entry (by index) last resolved to.
    last_good: Mutex<HashMap<usize, Vec<IpAddr>>>,
}

impl std::fmt::Debug for StaticDiscovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticDiscovery")
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl StaticDiscovery {
    /// Builds the backend from the raw `--static_members` value.
    pub fn new(raw: &str, ctx: Context) -> Result<Arc<Self>, StaticError> {
        Self::with_resolver(raw, ctx, system_resolver())
    }

    /// Builds the backend with another resolver.
    pub fn with_resolver(
        raw: &str,
        ctx: Context,
        resolver: Resolver,
    ) -> Result<Arc<Self>, StaticError> {
        let entries = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| parse_entry(s).map(|e| (s.to_owned(), e)))
            .collect::<Result<Vec<_>, _>>()?;
        if entries.is_empty() {
            return Err(StaticError::Empty);
        }
        Ok(Arc::new(Self {
            entries,
            ctx,
            resolver,
            last_good: Mutex::new(HashMap::new()),
        }))
    }

    /// Resolves one name within 5 s; an empty answer counts as a failure.
    async fn resolve(&self, host: &str, port: u16) -> std::io::Result<Vec<IpAddr>> {
        let found = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            (self.resolver)(host.to_owned(), port),
        )
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "resolution took longer than 5 s",
            )
        })?;
        let mut v = found?;
        if v.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the name has no address",
            ));
        }
        v.sort();
        v.dedup();
        Ok(v)
    }

    async fn round(&self) -> Result<Report, DiscoveryError> {
        let mut report = Report::default();
        let mut failures = Vec::new();
        for (i, (raw, entry)) in self.entries.iter().enumerate() {
            let port = entry.port().unwrap_or(self.ctx.private_port);
            let ips: Vec<IpAddr> = match entry {
                Entry::Ip(ip, _) => vec![*ip],
                Entry::Host(host, _) => match self.resolve(host, port).await {
                    Ok(v) => {
                        self.last_good
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(i, v.clone());
                        v
                    }
                    Err(e) => {
                        // A failure never removes a candidate: the last good answer stands in.
                        let kept = self
                            .last_good
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&i)
                            .cloned()
                            .unwrap_or_default();
                        let reason = if kept.is_empty() {
                            format!("cannot resolve: {e}")
                        } else {
                            format!("cannot resolve: {e}; keeping its last good addresses")
                        };
                        report.excluded.push(Exclusion {
                            id: raw.clone(),
                            reason,
                        });
                        failures.push((host.clone(), e));
                        kept
                    }
                },
            };
            for ip in ips {
                let id = if matches!(entry, Entry::Host(..)) {
                    format!("{raw} ({ip})")
                } else {
                    raw.clone()
                };
                match self.ctx.classify_listed(id, ip, port) {
                    Ok(c) => {
                        if !report
                            .candidates
                            .iter()
                            .any(|x| x.ip == c.ip && x.port == c.port)
                        {
                            report.candidates.push(c);
                        }
                    }
                    Err(x) => report.excluded.push(x),
                }
            }
        }
        // Only when every name failed is the round a failure (the refresh loop then keeps the
        // whole set); otherwise the rest, and the failed names' last good addresses, count.
        if !failures.is_empty() && failures.len() == self.entries.len() {
            let (name, source) = failures.remove(0);
            return Err(DiscoveryError::Resolve { name, source });
        }
        Ok(report)
    }
}

impl Discover for StaticDiscovery {
    fn name(&self) -> &'static str {
        "static"
    }

    fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
        Box::pin(self.round())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use discovery::Role;

    fn ctx() -> Context {
        Context::standalone(
            "default",
            Role::Worker,
            "127.0.0.21".parse().unwrap(),
            8081,
            Some("127.0.0.0/8".parse().unwrap()),
        )
    }

    #[test]
    fn parses_every_entry_form() {
        assert_eq!(
            parse_entry("10.0.0.5").unwrap(),
            Entry::Ip("10.0.0.5".parse().unwrap(), None)
        );
        assert_eq!(
            parse_entry("10.0.0.5:9081").unwrap(),
            Entry::Ip("10.0.0.5".parse().unwrap(), Some(9081))
        );
        assert_eq!(
            parse_entry("fd00::5").unwrap(),
            Entry::Ip("fd00::5".parse().unwrap(), None)
        );
        assert_eq!(
            parse_entry("[fd00::5]:9081").unwrap(),
            Entry::Ip("fd00::5".parse().unwrap(), Some(9081))
        );
        assert_eq!(
            parse_entry("[fd00::5]").unwrap(),
            Entry::Ip("fd00::5".parse().unwrap(), None)
        );
        assert_eq!(
            parse_entry("sched-0.sched.default.svc").unwrap(),
            Entry::Host("sched-0.sched.default.svc".into(), None)
        );
        assert_eq!(
            parse_entry("localhost:9081").unwrap(),
            Entry::Host("localhost".into(), Some(9081))
        );
    }

    #[test]
    fn bad_entries_name_the_entry_and_the_problem() {
        let e = parse_entry("10.0.0.5:70000").unwrap_err().to_string();
        assert!(
            e.contains("`10.0.0.5:70000`") && e.contains("out of range"),
            "{e}"
        );
        let e = parse_entry("10.0.0.5:64000").unwrap_err().to_string();
        assert!(e.contains("+2000"), "{e}");
        let e = parse_entry("fd00::5:x").unwrap_err().to_string();
        assert!(e.contains("fd00::5:x") && e.contains("[fd00::5]:x"), "{e}");
        let e = parse_entry("no spaces allowed").unwrap_err().to_string();
        assert!(e.contains("not an IP address or a DNS name"), "{e}");
        assert_eq!(parse_list(" , ,").unwrap_err(), StaticError::Empty);
        assert!(StaticError::Empty.to_string().contains("--static_members"));
    }

    #[test]
    fn ipv6_entries_need_brackets_for_a_port() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for (raw, want) in [
            ("2001:2::5", Entry::Ip(ip("2001:2::5"), None)),
            ("[2001:2::5]", Entry::Ip(ip("2001:2::5"), None)),
            ("[2001:2::5]:8081", Entry::Ip(ip("2001:2::5"), Some(8081))),
            (
                " [2001:2:0:1::2]:9081 ",
                Entry::Ip(ip("2001:2:0:1::2"), Some(9081)),
            ),
            // Bracketed, the last group is always part of the address.
            ("[2001:2::5:8081]", Entry::Ip(ip("2001:2::5:8081"), None)),
            // Short last groups and hex ones read as written.
            ("2001:db8::1:1", Entry::Ip(ip("2001:db8::1:1"), None)),
            ("fd00::5:beef", Entry::Ip(ip("fd00::5:beef"), None)),
            // `fd00:` is no address, so nothing else could be meant.
            ("fd00::8081", Entry::Ip(ip("fd00::8081"), None)),
            ("2001:2:0:0:0:0:0:8081", Entry::Ip(ip("2001:2::8081"), None)),
            ("::1", Entry::Ip(ip("::1"), None)),
            ("[::1]:8081", Entry::Ip(ip("::1"), Some(8081))),
        ] {
            assert_eq!(parse_entry(raw).unwrap(), want, "{raw}");
        }
        // An unbracketed IPv6 address with a port: the error shows the bracketed form.
        for (raw, hint) in [
            ("2001:2:0:0:0:0:0:5:8081", "[2001:2:0:0:0:0:0:5]:8081"),
            ("fd00::5::8081", "[fd00::5:]:8081"),
            ("2001:2::5:80x", "[2001:2::5]:80x"),
            // 10081 is no hex group: not an address, so a port without brackets.
            ("fd00::1:10081", "[fd00::1]:10081"),
        ] {
            let e = parse_entry(raw).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{raw}`")) && e.contains("brackets") && e.contains(hint),
                "{raw}: {e}"
            );
        }
        // A last group that reads as a port is ambiguous: both spellings are offered.
        for raw in ["2001:2::5:8081", "fd00::1:9081"] {
            let e = parse_entry(raw).unwrap_err().to_string();
            let (head, tail) = raw.rsplit_once(':').unwrap();
            assert!(
                e.contains("ambiguous")
                    && e.contains(&format!("[{head}]:{tail}"))
                    && e.contains(&format!("[{raw}]")),
                "{raw}: {e}"
            );
        }
        // Link-local addresses are refused in every spelling.
        for raw in ["fe80::1", "[fe80::1]", "[fe80::1]:8081", "[fe80::1%2]:8081"] {
            let e = parse_entry(raw).unwrap_err().to_string();
            assert!(
                e.contains("link-local") && e.contains("global or ULA"),
                "{raw}: {e}"
            );
        }
        // Bad ports inside brackets name the range.
        let e = parse_entry("[2001:2::5]:64000").unwrap_err().to_string();
        assert!(e.contains("+2000"), "{e}");
        let e = parse_entry("[2001:2::5]:").unwrap_err().to_string();
        assert!(e.contains("not a port number"), "{e}");
    }

    #[tokio::test]
    async fn ipv6_peers_become_candidates_and_self_is_excluded() {
        let me = Context::standalone(
            "default",
            Role::Worker,
            "2001:2::2".parse().unwrap(),
            8081,
            Some("2001:2::/64".parse().unwrap()),
        );
        let d = StaticDiscovery::new("[2001:2::2]:8081, [2001:2::3]:8081, 2001:2::4", me).unwrap();
        let r = d.discover().await.unwrap();
        let got: Vec<String> = r
            .candidates
            .iter()
            .map(|c| SocketAddr::new(c.ip, c.port).to_string())
            .collect();
        assert_eq!(got, ["[2001:2::3]:8081", "[2001:2::4]:8081"]);
        assert_eq!(r.excluded.len(), 1);
        assert_eq!(r.excluded[0].reason, "self");
    }

    /// Knows `peer.test` and `moving.test` (whose address changes on every lookup) only.
    fn fake_resolver() -> Resolver {
        let n = Arc::new(std::sync::atomic::AtomicU8::new(30));
        Arc::new(move |host: String, _port: u16| {
            let n = n.clone();
            Box::pin(async move {
                match host.as_str() {
                    "peer.test" => Ok(vec!["127.0.0.23".parse().unwrap()]),
                    "moving.test" => {
                        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok(vec![IpAddr::from([127, 0, 0, i])])
                    }
                    _ => Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "no such host",
                    )),
                }
            })
        })
    }

    #[tokio::test]
    async fn names_are_resolved_again_at_every_refresh() {
        let d = StaticDiscovery::with_resolver("moving.test", ctx(), fake_resolver()).unwrap();
        let a = d.discover().await.unwrap().candidates[0].ip;
        let b = d.discover().await.unwrap().candidates[0].ip;
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn excludes_self_and_resolves_names_each_round() {
        let d = StaticDiscovery::with_resolver(
            "127.0.0.21, 127.0.0.22:8081, peer.test:9081, 10.1.1.1:8081",
            ctx(),
            fake_resolver(),
        )
        .unwrap();
        let r = d.discover().await.unwrap();
        let got: Vec<(String, u16)> = r
            .candidates
            .iter()
            .map(|c| (c.ip.to_string(), c.port))
            .collect();
        assert!(got.contains(&("127.0.0.22".into(), 8081)), "{got:?}");
        assert!(got.contains(&("127.0.0.23".into(), 9081)), "{got:?}");
        // Listed peers count even outside the selector; only self is excluded.
        assert!(got.contains(&("10.1.1.1".into(), 8081)), "{got:?}");
        assert!(!got.iter().any(|(ip, _)| ip == "127.0.0.21"));
        let reasons: Vec<&str> = r.excluded.iter().map(|x| x.reason.as_str()).collect();
        assert_eq!(reasons, vec!["self"]);
    }

    /// Answers from a script: each lookup takes the next answer for its name.
    fn scripted_resolver(script: Vec<(&'static str, std::io::Result<Vec<IpAddr>>)>) -> Resolver {
        let script = Arc::new(Mutex::new(std::collections::VecDeque::from(script)));
        Arc::new(move |host: String, _port: u16| {
            let script = script.clone();
            Box::pin(async move {
                let mut s = script.lock().unwrap();
                let at = s
                    .iter()
                    .position(|(h, _)| *h == host)
                    .unwrap_or_else(|| panic!("unexpected lookup of {host}"));
                s.remove(at).unwrap().1
            })
        })
    }

    fn addr_set(r: &Report) -> Vec<String> {
        let mut v: Vec<String> = r.candidates.iter().map(|c| c.ip.to_string()).collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_failed_resolution_keeps_the_names_last_good_addresses() {
        let fail = || {
            Err(std::io::Error::other(
                "temporary failure in name resolution",
            ))
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let d = StaticDiscovery::with_resolver(
            "a.test, b.test",
            ctx(),
            scripted_resolver(vec![
                ("a.test", Ok(vec![ip("127.0.0.31"), ip("127.0.0.32")])),
                ("b.test", Ok(vec![ip("127.0.0.41")])),
                // Round 2: `a.test` fails while `b.test` answers.
                ("a.test", fail()),
                ("b.test", Ok(vec![ip("127.0.0.42")])),
                // Round 3: an empty answer is a failure too.
                ("a.test", Ok(vec![])),
                ("b.test", Ok(vec![ip("127.0.0.42")])),
                // Round 4: `a.test` moves.
                ("a.test", Ok(vec![ip("127.0.0.33")])),
                ("b.test", Ok(vec![ip("127.0.0.42")])),
            ]),
        )
        .unwrap();
        let r = d.discover().await.unwrap();
        assert_eq!(addr_set(&r), ["127.0.0.31", "127.0.0.32", "127.0.0.41"]);
        for _ in 0..2 {
            let r = d.discover().await.unwrap();
            assert_eq!(addr_set(&r), ["127.0.0.31", "127.0.0.32", "127.0.0.42"]);
            let x = r.excluded.iter().find(|x| x.id == "a.test").unwrap();
            assert!(
                x.reason.starts_with("cannot resolve") && x.reason.contains("last good"),
                "{}",
                x.reason
            );
        }
        let r = d.discover().await.unwrap();
        assert_eq!(addr_set(&r), ["127.0.0.33", "127.0.0.42"]);
        assert!(r.excluded.is_empty(), "{:?}", r.excluded);
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_excluded_but_the_rest_count() {
        let d = StaticDiscovery::with_resolver("127.0.0.22, gone.test", ctx(), fake_resolver())
            .unwrap();
        let r = d.discover().await.unwrap();
        assert_eq!(r.candidates.len(), 1);
        assert!(r.excluded[0].reason.starts_with("cannot resolve"));
        let d = StaticDiscovery::with_resolver("gone.test", ctx(), fake_resolver()).unwrap();
        let e = d.discover().await.unwrap_err();
        assert!(e.is_transient());
        assert!(e.to_string().contains("gone.test"));
    }
}
