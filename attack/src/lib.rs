//! Dev-only attack harness: a hostile peer attacks real `node` processes in a test bed and
//! measures what each attack achieved. Needs root (network namespaces).
//!
//! # What runs where
//!
//! [`run_suite`] starts one [`Cluster`] per key setting: `NODES` scheduler nodes (both logical
//! clusters, both HTTP ports), each in its own `testbed` namespace, a third-party listener
//! (`attack-sink`, counting every byte it receives on UDP and TCP at the gossip ports) in
//! another namespace, and a spare namespace for the wrong-key member. The hostile peer runs in
//! this process, in the root namespace, bound to the bed's bridge address; it does not spoof its
//! source address unless asked to ([`run_suite_with`]: then forged datagrams also go out under
//! the claimed sender's address, as an attacker on the same link could send them). All traffic
//! stays on the bed's bridge, inside `198.18.0.0/15`.
//!
//! # The attacker's knowledge
//!
//! The attacker reads `GET /v1/members` (the internal API has no authentication), so it knows
//! every member's UUID, address and role, and who is oldest. In keyless runs it also sniffs
//! the bridge ([`capture`]), so it learns exact identities and incarnations and can forge
//! packets foca accepts. In keyed runs it has no key: every forged message is sent twice, in
//! the clear and sealed with a key of its own, and the replay attack resends real sealed
//! datagrams it captured. No attack models a holder of the cluster key; the wrong-key member
//! is a real `node` started with another key (in keyless runs: with a key, where the cluster
//! has none).
//!
//! # What a row measures
//!
//! See [`Row`]. After every attack one honest node is killed with SIGKILL and every survivor
//! must log the smaller list; the node is then restarted. When an attack left damage (any
//! failed check), the cluster is rebuilt before the next one, so rows do not contaminate
//! each other.

use std::fmt::Write as _;

use serde::Serialize;

pub mod capture;
pub mod cluster;
pub mod hostile;

pub use cluster::{Binaries, Cluster};

/// Honest nodes per cluster.
pub const NODES: usize = 4;
/// The largest RSS growth of a node that an attack may cause.
pub const RSS_LIMIT: u64 = 10 << 20;

/// Why the harness could not run an attack (not: that an attack succeeded).
#[derive(Debug, thiserror::Error)]
pub enum AttackError {
    /// The test bed failed.
    #[error(transparent)]
    Testbed(#[from] testbed::TestbedError),
    /// A socket or file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The honest cluster could not be brought to a known state.
    #[error("{0}")]
    Cluster(String),
}

/// One attack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// A Pull claiming `have_ver = u64::MAX` and a List at `u64::MAX - 1` to every node.
    VersionCapture,
    /// A SyncRequest by UDP and by TCP, and a foca Announce, whose `from` is a third party.
    Reflection,
    /// One stream sync listing thousands of fake members, to every node.
    SyncFlood,
    /// Many idle TCP connections held at every node's gossip ports.
    StreamHold,
    /// 1,000 idle connections to each node's public and private HTTP port.
    HttpHold,
    /// Independent suspicions and a foca suspicion, at the highest incarnation, of a member.
    ForgedSuspect,
    /// foca gossip declaring a live member down.
    ForgedDead,
    /// A Leave naming a live member.
    ForgedLeave,
    /// Real datagrams captured on the bridge, resent later.
    Replay,
    /// Random bytes at every port, UDP and TCP, gossip and HTTP.
    RandomBytes,
    /// A real node started with another key.
    WrongKey,
}

impl Attack {
    /// Every attack, in the order they run.
    pub const ALL: [Attack; 11] = [
        Attack::VersionCapture,
        Attack::Reflection,
        Attack::SyncFlood,
        Attack::StreamHold,
        Attack::HttpHold,
        Attack::ForgedSuspect,
        Attack::ForgedDead,
        Attack::ForgedLeave,
        Attack::Replay,
        Attack::RandomBytes,
        Attack::WrongKey,
    ];

    /// The name in tables and in `summary.json`.
    pub fn name(self) -> &'static str {
        match self {
            Attack::VersionCapture => "version capture",
            Attack::Reflection => "reflection",
            Attack::SyncFlood => "sync flood",
            Attack::StreamHold => "stream hold",
            Attack::HttpHold => "http hold",
            Attack::ForgedSuspect => "forged suspect",
            Attack::ForgedDead => "forged dead",
            Attack::ForgedLeave => "forged leave",
            Attack::Replay => "replay",
            Attack::RandomBytes => "random bytes",
            Attack::WrongKey => "wrong-key member",
        }
    }

    /// The name when forged datagrams also carry the claimed sender's source address.
    pub fn spoofed_name(self) -> &'static str {
        match self {
            Attack::VersionCapture => "version capture+spoof",
            Attack::Reflection => "reflection+spoof",
            Attack::SyncFlood => "sync flood+spoof",
            Attack::StreamHold => "stream hold+spoof",
            Attack::HttpHold => "http hold+spoof",
            Attack::ForgedSuspect => "forged suspect+spoof",
            Attack::ForgedDead => "forged dead+spoof",
            Attack::ForgedLeave => "forged leave+spoof",
            Attack::Replay => "replay+spoof",
            Attack::RandomBytes => "random bytes+spoof",
            Attack::WrongKey => "wrong-key member+spoof",
        }
    }
}

/// What one attack achieved against one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The attack's name.
    pub attack: &'static str,
    /// Whether the cluster ran with `--cluster_key_file`.
    pub key: bool,
    /// Whether any honest node logged a member list during the attack or shortly after.
    pub view_changed: bool,
    /// Bytes the third-party listener received during the attack or shortly after.
    pub third_party_bytes: u64,
    /// The largest VmRSS growth of any honest node across the attack.
    pub rss_growth_bytes: u64,
    /// Whether, after the attack, every survivor of a SIGKILL logged the smaller list in time.
    pub lists_update_after: bool,
    /// Side checks that failed (e.g. `/healthz` did not answer); not part of the JSON.
    #[serde(skip)]
    pub problems: Vec<String>,
}

impl Row {
    /// Every way this row falls short of "the attack achieved nothing"; empty when it passes.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.view_changed {
            out.push("an honest node logged a new member list".to_owned());
        }
        if self.third_party_bytes > 0 {
            out.push(format!(
                "{} bytes reached the third address",
                self.third_party_bytes
            ));
        }
        if self.rss_growth_bytes >= RSS_LIMIT {
            out.push(format!(
                "a node's RSS grew by {} bytes",
                self.rss_growth_bytes
            ));
        }
        if !self.lists_update_after {
            out.push("survivors did not all log the smaller list after a kill".to_owned());
        }
        out.extend(self.problems.iter().cloned());
        out
    }
}

/// Runs `attacks` against one fresh cluster, with or without a key, one row per attack.
pub fn run_suite(bins: &Binaries, key: bool, attacks: &[Attack]) -> Result<Vec<Row>, AttackError> {
    run_suite_with(bins, key, false, attacks)
}

/// [`run_suite`], where `spoof` also sends every forged datagram under the source address of
/// whoever it claims to come from (an attacker on the same link, where nothing stops forged
/// source addresses; cloud networks drop them). Streams cannot be spoofed.
pub fn run_suite_with(
    bins: &Binaries,
    key: bool,
    spoof: bool,
    attacks: &[Attack],
) -> Result<Vec<Row>, AttackError> {
    let mut cluster = Cluster::start(bins, key, NODES)?;
    let mut rows = Vec::new();
    for &attack in attacks {
        cluster.ensure_healthy()?;
        let t = std::time::Instant::now();
        let row = hostile::run(&mut cluster, attack, spoof)?;
        let damaged = !row.failures().is_empty();
        eprintln!(
            "attack: {} (key: {key}, {:.0} s): {}",
            if spoof {
                attack.spoofed_name()
            } else {
                attack.name()
            },
            t.elapsed().as_secs_f64(),
            if damaged {
                row.failures().join("; ")
            } else {
                "no effect".to_owned()
            }
        );
        rows.push(row);
        if damaged && attack != *attacks.last().unwrap_or(&attack) {
            // Start the next attack from a clean cluster rather than from this one's damage.
            cluster.rebuild()?;
        }
    }
    Ok(rows)
}

/// The table: one line per row, with the columns of the summary.
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<22} {:<5} {:<12} {:>24} {:>14} {:>25}\n",
        "attack",
        "key",
        "view changed",
        "bytes to third address",
        "RSS growth",
        "lists update after kill"
    );
    let yes = |b: bool| if b { "yes" } else { "no" };
    for r in rows {
        let _ = writeln!(
            s,
            "{:<22} {:<5} {:<12} {:>24} {:>14} {:>25}",
            r.attack,
            yes(r.key),
            yes(r.view_changed),
            r.third_party_bytes,
            format!("{:.1} MB", r.rss_growth_bytes as f64 / (1 << 20) as f64),
            yes(r.lists_update_after)
        );
    }
    for r in rows {
        for p in &r.problems {
            let _ = writeln!(s, "note: {} (key: {}): {p}", r.attack, yes(r.key));
        }
    }
    s
}

/// `summary.json`: a JSON list of the rows with exactly the fields of [`Row`].
pub fn summary_json(rows: &[Row]) -> String {
    let mut s = serde_json::to_string_pretty(rows).unwrap_or_else(|_| "[]".to_owned());
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(view_changed: bool) -> Row {
        Row {
            attack: "replay",
            key: true,
            view_changed,
            third_party_bytes: 0,
            rss_growth_bytes: 1 << 20,
            lists_update_after: true,
            problems: vec![],
        }
    }

    #[test]
    fn the_summary_has_exactly_the_row_fields() {
        let v: serde_json::Value = serde_json::from_str(&summary_json(&[row(false)])).unwrap();
        let obj = v[0].as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "attack",
                "key",
                "lists_update_after",
                "rss_growth_bytes",
                "third_party_bytes",
                "view_changed"
            ]
        );
        assert_eq!(obj["attack"], "replay");
    }

    #[test]
    fn a_row_fails_on_any_effect() {
        assert!(row(false).failures().is_empty());
        assert_eq!(row(true).failures().len(), 1);
        let mut r = row(false);
        r.rss_growth_bytes = RSS_LIMIT;
        r.third_party_bytes = 1;
        r.problems.push("healthz".into());
        assert_eq!(r.failures().len(), 3);
        assert!(table(&[r]).contains("note: replay (key: yes): healthz"));
    }
}
