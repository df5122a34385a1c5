//! The booted-image test bed itself: two VMs boot with systemd as PID 1 on the bridge, reach
//! each other, keep files across a reboot, and leave no root, mount, container or namespace
//! behind, also when the test panics.

use std::time::Instant;

use testbed::image::{self, ImageBed};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|r| r.split_whitespace().nth(1))
            == Some("0")
    })
}

#[test]
fn vms_boot_systemd_talk_reboot_and_vanish() {
    if !is_root() {
        eprintln!("skipped: booted images need root (systemd-nspawn, network namespaces)");
        return;
    }
    image::check_prerequisites().expect("prerequisites");
    let t = Instant::now();
    let mut vms = ImageBed::new(2).expect("two roots");
    eprintln!("two roots unpacked in {:?}", t.elapsed());
    let t = Instant::now();
    for vm in 0..2 {
        vms.start(vm).expect("start");
    }
    for vm in 0..2 {
        vms.wait_booted(vm).expect("boot");
    }
    eprintln!("two VMs booted in {:?}", t.elapsed());
    let root = vms.root(0).to_path_buf();
    let netns = vms.bed().host(0).netns.clone();

    // systemd is PID 1, the VM has the test bed's address and reaches the other VM.
    let comm = vms.exec(0, "cat /proc/1/comm").unwrap();
    assert_eq!(comm.trim(), "systemd");
    let addrs = vms.exec(0, "ip -4 -o addr show dev eth0").unwrap();
    assert!(addrs.contains(&vms.ip(0).to_string()), "{addrs}");
    let other = vms.ip(1);
    vms.exec(0, &format!("curl -s -m 5 telnet://{other}:1 || true"))
        .unwrap();
    let hostname = vms.exec(1, "hostname").unwrap();
    assert_eq!(hostname.trim(), vms.name(1));
    // The journal answers, as an operator reads it.
    let journal = vms.journal(0, "systemd-journald").unwrap();
    assert!(journal.contains("journal"), "{journal}");

    // A file written inside survives a reboot; the boot is a new one.
    let boot1 = vms
        .exec(
            0,
            "cat /proc/sys/kernel/random/boot_id; journalctl --list-boots | wc -l",
        )
        .unwrap();
    vms.exec(0, "echo kept > /var/lib/marker").unwrap();
    let took = vms.reboot(0).expect("reboot");
    eprintln!("reboot took {took:?}");
    assert_eq!(vms.exec(0, "cat /var/lib/marker").unwrap(), "kept\n");
    let comm = vms.exec(0, "cat /proc/1/comm").unwrap();
    assert_eq!(comm.trim(), "systemd");
    let boot2 = vms.exec(0, "cat /proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(boot1.lines().next(), boot2.lines().next());

    let t = Instant::now();
    drop(vms);
    eprintln!("powered off and removed in {:?}", t.elapsed());
    assert!(!root.exists(), "{} survived the drop", root.display());
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&namespaces.stdout).contains(&netns));
}

/// A test that panics with a VM running still leaves nothing behind: no container process, no
/// root, no mount, no namespace.
#[test]
fn a_panic_powers_off_and_removes_everything() {
    if !is_root() {
        eprintln!("skipped: booted images need root (systemd-nspawn, network namespaces)");
        return;
    }
    image::check_prerequisites().expect("prerequisites");
    let seen = std::sync::Mutex::new(None);
    let result = std::panic::catch_unwind(|| {
        let mut vms = ImageBed::boot(1).expect("boot one VM");
        let init = vms.exec(0, "echo $PPID").unwrap();
        assert!(!init.trim().is_empty());
        let dir = vms.root(0).parent().unwrap().to_path_buf();
        let netns = vms.bed().host(0).netns.clone();
        *seen.lock().unwrap() = Some((dir, netns, vms.name(0).to_owned()));
        panic!("a failing check with a VM running");
    });
    assert!(result.is_err());
    let (dir, netns, name) = seen.lock().unwrap().take().expect("the VM booted");
    assert!(!dir.exists(), "{} survived the panic", dir.display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(&*dir.to_string_lossy()), "{mounts}");
    let namespaces = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&namespaces.stdout).contains(&netns));
    let ps = std::process::Command::new("ps")
        .args(["-eo", "args"])
        .output()
        .unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !ps.lines()
            .any(|l| l.contains("systemd-nspawn") && l.contains(&name)),
        "{ps}"
    );
}
