//! `GET /metrics`: the engines' counters and discovery's rounds, in the Prometheus text format.
//!
//! Cluster metrics are read from the shared views at scrape time (a collector), so the engine
//! loop does no metrics work. Discovery metrics are updated by the refresh loop through
//! [`DiscoveryMetrics`], the node's [`RefreshObserver`].

use std::time::Duration;

use discovery::{DiscoveryError, RefreshObserver};
use membership::PROBE_RTT_BOUNDS;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::cluster::SharedView;

/// The content type of the OpenMetrics text format that [`Metrics::render`] produces.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = [(&'static str, &'static str); 1];

/// Discovery's rounds, fed by the refresh loop.
#[derive(Debug)]
pub struct DiscoveryMetrics {
    refreshes: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    latency: Histogram,
    candidates: Gauge,
}

impl DiscoveryMetrics {
    fn new() -> Self {
        Self {
            refreshes: Family::default(),
            errors: Family::default(),
            latency: Histogram::new([0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            candidates: Gauge::default(),
        }
    }
}

impl RefreshObserver for DiscoveryMetrics {
    fn round(&self, latency: Duration, outcome: Result<usize, &DiscoveryError>) {
        self.latency.observe(latency.as_secs_f64());
        match outcome {
            Ok(n) => {
                self.refreshes.get_or_create(&[("outcome", "ok")]).inc();
                self.candidates.set(i64::try_from(n).unwrap_or(i64::MAX));
            }
            Err(e) => {
                self.refreshes.get_or_create(&[("outcome", "error")]).inc();
                self.errors.get_or_create(&[("kind", e.kind())]).inc();
            }
        }
    }
}

/// Reads the clusters' views at every scrape.
#[derive(Debug)]
struct ClusterCollector {
    clusters: Vec<SharedView>,
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(0u64);
    let mut m = enc.encode_descriptor(name, help, None, c.metric_type())?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(0i64);
    let mut m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for ClusterCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let views: Vec<_> = self
            .clusters
            .iter()
            .map(|v| v.read().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        let rows = |f: &dyn Fn(&crate::cluster::ClusterView) -> u64| -> Vec<(Labels, u64)> {
            views
                .iter()
                .map(|v| ([("cluster", v.name)], f(v)))
                .collect()
        };
        let as_i64 = |rows: Vec<(Labels, u64)>| -> Vec<(Labels, i64)> {
            rows.into_iter()
                .map(|(l, v)| (l, i64::try_from(v).unwrap_or(i64::MAX)))
                .collect()
        };
        gauge(
            &mut enc,
            "node_cluster_members",
            "Members in the list this node holds.",
            &as_i64(rows(&|v| v.list.members.len() as u64)),
        )?;
        gauge(
            &mut enc,
            "node_cluster_list_version",
            "Version (ver) of the member list this node holds.",
            &as_i64(rows(&|v| v.list.ver)),
        )?;
        counter(
            &mut enc,
            "node_cluster_joins",
            "Members the local failure detector saw become active.",
            &rows(&|v| v.stats.members_up),
        )?;
        counter(
            &mut enc,
            "node_cluster_members_down",
            "Members the local failure detector declared down, failures and leaves together.",
            &rows(&|v| v.stats.members_down),
        )?;
        counter(
            &mut enc,
            "node_cluster_leaves",
            "Graceful leaves received.",
            &rows(&|v| v.stats.leaves),
        )?;
        counter(
            &mut enc,
            "node_cluster_failures",
            "Members declared down without a leave received: members_down minus leaves.",
            &rows(&|v| v.stats.members_down.saturating_sub(v.stats.leaves)),
        )?;
        counter(
            &mut enc,
            "node_cluster_suspicions_raised",
            "Probes of other members that failed: suspicions this node raised.",
            &rows(&|v| v.stats.suspicions_raised),
        )?;
        counter(
            &mut enc,
            "node_cluster_suspicions_refuted",
            "Suspicions about this node that it refuted.",
            &rows(&|v| v.stats.suspicions_refuted),
        )?;
        counter(
            &mut enc,
            "node_cluster_suspicion_confirmations",
            "Independent confirmations of suspicions received (Lifeguard).",
            &rows(&|v| v.stats.confirmations),
        )?;
        gauge(
            &mut enc,
            "node_cluster_local_health",
            "Lifeguard's local health score; 0 is healthy, higher means this node is slow.",
            &as_i64(rows(&|v| u64::from(v.stats.health))),
        )?;
        counter(
            &mut enc,
            "node_cluster_rejoins",
            "Times this node renewed its identity after being declared down.",
            &rows(&|v| v.stats.rejoins),
        )?;
        counter(
            &mut enc,
            "node_cluster_packets_in",
            "Messages received (datagrams and stream frames).",
            &rows(&|v| v.stats.datagrams_in),
        )?;
        counter(
            &mut enc,
            "node_cluster_packets_out",
            "Messages sent (datagrams and stream frames).",
            &rows(&|v| v.stats.datagrams_out),
        )?;
        counter(
            &mut enc,
            "node_cluster_bytes_in",
            "Bytes of messages received.",
            &rows(&|v| v.stats.bytes_in),
        )?;
        counter(
            &mut enc,
            "node_cluster_bytes_out",
            "Bytes of messages sent.",
            &rows(&|v| v.stats.bytes_out),
        )?;
        {
            let c = ConstCounter::new(0u64);
            let mut m = enc.encode_descriptor(
                "node_cluster_packets_rejected",
                "Messages dropped, by reason.",
                None,
                c.metric_type(),
            )?;
            for v in &views {
                for (reason, n) in &v.stats.rejected {
                    let labels = [("cluster", v.name), ("reason", *reason)];
                    ConstCounter::new(*n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
        {
            let unit = Unit::Seconds;
            let mut m = enc.encode_descriptor(
                "node_cluster_probe_rtt",
                "Round trip of direct probes (ping to ack) that were answered.",
                Some(&unit),
                MetricType::Histogram,
            )?;
            for v in &views {
                let st = &v.stats;
                let buckets: Vec<(f64, u64)> = PROBE_RTT_BOUNDS
                    .iter()
                    .map(Duration::as_secs_f64)
                    .chain(std::iter::once(f64::INFINITY))
                    .zip(st.probe_rtt_buckets.iter().copied())
                    .collect();
                let count = st.probe_rtt_buckets.iter().sum();
                let labels = [("cluster", v.name)];
                m.encode_family(&labels)?.encode_histogram::<Labels>(
                    st.probe_rtt_sum.as_secs_f64(),
                    count,
                    &buckets,
                    None,
                )?;
            }
        }
        Ok(())
    }
}

/// Every metric of a node.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Registers the cluster collector and returns the observer for the refresh loop.
    pub fn new(clusters: Vec<SharedView>) -> (Self, std::sync::Arc<DiscoveryMetrics>) {
        let mut registry = Registry::default();
        let d = std::sync::Arc::new(DiscoveryMetrics::new());
        registry.register(
            "node_discovery_refreshes",
            "Discovery rounds, by outcome.",
            d.refreshes.clone(),
        );
        registry.register(
            "node_discovery_errors",
            "Failed discovery rounds, by error kind.",
            d.errors.clone(),
        );
        registry.register_with_unit(
            "node_discovery_refresh_latency",
            "Duration of discovery rounds.",
            Unit::Seconds,
            d.latency.clone(),
        );
        registry.register(
            "node_discovery_candidates",
            "Candidates found by the last successful discovery round.",
            d.candidates.clone(),
        );
        registry.register_collector(Box::new(ClusterCollector { clusters }));
        (Self { registry }, d)
    }

    /// Adds a collector read at every scrape (the HTTP listeners' counters).
    pub fn register_collector(&mut self, collector: Box<dyn Collector>) {
        self.registry.register_collector(collector);
    }

    /// The exposition, in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("cannot encode the metrics: {e}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_rounds_are_counted_by_outcome_and_error_kind() {
        let (m, d) = Metrics::new(Vec::new());
        d.round(Duration::from_millis(30), Ok(3));
        let denied = DiscoveryError::Unauthorized {
            backend: "aws",
            message: "grant ec2:DescribeInstances".into(),
        };
        d.round(Duration::from_millis(20), Err(&denied));
        d.round(Duration::from_millis(20), Err(&denied));
        let text = m.render();
        for line in [
            "node_discovery_refreshes_total{outcome=\"ok\"} 1",
            "node_discovery_refreshes_total{outcome=\"error\"} 2",
            "node_discovery_errors_total{kind=\"unauthorized\"} 2",
            "node_discovery_candidates 3",
            "node_discovery_refresh_latency_seconds_count 3",
            "node_discovery_refresh_latency_seconds_bucket{le=\"0.05\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
