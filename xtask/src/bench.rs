//! `cargo xtask bench`: our `node` against Debian's `serf` agent, same scenarios, same run.
//!
//! Real processes run in network namespaces on one bridge (the `testbed` crate), one host per
//! namespace. Times come from the processes' own records: the timestamps of node's member-list
//! log lines, and the timestamps serf's event handler writes, so polling adds no error. A
//! simulator run in virtual time adds N = 100, 500 and 1000. Output: a table, a PNG plot
//! (gnuplot) and `target/bench/summary.json`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use membership::parse_logged_lists;
use testbed::{ProcId, Testbed};

use crate::sh;

/// The all-instances gossip port of nodes started with the default `--private_port`.
const NODE_PORT: u16 = 10081;

/// One figure of the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Run {
    /// converge | detect | leave | false_removals | bytes_per_s | rss_bytes
    pub scenario: &'static str,
    /// Cluster size.
    pub n: usize,
    /// node | serf | sim
    pub system: &'static str,
    /// Seconds, a count, bytes per second or bytes.
    pub value: f64,
}

/// Options of one bench run.
#[derive(Debug, Clone)]
struct Opts {
    quick: bool,
    dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum System {
    Node,
    Serf,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Node => "node",
            System::Serf => "serf",
        }
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Parses the RFC 3339 UTC timestamp that starts a tracing line
/// (`2026-11-28T17:17:11.886625Z`) into Unix seconds.
pub fn parse_timestamp(s: &str) -> Option<f64> {
    let s = s.get(..s.find('Z')?)?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3600 + mm * 60) as f64 + ss)
}

/// One node's member lists of the all-instances cluster, with their log timestamps.
fn node_lists(text: &str) -> Vec<(f64, membership::LoggedList)> {
    let mut out = Vec::new();
    // Parse block by block so each list keeps the timestamp of its opening line.
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].contains("Members {size:") {
            let end = lines[i..]
                .iter()
                .position(|l| *l == "]")
                .map_or(lines.len(), |p| i + p);
            let block = lines[i..=end.min(lines.len() - 1)].join("\n");
            if let (Some(t), Some(l)) = (
                parse_timestamp(lines[i]),
                parse_logged_lists(&block).into_iter().next(),
            ) && l.port() == Some(NODE_PORT)
            {
                out.push((t, l));
            }
            i = end + 1;
        } else {
            i += 1;
        }
    }
    out
}

/// What serf's event handler recorded on one host: (time, event, member name).
fn serf_events(path: &Path) -> Vec<(f64, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let t = it.next()?.parse().ok()?;
            let ev = it.next()?.to_owned();
            let name = it.next()?.to_owned();
            Some((t, ev, name))
        })
        .collect()
}

/// A cluster of one system on a fresh test bed.
struct Cluster {
    system: System,
    bed: Testbed,
    procs: Vec<ProcId>,
    dir: PathBuf,
    started: f64,
}

impl Cluster {
    fn start(system: System, n: usize, dir: &Path) -> anyhow::Result<Cluster> {
        let mut bed = Testbed::new(n).map_err(|e| anyhow::anyhow!("{e}"))?;
        let dir = dir.join(format!("{}-{n}-{}", system.name(), bed.prefix()));
        std::fs::create_dir_all(&dir)?;
        let ips: Vec<String> = bed.hosts().iter().map(|h| h.ip.to_string()).collect();
        let node_bin = sh::root().join("target/release/node");
        let handler = dir.join("handler.sh");
        std::fs::write(
            &handler,
            "#!/bin/sh\n# Records serf membership events with a timestamp, one line per member.\nt=$(date +%s.%N)\nwhile read -r name rest; do echo \"$t $SERF_EVENT $name\"; done >> \"$EVENTS\"\n",
        )?;
        Command::new("chmod").arg("+x").arg(&handler).status()?;
        let started = unix_now();
        let mut procs = Vec::new();
        for (i, ip) in ips.iter().enumerate() {
            let mut cmd;
            match system {
                System::Node => {
                    cmd = Command::new(&node_bin);
                    cmd.args(["--role", "worker", "--discovery", "static"])
                        .args(["--private_ip_selector", &format!("{ip}/32")])
                        .args(["--static_members", &ips.join(",")])
                        .env("RUST_LOG", "info");
                }
                System::Serf => {
                    cmd = Command::new("serf");
                    cmd.arg("agent")
                        .arg(format!("-node=h{i}"))
                        .arg(format!("-bind={ip}:7946"))
                        .arg("-rpc-addr=127.0.0.1:7373")
                        .arg("-profile=lan")
                        .arg("-log-level=warn")
                        .arg(format!(
                            "-event-handler=member-join,member-leave,member-failed={}",
                            handler.display()
                        ))
                        .env("EVENTS", dir.join(format!("h{i}.events")));
                    for peer in &ips {
                        if peer != ip {
                            cmd.arg(format!("-retry-join={peer}:7946"));
                        }
                    }
                    cmd.arg("-retry-interval=1s");
                }
            }
            let id = bed
                .spawn(i, &format!("{}-{i}", system.name()), cmd)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            procs.push(id);
        }
        Ok(Cluster {
            system,
            bed,
            procs,
            dir,
            started,
        })
    }

    /// The alive set each host sees over time: (time, members) snapshots, per host.
    fn views(&self) -> Vec<Vec<(f64, HashSet<String>)>> {
        match self.system {
            System::Node => self
                .procs
                .iter()
                .map(|&p| {
                    node_lists(&self.bed.log(p))
                        .into_iter()
                        .map(|(t, l)| {
                            (
                                t,
                                l.members.iter().map(|m| m.addr.ip().to_string()).collect(),
                            )
                        })
                        .collect()
                })
                .collect(),
            System::Serf => (0..self.procs.len())
                .map(|i| {
                    let mut set: HashSet<String> = HashSet::new();
                    set.insert(self.member_name(i));
                    let mut out = vec![(self.started, set.clone())];
                    for (t, ev, name) in serf_events(&self.dir.join(format!("h{i}.events"))) {
                        if ev == "member-join" {
                            set.insert(name);
                        } else {
                            set.remove(&name);
                        }
                        out.push((t, set.clone()));
                    }
                    out
                })
                .collect(),
        }
    }

    /// How a host names itself in the views.
    fn member_name(&self, host: usize) -> String {
        match self.system {
            System::Node => self.bed.host(host).ip.to_string(),
            System::Serf => format!("h{host}"),
        }
    }

    /// Waits until every listed host sees exactly `want`; returns the latest time at which a
    /// host first saw it, or `None` at the deadline.
    fn wait_views(
        &self,
        hosts: &[usize],
        want: &HashSet<String>,
        after: f64,
        deadline: Duration,
    ) -> Option<f64> {
        let end = Instant::now() + deadline;
        loop {
            let views = self.views();
            let firsts: Vec<Option<f64>> = hosts
                .iter()
                .map(|&h| {
                    let v = &views[h];
                    // The last snapshot must match, and we take the first time it matched
                    // after `after` in the final run of matching snapshots.
                    let last = v.last()?;
                    if &last.1 != want {
                        return None;
                    }
                    let mut t = last.0;
                    for (ts, s) in v.iter().rev() {
                        if s == want && *ts >= after {
                            t = *ts;
                        } else {
                            break;
                        }
                    }
                    Some(t)
                })
                .collect();
            if firsts.iter().all(Option::is_some) {
                return firsts.into_iter().flatten().reduce(f64::max);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn all_names(&self) -> HashSet<String> {
        (0..self.procs.len()).map(|h| self.member_name(h)).collect()
    }

    fn tx_bytes(&self) -> u64 {
        (0..self.procs.len())
            .filter_map(|h| {
                let out = self
                    .bed
                    .exec(h, &["cat", "/sys/class/net/eth0/statistics/tx_bytes"])
                    .ok()?;
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    fn mean_rss(&self) -> Option<f64> {
        let rss: Vec<f64> = self
            .procs
            .iter()
            .filter_map(|&p| {
                let status =
                    std::fs::read_to_string(format!("/proc/{}/status", self.bed.pid(p))).ok()?;
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kb * 1024.0)
            })
            .collect();
        (!rss.is_empty()).then(|| rss.iter().sum::<f64>() / rss.len() as f64)
    }

    /// Removals of members that stayed alive, after `after`.
    fn false_removals(&self, after: f64) -> usize {
        match self.system {
            System::Node => {
                // Every list is sequenced by the oldest member, so one removal is one version,
                // whichever hosts logged it.
                let n = self.procs.len();
                let mut vers = HashSet::new();
                for &p in &self.procs {
                    for (t, l) in node_lists(&self.bed.log(p)) {
                        if t > after && l.size < n {
                            vers.insert(l.ver);
                        }
                    }
                }
                vers.len()
            }
            System::Serf => {
                // One incident per member and 10 s window, whichever hosts saw it.
                let mut incidents: Vec<(String, f64)> = Vec::new();
                for i in 0..self.procs.len() {
                    for (t, ev, name) in serf_events(&self.dir.join(format!("h{i}.events"))) {
                        if t > after
                            && (ev == "member-failed" || ev == "member-leave")
                            && !incidents
                                .iter()
                                .any(|(m, t0)| *m == name && (t - t0).abs() < 10.0)
                        {
                            incidents.push((name, t));
                        }
                    }
                }
                incidents.len()
            }
        }
    }

    fn stop_gracefully(&self, host: usize) {
        match self.system {
            System::Node => self.bed.terminate(self.procs[host]),
            // serf leaves on SIGINT; SIGTERM would only stop it.
            System::Serf => self.bed.signal(self.procs[host], "INT"),
        }
    }
}

/// Runs converge, steady traffic, memory, kill and leave on one system at size `n`.
fn lifecycle(
    system: System,
    n: usize,
    opts: &Opts,
    dir: &Path,
    runs: &mut Vec<Run>,
) -> anyhow::Result<()> {
    let sys = system.name();
    let c = Cluster::start(system, n, dir)?;
    let all = c.all_names();
    let hosts: Vec<usize> = (0..n).collect();
    let Some(t) = c.wait_views(&hosts, &all, c.started, Duration::from_secs(60)) else {
        bail!("{sys} at n={n} did not converge within 60 s");
    };
    runs.push(Run {
        scenario: "converge",
        n,
        system: sys,
        value: t - c.started,
    });
    if opts.dry_run {
        return Ok(());
    }

    let window = if opts.quick {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(30)
    };
    std::thread::sleep(Duration::from_secs(3));
    let b0 = c.tx_bytes();
    std::thread::sleep(window);
    let b1 = c.tx_bytes();
    runs.push(Run {
        scenario: "bytes_per_s",
        n,
        system: sys,
        value: (b1.saturating_sub(b0)) as f64 / n as f64 / window.as_secs_f64(),
    });
    if let Some(rss) = c.mean_rss() {
        runs.push(Run {
            scenario: "rss_bytes",
            n,
            system: sys,
            value: rss,
        });
    }
    if n > 10 {
        return Ok(());
    }

    // kill -9 of the last host.
    let victim = n - 1;
    let t_kill = unix_now();
    c.bed.kill9(c.procs[victim]);
    let mut rest = all.clone();
    rest.remove(&c.member_name(victim));
    let survivors: Vec<usize> = (0..victim).collect();
    match c.wait_views(&survivors, &rest, t_kill, Duration::from_secs(60)) {
        Some(t) => runs.push(Run {
            scenario: "detect",
            n,
            system: sys,
            value: t - t_kill,
        }),
        None => bail!("{sys} at n={n} did not detect the kill within 60 s"),
    }

    // Graceful leave of the next one.
    std::thread::sleep(Duration::from_secs(2));
    let leaver = n - 2;
    let t_leave = unix_now();
    c.stop_gracefully(leaver);
    rest.remove(&c.member_name(leaver));
    let survivors: Vec<usize> = (0..leaver).collect();
    match c.wait_views(&survivors, &rest, t_leave, Duration::from_secs(60)) {
        Some(t) => runs.push(Run {
            scenario: "leave",
            n,
            system: sys,
            value: t - t_leave,
        }),
        None => bail!("{sys} at n={n} did not see the leave within 60 s"),
    }
    Ok(())
}

/// Counts false removals at 10% inbound loss on every host, for both systems at once.
fn lossy(n: usize, opts: &Opts, dir: &Path, runs: &mut Vec<Run>) -> anyhow::Result<()> {
    let window = if opts.quick {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(300)
    };
    let mut clusters = Vec::new();
    for system in [System::Node, System::Serf] {
        let c = Cluster::start(system, n, dir)?;
        let hosts: Vec<usize> = (0..n).collect();
        if c.wait_views(&hosts, &c.all_names(), c.started, Duration::from_secs(60))
            .is_none()
        {
            bail!(
                "{} at n={n} did not converge before the loss test",
                system.name()
            );
        }
        clusters.push(c);
    }
    let t0 = unix_now();
    for c in &clusters {
        for h in 0..n {
            c.bed
                .set_loss(h, 10, 0)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    eprintln!(
        "bench: {} s at 10% loss, n={n}, node and serf side by side",
        window.as_secs()
    );
    std::thread::sleep(window);
    for c in &clusters {
        runs.push(Run {
            scenario: "false_removals",
            n,
            system: c.system.name(),
            value: c.false_removals(t0) as f64,
        });
    }
    Ok(())
}

fn simulate(opts: &Opts, runs: &mut Vec<Run>) {
    use membership::sim::scenarios;
    let sizes: &[usize] = if opts.dry_run {
        &[10]
    } else if opts.quick {
        &[100, 500]
    } else {
        &[100, 500, 1000]
    };
    for &n in sizes {
        let t = Instant::now();
        if let Some(v) = scenarios::converge(n, 1) {
            runs.push(Run {
                scenario: "converge",
                n,
                system: "sim",
                value: v,
            });
        }
        if let Some(v) = scenarios::detect(n, 2) {
            runs.push(Run {
                scenario: "detect",
                n,
                system: "sim",
                value: v,
            });
        }
        if n <= 100
            && let Some(v) = scenarios::bytes_per_second(n, 3, Duration::from_secs(60))
        {
            runs.push(Run {
                scenario: "bytes_per_s",
                n,
                system: "sim",
                value: v,
            });
        }
        eprintln!(
            "bench: simulator n={n} took {:.0} s of wall time",
            t.elapsed().as_secs_f64()
        );
    }
}

/// The summary in the issue's shape.
pub fn summary_json(runs: &[Run]) -> String {
    let mut s = String::from("{\"runs\":[");
    for (i, r) in runs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{{\"scenario\":\"{}\",\"n\":{},\"system\":\"{}\",\"value\":{}}}",
            r.scenario,
            r.n,
            r.system,
            if r.value.is_finite() { r.value } else { -1.0 }
        );
    }
    s.push_str("]}\n");
    s
}

/// The table: scenario × N × {node, serf, ratio}, plus the simulator's figures.
pub fn table(runs: &[Run]) -> String {
    let mut keys: BTreeMap<(&str, usize), HashMap<&str, f64>> = BTreeMap::new();
    for r in runs {
        keys.entry((r.scenario, r.n))
            .or_default()
            .insert(r.system, r.value);
    }
    let mut s = format!(
        "{:<16} {:>5} {:>12} {:>12} {:>10} {:>12}\n",
        "scenario", "n", "node", "serf", "node/serf", "sim"
    );
    let f = |v: Option<&f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}"));
    for ((scenario, n), m) in &keys {
        let ratio = match (m.get("node"), m.get("serf")) {
            (Some(a), Some(b)) if *b > 0.0 => format!("{:.2}", a / b),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<16} {:>5} {:>12} {:>12} {:>10} {:>12}",
            scenario,
            n,
            f(m.get("node")),
            f(m.get("serf")),
            ratio,
            f(m.get("sim"))
        );
    }
    s
}

fn plot(runs: &[Run], dir: &Path) -> anyhow::Result<PathBuf> {
    sh::ensure_debian_packages(&[("gnuplot", "gnuplot-nox")])?;
    let mut data = String::new();
    for scenario in ["converge", "detect"] {
        for system in ["node", "serf", "sim"] {
            let _ = writeln!(data, "# {scenario} {system}");
            let mut pts: Vec<&Run> = runs
                .iter()
                .filter(|r| r.scenario == scenario && r.system == system)
                .collect();
            pts.sort_by_key(|r| r.n);
            for r in pts {
                let _ = writeln!(data, "{} {}", r.n, r.value);
            }
            data.push_str("\n\n");
        }
    }
    std::fs::write(dir.join("plot.dat"), data)?;
    let png = dir.join("bench.png");
    let script = format!(
        "set terminal png size 1000,450\nset output '{}'\nset multiplot layout 1,2\nset logscale x\nset xlabel 'N (members)'\nset ylabel 'seconds'\nset key top left\nset title 'Convergence after a simultaneous start'\nplot '{d}' index 0 with linespoints title 'node', '{d}' index 1 with linespoints title 'serf', '{d}' index 2 with linespoints title 'node (simulator)'\nset title 'Detection of a kill -9'\nplot '{d}' index 3 with linespoints title 'node', '{d}' index 4 with linespoints title 'serf', '{d}' index 5 with linespoints title 'node (simulator)'\nunset multiplot\n",
        png.display(),
        d = dir.join("plot.dat").display()
    );
    std::fs::write(dir.join("plot.gp"), script)?;
    let mut gp = Command::new("gnuplot");
    gp.arg(dir.join("plot.gp"));
    sh::run(gp)?;
    Ok(png)
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut opts = Opts {
        quick: false,
        dry_run: false,
    };
    for a in args {
        match a.as_str() {
            "--quick" => opts.quick = true,
            "--dry-run" => opts.dry_run = true,
            other => bail!("unknown bench option `{other}`; use --quick and/or --dry-run"),
        }
    }
    testbed::check_prerequisites().map_err(|e| anyhow::anyhow!("{e}"))?;
    sh::ensure_debian_packages(&[("serf", "serf"), ("nft", "nftables")])?;
    let mut build = sh::cargo();
    build.args(["build", "--release", "--quiet", "--package", "node"]);
    sh::run(build)?;
    let out = sh::root().join(if opts.dry_run {
        "target/bench/dry-run"
    } else {
        "target/bench"
    });
    std::fs::create_dir_all(&out).context("cannot create target/bench")?;
    let work = out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;

    let started = Instant::now();
    let mut runs = Vec::new();
    simulate(&opts, &mut runs);
    let sizes: &[usize] = if opts.dry_run { &[3] } else { &[3, 10, 30] };
    for &n in sizes {
        for system in [System::Node, System::Serf] {
            eprintln!("bench: {} n={n}", system.name());
            lifecycle(system, n, &opts, &work, &mut runs)?;
        }
    }
    if !opts.dry_run {
        lossy(3, &opts, &work, &mut runs)?;
    }

    std::fs::write(out.join("summary.json"), summary_json(&runs))?;
    let t = table(&runs);
    std::fs::write(out.join("table.txt"), &t)?;
    println!("\n{t}");
    let png = plot(&runs, &out)?;
    println!(
        "summary: {}\nplot:    {}\n(times in seconds; bytes_per_s per member; rss_bytes per process; {:.0} s in all)",
        out.join("summary.json").display(),
        png.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracing_timestamps_become_unix_seconds() {
        let t = parse_timestamp("2026-11-28T17:17:11.886625Z  INFO members: x").unwrap();
        // 2026-11-28T00:00:00Z is day 20_420 after the epoch.
        assert!((t - (20_420.0 * 86_400.0 + 17.0 * 3600.0 + 17.0 * 60.0 + 11.886625)).abs() < 1e-6);
        assert_eq!(parse_timestamp("not a time"), None);
    }

    #[test]
    fn node_lists_keep_the_time_of_their_opening_line() {
        let log = "2026-11-28T00:00:01.500000Z  INFO members: Members {size:1, ver:1} [\n\tMember [198.18.0.2]:10081 - 00000000-0000-0000-0000-000000000001 this\n]\n2026-11-28T00:00:02.000000Z  INFO node: other\n";
        let lists = node_lists(log);
        assert_eq!(lists.len(), 1);
        assert!((lists[0].0 - (20_420.0 * 86_400.0 + 1.5)).abs() < 1e-6);
    }

    #[test]
    fn the_summary_has_the_issue_shape_and_the_table_has_ratios() {
        let runs = vec![
            Run {
                scenario: "detect",
                n: 3,
                system: "node",
                value: 1.0,
            },
            Run {
                scenario: "detect",
                n: 3,
                system: "serf",
                value: 4.0,
            },
        ];
        assert_eq!(
            summary_json(&runs),
            "{\"runs\":[{\"scenario\":\"detect\",\"n\":3,\"system\":\"node\",\"value\":1},{\"scenario\":\"detect\",\"n\":3,\"system\":\"serf\",\"value\":4}]}\n"
        );
        assert!(table(&runs).contains("0.25"));
    }
}
