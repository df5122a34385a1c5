//! The start-up gate (`--min_cluster_size`): a node reports ready, through `/readyz` and
//! systemd's READY, only once its all-instances cluster has held that many members, so a lone
//! node is never taken for a formed cluster (Hazelcast's `initial.min.cluster.size`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use discovery::Snapshot;
use tokio::sync::watch;

/// How often a node that has not reached the size says why it waits.
pub const WAIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How far each wait explanation pushes systemd's start timeout back (`EXTEND_TIMEOUT_USEC`).
/// It exceeds [`WAIT_LOG_INTERVAL`], so a `Type=notify` unit stays "activating" for as long as
/// the node waits, instead of being killed and restarted after `TimeoutStartSec` (90 s by
/// default) while its peers are still booting.
pub const START_EXTENSION: Duration = Duration::from_secs(30);

/// Readiness as `/readyz` sees it.
#[derive(Debug)]
pub struct Gate {
    /// `--min_cluster_size`.
    pub min: usize,
    /// True once discovery has answered at least once.
    pub discovered: Arc<AtomicBool>,
    /// The all-instances list's size now.
    have: AtomicUsize,
    /// Latched once the size was reached: the gate is for start-up, so a later loss of
    /// members does not take a formed node out of service.
    opened: AtomicBool,
}

impl Gate {
    /// A gate for `min` members; a single-member gate is open from the start.
    pub fn new(min: usize, discovered: Arc<AtomicBool>) -> Self {
        Self {
            min,
            discovered,
            have: AtomicUsize::new(1),
            opened: AtomicBool::new(min <= 1),
        }
    }

    /// Records the all-instances list's size; true when this call opened the gate.
    pub fn observe(&self, size: usize) -> bool {
        self.have.store(size, Ordering::Relaxed);
        size >= self.min && !self.opened.swap(true, Ordering::Relaxed)
    }

    /// Whether the cluster has held `min` members.
    pub fn formed(&self) -> bool {
        self.opened.load(Ordering::Relaxed)
    }

    /// `Ok` when ready; otherwise what the node waits for, for `/readyz` and the log.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.discovered.load(Ordering::Relaxed) {
            return Err("discovery has not answered yet".into());
        }
        if !self.formed() {
            return Err(format!(
                "the all-instances cluster holds {} of the {} members --min_cluster_size asks for",
                self.have.load(Ordering::Relaxed),
                self.min
            ));
        }
        Ok(())
    }
}

/// Feeds the gate from the all-instances list's size, and logs why the node waits every
/// [`WAIT_LOG_INTERVAL`] until the gate opens, naming the candidates discovery found. Returns
/// once the gate is open, after sending `opened` (the READY notification waits for it).
pub async fn run(
    gate: Arc<Gate>,
    mut size: watch::Receiver<usize>,
    candidates: watch::Receiver<Snapshot>,
    opened: tokio::sync::oneshot::Sender<()>,
) {
    let mut tick = tokio::time::interval(WAIT_LOG_INTERVAL);
    tick.tick().await;
    if !gate.formed() {
        crate::notify::notify(&format!(
            "EXTEND_TIMEOUT_USEC={}",
            START_EXTENSION.as_micros()
        ));
    }
    loop {
        let now = *size.borrow_and_update();
        gate.observe(now);
        if gate.formed() {
            if gate.min > 1 {
                tracing::info!(
                    members = now,
                    min = gate.min,
                    "the all-instances cluster reached --min_cluster_size; reporting ready"
                );
            }
            let _ = opened.send(());
            return;
        }
        tokio::select! {
            r = size.changed() => if r.is_err() { return },
            _ = tick.tick() => {
                crate::notify::notify(&format!(
                    "EXTEND_TIMEOUT_USEC={}",
                    START_EXTENSION.as_micros()
                ));
                let snap = candidates.borrow().clone();
                let found: Vec<String> = snap
                    .candidates
                    .iter()
                    .take(20)
                    .map(|c| std::net::SocketAddr::new(c.ip, c.port).to_string())
                    .collect();
                tracing::warn!(
                    members = now,
                    min = gate.min,
                    candidates = snap.candidates.len(),
                    refreshes = snap.refreshes,
                    "not ready: the all-instances cluster holds {now} of the {} members \
                     --min_cluster_size asks for; discovery found [{}]{}; waiting for the \
                     others to start and join",
                    gate.min,
                    found.join(", "),
                    if snap.candidates.len() > found.len() { ", ..." } else { "" },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_opens_at_the_size_and_stays_open() {
        let discovered = Arc::new(AtomicBool::new(true));
        let g = Gate::new(3, discovered.clone());
        let e = g.readiness().unwrap_err();
        assert!(e.contains("1 of the 3"), "{e}");
        assert!(!g.observe(2));
        assert!(g.readiness().unwrap_err().contains("2 of the 3"));
        assert!(g.observe(3), "reaching the size opens the gate");
        assert!(!g.observe(3), "only once");
        assert!(g.readiness().is_ok());
        g.observe(1);
        assert!(
            g.readiness().is_ok(),
            "a formed node stays ready when members leave"
        );
    }

    #[test]
    fn a_single_member_gate_waits_for_discovery_only() {
        let discovered = Arc::new(AtomicBool::new(false));
        let g = Gate::new(1, discovered.clone());
        assert!(g.formed());
        assert!(g.readiness().unwrap_err().contains("discovery"));
        discovered.store(true, Ordering::Relaxed);
        assert!(g.readiness().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn run_signals_once_the_size_is_reached() {
        let g = Arc::new(Gate::new(2, Arc::new(AtomicBool::new(true))));
        let (size_tx, size_rx) = watch::channel(1usize);
        let (_cand_tx, cand_rx) = watch::channel(Snapshot::default());
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(g.clone(), size_rx, cand_rx, tx));
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(rx.try_recv().is_err(), "opened with one member of two");
        size_tx.send_replace(2);
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("the gate task ends once open")
            .expect("no panic");
        assert!(rx.try_recv().is_ok());
        assert!(g.formed());
    }
}
