//! Booted images: Debian roots that boot with systemd as PID 1 in `systemd-nspawn` containers,
//! one per test-bed host, so packages, units and launch scripts are tested as on a real VM.
//!
//! # The base image
//!
//! [`base_image`] builds `bookworm.tar` once with `mmdebstrap --variant=minbase` (systemd,
//! dbus, iproute2, curl) and caches it in the target directory (`testbed-image/`); it is
//! rebuilt only when missing. Concurrent tests wait for one builder on a lock file.
//!
//! # VMs
//!
//! [`ImageBed::boot`] makes a [`Testbed`] of N hosts and, for each, unpacks its own copy of the
//! root and runs `systemd-nspawn --boot --register=no --keep-unit
//! --network-namespace-path=/run/netns/<host>` on it: the container shares the host's
//! namespace (its `eth0` and address), has systemd as PID 1 and needs no host D-Bus.
//! [`ImageBed::exec`] runs a shell command inside through `nsenter` into the init's
//! namespaces, with a clean environment and a deadline; [`ImageBed::journal`] reads a unit's
//! journal the way an operator does. [`ImageBed::reboot`] reboots a VM (nspawn exits with 133
//! and is started again on the same root). Before a boot, [`ImageBed::write`] puts files in
//! the root (a package, `/etc/hosts`, a unit that runs a launch script at boot).
//!
//! # Cleanup
//!
//! Dropping the [`ImageBed`], also while a test panics, powers every container off hard
//! (SIGKILL to its init, which ends its PID namespace; nspawn is killed if it has not exited
//! within 10 s), removes every root, then drops the [`Testbed`], which kills anything left in
//! the namespaces. Roots live under `testbed-image/run/<bed prefix>/`, a tmpfs of the bed's
//! own (unmounted on drop); a later bed unmounts and removes those of dead test processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{Testbed, TestbedError, describe, need_program, owner_pid, pid_alive, run};

/// How long a base-image build may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long a boot may take until `systemctl is-system-running` answers.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a container gets to power off before it is killed.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(10);
/// The packages in the base image besides minbase.
const PACKAGES: &str = "systemd,systemd-sysv,dbus,iproute2,curl,ca-certificates";
/// PATH inside the containers.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Checks what booted images need besides the test bed: root, `mmdebstrap`, `systemd-nspawn`
/// and `nsenter`.
pub fn check_prerequisites() -> Result<(), TestbedError> {
    super::check_prerequisites()?;
    need_program("mmdebstrap", "mmdebstrap")?;
    need_program("systemd-nspawn", "systemd-container")?;
    need_program("nsenter", "util-linux")
}

/// The cache directory: `$CARGO_TARGET_DIR/testbed-image`, else the `target` directory that
/// holds the running test binary, else the system's temporary directory.
pub fn cache_dir() -> PathBuf {
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("testbed-image");
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map_or_else(std::env::temp_dir, Path::to_path_buf)
        .join("testbed-image")
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> TestbedError {
    move |source| TestbedError::Io { what, source }
}

/// Runs `cmd` with a deadline; on timeout it is killed and the error says so.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output, TestbedError> {
    let command = describe(&cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| TestbedError::Spawn {
            command: command.clone(),
            source,
        })?;
    // Readers on threads, so a chatty command cannot fill a pipe and stall.
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child
            .try_wait()
            .map_err(io(format!("wait for `{command}`")))?
        {
            break st;
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TestbedError::Timeout {
                what: format!("`{command}` to finish"),
                waited: start.elapsed(),
                state: String::new(),
            });
        }
        thread::sleep(Duration::from_millis(50));
    };
    let join =
        |h: Option<thread::JoinHandle<Vec<u8>>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    Ok(Output {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

fn reader<R: std::io::Read + Send + 'static>(mut r: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

fn checked(cmd: Command, timeout: Duration) -> Result<String, TestbedError> {
    let command = describe(&cmd);
    let out = run_bounded(cmd, timeout)?;
    if !out.status.success() {
        return Err(TestbedError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cached base image, built first if it is missing (about a minute with a Debian mirror).
pub fn base_image() -> Result<PathBuf, TestbedError> {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let tar = dir.join("bookworm.tar");
    if tar.is_file() {
        return Ok(tar);
    }
    check_prerequisites()?;
    // One builder at a time: `flock` on a lock file, bounded like the build itself.
    let lock = dir.join("build.lock");
    // mmdebstrap picks the output format from the name, so the partial file ends in `.tar`.
    let part = dir.join(format!("bookworm.part-{}.tar", std::process::id()));
    let mut cmd = Command::new("flock");
    cmd.arg("-w")
        .arg(BUILD_TIMEOUT.as_secs().to_string())
        .arg(&lock)
        .arg("sh")
        .arg("-c")
        .arg(
            "test -f \"$1\" || { mmdebstrap --quiet --variant=minbase --include=\"$3\" \
             bookworm \"$2\" && mv \"$2\" \"$1\"; }; rc=$?; rm -f \"$2\"; exit $rc",
        )
        .arg("sh")
        .arg(&tar)
        .arg(&part)
        .arg(PACKAGES);
    checked(cmd, BUILD_TIMEOUT + Duration::from_secs(30))?;
    Ok(tar)
}

/// One booted container.
#[derive(Debug)]
struct Vm {
    name: String,
    host: usize,
    root: PathBuf,
    console: PathBuf,
    nspawn: Option<Child>,
}

/// Test-bed hosts, each running a booted image; powered off and removed on drop.
#[derive(Debug)]
pub struct ImageBed {
    vms: Vec<Vm>,
    run_dir: PathBuf,
    // Declared last: dropped after the containers are gone.
    bed: Testbed,
}

/// Removes the roots of beds whose test process is gone.
fn sweep_roots(run_dir: &Path) {
    let Ok(dirs) = std::fs::read_dir(run_dir) else {
        return;
    };
    for d in dirs.flatten() {
        let name = d.file_name().to_string_lossy().into_owned();
        if owner_pid(&name).is_some_and(|p| !pid_alive(p)) {
            remove_bed_dir(&d.path());
        }
    }
}

fn is_mount_point(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split(' ').nth(1) == Some(&*p)))
}

/// Removes a bed's directory: its tmpfs is unmounted (which frees the roots at once), then
/// whatever is left on disk is deleted.
fn remove_bed_dir(path: &Path) {
    if is_mount_point(path)
        && let Err(e) = run(["umount", "--lazy", &path.to_string_lossy()])
    {
        eprintln!("testbed cleanup: {e}");
    }
    remove_root(path);
}

fn remove_root(path: &Path) {
    // --one-file-system: never descend into anything still mounted below the root.
    if let Err(e) = run(["rm", "-rf", "--one-file-system", &path.to_string_lossy()]) {
        eprintln!("testbed cleanup: {e}");
    }
}

impl ImageBed {
    /// Makes a test bed of `n` hosts and unpacks one root per host from the base image; the
    /// VMs are named `vm0`, `vm1`, ... and are booted by [`ImageBed::start`].
    pub fn new(n: usize) -> Result<Self, TestbedError> {
        check_prerequisites()?;
        let image = base_image()?;
        let bed = Testbed::new(n)?;
        let run_dir = cache_dir().join("run");
        sweep_roots(&run_dir);
        let mut me = ImageBed {
            vms: Vec::new(),
            run_dir: run_dir.join(bed.prefix()),
            bed,
        };
        std::fs::create_dir_all(&me.run_dir)
            .map_err(io(format!("cannot create {}", me.run_dir.display())))?;
        // The roots live in a tmpfs of their own: unpacking takes about a second instead of
        // many on a busy disk, and unmounting frees them at once. Memory is used only as
        // files are written (about 350 MB per VM with the package installed); where tmpfs
        // cannot be mounted, the roots stay on disk.
        let size = format!("size={}m,mode=0755", 1024 * n.max(1));
        let dir = me.run_dir.to_string_lossy().into_owned();
        if let Err(e) = run(["mount", "-t", "tmpfs", "-o", &size, "tmpfs", &dir]) {
            eprintln!("testbed: roots on disk, tmpfs failed: {e}");
        }
        for host in 0..n {
            let root = me.run_dir.join(format!("vm{host}"));
            me.vms.push(Vm {
                name: format!("{}-vm{host}", me.bed.prefix()),
                host,
                root: root.clone(),
                console: me.run_dir.join(format!("vm{host}.console")),
                nspawn: None,
            });
            std::fs::create_dir_all(&root)
                .map_err(io(format!("cannot create {}", root.display())))?;
        }
        // The roots are unpacked in parallel: each takes seconds on a busy disk.
        let unpacks: Vec<_> = me
            .vms
            .iter()
            .map(|v| {
                let mut tar = Command::new("tar");
                tar.arg("-xpf").arg(&image).arg("-C").arg(&v.root);
                thread::spawn(move || checked(tar, Duration::from_secs(180)))
            })
            .collect();
        for u in unpacks {
            u.join().map_err(|_| TestbedError::Command {
                command: "tar -xpf".into(),
                status: "panicked".into(),
                stderr: String::new(),
            })??;
        }
        for host in 0..n {
            // A fresh machine id at first boot, as a cloned VM image has, and its own name.
            let name = me.vms[host].name.clone();
            me.write(host, "/etc/machine-id", b"", 0o444)?;
            me.write(host, "/etc/hostname", format!("{name}\n").as_bytes(), 0o644)?;
            let hosts = format!("127.0.0.1 localhost\n127.0.1.1 {name}\n");
            me.write(host, "/etc/hosts", hosts.as_bytes(), 0o644)?;
        }
        Ok(me)
    }

    /// Makes `n` VMs and boots them all (see [`ImageBed::new`] and [`ImageBed::start`]).
    pub fn boot(n: usize) -> Result<Self, TestbedError> {
        let mut me = Self::new(n)?;
        for vm in 0..n {
            me.start(vm)?;
        }
        for vm in 0..n {
            me.wait_booted(vm)?;
        }
        Ok(me)
    }

    /// The network test bed the VMs run in (addresses, bridge, link cuts, root processes).
    pub fn bed(&mut self) -> &mut Testbed {
        &mut self.bed
    }

    /// How many VMs there are.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }

    /// A VM's address.
    pub fn ip(&self, vm: usize) -> std::net::Ipv4Addr {
        self.bed.host(self.vms[vm].host).ip
    }

    /// A VM's machine (and host) name.
    pub fn name(&self, vm: usize) -> &str {
        &self.vms[vm].name
    }

    /// A VM's root directory on the host, to place files before (or while) it runs.
    pub fn root(&self, vm: usize) -> &Path {
        &self.vms[vm].root
    }

    /// Writes a file into a VM's root, creating its directories, with `mode`.
    pub fn write(
        &self,
        vm: usize,
        path: &str,
        content: &[u8],
        mode: u32,
    ) -> Result<(), TestbedError> {
        use std::os::unix::fs::PermissionsExt as _;
        let full = self.vms[vm].root.join(path.trim_start_matches('/'));
        if let Some(d) = full.parent() {
            std::fs::create_dir_all(d).map_err(io(format!("cannot create {}", d.display())))?;
        }
        std::fs::write(&full, content).map_err(io(format!("cannot write {}", full.display())))?;
        std::fs::set_permissions(&full, std::fs::Permissions::from_mode(mode))
            .map_err(io(format!("cannot chmod {}", full.display())))
    }

    /// Boots a VM: `systemd-nspawn --boot` in its host's network namespace. Returns at once;
    /// [`ImageBed::wait_booted`] waits for systemd.
    pub fn start(&mut self, vm: usize) -> Result<(), TestbedError> {
        let v = &mut self.vms[vm];
        if v.nspawn.is_some() {
            return Ok(());
        }
        let ns = &self.bed.host(v.host).netns;
        let console = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&v.console)
            .map_err(io(format!("cannot open {}", v.console.display())))?;
        let console2 = console
            .try_clone()
            .map_err(io(format!("cannot open {}", v.console.display())))?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args([
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            "--resolv-conf=off",
            "--timezone=off",
            "--link-journal=no",
        ])
        .arg(format!("--network-namespace-path=/run/netns/{ns}"))
        .arg(format!("--machine={}", v.name))
        .arg("-D")
        .arg(&v.root)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(console2);
        let child = cmd.spawn().map_err(|source| TestbedError::Spawn {
            command: describe(&cmd),
            source,
        })?;
        v.nspawn = Some(child);
        Ok(())
    }

    /// The PID (in the root namespace) of a running VM's init, systemd.
    fn init_pid(&self, vm: usize) -> Option<u32> {
        let parent = self.vms[vm].nspawn.as_ref()?.id();
        // nspawn's child in another PID namespace is the container's PID 1.
        let own = std::fs::read_link("/proc/self/ns/pid").ok()?;
        std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<u32>().ok());
                ppid == Some(parent)
                    && std::fs::read_link(format!("/proc/{pid}/ns/pid"))
                        .ok()
                        .as_ref()
                        != Some(&own)
            })
    }

    /// Waits until systemd in the VM has finished booting (`is-system-running` says
    /// `running` or `degraded`); returns how long it waited.
    pub fn wait_booted(&mut self, vm: usize) -> Result<Duration, TestbedError> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.vms[vm]
                .nspawn
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(TestbedError::Command {
                    command: format!("boot {}", self.vms[vm].name),
                    status: st.to_string(),
                    stderr: self.console(vm),
                });
            }
            if self.init_pid(vm).is_some() {
                let left = BOOT_TIMEOUT.saturating_sub(start.elapsed());
                if let Ok(out) = self.exec_for(vm, "systemctl is-system-running --wait", left) {
                    let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                    if state == "running" || state == "degraded" {
                        return Ok(start.elapsed());
                    }
                }
            }
            if start.elapsed() >= BOOT_TIMEOUT {
                return Err(TestbedError::Timeout {
                    what: format!("{} to boot", self.vms[vm].name),
                    waited: start.elapsed(),
                    state: self.console(vm),
                });
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// What the VM's console printed (the boot messages), for failure messages.
    pub fn console(&self, vm: usize) -> String {
        let text = std::fs::read_to_string(&self.vms[vm].console).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Runs `sh -c script` inside a VM (every namespace of its init, a clean environment) and
    /// returns its output whatever its exit status; killed after `timeout`.
    pub fn exec_for(
        &self,
        vm: usize,
        script: &str,
        timeout: Duration,
    ) -> Result<Output, TestbedError> {
        let pid = self.init_pid(vm).ok_or_else(|| TestbedError::Command {
            command: format!("exec in {}", self.vms[vm].name),
            status: "not run".into(),
            stderr: "the VM is not running".into(),
        })?;
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(pid.to_string())
            .args(["-m", "-u", "-i", "-n", "-p", "--", "sh", "-c", script])
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_bounded(cmd, timeout)
    }

    /// Runs `sh -c script` inside a VM with a 60 s deadline and returns its stdout; a non-zero
    /// exit is an error with its stderr.
    pub fn exec(&self, vm: usize, script: &str) -> Result<String, TestbedError> {
        let out = self.exec_for(vm, script, Duration::from_secs(60))?;
        if !out.status.success() {
            return Err(TestbedError::Command {
                command: format!("{}: {script}", self.vms[vm].name),
                status: out.status.to_string(),
                stderr: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .trim()
                .to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A unit's journal as an operator reads it: `journalctl -n10000 --unit=UNIT`.
    pub fn journal(&self, vm: usize, unit: &str) -> Result<String, TestbedError> {
        self.exec(vm, &format!("journalctl -n10000 --no-pager --unit={unit}"))
    }

    /// Reboots a VM (`systemctl reboot`); nspawn exits with 133 and is started again on the same
    /// root. Returns when the new boot has finished, with how long the whole reboot took.
    pub fn reboot(&mut self, vm: usize) -> Result<Duration, TestbedError> {
        let start = Instant::now();
        let _ = self.exec_for(vm, "systemctl reboot", Duration::from_secs(10));
        let v = &mut self.vms[vm];
        if let Some(mut child) = v.nspawn.take() {
            loop {
                if let Some(st) = child.try_wait().ok().flatten() {
                    if st.code() != Some(133) {
                        return Err(TestbedError::Command {
                            command: format!("reboot {}", v.name),
                            status: st.to_string(),
                            stderr: "systemd-nspawn did not exit with 133 (reboot)".into(),
                        });
                    }
                    break;
                }
                if start.elapsed() >= POWEROFF_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(TestbedError::Timeout {
                        what: format!("{} to shut down for a reboot", v.name),
                        waited: start.elapsed(),
                        state: String::new(),
                    });
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
        self.start(vm)?;
        self.wait_booted(vm)?;
        Ok(start.elapsed())
    }

    /// Powers a VM off: `systemctl poweroff` inside (as an operator would; nspawn then exits),
    /// SIGKILL to its init and nspawn after 10 s.
    pub fn poweroff(&mut self, vm: usize) {
        let _ = self.exec_for(vm, "systemctl poweroff --no-block", Duration::from_secs(5));
        let init = self.init_pid(vm);
        if let Some(child) = self.vms[vm].nspawn.take() {
            finish(child, init, Instant::now());
        }
    }
}

/// Waits for a powered-off container's nspawn until `POWEROFF_TIMEOUT` after `start`, then
/// kills its init (which kills everything in its PID namespace) and nspawn.
fn finish(mut child: Child, init: Option<u32>, start: Instant) {
    while start.elapsed() < POWEROFF_TIMEOUT {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    if let Some(pid) = init {
        let _ = run(["kill", "-KILL", &pid.to_string()]);
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for ImageBed {
    fn drop(&mut self) {
        // A hard power-off: SIGKILL to each init ends its PID namespace at once (a clean
        // shutdown of three VMs took half a minute on a busy machine, and the roots are
        // discarded anyway); nspawn then exits and its mounts go with its mount namespace.
        let inits: Vec<Option<u32>> = (0..self.vms.len()).map(|v| self.init_pid(v)).collect();
        for pid in inits.iter().flatten() {
            let _ = run(["kill", "-KILL", &pid.to_string()]);
        }
        let start = Instant::now();
        for (v, init) in self.vms.iter_mut().zip(inits) {
            if let Some(child) = v.nspawn.take() {
                finish(child, init, start);
            }
        }
        // Unmounting the tmpfs frees every root at once; roots on disk are removed in parallel
        // (each takes seconds on a busy disk).
        let removals: Vec<_> = self
            .vms
            .iter()
            .map(|v| {
                let root = v.root.clone();
                let dir = self.run_dir.clone();
                thread::spawn(move || {
                    if !is_mount_point(&dir) {
                        remove_root(&root);
                    }
                })
            })
            .collect();
        for r in removals {
            let _ = r.join();
        }
        remove_bed_dir(&self.run_dir);
        // `bed` drops next: anything left in the namespaces is killed there.
    }
}
