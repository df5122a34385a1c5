//! LocalStack (EC2 only, host mode, from PyPI) for the AWS backend's tests.
//!
//! It is installed into a virtualenv under the target directory (reused when present), started
//! on a port that must be free, watched until its health endpoint says EC2 is up, and stopped by
//! PID when the guard is dropped, whether or not the tests passed.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::sh;

/// The environment variable that tells tests where LocalStack listens.
pub const ENDPOINT_ENV: &str = "LOCALSTACK_ENDPOINT";
/// What the tests' SDK clients need: dummy credentials, and no real instance metadata service.
pub const TEST_ENV: &[(&str, &str)] = &[
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
];
/// Where it listens by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4566";

/// The pinned set that starts on Python 3.11; newer releases need Python 3.12 or later.
const PINS: &[&str] = &[
    "localstack-core[runtime]==4.13.1",
    "cbor2<6",
    "pyopenssl<25",
    "cryptography<45",
    "joserfc<1.5",
    "service-identity",
    "boto3",
];
const HEALTH_TIMEOUT: Duration = Duration::from_secs(180);

/// The target directory cargo uses.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| sh::root().join("target"))
}

/// A running LocalStack; dropping it stops the process.
#[derive(Debug)]
pub struct LocalStack {
    child: Child,
    /// The URL to pass as `--aws_endpoint`.
    pub endpoint: String,
    log: PathBuf,
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Its own process group holds any helpers it started; stop those too.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        eprintln!("localstack stopped (log: {})", self.log.display());
    }
}

/// Makes sure the virtualenv exists with the pinned packages; returns its python.
pub fn ensure_installed(dir: &Path) -> anyhow::Result<PathBuf> {
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    let marker = venv.join(".installed");
    if python.exists() && marker.exists() {
        return Ok(python);
    }
    sh::ensure_debian_packages(&[("python3", "python3")])?;
    let venv_ok = Command::new("python3")
        .args(["-c", "import venv, ensurepip"])
        .status()
        .is_ok_and(|s| s.success());
    if !venv_ok {
        // Debian ships venv and ensurepip separately from python3.
        let mut update = Command::new("apt-get");
        update.args(["update", "-qq"]);
        sh::run(update)?;
        let mut install = Command::new("apt-get");
        install
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "python3-venv",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive");
        sh::run(install)?;
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    if !python.exists() {
        let mut c = Command::new("python3");
        c.args(["-m", "venv"]).arg(&venv);
        sh::run(c)?;
    }
    eprintln!(
        "installing LocalStack into {} (a few minutes, once)",
        venv.display()
    );
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ])
    .args(PINS);
    sh::run(pip)?;
    fs::write(&marker, PINS.join("\n")).context("cannot write the install marker")?;
    Ok(python)
}

/// Installs (once) and starts LocalStack on `listen`, then waits until EC2 is available.
pub fn start(listen: SocketAddr) -> anyhow::Result<LocalStack> {
    let dir = target_dir().join("localstack");
    let python = ensure_installed(&dir)?;
    if let Err(e) = TcpListener::bind(listen) {
        bail!(
            "cannot start LocalStack: {listen} is already in use ({e}); stop whatever holds it (`ss -ltnp 'sport = {}'`)",
            listen.port()
        );
    }
    let volume = dir.join("volume");
    fs::create_dir_all(&volume)?;
    let log = dir.join("localstack.log");
    let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let err = out.try_clone()?;
    let child = Command::new(&python)
        .args(["-m", "localstack.runtime.main"])
        .env("SERVICES", "ec2")
        // Hypercorn binds the address given; the default server listens on every interface.
        .env("GATEWAY_SERVER", "hypercorn")
        // No DNS server, and so no lookup of localstack.cloud at start-up.
        .env("DNS_ADDRESS", "0")
        .env("SKIP_SSL_CERT_DOWNLOAD", "1")
        .env("DISABLE_EVENTS", "1")
        .env("LOCALSTACK_VOLUME_DIR", &volume)
        .env("GATEWAY_LISTEN", listen.to_string())
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .context("cannot start LocalStack")?;
    let mut ls = LocalStack {
        child,
        endpoint: format!("http://{listen}"),
        log: log.clone(),
    };
    eprintln!(
        "localstack: pid {}, waiting for {}/_localstack/health",
        ls.child.id(),
        ls.endpoint
    );
    let started = Instant::now();
    loop {
        if let Some(status) = ls.child.try_wait()? {
            bail!(
                "LocalStack exited with {status} before it was ready; last lines of {}:\n{}",
                log.display(),
                tail(&log)
            );
        }
        if ec2_available(listen) {
            eprintln!(
                "localstack: ready in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            return Ok(ls);
        }
        if started.elapsed() > HEALTH_TIMEOUT {
            bail!(
                "LocalStack did not report ec2 available within {}s; last lines of {}:\n{}",
                HEALTH_TIMEOUT.as_secs(),
                log.display(),
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether the health endpoint lists ec2 as available or running.
fn ec2_available(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let req = format!("GET /_localstack/health HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.take(1 << 20).read_to_string(&mut body);
    let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    compact.contains("\"ec2\":\"available\"") || compact.contains("\"ec2\":\"running\"")
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// `cargo xtask localstack`: runs LocalStack in the foreground until Ctrl-C.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let listen: SocketAddr = args
        .first()
        .map_or(DEFAULT_LISTEN, String::as_str)
        .parse()
        .context("the argument is the address to listen on, e.g. 127.0.0.1:4566")?;
    let ls = start(listen)?;
    let (tx, rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })?;
    let vars: Vec<String> = TEST_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "export {ENDPOINT_ENV}={} {}\n# then: cargo test -p discovery-aws; Ctrl-C stops LocalStack",
        ls.endpoint,
        vars.join(" ")
    );
    let _ = rx.recv();
    drop(ls);
    Ok(())
}
