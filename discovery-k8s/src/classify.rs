//! Turns pods and EndpointSlices into candidates, and says why the others were skipped.
//!
//! A pod counts only with a `podIP`, in phase `Running` (or `Pending` once it has an IP), and
//! without a `deletionTimestamp`. Not-ready pods count unless `--k8s_include_not_ready=false`,
//! because readiness usually waits for the cluster to form.

use std::net::IpAddr;

use discovery::{Candidate, Context, Exclusion, Report, Role};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The container port name that tells a pod's `--private_port`.
pub const PRIVATE_PORT_NAME: &str = "private";

/// The standard label that tells a pod's role (`scheduler` or `worker`).
pub const ROLE_LABEL: &str = "app.kubernetes.io/component";

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

/// One pod: a candidate, or the reason it is not one.
pub fn pod(ctx: &Context, include_not_ready: bool, pod: &Pod) -> Result<Candidate, Exclusion> {
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
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| exclusion(&id, format!("podIP `{ip}` is not an IP address")))?;
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
    let mut c = ctx.classify_listed(id, ip, port)?;
    c.role = role_of(pod.metadata.labels.as_ref());
    Ok(c)
}

/// Every pod, sorted into candidates and exclusions, in name order.
pub fn pods<'a>(
    ctx: &Context,
    include_not_ready: bool,
    items: impl IntoIterator<Item = &'a Pod>,
) -> Report {
    let mut report = Report::default();
    for p in items {
        match pod(ctx, include_not_ready, p) {
            Ok(c) => report.candidates.push(c),
            Err(x) => report.excluded.push(x),
        }
    }
    report
}

/// Every endpoint of every slice, sorted into candidates and exclusions.
///
/// An address that appears in several slices (for example during a slice rewrite) counts once.
pub fn endpoint_slices<'a>(
    ctx: &Context,
    include_not_ready: bool,
    items: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Report {
    let mut report = Report::default();
    for slice in items {
        let slice_name = slice.metadata.name.as_deref().unwrap_or("<unnamed>");
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
            match ctx.classify_listed(id, ip, port) {
                Ok(c) => report.candidates.push(c),
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
        let x = pod(&ctx(), true, &p).unwrap_err();
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
        assert_eq!(pod(&c, true, &p).unwrap().ip.to_string(), "10.1.0.2");
    }

    #[test]
    fn an_address_in_two_slices_counts_once_and_nil_ready_means_ready() {
        let s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.3"]}],
        }))
        .unwrap();
        let r = endpoint_slices(&ctx(), false, [&s, &s]);
        assert_eq!(r.candidates.len(), 1);
        assert!(r.excluded.is_empty());
        assert_eq!(r.candidates[0].port, 8081);
    }
}
