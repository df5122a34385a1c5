//! Smoke test of the test bed itself: hosts reach each other over the bridge, faults take
//! effect, processes are collected, and every trace is gone after drop, even after a panic.

use std::process::Command;
use std::time::Duration;

use testbed::Testbed;

fn ping(bed: &Testbed, from: usize, to: &str, count: &str) -> String {
    let out = bed
        .exec(from, &["ping", "-c", count, "-i", "0.05", "-W", "1", to])
        .expect("ping runs; install iputils-ping (cargo xtask test does)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn received(report: &str) -> usize {
    report
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ping summary in: {report}"))
}

/// Every namespace and link whose name starts with `prefix`.
fn traces(prefix: &str) -> Vec<String> {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let mut out = Vec::new();
    for l in String::from_utf8_lossy(&ns.stdout).lines() {
        if l.starts_with(prefix) {
            out.push(l.to_owned());
        }
    }
    for l in String::from_utf8_lossy(&links.stdout).lines() {
        if l.split(": ").nth(1).is_some_and(|n| n.starts_with(prefix)) {
            out.push(l.to_owned());
        }
    }
    out
}

#[test]
fn two_hosts_ping_each_other_and_everything_is_removed_on_drop() {
    testbed::check_prerequisites().unwrap();
    let bed = Testbed::new(2).unwrap();
    let prefix = bed.prefix().to_owned();
    let (a, b) = (bed.host(0).ip.to_string(), bed.host(1).ip.to_string());
    assert_ne!(a, b);
    assert_eq!(received(&ping(&bed, 0, &b, "3")), 3);
    assert_eq!(received(&ping(&bed, 1, &a, "3")), 3);
    // The root namespace reaches the hosts through the bridge address.
    assert_eq!(
        received(&ping(&bed, 0, &bed.bridge_ip().to_string(), "1")),
        1
    );

    bed.link_down(1).unwrap();
    assert_eq!(received(&ping(&bed, 0, &b, "2")), 0, "a cut host answers");
    bed.link_up(1).unwrap();
    // The port comes back at once (no STP), but allow for neighbour discovery.
    assert!(received(&ping(&bed, 0, &b, "5")) >= 3);

    // 100% inbound loss on host 1 drops everything; removing it restores the path.
    bed.set_loss(1, 100, 0).unwrap();
    assert_eq!(received(&ping(&bed, 0, &b, "3")), 0);
    bed.set_loss(1, 50, 0).unwrap();
    let got = received(&ping(&bed, 0, &b, "100"));
    assert!((20..=80).contains(&got), "50% loss let {got}/100 through");
    bed.set_loss(1, 0, 0).unwrap();
    assert_eq!(received(&ping(&bed, 0, &b, "3")), 3);

    assert!(!traces(&prefix).is_empty());
    drop(bed);
    assert_eq!(traces(&prefix), Vec::<String>::new());
}

#[test]
fn processes_are_logged_killed_and_cleaned_up_even_after_a_panic() {
    testbed::check_prerequisites().unwrap();
    let mut prefix = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut bed = Testbed::new(1).unwrap();
        prefix = bed.prefix().to_owned();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo \"err $X\" >&2; exec sleep 600"])
            .env("X", "set");
        let p = bed.spawn(0, "sleeper", cmd).unwrap();
        bed.wait_for(Duration::from_secs(10), "both lines", |logs| {
            logs.contains(p, "out") && logs.contains(p, "err set")
        })
        .unwrap();
        let err = bed
            .wait_for(Duration::from_millis(300), "a line never printed", |logs| {
                logs.contains(p, "never")
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a line never printed") && err.contains("sleeper"),
            "{err}"
        );
        assert!(bed.exit_status(p).is_none());
        bed.kill9(p);
        assert!(bed.exit_status(p).is_some());
        // A process left running in the host is killed by the cleanup.
        let q = bed
            .spawn(0, "orphan", {
                let mut c = Command::new("sleep");
                c.arg("600");
                c
            })
            .unwrap();
        assert!(bed.exit_status(q).is_none());
        panic!("deliberate panic with a live process");
    }));
    assert!(result.is_err());
    assert!(!prefix.is_empty());
    assert_eq!(traces(&prefix), Vec::<String>::new());
}

#[test]
fn leftovers_of_a_dead_test_process_are_swept() {
    testbed::check_prerequisites().unwrap();
    // A process id that is not running now, encoded the way the bed names things.
    let dead = (2..32768u32)
        .rev()
        .find(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        .unwrap();
    let mut digits = String::new();
    let mut n = dead;
    for _ in 0..5 {
        digits.insert(0, char::from_digit(n % 36, 36).unwrap());
        n /= 36;
    }
    let prefix = format!("tb{digits}zz");
    let ns = format!("{prefix}h0");
    let br = format!("{prefix}br");
    let ok = |args: &[&str]| assert!(Command::new("ip").args(args).status().unwrap().success());
    ok(&["netns", "add", &ns]);
    ok(&["link", "add", "name", &br, "type", "bridge"]);
    // No count check here: another test of this binary may run its own sweep at any moment.
    testbed::sweep_stale();
    assert_eq!(traces(&prefix), Vec::<String>::new());
}

#[test]
fn ipv6_hosts_reach_each_other_over_the_bridge_and_nothing_else() {
    testbed::check_prerequisites().unwrap();
    let bed = Testbed::new(2).unwrap();
    let (a, b) = (bed.host(0).ip6, bed.host(1).ip6);
    // One /64 of 2001:2::/48 holds the bridge and every host.
    let cidr6 = bed.cidr6();
    let (base, len) = cidr6.split_once('/').unwrap();
    assert_eq!(len, "64");
    let net = |ip: std::net::Ipv6Addr| u128::from(ip) >> 64;
    let base: std::net::Ipv6Addr = base.parse().unwrap();
    assert_eq!(
        u128::from(base) >> 80,
        0x2001_0002_0000,
        "{cidr6} is outside 2001:2::/48"
    );
    assert!(
        [a, b, bed.bridge_ip6()]
            .iter()
            .all(|&ip| net(ip) == net(base))
    );
    // `nodad`: usable at once, no waiting for duplicate address detection.
    assert_eq!(received(&ping(&bed, 0, &b.to_string(), "3")), 3);
    assert_eq!(received(&ping(&bed, 1, &a.to_string(), "3")), 3);
    assert_eq!(
        received(&ping(&bed, 0, &bed.bridge_ip6().to_string(), "1")),
        1
    );
    // Hosts have no default route: another /64 of the range is unreachable from inside.
    let routes = bed
        .exec(0, &["ip", "-6", "route", "show", "default"])
        .unwrap();
    assert!(routes.stdout.is_empty(), "{routes:?}");
    let out = bed
        .exec(0, &["ip", "-6", "route", "get", "2001:2:0:ffff::1"])
        .unwrap();
    assert!(
        !out.status.success(),
        "a host routes outside its /64: {out:?}"
    );
    // In the root namespace, the range goes nowhere but to live beds' bridges.
    let out = Command::new("ip")
        .args(["-6", "route", "get", "2001:2:0:ffff::1"])
        .output()
        .unwrap();
    let text = format!("{out:?}");
    assert!(
        !out.status.success() || text.contains("unreachable"),
        "2001:2::/48 leaks from the root namespace: {text}"
    );
    let out = Command::new("ip")
        .args(["-6", "route", "get", &b.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("dev {}", bed.bridge())), "{text}");
    // Faults apply to IPv6 too.
    bed.link_down(1).unwrap();
    assert_eq!(received(&ping(&bed, 0, &b.to_string(), "2")), 0);
    bed.link_up(1).unwrap();
    assert!(received(&ping(&bed, 0, &b.to_string(), "5")) >= 3);
    bed.set_loss(1, 100, 0).unwrap();
    assert_eq!(received(&ping(&bed, 0, &b.to_string(), "3")), 0);
    bed.set_loss(1, 0, 0).unwrap();
    assert_eq!(received(&ping(&bed, 0, &b.to_string(), "3")), 3);
}
