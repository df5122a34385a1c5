//! Shared by node's process tests: a `node` child whose stderr is collected, killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use membership::{LoggedList, parse_logged_lists};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_node");

/// A running process whose stderr is collected; SIGKILLed and reaped when dropped.
pub struct Node {
    pub child: Child,
    log: Arc<Mutex<String>>,
}

impl Node {
    /// Spawns `cmd` with stdin and stdout closed and stderr collected.
    pub fn spawn(mut cmd: Command) -> Node {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|p| p.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        Node { child, log }
    }

    /// Everything written to stderr so far.
    pub fn text(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every member list logged for the cluster on `port`, oldest first.
    pub fn lists(&self, port: u16) -> Vec<LoggedList> {
        parse_logged_lists(&self.text())
            .into_iter()
            .filter(|l| l.port() == Some(port))
            .collect()
    }

    /// The last member list logged for the cluster on `port`.
    pub fn last(&self, port: u16) -> Option<LoggedList> {
        self.lists(port).pop()
    }

    /// This node's UUID, from the `this` line of its last list on `port`.
    pub fn me(&self, port: u16) -> uuid::Uuid {
        self.last(port)
            .and_then(|l| l.members.into_iter().find(|m| m.this))
            .expect("a logged list")
            .uuid
    }

    /// Sends a signal by name (`TERM`, `KILL`, `HUP`).
    pub fn signal(&self, sig: &str) {
        Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `pred` until it holds or `within` passes; returns its last value.
pub fn wait_until(within: Duration, mut pred: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if pred() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pred()
}
