//! Per-process CPU time and memory, and the machine's busy time, from `/proc`: the bench's
//! resource figures.

use std::process::Command;

/// utime + stime of a process (all its threads), in clock ticks, from a `/proc/<pid>/stat` line.
pub fn cpu_ticks_of(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold spaces or ')': skip past the
    // last ')'. What follows starts at field 3, so utime (14) and stime (15) are the 12th and
    // 13th words.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut words = rest.split_whitespace().skip(11);
    let utime: u64 = words.next()?.parse().ok()?;
    let stime: u64 = words.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A process's CPU ticks so far.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    cpu_ticks_of(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 when that fails).
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// The resident set of a process, in bytes, from `VmRSS` of `/proc/<pid>/status`.
pub fn rss_bytes(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// The process's command name (`/proc/<pid>/comm`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Seconds since boot (`/proc/uptime`, 10 ms steps).
pub fn uptime() -> Option<f64> {
    std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// (busy, total) jiffies of every CPU, from the `cpu` line of `/proc/stat`. Idle and iowait
/// are not busy; guest time is already in user time.
pub fn machine_jiffies_of(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    Some((total - v[3] - v[4], total))
}

/// The machine's (busy, total) jiffies so far.
pub fn machine_jiffies() -> Option<(u64, u64)> {
    machine_jiffies_of(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Counters of the network namespace `pid` runs in, summed by name: UDP's (`Udp:` of
/// `/proc/<pid>/net/snmp`, such as `Udp:RcvbufErrors`) and TCP's extended ones (`TcpExt:` of
/// `/proc/<pid>/net/netstat`, such as `TcpExt:ListenDrops`).
pub fn net_counters(pid: u32, into: &mut std::collections::BTreeMap<String, u64>) {
    for (file, prefix) in [("snmp", "Udp:"), ("netstat", "TcpExt:")] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            add_counters(&text, prefix, into);
        }
    }
}

/// Adds the counters of the first two lines that start with `prefix` (names, then values).
pub fn add_counters(text: &str, prefix: &str, into: &mut std::collections::BTreeMap<String, u64>) {
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    if let [names, values, ..] = rows[..] {
        for (k, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            if let Ok(v) = v.parse::<u64>() {
                *into.entry(format!("{prefix}{k}")).or_default() += v;
            }
        }
    }
}

/// Packets the machine's softnet backlogs dropped since boot (the second column of
/// `/proc/net/softnet_stat`, hexadecimal, one row per CPU).
pub fn softnet_dropped() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/softnet_stat").ok()?;
    text.lines()
        .map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (we ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 9 0 1000 1000000 2000 18446744073709551615";
        assert_eq!(cpu_ticks_of(stat), Some(42));
        assert_eq!(cpu_ticks_of("4242 (x) S 1 2"), None);
        assert_eq!(cpu_ticks_of("no parenthesis"), None);
    }

    #[test]
    fn this_process_has_ticks_and_a_resident_set() {
        let pid = std::process::id();
        assert!(cpu_ticks(pid).is_some());
        assert!(rss_bytes(pid).is_some_and(|b| b > 0.0));
        assert!(clock_ticks_per_second() >= 1.0);
        assert!(uptime().is_some_and(|u| u > 0.0));
    }

    #[test]
    fn machine_jiffies_leave_out_idle_and_iowait() {
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 50 2 25 400 20 1 1 0 0 0\n";
        assert_eq!(machine_jiffies_of(stat), Some((160, 1000)));
        assert_eq!(machine_jiffies_of("intr 1 2 3\n"), None);
    }

    #[test]
    fn snmp_counters_are_summed_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\nUdp: InDatagrams NoPorts RcvbufErrors\nUdp: 10 2 7\nUdpLite: InDatagrams\nUdpLite: 0\n";
        let mut m = std::collections::BTreeMap::new();
        add_counters(snmp, "Udp:", &mut m);
        add_counters(snmp, "Udp:", &mut m);
        assert_eq!(m.get("Udp:RcvbufErrors"), Some(&14));
        assert_eq!(m.get("Udp:InDatagrams"), Some(&20));
        assert!(!m.contains_key("UdpLite:InDatagrams") && !m.contains_key("Ip:Forwarding"));
    }
}
