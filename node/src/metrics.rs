//! `GET /metrics`: the engines' counters and discovery's rounds, in the Prometheus text format.
//!
//! Cluster metrics are read from the shared views at scrape time (a collector), so the engine
//! loop does no metrics work. Discovery metrics are updated by the refresh loop through
//! [`DiscoveryMetrics`], the node's [`RefreshObserver`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use discovery::{Discover, DiscoveryError, RefreshObserver};
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
        {
            let g = ConstGauge::new(0i64);
            let mut m = enc.encode_descriptor(
                "node_cluster_zone_members",
                "Members in the list this node holds, by role and zone (empty: none reported).",
                None,
                g.metric_type(),
            )?;
            for v in &views {
                for ((role, zone), n) in members_by_role_zone(&v.list) {
                    let labels = [("cluster", v.name), ("role", role), ("zone", zone.as_str())];
                    ConstGauge::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
        }
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

/// The discovery backend's own counters ([`Discover::counters`]), read at every scrape; each
/// becomes a counter `<name>_total`.
pub struct BackendCollector(pub std::sync::Arc<dyn Discover>);

impl std::fmt::Debug for BackendCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BackendCollector")
            .field(&self.0.name())
            .finish()
    }
}

impl Collector for BackendCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for c in self.0.counters() {
            let counter = ConstCounter::new(c.value);
            let m = enc.encode_descriptor(c.name, c.help, None, counter.metric_type())?;
            counter.encode(m)?;
        }
        Ok(())
    }
}

/// The most distinct zones one cluster's members are counted under; the members of any
/// further zone are counted under [`OTHER_ZONES`]. Zones come from peers, so this bounds
/// the series a cluster of liars can create, beyond the member cap.
pub const MAX_ZONES: usize = 32;

/// The zone label of members beyond [`MAX_ZONES`] zones: not a valid zone (it starts with
/// `_`), so it never names a real one.
pub const OTHER_ZONES: &str = "_other";

/// Counts a list's members by role and zone, with at most [`MAX_ZONES`] zones (the most
/// populous first; ties by name) and the rest under [`OTHER_ZONES`].
fn members_by_role_zone(list: &membership::MemberList) -> BTreeMap<(&'static str, String), i64> {
    let zone_of =
        |m: &membership::NodeId| list.zone(m.uuid).map(|z| z.to_string()).unwrap_or_default();
    let mut per_zone: BTreeMap<String, usize> = BTreeMap::new();
    for m in &list.members {
        *per_zone.entry(zone_of(m)).or_default() += 1;
    }
    let mut ranked: Vec<(String, usize)> = per_zone.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let kept: BTreeSet<String> = ranked.into_iter().take(MAX_ZONES).map(|(z, _)| z).collect();
    let mut out = BTreeMap::new();
    for m in &list.members {
        let z = zone_of(m);
        let z = if kept.contains(&z) {
            z
        } else {
            OTHER_ZONES.to_owned()
        };
        *out.entry((crate::logical::role_name(m.role), z))
            .or_default() += 1;
    }
    out
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

    /// A backend with one counter of its own.
    struct Counting;

    impl Discover for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }

        fn discover(&self) -> discovery::BoxFuture<'_, Result<discovery::Report, DiscoveryError>> {
            Box::pin(async { Ok(discovery::Report::default()) })
        }

        fn counters(&self) -> Vec<discovery::Counter> {
            vec![discovery::Counter {
                name: "node_discovery_test_dropped",
                help: "Announcements dropped.",
                value: 7,
            }]
        }
    }

    #[test]
    fn backend_counters_are_scraped_as_counters() {
        let (mut m, _) = Metrics::new(Vec::new());
        m.register_collector(Box::new(BackendCollector(std::sync::Arc::new(Counting))));
        let text = m.render();
        for line in [
            "# TYPE node_discovery_test_dropped counter",
            "# HELP node_discovery_test_dropped Announcements dropped.",
            "node_discovery_test_dropped_total 7",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }

    fn list(zones: &[Option<&str>]) -> membership::MemberList {
        let members: Vec<membership::NodeId> = zones
            .iter()
            .enumerate()
            .map(|(i, _)| {
                membership::NodeId::new(
                    std::net::SocketAddr::from(([10, 0, 0, 1], 10_000 + i as u16)),
                    uuid::Uuid::from_u128(i as u128 + 1),
                    i as u64,
                    if i == 0 {
                        membership::Role::Scheduler
                    } else {
                        membership::Role::Worker
                    },
                )
            })
            .collect();
        membership::MemberList {
            ver: 7,
            coordinator: members[0].uuid,
            zones: members
                .iter()
                .zip(zones)
                .filter_map(|(m, z)| Some((m.uuid, membership::Zone::new((*z)?).unwrap())))
                .collect(),
            members,
        }
    }

    #[test]
    fn members_are_counted_by_cluster_role_and_zone() {
        let l = list(&[Some("a-1"), Some("a-1"), Some("b-2"), None]);
        let me = l.members[0];
        let view = crate::cluster::ClusterView::shared("all", me, l);
        let (m, _) = Metrics::new(vec![view]);
        let text = m.render();
        for line in [
            "node_cluster_zone_members{cluster=\"all\",role=\"scheduler\",zone=\"a-1\"} 1",
            "node_cluster_zone_members{cluster=\"all\",role=\"worker\",zone=\"a-1\"} 1",
            "node_cluster_zone_members{cluster=\"all\",role=\"worker\",zone=\"b-2\"} 1",
            "node_cluster_zone_members{cluster=\"all\",role=\"worker\",zone=\"\"} 1",
            "node_cluster_members{cluster=\"all\"} 4",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }

    #[test]
    fn a_flood_of_zones_makes_a_bounded_number_of_series() {
        let names: Vec<String> = (0..500).map(|i| format!("z{i}")).collect();
        let mut zones: Vec<Option<&str>> = names.iter().map(|z| Some(z.as_str())).collect();
        // The real zone holds most members, so it keeps its own series.
        zones.extend(std::iter::repeat_n(Some("real-1"), 10));
        let counts = members_by_role_zone(&list(&zones));
        let distinct: BTreeSet<&str> = counts.keys().map(|(_, z)| z.as_str()).collect();
        assert!(distinct.len() <= MAX_ZONES + 1, "{}", distinct.len());
        assert!(distinct.contains("real-1") && distinct.contains(OTHER_ZONES));
        assert_eq!(counts.values().sum::<i64>(), 510);
    }
}
