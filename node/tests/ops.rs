//! Operator-facing behaviour of the real binary on loopback (127.0.0.71-79): `/metrics` parsed
//! strictly, `node members`, `sd_notify`, `node discover` exit codes, `--help`, and member logs
//! written through journald's native protocol (a real journald when one can run).

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{BIN, Node};

/// Starts a worker on `ip` with static discovery and extra flags and variables.
fn start(ip: &str, port: u16, peers: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
    let mut cmd = Command::new(BIN);
    cmd.args(["--role", "worker", "--discovery", "static"])
        .args(["--private_ip_selector", &format!("{ip}/32")])
        .args(["--private_port", &port.to_string()])
        .args(["--static_members", peers])
        .args(["--discovery_refresh", "1s"])
        .args(extra)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Node::spawn(cmd)
}

/// Sends SIGTERM and waits for the exit.
fn terminate(n: &mut Node, within: Duration) -> Option<std::process::ExitStatus> {
    n.signal("TERM");
    n.wait_exit(within)
}

/// One GET on loopback with the node's own client; the body of a 200 answer.
fn get(addr: &str, path: &str) -> Result<String, String> {
    common::get(addr.parse().map_err(|e| format!("{addr}: {e}"))?, path)
}

/// One GET on loopback; the status code and the body, whatever the status.
fn get_status(addr: &str, path: &str) -> Result<(u16, String), String> {
    common::get_status(addr.parse().map_err(|e| format!("{addr}: {e}"))?, path)
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `within`.
fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if let Some(t) = f() {
            return Some(t);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn members_json(addr: &str) -> Option<serde_json::Value> {
    serde_json::from_str(&get(addr, "/v1/members").ok()?).ok()
}

/// The `all` cluster's members as the log prints them: `Member [ip]:port - uuid[ this]`.
fn expected_lines(v: &serde_json::Value) -> Vec<String> {
    let c = &v["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == "all")
        .unwrap();
    c["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let addr: std::net::SocketAddr = m["address"].as_str().unwrap().parse().unwrap();
            let this = if m["this"].as_bool().unwrap() {
                " this"
            } else {
                ""
            };
            format!(
                "Member [{}]:{} - {}{this}",
                addr.ip(),
                addr.port(),
                m["uuid"].as_str().unwrap()
            )
        })
        .collect()
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("JOURNAL_STREAM")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run node")
}

// ---------------------------------------------------------------------------------------------
// A strict parser of the Prometheus/OpenMetrics text format.

/// Samples by `name{sorted labels}`.
type Samples = BTreeMap<String, f64>;

fn valid_name(n: &str) -> bool {
    let mut c = n.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Label names and values, in the order given.
type LabelPairs = Vec<(String, String)>;

/// Parses `{a="x",b="y"}`; returns the labels and the rest of the line.
fn parse_labels(s: &str) -> Result<(LabelPairs, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("a label has no =")?;
        let key = &rest[..eq];
        if !valid_name(key) {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value is not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next().ok_or("an unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("a cut escape")?.1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_owned(), value));
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_exposition(text: &str) -> Result<Samples, String> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Samples::new();
    let mut eof = false;
    for line in text.lines() {
        if eof {
            return Err(format!("a line after # EOF: {line:?}"));
        }
        if line == "# EOF" {
            eof = true;
            continue;
        }
        if let Some(meta) = line.strip_prefix("# ") {
            let mut p = meta.splitn(3, ' ');
            let (kind, name) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
            if !valid_name(name) {
                return Err(format!("bad metric name in {line:?}"));
            }
            match kind {
                "TYPE" => {
                    let t = p.next().unwrap_or("");
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "unknown",
                    ]
                    .contains(&t)
                    {
                        return Err(format!("bad type in {line:?}"));
                    }
                    types.insert(name.to_owned(), t.to_owned());
                }
                "HELP" | "UNIT" => {}
                _ => return Err(format!("unknown comment {line:?}")),
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or(format!("no value in {line:?}"))?;
        let name = &line[..name_end];
        let (mut labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..])?
        } else {
            (Vec::new(), &line[name_end..])
        };
        let value_txt = rest.trim();
        let value: f64 = match value_txt {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("bad value in {line:?}"))?,
        };
        let family = types
            .keys()
            .filter(|f| {
                name == f.as_str()
                    || ["_total", "_bucket", "_sum", "_count", "_created"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(f.as_str()))
            })
            .max_by_key(|f| f.len())
            .ok_or(format!("sample {name} has no # TYPE"))?;
        if types[family] == "counter" && (!name.ends_with("_total") || value < 0.0) {
            return Err(format!("bad counter sample {line:?}"));
        }
        labels.sort();
        let key = format!(
            "{name}{{{}}}",
            labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        if samples.insert(key.clone(), value).is_some() {
            return Err(format!("duplicate sample {key}"));
        }
    }
    if !eof {
        return Err("no # EOF".into());
    }
    Ok(samples)
}

fn sample(s: &Samples, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have {:#?}", s.keys().collect::<Vec<_>>()))
}

#[test]
fn the_exposition_parser_rejects_malformed_text() {
    assert!(parse_exposition("# TYPE a counter\na_total 1\n# EOF\n").is_ok());
    assert!(
        parse_exposition("# TYPE a counter\na_total 1\n").is_err(),
        "no EOF"
    );
    assert!(parse_exposition("a_total 1\n# EOF\n").is_err(), "no TYPE");
    assert!(
        parse_exposition("# TYPE a counter\na 1\n# EOF\n").is_err(),
        "no _total"
    );
    assert!(parse_exposition("# TYPE a gauge\na{x=\"1} 1\n# EOF\n").is_err());
    assert!(parse_exposition("# TYPE a gauge\na{x=\"1\"} one\n# EOF\n").is_err());
}

// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_members_and_sd_notify_on_a_two_node_cluster() {
    let dir = std::env::temp_dir().join(format!("node-ops-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();

    let peers = "127.0.0.71:8291,127.0.0.72:8291";
    let mut a = start(
        "127.0.0.71",
        8291,
        peers,
        &[],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    // READY=1 comes once the listeners are bound: the internal API must answer right then.
    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("READY=1 within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    assert!(
        TcpStream::connect("127.0.0.71:8291").is_ok(),
        "not listening at READY=1"
    );

    let b = start("127.0.0.72", 8291, peers, &["--log_format", "json"], &[]);
    let api = "127.0.0.71:8291";
    let v = wait_for(Duration::from_secs(20), || {
        members_json(api).filter(|v| v["clusters"][0]["members"].as_array().unwrap().len() == 2)
    })
    .unwrap_or_else(|| panic!("no 2-member list; log:\n{}", a.text()));
    let uuids: Vec<String> = v["clusters"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["uuid"].as_str().unwrap().to_owned())
        .collect();

    // `node members`: text, JSON, the cluster filter and an unreachable node.
    let out = run(&[
        "members",
        "--private_ip_selector",
        "127.0.0.71/32",
        "--private_port",
        "8291",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("cluster all (port 10291): ver "), "{text}");
    assert!(text.contains("ADDRESS") && text.contains("AGE"), "{text}");
    for u in &uuids {
        let line = text
            .lines()
            .find(|l| l.contains(u.as_str()))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(line.contains("worker") && line.contains("alive"), "{line}");
    }
    assert_eq!(
        text.lines().filter(|l| l.ends_with("this")).count(),
        1,
        "{text}"
    );
    let out = run(&[
        "members",
        "--json",
        "--cluster",
        "all",
        "--private_ip_selector",
        "127.0.0.71/32",
        "--private_port",
        "8291",
    ]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(j["clusters"][0]["members"].as_array().unwrap().len(), 2);
    let out = run(&[
        "members",
        "--cluster",
        "scheduler",
        "--private_ip_selector",
        "127.0.0.71/32",
        "--private_port",
        "8291",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not in the scheduler cluster"));
    let out = run(&[
        "members",
        "--private_ip_selector",
        "127.0.0.79/32",
        "--private_port",
        "8291",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Is the node running"),
        "{err}"
    );

    // `/metrics`: parsed strictly; the figures match the cluster.
    let s = wait_for(Duration::from_secs(10), || {
        let s = parse_exposition(&get(api, "/metrics").ok()?).unwrap();
        (s.get("node_cluster_probe_rtt_seconds_count{cluster=all}")
            .copied()?
            > 0.0)
            .then_some(s)
    })
    .expect("a probe answered within 10 s");
    assert_eq!(sample(&s, "node_cluster_members{cluster=all}"), 2.0);
    assert!(sample(&s, "node_cluster_list_version{cluster=all}") >= 2.0);
    assert!(sample(&s, "node_cluster_joins_total{cluster=all}") >= 1.0);
    assert!(sample(&s, "node_cluster_packets_in_total{cluster=all}") > 0.0);
    assert!(sample(&s, "node_cluster_bytes_out_total{cluster=all}") > 0.0);
    assert_eq!(sample(&s, "node_cluster_failures_total{cluster=all}"), 0.0);
    assert!(sample(&s, "node_discovery_refreshes_total{outcome=ok}") >= 1.0);
    assert!(sample(&s, "node_discovery_refresh_latency_seconds_count{}") >= 1.0);
    // Static discovery lists both peers and excludes this node.
    assert_eq!(sample(&s, "node_discovery_candidates{}"), 1.0);
    let inf = sample(
        &s,
        "node_cluster_probe_rtt_seconds_bucket{cluster=all,le=+Inf}",
    );
    assert_eq!(
        inf,
        sample(&s, "node_cluster_probe_rtt_seconds_count{cluster=all}")
    );
    for key in [
        "node_cluster_leaves_total{cluster=all}",
        "node_cluster_suspicions_raised_total{cluster=all}",
        "node_cluster_suspicions_refuted_total{cluster=all}",
    ] {
        assert!(s.contains_key(key), "missing {key}");
    }

    // `--log_format json`: one object per line; a member list is one record, lines kept.
    let lists: Vec<String> = b
        .text()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"))
        })
        .filter(|v| v["target"] == "members")
        .map(|v| v["fields"]["message"].as_str().unwrap().to_owned())
        .collect();
    let last = lists.last().expect("a member record");
    assert!(last.starts_with("Members {size:2, ver:"), "{last}");
    assert_eq!(last.matches("\n\tMember [").count(), 2, "{last}");
    assert!(last.ends_with("\n]"), "{last}");

    // SIGTERM: STOPPING=1, a graceful leave, exit 0.
    let status = terminate(&mut a, Duration::from_secs(10)).expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
    let n = notify.recv(&mut buf).expect("STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("STOPPING=1"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn discover_explains_an_empty_result_and_fails_on_a_bad_configuration() {
    let out = run(&[
        "discover",
        "--private_ip_selector",
        "127.0.0.74/32",
        "--static_members",
        "127.0.0.74",
    ]);
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{so}{se}");
    assert!(
        so.contains("candidates (0):") && so.contains("self"),
        "{so}"
    );
    assert!(se.contains("hint: no candidates"), "{se}");

    let out = run(&[
        "discover",
        "--private_ip_selector",
        "127.0.0.74/32",
        "--static_members",
        "127.0.0.1:0",
    ]);
    let se = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{se}");
    assert!(
        se.lines()
            .any(|l| l.starts_with("error: ") && l.contains("--static_members")),
        "{se}"
    );
    assert!(!se.contains("Stack backtrace"), "{se}");
}

#[test]
fn help_shows_the_variable_of_every_flag_and_groups_backends() {
    let out = run(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    let mut flags = 0;
    // A flag's block runs from its `--name` line (indented, in `node --help`) to the next one.
    let lines: Vec<&str> = help.lines().collect();
    let starts: Vec<(usize, String)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let t = l.trim_start();
            let t = t
                .strip_prefix("-h, ")
                .or(t.strip_prefix("-V, "))
                .unwrap_or(t);
            let name = t.strip_prefix("--")?.split([' ', '[', '=']).next()?;
            (l.starts_with("  ") && !name.is_empty()).then(|| (i, name.to_owned()))
        })
        .collect();
    for (k, (i, name)) in starts.iter().enumerate() {
        if name == "help" || name == "version" {
            continue;
        }
        flags += 1;
        let end = starts.get(k + 1).map_or(lines.len(), |(j, _)| *j);
        let block = lines[*i..end].join("\n");
        let env = format!("[env: NODE_{}=", name.to_uppercase());
        assert!(
            block.contains(&env),
            "--{name} does not show {env}:\n{block}"
        );
    }
    assert!(flags >= 10, "{help}");
    assert!(
        help.contains("Static discovery (--discovery=static):"),
        "{help}"
    );
    assert!(help.contains("Logging"), "{help}");
    assert!(
        help.contains("[default: text]") && help.contains("[default: auto]"),
        "{help}"
    );
}

// ---------------------------------------------------------------------------------------------
// journald.

const JOURNALD: &str = "/lib/systemd/systemd-journald";
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Whether something answers on journald's native socket.
fn journald_answers() -> bool {
    let Ok(s) = UnixDatagram::unbound() else {
        return false;
    };
    s.send_to(b"", JOURNAL_SOCKET).is_ok()
}

/// A journald this test started; stopped by its PID when dropped.
struct Journald {
    child: Child,
}

impl Journald {
    fn start() -> Result<Journald, String> {
        if !Path::new(JOURNALD).exists() {
            return Err(format!("{JOURNALD} is not installed"));
        }
        if !Path::new("/etc/machine-id").exists() {
            return Err("/etc/machine-id is missing".into());
        }
        std::fs::create_dir_all("/run/systemd/journal").map_err(|e| e.to_string())?;
        let child = Command::new(JOURNALD)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let j = Journald { child };
        if wait_for(Duration::from_secs(10), || journald_answers().then_some(())).is_none() {
            return Err("journald started but its socket does not answer".into());
        }
        Ok(j)
    }
}

impl Drop for Journald {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn identifier(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("node-ops-test-{tag}-{}-{nanos}", std::process::id())
}

/// Two nodes; the first logs through journald as `id`. Returns the first node's latest list
/// as expected log lines, once the list holds both.
fn two_nodes_one_in_journald(id: &str) -> (Node, Node, Vec<String>) {
    let peers = "127.0.0.73:8293,127.0.0.75:8293";
    let a = start(
        "127.0.0.73",
        8293,
        peers,
        &["--log_target", "journald", "--syslog_identifier", id],
        &[],
    );
    let b = start("127.0.0.75", 8293, peers, &[], &[]);
    let v = wait_for(Duration::from_secs(20), || {
        members_json("127.0.0.73:8293")
            .filter(|v| v["clusters"][0]["members"].as_array().unwrap().len() == 2)
    })
    .unwrap_or_else(|| {
        panic!(
            "no 2-member list; stderr of the journald node:\n{}",
            a.text()
        )
    });
    (a, b, expected_lines(&v))
}

fn check_real_journald() {
    let id = identifier("journald");
    let (a, _b, want) = two_nodes_one_in_journald(&id);
    // The operator's command, on the latest member record.
    let cmd = format!(
        "journalctl SYSLOG_IDENTIFIER={id} TARGET=members -n 1 --no-pager | grep '^ *Member'"
    );
    let got = wait_for(Duration::from_secs(10), || {
        let out = Command::new("sh").args(["-c", &cmd]).output().ok()?;
        let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_start().to_owned())
            .collect();
        (lines == want).then_some(lines)
    });
    assert!(
        got.is_some(),
        "`{cmd}` did not print {want:#?}; journal:\n{}",
        String::from_utf8_lossy(
            &Command::new("journalctl")
                .args([&format!("SYSLOG_IDENTIFIER={id}"), "--no-pager"])
                .output()
                .unwrap()
                .stdout
        )
    );
    // Across every entry, each `Member` line is an indented continuation line of one entry:
    // none starts an entry of its own.
    let out = Command::new("journalctl")
        .args([
            &format!("SYSLOG_IDENTIFIER={id}"),
            "--no-pager",
            "-o",
            "short",
        ])
        .output()
        .unwrap();
    let all = String::from_utf8_lossy(&out.stdout);
    let member_lines: Vec<&str> = all
        .lines()
        .filter(|l| l.trim_start().starts_with("Member ["))
        .collect();
    assert!(member_lines.len() >= 3, "{all}");
    assert!(member_lines.iter().all(|l| l.starts_with(' ')), "{all}");
    // Nothing went to stderr but what precedes the logger.
    assert!(!a.text().contains("Member ["), "{}", a.text());
    drop(a);
    check_journal_stream_selects_journald();
}

/// Under systemd, `JOURNAL_STREAM` names stderr's `dev:ino`; `--log_target auto` (the default)
/// then writes through the native protocol instead of stderr.
fn check_journal_stream_selects_journald() {
    use std::os::unix::fs::MetadataExt as _;
    let id = identifier("stream");
    let path = std::env::temp_dir().join(format!("{id}.stderr"));
    let file = std::fs::File::create(&path).unwrap();
    let m = file.metadata().unwrap();
    let mut child = Command::new(BIN)
        .args([
            "--discovery",
            "static",
            "--private_ip_selector",
            "127.0.0.76/32",
        ])
        .args([
            "--private_port",
            "8294",
            "--static_members",
            "127.0.0.76:8294",
        ])
        .args(["--syslog_identifier", &id])
        .env("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .unwrap();
    let cmd =
        format!("journalctl SYSLOG_IDENTIFIER={id} TARGET=members --no-pager | grep '^ *Member'");
    let found = wait_for(Duration::from_secs(10), || {
        let out = Command::new("sh").args(["-c", &cmd]).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("Member [127.0.0.76]:10294 - ")
            .then_some(text)
    });
    let _ = child.kill();
    let _ = child.wait();
    let stderr = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(
        found.is_some(),
        "no journal entry for {id}; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("Members {"), "{stderr}");
}

/// Reads journald native-protocol datagrams: `KEY=value\n` or `KEY\n<u64 LE length><value>\n`.
fn native_fields(d: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut out = Vec::new();
    let mut rest = d;
    while !rest.is_empty() {
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("a field without newline")?;
        let line = &rest[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            out.push((
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                line[eq + 1..].to_vec(),
            ));
            rest = &rest[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let after = &rest[nl + 1..];
            let len_bytes: [u8; 8] = after.get(..8).ok_or("a cut length")?.try_into().unwrap();
            let len = u64::from_le_bytes(len_bytes) as usize;
            let value = after.get(8..8 + len).ok_or("a cut value")?.to_vec();
            if after.get(8 + len) != Some(&b'\n') {
                return Err("a binary field without its newline".into());
            }
            out.push((key, value));
            rest = &after[9 + len..];
        }
    }
    Ok(out)
}

/// Socket file left by a journald that is gone, or ours; removed when dropped.
struct OwnSocket(PathBuf);

impl Drop for OwnSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check_datagram_socket() {
    std::fs::create_dir_all("/run/systemd/journal").unwrap();
    // Nothing answers here (checked by the caller): a stale file from a stopped journald.
    let _ = std::fs::remove_file(JOURNAL_SOCKET);
    let sock = UnixDatagram::bind(JOURNAL_SOCKET).expect("bind the journal socket path");
    let _own = OwnSocket(PathBuf::from(JOURNAL_SOCKET));
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let id = identifier("socket");
    let (_a, _b, want) = two_nodes_one_in_journald(&id);
    let mut buf = vec![0u8; 1 << 16];
    let end = Instant::now() + Duration::from_secs(10);
    let mut lists = Vec::new();
    while Instant::now() < end {
        let Ok(n) = sock.recv(&mut buf) else {
            if lists.last() == Some(&want) {
                break;
            }
            continue;
        };
        let fields = native_fields(&buf[..n]).unwrap();
        let get = |k: &str| {
            fields
                .iter()
                .find(|(f, _)| f == k)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        if get("SYSLOG_IDENTIFIER").as_deref() != Some(id.as_str())
            || get("TARGET").as_deref() != Some("members")
        {
            continue;
        }
        let msg = get("MESSAGE").expect("MESSAGE");
        // One datagram holds the whole list: header, every member line with its tab, `]`.
        assert!(
            msg.starts_with("Members {size:") && msg.ends_with("\n]"),
            "{msg:?}"
        );
        let lines: Vec<String> = msg
            .lines()
            .filter_map(|l| l.strip_prefix('\t'))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len() + 2, msg.lines().count(), "{msg:?}");
        lists.push(lines);
    }
    assert_eq!(lists.last(), Some(&want), "lists received: {lists:#?}");
}

#[test]
fn member_lists_are_single_journal_entries() {
    if journald_answers() {
        // A journald of the host: used read-only, never restarted or replaced.
        check_real_journald();
        return;
    }
    match Journald::start() {
        Ok(j) => {
            check_real_journald();
            drop(j);
            // The same nodes against a plain datagram socket, now that ours is stopped.
            if !journald_answers() {
                check_datagram_socket();
            }
        }
        Err(e) => {
            eprintln!(
                "journald cannot run here ({e}); checking the native protocol on a datagram socket"
            );
            check_datagram_socket();
        }
    }
}

#[test]
fn the_start_up_gate_holds_readiness_until_the_cluster_has_its_size() {
    let dir = std::env::temp_dir().join(format!("node-ops-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&sock_path);
    let notify = UnixDatagram::bind(&sock_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut seen = String::new();
    let drain = |seen: &mut String| {
        let mut buf = [0u8; 512];
        while let Ok(n) = notify.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('|');
        }
    };

    let peers = "127.0.0.77:8295,127.0.0.78:8295";
    let gate = ["--min_cluster_size", "2"];
    let a = start(
        "127.0.0.77",
        8295,
        peers,
        &gate,
        // The first wait explanation is logged after 10 s (`gate::WAIT_LOG_INTERVAL`).
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let api = "127.0.0.77:8295";
    // Alone, the node serves but is not ready, and says why.
    let waiting = wait_for(Duration::from_secs(10), || {
        get_status(api, "/readyz")
            .ok()
            .filter(|(_, body)| body.contains("1 of the 2"))
    })
    .unwrap_or_else(|| panic!("no waiting answer; log:\n{}", a.text()));
    assert_eq!(waiting.0, 503, "{waiting:?}");
    assert!(get_status(api, "/healthz").is_ok_and(|(c, _)| c == 200));
    drain(&mut seen);
    assert!(seen.contains("waiting for 2 members"), "{seen}");
    assert!(!seen.contains("READY=1"), "READY before the size: {seen}");
    // The wait pushes systemd's start timeout back, so the unit is not killed while it waits.
    assert!(seen.contains("EXTEND_TIMEOUT_USEC=30000000"), "{seen}");
    // The wait is explained in the log, with what discovery found.
    assert!(
        wait_for(Duration::from_secs(15), || a
            .text()
            .contains("not ready: the all-instances cluster holds 1 of the 2")
            .then_some(()))
        .is_some(),
        "no wait explanation in the log:\n{}",
        a.text()
    );
    assert!(a.text().contains("127.0.0.78:8295"), "{}", a.text());

    let _b = start("127.0.0.78", 8295, peers, &gate, &[]);
    let ready = wait_for(Duration::from_secs(15), || {
        get_status(api, "/readyz").ok().filter(|(c, _)| *c == 200)
    });
    assert!(ready.is_some(), "never ready with 2 members:\n{}", a.text());
    assert!(
        wait_for(Duration::from_secs(5), || {
            drain(&mut seen);
            seen.contains("READY=1").then_some(())
        })
        .is_some(),
        "no READY=1 once the size was reached: {seen}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
