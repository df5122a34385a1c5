//! `cargo xtask demo`: a local cluster on loopback that needs no cloud.
//!
//! Two schedulers and three workers start on 127.0.0.11 to .15 with static discovery. Their
//! member logs stream here, prefixed with the node's name. Once every node lists all five, one
//! worker is killed with SIGKILL; once the survivors list four, everything stops with SIGTERM
//! (a graceful leave). Ctrl-C stops early, just as cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use membership::parse_logged_lists;

use crate::sh;

/// A running node whose logs are being collected.
pub struct Proc {
    /// The name shown in front of its lines.
    pub name: String,
    /// The process.
    pub child: Child,
    /// Everything it wrote to stderr so far.
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    /// Sends a signal by name (`TERM`, `KILL`) with the `kill` program.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// The last all-instances list it logged (port 10081), as (size, ver).
    fn last_all(&self) -> Option<(usize, u64)> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        parse_logged_lists(&log)
            .into_iter()
            .rev()
            .find(|l| l.port() == Some(10081))
            .map(|l| (l.size, l.ver))
    }
}

/// Stops every process when dropped: SIGTERM, then SIGKILL after two seconds.
pub struct Procs(pub Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &self.0 {
            p.signal("TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for p in &mut self.0 {
            loop {
                match p.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = p.child.kill();
                        let _ = p.child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

fn spawn(
    bin: &std::path::Path,
    name: &str,
    role: &str,
    ip: &str,
    peers: &str,
) -> anyhow::Result<Proc> {
    let mut child = Command::new(bin)
        .args(["--role", role, "--discovery", "static"])
        .args(["--private_ip_selector", &format!("{ip}/32")])
        .args(["--static_members", peers])
        .arg("--public_bind_to_any=false")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let (sink, prefix) = (log.clone(), format!("[{name:<11}]"));
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("{prefix} {line}");
            let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
            l.push_str(&line);
            l.push('\n');
        }
    });
    Ok(Proc {
        name: name.into(),
        child,
        log,
    })
}

/// Waits until `pred` holds, Ctrl-C is pressed, or the deadline passes.
fn wait(stop: &AtomicBool, deadline: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end && !stop.load(Ordering::SeqCst) {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Runs the demo.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    if let Some(a) = args.first() {
        bail!("`cargo xtask demo` takes no arguments, got `{a}`");
    }
    // Only the static backend: a cold clone then compiles no cloud SDK and no TLS stack
    // before the first list (cargo caches this build apart from the default-feature one).
    let mut build = sh::cargo();
    build.args([
        "build",
        "--quiet",
        "--package",
        "node",
        "--no-default-features",
        "--features",
        "static",
    ]);
    sh::run(build)?;
    let bin = sh::root().join("target/debug/node");

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("cannot install the Ctrl-C handler")?;
    }

    let peers = "127.0.0.11,127.0.0.12,127.0.0.13,127.0.0.14,127.0.0.15";
    let layout = [
        ("scheduler-1", "scheduler", "127.0.0.11"),
        ("scheduler-2", "scheduler", "127.0.0.12"),
        ("worker-1", "worker", "127.0.0.13"),
        ("worker-2", "worker", "127.0.0.14"),
        ("worker-3", "worker", "127.0.0.15"),
    ];
    let mut procs = Procs(Vec::new());
    let started = Instant::now();
    for (name, role, ip) in layout {
        procs.0.push(spawn(&bin, name, role, ip, peers)?);
    }

    let formed = wait(&stop, Duration::from_secs(20), || {
        procs
            .0
            .iter()
            .all(|p| p.last_all().is_some_and(|(n, _)| n == 5))
    });
    if stop.load(Ordering::SeqCst) {
        println!("\n== Ctrl-C: stopping every node with SIGTERM");
        return Ok(());
    }
    if !formed {
        bail!("the cluster did not form within 20 s; see the logs above");
    }
    println!(
        "\n== all 5 nodes list 5 members, {:.2} s after start; killing worker-3 with SIGKILL in 3 s\n",
        started.elapsed().as_secs_f64()
    );
    wait(&stop, Duration::from_secs(3), || false);
    if stop.load(Ordering::SeqCst) {
        return Ok(());
    }
    let victim = procs.0.pop().context("no worker to kill")?;
    victim.signal("KILL");
    let killed = Instant::now();
    let mut victim = victim;
    let _ = victim.child.wait();
    let removed = wait(&stop, Duration::from_secs(20), || {
        procs
            .0
            .iter()
            .all(|p| p.last_all().is_some_and(|(n, _)| n == 4))
    });
    if removed {
        println!(
            "\n== every survivor dropped {} after {:.2} s; stopping the rest with SIGTERM\n",
            victim.name,
            killed.elapsed().as_secs_f64()
        );
    } else if !stop.load(Ordering::SeqCst) {
        bail!("the survivors did not drop the killed worker within 20 s");
    }
    drop(procs);
    std::thread::sleep(Duration::from_millis(200));
    println!("== stopped");
    Ok(())
}
