//! Static discovery: `--static_members`, a comma list of IPs, `IP:port`s and DNS names.
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
        DiscoveryError::Config(e.to_string())
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

/// Parses one entry: `IP`, `IP:port`, `[IPv6]:port`, `host` or `host:port`.
pub fn parse_entry(raw: &str) -> Result<Entry, StaticError> {
    let s = raw.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(Entry::Ip(ip, None));
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(Entry::Ip(
            sa.ip(),
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
        return match tail.strip_prefix(':') {
            None if tail.is_empty() => Ok(Entry::Ip(ip, None)),
            Some(p) => Ok(Entry::Ip(ip, Some(parse_port(s, p)?))),
            None => Err(StaticError::BadEntry {
                entry: s.into(),
                reason: "unexpected text after `]`".into(),
            }),
        };
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(parse_port(s, p)?)),
        None => (s, None),
    };
    if host.contains(':') {
        return Err(StaticError::BadEntry {
            entry: s.into(),
            reason: "an IPv6 address with a port must be written as [addr]:port".into(),
        });
    }
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
        assert!(e.contains("fd00::5:x"), "{e}");
        let e = parse_entry("no spaces allowed").unwrap_err().to_string();
        assert!(e.contains("not an IP address or a DNS name"), "{e}");
        assert_eq!(parse_list(" , ,").unwrap_err(), StaticError::Empty);
        assert!(StaticError::Empty.to_string().contains("--static_members"));
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
