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
