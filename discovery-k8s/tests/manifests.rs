//! Every manifest in deploy/k8s (the one Kubernetes kit) parses as its k8s-openapi type with
//! no field left over, so a typo in a field name or a value of the wrong type fails CI; the
//! pods carry the role label the backend reads, name themselves for the zone lookup and mount
//! the cluster key's Secret; the optional ClusterRole lets the service account read nodes.

use std::path::PathBuf;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::Deserialize;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/k8s")
}

/// Parses `doc` as `T` and checks that serialising it again gives the same document: serde
/// ignores unknown fields, so a misspelt one shows up as a difference.
fn strict<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, file: &str) -> T {
    let typed: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} does not parse: {e}", doc["kind"]));
    let again = serde_json::to_value(&typed).unwrap();
    if let Some(path) = first_difference(doc, &again, String::new()) {
        panic!(
            "{file}: {} has a field k8s-openapi does not know, or a wrong value, at {path}",
            doc["kind"]
        );
    }
    typed
}

fn first_difference(a: &Value, b: &Value, path: String) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let p = format!("{path}.{k}");
                let Some(w) = y.get(k) else { return Some(p) };
                if let Some(d) = first_difference(v, w, p) {
                    return Some(d);
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(path),
    }
}

fn documents() -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(deploy_dir())
        .expect("deploy/k8s exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            text.starts_with('#'),
            "{name} must start with a comment saying why it exists"
        );
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc = Value::deserialize(de).unwrap_or_else(|e| panic!("{name}: {e}"));
            if !doc.is_null() {
                out.push((name.clone(), doc));
            }
        }
    }
    out
}

fn check_node_container(file: &str, t: &PodTemplateSpec, role: &str) -> Container {
    let labels = t
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert_eq!(
        labels
            .get(discovery_k8s::classify::ROLE_LABEL)
            .map(String::as_str),
        Some(role),
        "{file}: the pods need the role label the backend reads"
    );
    let spec = t.spec.as_ref().expect("pod spec");
    // The key: a Secret volume, mounted where NODE_CLUSTER_KEY_FILE points, readable by the
    // node's group and writable by no one.
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "cluster-key")
        .unwrap_or_else(|| panic!("{file}: no cluster-key volume"));
    let secret = volume.secret.as_ref().expect("a Secret volume");
    assert_eq!(
        secret.secret_name.as_deref(),
        Some("cluster-start-key"),
        "{file}"
    );
    assert_eq!(secret.default_mode, Some(0o440), "{file}");
    assert_eq!(
        spec.security_context.as_ref().and_then(|s| s.fs_group),
        Some(65534),
        "{file}"
    );
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("cluster-start"),
        "{file}"
    );
    let c = spec.containers[0].clone();
    let env = c.env.clone().unwrap_or_default();
    let pod_ip = env.iter().find(|e| e.name == "POD_IP").expect("POD_IP");
    let field = pod_ip
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(field, Some("status.podIP"), "{file}");
    let pod_name = env.iter().find(|e| e.name == "POD_NAME").expect("POD_NAME");
    let field = pod_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        field,
        Some("metadata.name"),
        "{file}: POD_NAME names the pod whose node's zone is read"
    );
    let sel = env
        .iter()
        .find(|e| e.name == "NODE_PRIVATE_IP_SELECTOR")
        .and_then(|e| e.value.as_deref());
    assert_eq!(sel, Some("$(POD_IP)/32"), "{file}");
    let pos = |n: &str| env.iter().position(|e| e.name == n).unwrap();
    assert!(
        pos("POD_IP") < pos("NODE_PRIVATE_IP_SELECTOR"),
        "{file}: $(POD_IP) only expands if POD_IP comes first"
    );
    let discovery = env
        .iter()
        .find(|e| e.name == "NODE_DISCOVERY")
        .and_then(|e| e.value.as_deref());
    assert_eq!(discovery, Some("k8s"), "{file}");
    let key_file = env
        .iter()
        .find(|e| e.name == "NODE_CLUSTER_KEY_FILE")
        .and_then(|e| e.value.as_deref());
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "cluster-key")
        .unwrap_or_else(|| panic!("{file}: the key volume is not mounted"));
    assert_eq!(mount.read_only, Some(true), "{file}");
    assert_eq!(
        key_file.map(str::to_owned),
        Some(format!("{}/key", mount.mount_path)),
        "{file}: NODE_CLUSTER_KEY_FILE must name the Secret's `key`"
    );
    assert!(
        c.ports
            .iter()
            .flatten()
            .any(|p| p.name.as_deref() == Some("private")),
        "{file}: the container port named `private` tells peers the --private_port"
    );
    // Readiness is the start-up gate's signal: /readyz, with a size the schedulers' replicas
    // can reach alone (checked against the StatefulSet by the caller).
    let ready = c
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{file}: no readinessProbe httpGet"));
    assert_eq!(ready.path.as_deref(), Some("/readyz"), "{file}");
    let min: u32 = env
        .iter()
        .find(|e| e.name == "NODE_MIN_CLUSTER_SIZE")
        .and_then(|e| e.value.as_deref())
        .unwrap_or_else(|| panic!("{file}: no NODE_MIN_CLUSTER_SIZE"))
        .parse()
        .unwrap_or_else(|e| panic!("{file}: NODE_MIN_CLUSTER_SIZE: {e}"));
    assert!(min >= 1, "{file}");
    c
}

/// The start-up gate's size in a container, for the cross-manifest check.
fn min_cluster_size(c: &Container) -> i32 {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_MIN_CLUSTER_SIZE")
        .and_then(|e| e.value.as_deref())
        .and_then(|v| v.parse().ok())
        .expect("checked by check_node_container")
}

#[test]
fn every_manifest_parses_strictly_and_fits_together() {
    let mut kinds = Vec::new();
    let mut scheduler_replicas = 0;
    let mut gates = Vec::new();
    for (file, doc) in documents() {
        let kind = doc["kind"].as_str().unwrap_or("").to_owned();
        match kind.as_str() {
            "ServiceAccount" => {
                strict::<ServiceAccount>(&doc, &file);
            }
            "Role" => {
                let r: Role = strict(&doc, &file);
                check_core_rule(
                    &r.rules.unwrap_or_default(),
                    "pods",
                    &["get", "list", "watch"],
                );
            }
            "ClusterRole" => {
                let r: ClusterRole = strict(&doc, &file);
                assert_eq!(r.metadata.name.as_deref(), Some("cluster-start-node-zones"));
                check_core_rule(&r.rules.unwrap_or_default(), "nodes", &["get", "list"]);
            }
            "ClusterRoleBinding" => {
                let b: ClusterRoleBinding = strict(&doc, &file);
                assert_eq!(b.role_ref.kind, "ClusterRole");
                assert_eq!(b.role_ref.name, "cluster-start-node-zones");
                let sa = &b.subjects.unwrap_or_default()[0];
                assert_eq!(
                    (sa.kind.as_str(), sa.name.as_str()),
                    ("ServiceAccount", "cluster-start")
                );
                assert!(
                    sa.namespace.as_deref().is_some_and(|n| !n.is_empty()),
                    "{file}: a ClusterRoleBinding's ServiceAccount subject needs its namespace"
                );
            }
            "RoleBinding" => {
                let b: RoleBinding = strict(&doc, &file);
                assert_eq!(b.role_ref.kind, "Role");
                assert_eq!(b.role_ref.name, "cluster-start-discovery");
            }
            "Service" => {
                let s: Service = strict(&doc, &file);
                let spec = s.spec.unwrap();
                assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
            }
            "StatefulSet" => {
                let s: StatefulSet = strict(&doc, &file);
                let spec = s.spec.unwrap();
                let c = check_node_container(&file, &spec.template, "scheduler");
                scheduler_replicas = spec.replicas.unwrap_or(1);
                gates.push((file.clone(), min_cluster_size(&c)));
                assert!(c.args.unwrap().contains(&"scheduler".to_owned()));
            }
            "Deployment" => {
                let d: Deployment = strict(&doc, &file);
                let c = check_node_container(&file, &d.spec.unwrap().template, "worker");
                gates.push((file.clone(), min_cluster_size(&c)));
                assert!(c.args.unwrap().contains(&"worker".to_owned()));
            }
            other => panic!("{file}: unexpected kind `{other}`"),
        }
        kinds.push(kind);
    }
    // The schedulers alone can open every pod's start-up gate: a gate above that could keep
    // a whole deployment unready while the workers are scaled to zero.
    for (file, min) in gates {
        assert!(
            min <= scheduler_replicas,
            "{file}: NODE_MIN_CLUSTER_SIZE {min} exceeds the {scheduler_replicas} schedulers"
        );
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
            "StatefulSet"
        ]
    );
}

/// A rule in the core API group on `resource` allows every verb in `verbs`.
fn check_core_rule(rules: &[PolicyRule], resource: &str, verbs: &[&str]) {
    let rule = rules
        .iter()
        .find(|r| r.resources.iter().flatten().any(|x| x == resource))
        .unwrap_or_else(|| panic!("a rule on {resource}"));
    assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
    for verb in verbs {
        assert!(rule.verbs.iter().any(|v| v == verb), "{resource} {verb}");
    }
}

#[test]
fn a_misspelt_field_is_caught() {
    let doc = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "x", "lables": {"a": "b"}},
    });
    let r = std::panic::catch_unwind(|| strict::<ServiceAccount>(&doc, "test"));
    assert!(r.is_err());
}
