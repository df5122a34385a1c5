//! Turns pods and EndpointSlices into candidates, and says why the others were skipped.
//!
//! A pod counts only with a `podIP`, in phase `Running` (or `Pending` once it has an IP), and
//! without a `deletionTimestamp`. Not-ready pods count unless `--k8s_include_not_ready=false`,
//! because readiness usually waits for the cluster to form. A dual-stack pod is one host with
//! its `status.podIPs`: [`Context::classify_host`] picks the address of this node's family,
//! without the selector (pod IPs come from the API, and a pod's selector is its own `/32`).
//! A candidate's zone is its node's `topology.kubernetes.io/zone` (for an endpoint, the
//! EndpointSlice's own `zone`), when known.

use std::collections::HashMap;
use std::net::IpAddr;

use discovery::{Candidate, Context, Exclusion, Report, Role};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The container port name that tells a pod's `--private_port`.
pub const PRIVATE_PORT_NAME: &str = "private";

/// The standard label that tells a pod's role (`scheduler` or `worker`).
pub const ROLE_LABEL: &str = "app.kubernetes.io/component";

/// The well-known node label that tells a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The most addresses read from one pod's `podIPs` (the API allows one per family).
const MAX_POD_IPS: usize = 8;

/// Node name to zone, for the nodes whose zone is known.
pub type NodeZones = HashMap<String, String>;

/// A zone as the API gave it, if it is a valid label value (at most 63 of `A-Za-z0-9._-`);
/// anything else is dropped, so a hostile value cannot reach logs or peers.
pub fn clean_zone(z: &str) -> Option<String> {
    let ok = !z.is_empty()
        && z.len() <= 63
        && z.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then(|| z.to_owned())
}

/// The context without the selector: pod and endpoint addresses come from the API.
fn unfiltered(ctx: &Context) -> std::borrow::Cow<'_, Context> {
    if ctx.selector.is_none() {
        std::borrow::Cow::Borrowed(ctx)
    } else {
        std::borrow::Cow::Owned(Context {
            selector: None,
            ..ctx.clone()
        })
    }
}

fn exclusion(id: &str, reason: impl Into<String>) -> Exclusion {
    Exclusion {
        id: id.to_owned(),
        reason: reason.into(),
    }
}

fn role_of(labels: Option<&std::collections::BTreeMap<String, String>>) -> Option<Role> {
    match labels?.get(ROLE_LABEL)?.as_str() {
        "scheduler" => Some(Role::Scheduler),
        "worker" => Some(Role::Worker),
        _ => None,
    }
}

fn valid_private_port(p: i32) -> Option<u16> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p > 0 && *p <= 65535 - 2000)
}

/// One pod: a candidate, or the reason it is not one. `zones` gives its node's zone.
pub fn pod(
    ctx: &Context,
    include_not_ready: bool,
    zones: &NodeZones,
    pod: &Pod,
) -> Result<Candidate, Exclusion> {
    let name = pod.metadata.name.as_deref().unwrap_or("<unnamed>");
    let id = format!("pod/{name}");
    if pod.metadata.deletion_timestamp.is_some() {
        return Err(exclusion(&id, "terminating (deletionTimestamp is set)"));
    }
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
    let ip = status.and_then(|s| s.pod_ip.as_deref()).unwrap_or("");
    if ip.is_empty() {
        return Err(exclusion(&id, format!("no podIP yet (phase {phase})")));
    }
    if phase != "Running" && phase != "Pending" {
        return Err(exclusion(&id, format!("phase {phase}")));
    }
    let ip: IpAddr = ip.parse().map_err(|_| {
        exclusion(
            &id,
            format!(
                "podIP `{}` is not an IP address",
                discovery::escape_untrusted(&ip.chars().take(64).collect::<String>())
            ),
        )
    })?;
    // `podIPs` holds `podIP` first, then the other family's address on a dual-stack pod.
    let mut addrs = vec![ip];
    for extra in status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .take(MAX_POD_IPS)
    {
        if let Ok(a) = extra.ip.parse::<IpAddr>()
            && !addrs.contains(&a)
        {
            addrs.push(a);
        }
    }
    if !include_not_ready {
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready {
            return Err(exclusion(&id, "not ready (--k8s_include_not_ready=false)"));
        }
    }
    let named = pod.spec.as_ref().and_then(|s| {
        s.containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(PRIVATE_PORT_NAME))
            .map(|p| p.container_port)
    });
    let port = match named {
        Some(p) => valid_private_port(p).ok_or_else(|| {
            exclusion(
                &id,
                format!("container port `{PRIVATE_PORT_NAME}` is {p}, outside 1..=63535"),
            )
        })?,
        None => ctx.private_port,
    };
    let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
    let c = unfiltered(ctx).classify_host(id, &addrs, port)?;
    Ok(Candidate {
        role: role_of(pod.metadata.labels.as_ref()),
        zone: node.and_then(|n| zones.get(n)).cloned(),
        ..c
    })
}

/// Every pod, sorted into candidates and exclusions, in name order.
pub fn pods<'a>(
    ctx: &Context,
    include_not_ready: bool,
    zones: &NodeZones,
    items: impl IntoIterator<Item = &'a Pod>,
) -> Report {
    let ctx = unfiltered(ctx);
    let mut report = Report::default();
    for p in items {
        match pod(&ctx, include_not_ready, zones, p) {
            Ok(c) => report.candidates.push(c),
            Err(x) => report.excluded.push(x),
        }
    }
    report
}

/// Every endpoint of every slice, sorted into candidates and exclusions.
///
/// An address that appears in several slices (for example during a slice rewrite) counts once.
/// A dual-stack Service has a slice per family: only the slices of this node's family count.
pub fn endpoint_slices<'a>(
    ctx: &Context,
    include_not_ready: bool,
    zones: &NodeZones,
    items: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Report {
    let ctx = unfiltered(ctx);
    let family = if ctx.private_ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    };
    let mut report = Report::default();
    for slice in items {
        let slice_name = slice.metadata.name.as_deref().unwrap_or("<unnamed>");
        let other_family = match slice.address_type.as_str() {
            "IPv4" => "IPv4" != family,
            "IPv6" => "IPv6" != family,
            _ => false,
        };
        if other_family {
            report.excluded.push(exclusion(
                &format!("endpointslice/{slice_name}"),
                format!(
                    "addressType {}, but this node's private IP is {family}",
                    slice.address_type
                ),
            ));
            continue;
        }
        let port = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(PRIVATE_PORT_NAME))
            .and_then(|p| p.port)
            .and_then(valid_private_port)
            .unwrap_or(ctx.private_port);
        for ep in &slice.endpoints {
            let id = match &ep.target_ref {
                Some(r) => format!(
                    "{}/{}",
                    r.kind.as_deref().unwrap_or("endpoint").to_lowercase(),
                    r.name.as_deref().unwrap_or("<unnamed>")
                ),
                None => format!(
                    "endpointslice/{slice_name}/{}",
                    ep.addresses.first().map_or("", |a| a.as_str())
                ),
            };
            let cond = ep.conditions.as_ref();
            if cond.and_then(|c| c.terminating) == Some(true) {
                report
                    .excluded
                    .push(exclusion(&id, "terminating (endpoint condition)"));
                continue;
            }
            // Per the API reference, a nil `ready` means ready.
            if !include_not_ready && cond.and_then(|c| c.ready) == Some(false) {
                report
                    .excluded
                    .push(exclusion(&id, "not ready (--k8s_include_not_ready=false)"));
                continue;
            }
            // The API guarantees at least one address, and consumers use the first.
            let Some(addr) = ep.addresses.first() else {
                report
                    .excluded
                    .push(exclusion(&id, "endpoint has no address"));
                continue;
            };
            let Ok(ip) = addr.parse::<IpAddr>() else {
                report
                    .excluded
                    .push(exclusion(&id, format!("address `{addr}` is not an IP")));
                continue;
            };
            if report
                .candidates
                .iter()
                .any(|c| c.ip == ip && c.port == port)
            {
                continue;
            }
            let zone = ep
                .zone
                .as_deref()
                .and_then(clean_zone)
                .or_else(|| ep.node_name.as_deref().and_then(|n| zones.get(n)).cloned());
            match ctx.classify_host(id, &[ip], port) {
                Ok(c) => report.candidates.push(Candidate { zone, ..c }),
                Err(x) => report.excluded.push(x),
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ctx() -> Context {
        Context::standalone(
            "t",
            Role::Worker,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            8081,
            None,
        )
    }

    fn from(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_private_port_that_leaves_no_room_for_the_cluster_ports_is_refused() {
        let p = from(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "ports": [{"name": "private", "containerPort": 64000}]}]},
            "status": {"phase": "Running", "podIP": "10.1.0.1"},
        }));
        let x = pod(&ctx(), true, &NodeZones::new(), &p).unwrap_err();
        assert!(x.reason.contains("63535"), "{}", x.reason);
    }

    #[test]
    fn peers_outside_the_selector_still_count_because_pod_ips_come_from_the_api() {
        let mut c = ctx();
        c.selector = Some("127.0.0.1/32".parse().unwrap());
        let p = from(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"phase": "Running", "podIP": "10.1.0.2"},
        }));
        assert_eq!(
            pod(&c, true, &NodeZones::new(), &p).unwrap().ip.to_string(),
            "10.1.0.2"
        );
    }

    #[test]
    fn an_address_in_two_slices_counts_once_and_nil_ready_means_ready() {
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.3"]}],
        }))
        .unwrap();
        let r = endpoint_slices(&ctx(), false, &NodeZones::new(), [&s, &s]);
        assert_eq!(r.candidates.len(), 1);
        assert!(r.excluded.is_empty());
        assert_eq!(r.candidates[0].port, 8081);
    }

    #[test]
    fn a_dual_stack_pod_is_a_candidate_at_the_address_of_this_nodes_family() {
        let p = from(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"nodeName": "n1", "containers": []},
            "status": {"phase": "Running", "podIP": "10.1.0.4",
                       "podIPs": [{"ip": "10.1.0.4"}, {"ip": "2001:2::4"}]},
        }));
        let zones = NodeZones::from([("n1".to_owned(), "zone-a".to_owned())]);
        let v4 = pod(&ctx(), true, &zones, &p).unwrap();
        assert_eq!(v4.ip.to_string(), "10.1.0.4");
        assert_eq!(v4.zone.as_deref(), Some("zone-a"));
        let v6 = Context::standalone("t", Role::Worker, "2001:2::1".parse().unwrap(), 8081, None);
        assert_eq!(
            pod(&v6, true, &zones, &p).unwrap().ip.to_string(),
            "2001:2::4"
        );
        // This node's own IPv6 address among a pod's addresses makes the pod `self`.
        let me = Context::standalone("t", Role::Worker, "2001:2::4".parse().unwrap(), 9, None);
        assert_eq!(pod(&me, true, &zones, &p).unwrap_err().reason, "self");
        let single = from(serde_json::json!({
            "metadata": {"name": "q"},
            "status": {"phase": "Running", "podIP": "10.1.0.5"},
        }));
        let x = pod(&v6, true, &zones, &single).unwrap_err();
        assert_eq!(x.reason, "no IPv6 address (has 10.1.0.5)");
    }

    #[test]
    fn zones_are_label_values_or_nothing() {
        assert_eq!(clean_zone("us-east-1a").as_deref(), Some("us-east-1a"));
        assert_eq!(clean_zone("eu.west_1").as_deref(), Some("eu.west_1"));
        assert_eq!(clean_zone(""), None);
        assert_eq!(clean_zone("a\nMember"), None);
        assert_eq!(clean_zone("zone a"), None);
        assert_eq!(clean_zone(&"z".repeat(64)), None);
    }
}
