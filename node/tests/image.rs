//! The package as an operator runs it: three booted Debian images (systemd as PID 1, one
//! scheduler and two workers, static discovery) install `cluster-node_*.deb`, edit
//! `/etc/default/cluster-node` and `systemctl enable --now` their unit; then stop, SIGKILL,
//! reboot, package upgrade and a rolling key rotation, each checked through the journal with
//! the documented `journalctl -n10000 --unit=... | grep "^ *Member"`.
//!
//! The packages come from `cargo xtask test`, which builds them from the debug node with
//! `cargo xtask dist --binary` and names them in `NODE_IMAGE_DEB` and `NODE_IMAGE_DEB_UPGRADE`
//! (the same binary, a higher version).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use testbed::image::{self, ImageBed};
use testbed::{LoggedList, parse_logged_lists};

mod common;

/// The gossip port of the all-instances cluster (the default private port + 2000).
const ALL: u16 = common::ALL_PORT;
/// The gossip port of the scheduler cluster (the default private port + 1000).
const SCHEDULERS: u16 = common::SCHEDULER_PORT;
const ROLES: [&str; 3] = ["scheduler", "worker", "worker"];

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|r| r.split_whitespace().nth(1))
            == Some("0")
    })
}

fn deb(var: &str) -> PathBuf {
    let path = std::env::var_os(var).unwrap_or_else(|| {
        panic!(
            "{var} is not set: `cargo xtask test` builds the packages; by hand: `cargo build -p node && \
             cargo xtask dist --binary target/debug/node --out target/image-debs && cargo xtask dist \
             --binary target/debug/node --out target/image-debs --version 0.1.0+1`, then set \
             NODE_IMAGE_DEB and NODE_IMAGE_DEB_UPGRADE to the two files"
        )
    });
    let path = PathBuf::from(path);
    assert!(path.is_file(), "{var}={} does not exist", path.display());
    path
}

/// A package's version, as dpkg reads it.
fn version_of(deb: &std::path::Path) -> String {
    let out = std::process::Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg("Version")
        .output()
        .expect("dpkg-deb");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The member lists in journalctl's default output: continuation lines are indented with
/// spaces, so they are turned back into the rendered layout before parsing.
fn lists(journal: &str) -> Vec<LoggedList> {
    let text: String = journal
        .lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("Member [") {
                format!("\t{t}\n")
            } else if t == "]" {
                "]\n".to_owned()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    parse_logged_lists(&text)
}

fn ips(list: &LoggedList) -> BTreeSet<Ipv4Addr> {
    list.members
        .iter()
        .filter_map(|m| match m.addr.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        })
        .collect()
}

struct Cluster {
    vms: ImageBed,
    all: BTreeSet<Ipv4Addr>,
}

impl Cluster {
    fn sh(&self, vm: usize, script: &str) -> String {
        self.vms
            .exec(vm, script)
            .unwrap_or_else(|e| panic!("vm{vm}: {e}\n{}", self.state()))
    }

    fn journal(&self, vm: usize) -> String {
        self.vms.journal(vm, ROLES[vm]).unwrap_or_default()
    }

    /// What the documented command prints on a VM.
    fn grep(&self, vm: usize) -> String {
        self.sh(
            vm,
            &format!(
                "journalctl -n10000 --unit={} | grep '^ *Member' || true",
                ROLES[vm]
            ),
        )
    }

    /// The last list a VM logged for the cluster on `port`.
    fn last(&self, vm: usize, port: u16) -> Option<LoggedList> {
        lists(&self.journal(vm))
            .into_iter()
            .rev()
            .find(|l| l.port() == Some(port))
    }

    fn state(&self) -> String {
        (0..self.vms.len())
            .map(|vm| {
                let j = self.journal(vm);
                let tail: Vec<&str> = j.lines().rev().take(25).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- vm{vm} ({}):\n{}\n", ROLES[vm], tail.join("\n"))
            })
            .collect()
    }

    /// Polls `pred` every 200 ms until it holds; returns how long that took.
    fn wait(&self, timeout: Duration, what: &str, mut pred: impl FnMut(&Self) -> bool) -> Duration {
        let start = Instant::now();
        loop {
            if pred(self) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.state()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether every VM's last all-instances list holds `expected`, and the scheduler's last
    /// scheduler list holds only itself.
    fn converged(&self, expected: &BTreeSet<Ipv4Addr>) -> bool {
        (0..self.vms.len())
            .filter(|&vm| expected.contains(&self.vms.ip(vm)))
            .all(|vm| self.last(vm, ALL).is_some_and(|l| &ips(&l) == expected))
            && (!expected.contains(&self.vms.ip(0))
                || self
                    .last(0, SCHEDULERS)
                    .is_some_and(|l| ips(&l) == BTreeSet::from([self.vms.ip(0)])))
    }

    fn wait_full(&self, what: &str) -> Duration {
        let all = self.all.clone();
        self.wait(Duration::from_secs(60), what, |c| c.converged(&all))
    }

    /// How many lists each VM has logged so far: a mark for [`Cluster::none_dropped_since`].
    fn mark(&self) -> Vec<usize> {
        (0..self.vms.len())
            .map(|vm| lists(&self.journal(vm)).len())
            .collect()
    }

    /// Checks that no VM other than `changed` logged an all-instances list since `mark` that
    /// lacks a member other than `changed`.
    fn none_dropped_since(&self, mark: &[usize], changed: usize, step: &str) {
        let changed_ip = self.vms.ip(changed);
        for vm in (0..self.vms.len()).filter(|&v| v != changed) {
            for l in lists(&self.journal(vm)).iter().skip(mark[vm]) {
                if l.port() != Some(ALL) {
                    continue;
                }
                let seen = ips(l);
                let missing: Vec<_> = self
                    .all
                    .difference(&seen)
                    .filter(|ip| **ip != changed_ip)
                    .collect();
                assert!(
                    missing.is_empty(),
                    "{step}: vm{vm} logged a list without {missing:?}: {l:?}\n{}",
                    self.state()
                );
            }
        }
    }

    fn uuid_of(&self, seen_by: usize, vm: usize) -> Option<String> {
        let ip = self.vms.ip(vm);
        self.last(seen_by, ALL)?
            .members
            .iter()
            .find(|m| m.addr.ip() == ip)
            .map(|m| m.uuid.to_string())
    }

    /// Restarts `vm`'s unit with `action` and waits until the cluster holds it again under a
    /// new identity, checking that nobody else was dropped meanwhile; returns the rejoin time.
    fn roll(&self, vm: usize, action: &str, step: &str) -> Duration {
        let before = self.uuid_of(0, vm);
        let mark = self.mark();
        let start = Instant::now();
        self.sh(vm, action);
        let all = self.all.clone();
        self.wait(Duration::from_secs(60), step, |c| {
            c.converged(&all) && (0..c.vms.len()).all(|s| c.uuid_of(s, vm) != before)
        });
        let took = start.elapsed();
        self.none_dropped_since(&mark, vm, step);
        took
    }
}

#[test]
fn the_package_runs_under_systemd_on_booted_images() {
    if !is_root() {
        eprintln!("skipped: booted images need root (systemd-nspawn, network namespaces)");
        return;
    }
    image::check_prerequisites().expect("prerequisites");
    let (deb, upgrade) = (deb("NODE_IMAGE_DEB"), deb("NODE_IMAGE_DEB_UPGRADE"));
    let (old_version, new_version) = (version_of(&deb), version_of(&upgrade));
    assert_ne!(
        old_version, new_version,
        "the upgrade package needs another version"
    );
    let test_start = Instant::now();

    let mut vms = ImageBed::new(3).expect("three images");
    for vm in 0..3 {
        for (d, name) in [
            (&deb, "cluster-node.deb"),
            (&upgrade, "cluster-node-new.deb"),
        ] {
            let bytes = std::fs::read(d).unwrap();
            vms.write(vm, &format!("/root/{name}"), &bytes, 0o644)
                .unwrap();
        }
        vms.start(vm).unwrap();
    }
    for vm in 0..3 {
        vms.wait_booted(vm).expect("boot");
    }
    let cidr = vms.bed().cidr();
    let all: BTreeSet<Ipv4Addr> = (0..3).map(|vm| vms.ip(vm)).collect();
    let members: Vec<String> = all.iter().map(Ipv4Addr::to_string).collect();
    let c = Cluster { vms, all };

    // The operator's steps: install (offline: libc6 is in the image), settings, enable.
    for vm in 0..3 {
        let out = c.sh(
            vm,
            "apt-get install -y -q /root/cluster-node.deb 2>&1 && dpkg-query -W cluster-node",
        );
        assert!(
            out.contains(&format!("cluster-node\t{old_version}\n")),
            "{out}"
        );
        c.sh(
            vm,
            &format!(
                "printf 'NODE_STATIC_MEMBERS={}\\nNODE_PRIVATE_IP_SELECTOR={cidr}\\nNODE_MIN_CLUSTER_SIZE=3\\n' >> /etc/default/cluster-node",
                members.join(",")
            ),
        );
    }
    // The start-up gate under systemd: vm0 starts alone with a start timeout shorter than its
    // wait. The node pushes the timeout back while it waits, so the unit stays "activating"
    // (not ready, not killed and restarted) until the cluster has its 3 members.
    c.sh(
        0,
        "mkdir -p /etc/systemd/system/scheduler.service.d \
         && printf '[Service]\\nTimeoutStartSec=12s\\n' > /etc/systemd/system/scheduler.service.d/gate.conf \
         && systemctl daemon-reload && systemctl enable --now --no-block scheduler 2>&1",
    );
    thread::sleep(Duration::from_secs(20));
    let lone = (
        c.sh(0, "systemctl is-active scheduler || true"),
        c.sh(0, "systemctl show -p NRestarts --value scheduler"),
    );
    assert_eq!(
        (lone.0.trim(), lone.1.trim()),
        ("activating", "0"),
        "a lone node under --min_cluster_size=3, 20 s after start with TimeoutStartSec=12s\n{}",
        c.state()
    );
    assert!(
        c.journal(0)
            .contains("not ready: the all-instances cluster holds 1 of the 3"),
        "{}",
        c.state()
    );
    let start = Instant::now();
    for (vm, role) in ROLES.iter().enumerate().skip(1) {
        c.sh(
            vm,
            &format!("systemctl enable --now --no-block {role} 2>&1"),
        );
    }
    let converge = c.wait_full("the first full list everywhere");
    c.wait(Duration::from_secs(10), "every unit active", |c| {
        (0..3).all(|vm| {
            c.sh(vm, &format!("systemctl is-active {} || true", ROLES[vm]))
                .trim()
                == "active"
        })
    });
    let gate_open = start.elapsed();
    // The documented grep shows it: workers their list of 3, the scheduler both groups.
    for vm in 0..3 {
        let grep = c.grep(vm);
        let lines: Vec<&str> = grep.lines().collect();
        let tail = &lines[lines.len().saturating_sub(if vm == 0 { 4 } else { 3 })..];
        for ip in &c.all {
            assert!(
                tail.iter()
                    .any(|l| l.contains(&format!("Member [{ip}]:{ALL} - "))),
                "vm{vm} grep lacks {ip}:\n{grep}"
            );
        }
        if vm == 0 {
            assert!(
                grep.contains(&format!("Member [{}]:{SCHEDULERS} - ", c.vms.ip(0))),
                "{grep}"
            );
        }
    }
    // No key file: the empty credential default keeps the keyless setup running.
    assert!(c.journal(1).contains("no --cluster_key_file"));

    // A graceful stop is seen by the others at once.
    let start = Instant::now();
    c.sh(2, "systemctl stop worker");
    let rest: BTreeSet<Ipv4Addr> = [c.vms.ip(0), c.vms.ip(1)].into();
    let stop_seen = start
        .elapsed()
        .max(c.wait(Duration::from_secs(10), "the stop seen", |c| {
            c.converged(&rest)
        }));
    let mark = c.mark();
    c.sh(2, "systemctl start worker");
    c.wait_full("the stopped worker back");
    c.none_dropped_since(&mark, 2, "start after stop");

    // SIGKILL: systemd restarts the unit (Restart=on-failure) and it rejoins.
    let rejoin = c.roll(
        1,
        "systemctl kill --kill-who=main -s KILL worker",
        "restart and rejoin after SIGKILL",
    );
    let restarts = c.sh(1, "systemctl show -p NRestarts --value worker");
    assert_eq!(restarts.trim(), "1", "NRestarts after one SIGKILL");

    // A reboot brings the enabled unit back, under a new identity.
    let mut c = c;
    let mark = c.mark();
    let before = c.uuid_of(0, 2);
    let start = Instant::now();
    c.vms.reboot(2).expect("reboot vm2");
    let after_boot = start.elapsed();
    let all = c.all.clone();
    c.wait(Duration::from_secs(60), "the rebooted worker back", |c| {
        c.converged(&all) && (0..3).all(|s| c.uuid_of(s, 2) != before)
    });
    let reboot_full = start.elapsed();
    assert_eq!(c.sh(2, "systemctl is-enabled worker").trim(), "enabled");
    let boots = c.sh(2, "journalctl --list-boots --no-pager | wc -l");
    eprintln!("vm2 journal boots: {}", boots.trim());
    c.none_dropped_since(&mark, 2, "reboot");

    // Upgrading the package on each image in turn, then restarting its unit, drops no one else.
    for (vm, role) in ROLES.iter().enumerate() {
        c.roll(
            vm,
            &format!(
                "apt-get install -y -q /root/cluster-node-new.deb >/dev/null 2>&1 \
                 && systemctl daemon-reload && systemctl restart {role}"
            ),
            &format!("upgrade of vm{vm}"),
        );
        let v = c.sh(vm, "dpkg-query -W -f '${Version}' cluster-node");
        assert_eq!(v, new_version);
    }

    // A cluster key through the unit's credential: stop all, install the key, start all.
    let k1 = c.sh(0, "cluster-node keygen");
    let k2 = c.sh(0, "cluster-node keygen");
    let write_key = |c: &Cluster, vm: usize, keys: &[&str]| {
        let text: String = keys.iter().map(|k| k.trim().to_owned() + "\n").collect();
        c.vms
            .write(vm, "/etc/cluster-node/key", text.as_bytes(), 0o600)
            .unwrap();
    };
    for (vm, role) in ROLES.iter().enumerate() {
        c.sh(vm, &format!("systemctl stop {role}"));
        write_key(&c, vm, &[&k1]);
    }
    // Under the gate, the first two units can only be ready once the third runs: no blocking.
    for (vm, role) in ROLES.iter().enumerate() {
        c.sh(vm, &format!("systemctl start --no-block {role}"));
    }
    c.wait_full("the keyed cluster");
    for vm in 0..3 {
        let j = c.journal(vm);
        assert!(
            j.contains("cluster key file loaded"),
            "vm{vm} did not load the key:\n{}",
            c.state()
        );
    }
    // Rolling rotation, one restart at a time: new key second, swap, remove the old one.
    let mut rotation = Duration::ZERO;
    for (step, keys) in [[&k1, &k2][..].to_vec(), vec![&k2, &k1], vec![&k2]]
        .iter()
        .enumerate()
    {
        for (vm, role) in ROLES.iter().enumerate() {
            let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
            write_key(&c, vm, &keys);
            rotation += c.roll(
                vm,
                &format!("systemctl restart {role}"),
                &format!("rotation step {} on vm{vm}", step + 1),
            );
        }
    }
    for vm in 0..3 {
        let j = c.journal(vm);
        assert!(
            !j.contains("dropped packets that failed checks"),
            "vm{vm} refused packets during the rotation:\n{j}"
        );
    }
    // The old key is gone everywhere, and the cluster holds with the new one alone.
    c.hold_full(Duration::from_secs(3));

    eprintln!(
        "figures: with vm0 waiting at the gate, enable --now on the other 2 images to the \
         full list everywhere {converge:?} and every unit active {gate_open:?}; \
         stop seen by the others {stop_seen:?}; SIGKILL to restarted-and-rejoined {rejoin:?}; \
         reboot of a worker: booted after {after_boot:?}, full list after {reboot_full:?}; \
         nine rolling restarts of the key rotation {rotation:?}; whole test {:?}",
        test_start.elapsed()
    );
    let t = Instant::now();
    drop(c);
    eprintln!("three images powered off and removed in {:?}", t.elapsed());
}

impl Cluster {
    /// Checks that the full list stays for `d`.
    fn hold_full(&self, d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            assert!(
                self.converged(&self.all),
                "the cluster fell apart\n{}",
                self.state()
            );
            thread::sleep(Duration::from_millis(500));
        }
    }
}

/// A stand-in for the GCE guest agent: runs the startup script at every boot, after the
/// network is up, as `google-startup-scripts.service` does.
const STARTUP_UNIT: &str = "[Unit]
Description=GCE startup script (test stand-in for the guest agent)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/gce-startup-script

[Install]
WantedBy=multi-user.target
";

/// The GCE startup script (deploy/gcp/startup-script.sh) at the boot of three images: it
/// reads node-role, node-package, node-settings and node-cluster-key from the metadata server
/// (one gce-fake per VM, at `metadata.google.internal` through the image's /etc/hosts),
/// installs the package, writes the settings and the key, and starts the role's unit, which
/// finds its peers through the fake's Compute API.
#[test]
fn the_gce_startup_script_brings_up_a_keyed_cluster_at_boot() {
    if !is_root() {
        eprintln!("skipped: booted images need root (systemd-nspawn, network namespaces)");
        return;
    }
    image::check_prerequisites().expect("prerequisites");
    let deb = deb("NODE_IMAGE_DEB");
    let test_start = Instant::now();
    let script = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gcp/startup-script.sh"),
    )
    .unwrap();
    let key = std::process::Command::new(env!("CARGO_BIN_EXE_node"))
        .arg("keygen")
        .output()
        .expect("node keygen");
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();

    let mut vms = ImageBed::new(3).expect("three images");
    let cidr = vms.bed().cidr();
    let bridge = vms.bed().bridge().to_owned();
    let base = u32::from(vms.bed().bridge_ip()) - 1;
    let ips: Vec<Ipv4Addr> = (0..3).map(|vm| vms.ip(vm)).collect();
    let mut fakes = Vec::new();
    for (vm, role) in ROLES.iter().enumerate() {
        // Each VM's metadata server on port 80 of its own address on the bridge.
        let md = Ipv4Addr::from(base + 1000 + vm as u32);
        let out = std::process::Command::new("ip")
            .args(["addr", "add", &format!("{md}/22"), "dev", &bridge])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let fake = gce_fake::GceFake::start((md, 80).into()).expect("gce fake on :80");
        let settings = format!(
            "NODE_GCP_LABELS=cluster=image\nNODE_GCP_ENDPOINT={}\nNODE_PRIVATE_IP_SELECTOR={cidr}\n\
             NODE_DISCOVERY_REFRESH=2s\nGCE_METADATA_HOST={}\n",
            fake.endpoint(),
            fake.metadata_host()
        );
        fake.set_vm(gce_fake::VmIdentity {
            project_id: "image-project".into(),
            attributes: [
                ("node-role", role.to_string()),
                ("node-package", "/root/cluster-node.deb".into()),
                ("node-settings", settings),
                ("node-cluster-key", key.clone()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
            ..gce_fake::VmIdentity::default()
        });
        for (i, ip) in ips.iter().enumerate() {
            fake.add_instance(
                "image-project",
                "us-central1-a",
                gce_fake::InstanceSpec::running(format!("node-{i}"))
                    .label("cluster", "image")
                    .nic(std::net::IpAddr::V4(*ip)),
            );
        }
        fakes.push(fake);
        let hosts = format!(
            "127.0.0.1 localhost\n127.0.1.1 {}\n{md} metadata.google.internal\n",
            vms.name(vm)
        );
        vms.write(vm, "/etc/hosts", hosts.as_bytes(), 0o644)
            .unwrap();
        vms.write(
            vm,
            "/root/cluster-node.deb",
            &std::fs::read(&deb).unwrap(),
            0o644,
        )
        .unwrap();
        vms.write(vm, "/usr/local/sbin/gce-startup-script", &script, 0o755)
            .unwrap();
        let unit = "/etc/systemd/system/google-startup-scripts.service";
        vms.write(vm, unit, STARTUP_UNIT.as_bytes(), 0o644).unwrap();
        std::os::unix::fs::symlink(
            unit,
            vms.root(vm)
                .join("etc/systemd/system/multi-user.target.wants/google-startup-scripts.service"),
        )
        .unwrap();
    }
    let start = Instant::now();
    for vm in 0..3 {
        vms.start(vm).unwrap();
    }
    let all: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
    let c = Cluster { vms, all };
    let converge = c.wait_full("the cluster the startup scripts started");
    let boot_to_list = start.elapsed();
    for (vm, role) in ROLES.iter().enumerate() {
        assert_eq!(
            c.sh(vm, &format!("systemctl is-enabled {role}")).trim(),
            "enabled"
        );
        let j = c.journal(vm);
        assert!(j.contains("cluster key file loaded"), "vm{vm}:\n{j}");
        let settings = c.sh(vm, "cat /etc/default/cluster-node");
        assert!(settings.starts_with("NODE_DISCOVERY=gcp\n"), "{settings}");
        let mode = c.sh(vm, "stat -c %a /etc/cluster-node/key");
        assert_eq!(mode.trim(), "600");
    }
    assert!(fakes.iter().all(|f| f.metadata_requests() > 0));
    eprintln!(
        "figures (gce): boot of 3 images to the full list everywhere {boot_to_list:?} \
         (last wait {converge:?}); whole test {:?}",
        test_start.elapsed()
    );
    drop(c);
    drop(fakes);
}

/// Sets `VAR=value` on the line that starts with `VAR=` (the script's own settings block).
fn set_var(script: &str, var: &str, value: &str) -> String {
    let prefix = format!("{var}=");
    let mut done = false;
    script
        .lines()
        .map(|l| {
            if !done && l.starts_with(&prefix) {
                done = true;
                format!("{prefix}\"{value}\"\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect::<String>()
        + if done {
            ""
        } else {
            panic!("the script has no {var}=")
        }
}

/// Forwards TCP connections from a test-bed address to an upstream (LocalStack on loopback,
/// which the containers cannot reach) until dropped.
struct Relay {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    fn start(bind: Ipv4Addr, upstream: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind((bind, 0)).expect("bind the relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let _ = down.set_nonblocking(false);
                        if let Ok(up) =
                            std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(3))
                        {
                            pipe(down, up);
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Relay { addr, stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Copies both directions until either side closes; reads time out so threads never hang.
fn pipe(a: std::net::TcpStream, b: std::net::TcpStream) {
    use std::io::{Read, Write};
    for (mut from, mut to) in [
        (a.try_clone().expect("clone"), b.try_clone().expect("clone")),
        (b, a),
    ] {
        let _ = from.set_read_timeout(Some(Duration::from_secs(120)));
        thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 || to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Both);
        });
    }
}

/// A minimal IMDSv2 on a test-bed address: `PUT /latest/api/token` gives a token, and the
/// identity document (naming the region) is served only with it. Counts what it served.
struct Imds {
    addr: std::net::SocketAddr,
    served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Imds {
    fn start(bind: Ipv4Addr, region: &'static str) -> Imds {
        use std::io::{BufRead, BufReader, Write};
        use std::sync::atomic::Ordering;
        const TOKEN: &str = "AQAEAImageTestToken==";
        let listener = std::net::TcpListener::bind((bind, 0)).expect("bind imds");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, flag, seen) = (served.clone(), stop.clone(), log.clone());
        thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let Ok((s, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut reader = BufReader::new(s.try_clone().expect("clone"));
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_ascii_lowercase());
                }
                let first = head.first().cloned().unwrap_or_default();
                let has = |h: &str| head.iter().any(|l| l.starts_with(h));
                let token_ok = head.iter().any(|l| {
                    l == &format!("x-aws-ec2-metadata-token: {}", TOKEN.to_ascii_lowercase())
                });
                let doc = format!(
                    "{{\"accountId\":\"000000000000\",\"region\":\"{region}\",\"availabilityZone\":\"{region}a\",\"instanceId\":\"i-0123456789abcdef0\",\"version\":\"2017-09-30\"}}"
                );
                let (status, extra, body) = if first.starts_with("put /latest/api/token ")
                    && has("x-aws-ec2-metadata-token-ttl-seconds:")
                {
                    (
                        "200 OK",
                        "X-aws-ec2-metadata-token-ttl-seconds: 21600\r\n",
                        TOKEN.to_owned(),
                    )
                } else if first.starts_with("get /latest/dynamic/instance-identity/document ") {
                    if token_ok {
                        count.fetch_add(1, Ordering::Relaxed);
                        ("200 OK", "", doc)
                    } else {
                        ("401 Unauthorized", "", String::new())
                    }
                } else {
                    ("404 Not Found", "", String::new())
                };
                if let Ok(mut l) = seen.lock() {
                    l.push(format!("{first} -> {status}"));
                }
                let mut s = s;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Imds {
            addr,
            served,
            log,
            stop,
        }
    }
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A stand-in for cloud-init: runs the user data once, at the first boot, after the network.
const USER_DATA_UNIT: &str = "[Unit]
Description=EC2 user data (test stand-in for cloud-init)
Wants=network-online.target
After=network-online.target
ConditionPathExists=!/var/lib/cloud/user-data.done

[Service]
Type=oneshot
ExecStart=/bin/sh -c '/var/lib/cloud/user-data.sh && touch /var/lib/cloud/user-data.done'

[Install]
WantedBy=multi-user.target
";

/// The EC2 user data (deploy/aws/user-data.sh) at the first boot of three images: it installs
/// the package from a path, writes the settings and the key from its variables and enables the
/// role's unit, which reads its region from IMDSv2 (a fake on a test-bed address) and finds
/// its peers with DescribeInstances in LocalStack (instances seeded with the images'
/// addresses, reached through a relay on the bridge).
#[test]
fn the_ec2_user_data_brings_up_a_keyed_cluster_at_first_boot() {
    if !is_root() {
        eprintln!("skipped: booted images need root (systemd-nspawn, network namespaces)");
        return;
    }
    image::check_prerequisites().expect("prerequisites");
    let deb = deb("NODE_IMAGE_DEB");
    let ls: std::net::SocketAddr = std::env::var("LOCALSTACK_ENDPOINT")
        .unwrap_or_else(|_| {
            panic!(
                "LOCALSTACK_ENDPOINT is not set: run `cargo xtask test`, or `cargo xtask localstack` in another shell and export the variables it prints"
            )
        })
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("LOCALSTACK_ENDPOINT must be http://ip:port");
    const REGION: &str = "us-east-1";
    let test_start = Instant::now();
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/aws/user-data.sh"),
    )
    .unwrap();
    let key = std::process::Command::new(env!("CARGO_BIN_EXE_node"))
        .arg("keygen")
        .output()
        .expect("node keygen");
    let key = String::from_utf8(key.stdout).unwrap().trim().to_owned();

    let mut vms = ImageBed::new(3).expect("three images");
    let cidr = vms.bed().cidr();
    let bridge_ip = vms.bed().bridge_ip();
    let ips: Vec<Ipv4Addr> = (0..3).map(|vm| vms.ip(vm)).collect();
    let relay = Relay::start(bridge_ip, ls);
    let imds = Imds::start(bridge_ip, REGION);
    let tag = format!("image-{}", std::process::id());

    // Instances in LocalStack whose private IPs are the images' addresses.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(REGION))
            .endpoint_url(format!("http://{ls}"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .load()
            .await;
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let o = bridge_ip.octets();
        let vpc = ec2
            .create_vpc()
            .cidr_block(format!("{}.{}.0.0/16", o[0], o[1]))
            .send()
            .await
            .expect("create vpc");
        let subnet = ec2
            .create_subnet()
            .vpc_id(vpc.vpc().and_then(|v| v.vpc_id()).expect("vpc id"))
            .cidr_block(&cidr)
            .send()
            .await
            .expect("create subnet");
        let subnet = subnet.subnet().and_then(|s| s.subnet_id()).expect("subnet");
        for ip in &ips {
            ec2.run_instances()
                .image_id("ami-df5de72bdb3b")
                .min_count(1)
                .max_count(1)
                .subnet_id(subnet)
                .private_ip_address(ip.to_string())
                .tag_specifications(
                    TagSpecification::builder()
                        .resource_type(ResourceType::Instance)
                        .tags(Tag::builder().key("cluster").value(&tag).build())
                        .build(),
                )
                .send()
                .await
                .expect("run instance");
        }
    });

    let extra = format!(
        "NODE_AWS_ENDPOINT=http://{}\nNODE_DISCOVERY_REFRESH=2s\n\
         AWS_EC2_METADATA_SERVICE_ENDPOINT=http://{}\n\
         AWS_ACCESS_KEY_ID=test\nAWS_SECRET_ACCESS_KEY=test",
        relay.addr, imds.addr
    );
    for (vm, role) in ROLES.iter().enumerate() {
        let mut s = script.clone();
        for (var, value) in [
            ("ROLE", *role),
            ("CLUSTER_TAGS", &format!("cluster={tag}")),
            ("CLUSTER_NAME", "image"),
            ("PRIVATE_IP_SELECTOR", &cidr),
            ("PACKAGE", "/root/cluster-node.deb"),
            ("CLUSTER_KEY", &key),
            ("EXTRA_SETTINGS", &extra),
        ] {
            s = set_var(&s, var, value);
        }
        vms.write(vm, "/var/lib/cloud/user-data.sh", s.as_bytes(), 0o700)
            .unwrap();
        vms.write(
            vm,
            "/root/cluster-node.deb",
            &std::fs::read(&deb).unwrap(),
            0o644,
        )
        .unwrap();
        let unit = "/etc/systemd/system/cloud-user-data.service";
        vms.write(vm, unit, USER_DATA_UNIT.as_bytes(), 0o644)
            .unwrap();
        std::os::unix::fs::symlink(
            unit,
            vms.root(vm)
                .join("etc/systemd/system/multi-user.target.wants/cloud-user-data.service"),
        )
        .unwrap();
    }
    let start = Instant::now();
    for vm in 0..3 {
        vms.start(vm).unwrap();
    }
    let all: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
    let c = Cluster { vms, all };
    c.wait_full("the cluster the user data started");
    let boot_to_list = start.elapsed();
    for (vm, role) in ROLES.iter().enumerate() {
        assert_eq!(
            c.sh(vm, &format!("systemctl is-enabled {role}")).trim(),
            "enabled"
        );
        let j = c.journal(vm);
        assert!(j.contains("cluster key file loaded"), "vm{vm}:\n{j}");
        let settings = c.sh(vm, "cat /etc/default/cluster-node");
        assert!(settings.starts_with("NODE_DISCOVERY=aws\n"), "{settings}");
        assert_eq!(c.sh(vm, "stat -c %a /etc/cluster-node/key").trim(), "600");
    }
    // The region came from IMDSv2 (no region is configured anywhere). A node joined by its
    // peers may log the full list before its own first discovery round, so this waits.
    let served = || imds.served.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while served() < 3 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }
    assert!(
        served() >= 3,
        "the identity document was not read by every node: {:?}\n{}",
        imds.log.lock().map(|l| l.clone()).unwrap_or_default(),
        c.state()
    );
    eprintln!(
        "figures (ec2): first boot of 3 images to the full list everywhere {boot_to_list:?}; \
         whole test {:?}",
        test_start.elapsed()
    );
    drop(c);
    drop(relay);
    drop(imds);
}
