//! What each host of a bench cluster sees, read incrementally from the processes' own records
//! (node's log, serf's event-handler file), so waits at N = 200 only read what is new.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::PathBuf;

use membership::parse_logged_lists;

use super::{NODE_PORT, parse_timestamp};

/// The most bytes one poll reads from one file; the rest waits for the next poll.
const READ_CAP: u64 = 64 << 20;
/// A line longer than this (no newline yet) is dropped rather than buffered further.
const PARTIAL_CAP: usize = 1 << 20;
/// A member-list block longer than this is dropped (200 members take about 16 KB).
const BLOCK_CAP: usize = 4 << 20;

/// The complete lines appended to a file since the last read.
#[derive(Debug)]
pub struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    pub fn new(path: PathBuf) -> Self {
        Tail {
            path,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// New complete lines, oldest first; a missing file has none yet.
    pub fn read(&mut self) -> Vec<String> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        let n = f.take(READ_CAP).read_to_end(&mut buf).unwrap_or(0);
        self.offset += n as u64;
        self.partial.extend_from_slice(&buf[..n.min(buf.len())]);
        let Some(last) = self.partial.iter().rposition(|&b| b == b'\n') else {
            if self.partial.len() > PARTIAL_CAP {
                self.partial.clear();
            }
            return Vec::new();
        };
        let rest = self.partial.split_off(last + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        String::from_utf8_lossy(&complete)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// One observation of a host's view.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A whole member list of the all-instances cluster (node): log time, version, members' IPs.
    List {
        t: f64,
        ver: u64,
        members: HashSet<String>,
    },
    /// One membership event (serf): handler time, event, member name.
    Event {
        t: f64,
        event: String,
        member: String,
    },
}

/// Turns node's log lines into member lists, one multi-line block at a time.
#[derive(Debug, Default)]
pub struct NodeParser {
    block: Option<(f64, String)>,
}

impl NodeParser {
    /// Feeds one line; returns a list when this line closes one of the all-instances cluster.
    pub fn feed(&mut self, line: &str) -> Option<Record> {
        if line.contains("Members {size:") {
            // A new opening line abandons an unfinished block.
            self.block = parse_timestamp(line).map(|t| (t, format!("{line}\n")));
            return None;
        }
        let (_, block) = self.block.as_mut()?;
        block.push_str(line);
        block.push('\n');
        if line != "]" {
            if block.len() > BLOCK_CAP {
                self.block = None;
            }
            return None;
        }
        let (t, block) = self.block.take()?;
        let list = parse_logged_lists(&block).into_iter().next()?;
        (list.port() == Some(NODE_PORT)).then(|| Record::List {
            t,
            ver: list.ver,
            members: list
                .members
                .iter()
                .map(|m| m.addr.ip().to_string())
                .collect(),
        })
    }
}

/// Parses one line of serf's event file, `<time> <event> <member>`, whose clock is `offset`
/// seconds behind Unix time (the handler stamps lines with `/proc/uptime`).
pub fn serf_event(line: &str, offset: f64) -> Option<Record> {
    let mut it = line.split_whitespace();
    let t = it.next()?.parse::<f64>().ok()? + offset;
    let event = it.next()?.to_owned();
    let member = it.next()?.to_owned();
    Some(Record::Event { t, event, member })
}

/// When serf's own log first reports `member` failed or left at or after `after` (Unix
/// seconds): `2026/12/02 02:54:14 [INFO] serf: EventMemberFailed: h99 198.18.0.101`. The log
/// has whole seconds (UTC, as the bench sets `TZ`), so this is the middle of that second; it
/// is written before the agent's event coalescing, which delays the handler by 1 to 3 s.
pub fn serf_log_removal(log: &str, member: &str, after: f64) -> Option<f64> {
    log.lines().find_map(|l| {
        // The agent indents its log lines.
        let (stamp, rest) = l.trim_start().split_at_checked(19)?;
        let rest = rest
            .strip_prefix(" [INFO] serf: EventMemberFailed: ")
            .or_else(|| rest.strip_prefix(" [INFO] serf: EventMemberLeave: "))?;
        if rest.split_whitespace().next()? != member {
            return None;
        }
        let (date, time) = stamp.split_once(' ')?;
        let t = parse_timestamp(&format!("{}T{time}Z", date.replace('/', "-")))? + 0.5;
        (t >= after - 0.5).then_some(t)
    })
}

/// A host's current view and how it got there.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// The members it sees now.
    pub members: HashSet<String>,
    /// When it started seeing exactly these members.
    pub since: f64,
    /// Every list it logged: (time, version, size); node only.
    pub lists: Vec<(f64, u64, usize)>,
    /// Every removal event: (time, member); serf only.
    pub removals: Vec<(f64, String)>,
}

impl View {
    /// A view of `members` since `since`.
    pub fn new(members: HashSet<String>, since: f64) -> Self {
        View {
            members,
            since,
            ..View::default()
        }
    }

    /// Applies one record in log order.
    pub fn apply(&mut self, r: Record) {
        match r {
            Record::List { t, ver, members } => {
                self.lists.push((t, ver, members.len()));
                if members != self.members {
                    self.members = members;
                    self.since = t;
                }
            }
            Record::Event { t, event, member } => {
                let changed = if event == "member-join" {
                    self.members.insert(member)
                } else {
                    let gone = self.members.remove(&member);
                    self.removals.push((t, member));
                    gone
                };
                if changed {
                    self.since = t;
                }
            }
        }
    }
}

#[derive(Debug)]
enum Source {
    Node(NodeParser),
    /// The offset of the handler's clock to Unix time.
    Serf(f64),
}

/// Every host's view of one cluster, fed from the hosts' files.
#[derive(Debug)]
pub struct Watch {
    hosts: Vec<(Tail, Source, View)>,
}

impl Watch {
    /// Node hosts, one log file each.
    pub fn node(logs: Vec<PathBuf>) -> Self {
        Watch {
            hosts: logs
                .into_iter()
                .map(|p| {
                    (
                        Tail::new(p),
                        Source::Node(NodeParser::default()),
                        View::default(),
                    )
                })
                .collect(),
        }
    }

    /// Serf hosts, one event file each, stamped `offset` seconds behind Unix time; each host
    /// starts seeing only itself at `started`.
    pub fn serf(events: Vec<PathBuf>, names: Vec<String>, started: f64, offset: f64) -> Self {
        Watch {
            hosts: events
                .into_iter()
                .zip(names)
                .map(|(p, name)| {
                    (
                        Tail::new(p),
                        Source::Serf(offset),
                        View::new(HashSet::from([name]), started),
                    )
                })
                .collect(),
        }
    }

    /// Reads what every host wrote since the last poll.
    pub fn poll(&mut self) {
        for (tail, source, view) in &mut self.hosts {
            for line in tail.read() {
                let record = match source {
                    Source::Node(p) => p.feed(&line),
                    Source::Serf(offset) => serf_event(&line, *offset),
                };
                if let Some(r) = record {
                    view.apply(r);
                }
            }
        }
    }

    /// One host's view.
    pub fn view(&self, host: usize) -> &View {
        &self.hosts[host].2
    }

    /// When every host of `hosts` sees exactly `want`: the latest time one of them started
    /// to (not earlier than `after`), or `None` while one does not.
    pub fn agreed(&self, hosts: &[usize], want: &HashSet<String>, after: f64) -> Option<f64> {
        hosts
            .iter()
            .map(|&h| {
                let v = self.view(h);
                (v.members == *want).then_some(v.since.max(after))
            })
            .try_fold(after, |acc, t| t.map(|t| acc.max(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn list(t: &str, ver: u64, port: u16, ips: &[&str]) -> String {
        let mut s = format!(
            "{t}  INFO members: Members {{size:{}, ver:{ver}}} [\n",
            ips.len()
        );
        for (i, ip) in ips.iter().enumerate() {
            s.push_str(&format!(
                "\tMember [{ip}]:{port} - 00000000-0000-0000-0000-00000000000{i}\n"
            ));
        }
        s.push_str("]\n");
        s
    }

    #[test]
    fn a_tail_returns_only_complete_new_lines() {
        let dir = std::env::temp_dir().join(format!("h4-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.log");
        let mut tail = Tail::new(path.clone());
        assert!(tail.read().is_empty(), "a missing file has no lines");
        let mut f = File::create(&path).unwrap();
        f.write_all(b"one\ntw").unwrap();
        assert_eq!(tail.read(), vec!["one".to_owned()]);
        assert!(tail.read().is_empty());
        f.write_all(b"o\nthree\n").unwrap();
        assert_eq!(tail.read(), vec!["two".to_owned(), "three".to_owned()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn node_lists_are_parsed_across_reads_and_other_ports_are_skipped() {
        let text = format!(
            "{}2026-11-28T00:00:02.000000Z  INFO node: noise\n{}",
            list("2026-11-28T00:00:01.500000Z", 3, 9081, &["198.18.0.2"]),
            list(
                "2026-11-28T00:00:03.250000Z",
                4,
                NODE_PORT,
                &["198.18.0.2", "198.18.0.3"]
            ),
        );
        let mut p = NodeParser::default();
        let records: Vec<Record> = text.lines().filter_map(|l| p.feed(l)).collect();
        assert_eq!(records.len(), 1, "{records:?}");
        let Record::List { t, ver, members } = &records[0] else {
            panic!("not a list: {records:?}");
        };
        assert!((t - (20_785.0 * 86_400.0 + 3.25)).abs() < 1e-6);
        assert_eq!(*ver, 4);
        assert!(members.contains("198.18.0.3") && members.len() == 2);
    }

    #[test]
    fn a_block_cut_by_a_new_opening_line_is_dropped() {
        let mut p = NodeParser::default();
        assert_eq!(
            p.feed("2026-11-28T00:00:01.000000Z  INFO members: Members {size:2, ver:1} ["),
            None
        );
        assert_eq!(
            p.feed("\tMember [198.18.0.2]:10081 - 00000000-0000-0000-0000-000000000001"),
            None
        );
        let whole = list("2026-11-28T00:00:02.000000Z", 2, NODE_PORT, &["198.18.0.9"]);
        let records: Vec<Record> = whole.lines().filter_map(|l| p.feed(l)).collect();
        assert_eq!(records.len(), 1);
        assert!(matches!(&records[0], Record::List { ver: 2, members, .. } if members.len() == 1));
    }

    #[test]
    fn serf_events_change_the_view_and_removals_are_kept() {
        let mut v = View::new(HashSet::from(["h0".to_owned()]), 10.0);
        for line in [
            "11.5 member-join h0",
            "12.0 member-join h1",
            "12.5 member-join h2",
            "garbage",
            "20.0 member-failed h2",
        ] {
            if let Some(r) = serf_event(line, 0.0) {
                v.apply(r);
            }
        }
        assert_eq!(v.members, HashSet::from(["h0".to_owned(), "h1".to_owned()]));
        assert!((v.since - 20.0).abs() < 1e-9);
        assert_eq!(v.removals, vec![(20.0, "h2".to_owned())]);
    }

    #[test]
    fn serf_log_removals_take_the_middle_of_their_second() {
        let log = "    2026/11/28 00:00:01 [INFO] serf: EventMemberFailed: h2 198.18.0.4\n\
                   2026/11/28 00:00:09 [INFO] serf: EventMemberJoin: h2 198.18.0.4\n\
                   2026/11/28 00:00:20 [INFO] serf: EventMemberFailed: h20 198.18.0.22\n\
                   2026/11/28 00:00:21 [INFO] serf: EventMemberLeave: h2 198.18.0.4\n";
        let day = 20_785.0 * 86_400.0;
        assert_eq!(serf_log_removal(log, "h2", day + 5.0), Some(day + 21.5));
        assert_eq!(serf_log_removal(log, "h2", day), Some(day + 1.5));
        assert_eq!(serf_log_removal(log, "h3", day), None);
        assert_eq!(serf_log_removal("garbage\n\u{e9}\n", "h2", day), None);
    }

    #[test]
    fn agreement_is_the_latest_host_and_never_before_after() {
        let names = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<HashSet<_>>();
        let mut w = Watch::serf(
            vec![
                PathBuf::from("/nonexistent/a"),
                PathBuf::from("/nonexistent/b"),
            ],
            vec!["h0".into(), "h1".into()],
            5.0,
            100.0,
        );
        let both = names(&["h0", "h1"]);
        assert_eq!(w.agreed(&[0, 1], &both, 5.0), None);
        w.hosts[0]
            .2
            .apply(serf_event("-94.0 member-join h1", 100.0).unwrap());
        assert_eq!(
            w.agreed(&[0, 1], &both, 5.0),
            None,
            "h1 does not see h0 yet"
        );
        w.hosts[1]
            .2
            .apply(serf_event("-92.5 member-join h0", 100.0).unwrap());
        assert_eq!(w.agreed(&[0, 1], &both, 5.0), Some(7.5));
        assert_eq!(w.agreed(&[0, 1], &both, 9.0), Some(9.0));
        assert_eq!(w.agreed(&[0], &names(&["h0"]), 5.0), None);
    }
}
