//! Client configuration inference: in-cluster service account first, then a kubeconfig.
//!
//! Every input comes through [`ConfigEnv`], so tests point it at files in a temp dir instead of
//! changing the process environment. When both attempts fail, [`K8sError::NoConfig`] keeps both
//! causes, like kube's own `Config::infer`.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::K8sError;

/// Where the service account is mounted in every pod.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The inputs of configuration inference, normally read from the process environment.
#[derive(Debug, Clone, Default)]
pub struct ConfigEnv {
    /// `KUBERNETES_SERVICE_HOST`.
    pub service_host: Option<String>,
    /// `KUBERNETES_SERVICE_PORT`.
    pub service_port: Option<String>,
    /// The directory holding `token`, `ca.crt` and `namespace`.
    pub service_account_dir: PathBuf,
    /// `KUBECONFIG`: one or more paths, separated like `PATH`.
    pub kubeconfig: Option<OsString>,
    /// `HOME`, for `~/.kube/config`.
    pub home: Option<PathBuf>,
    /// This pod's name, for its node's zone: `POD_NAME` (the downward API's `metadata.name`,
    /// which the manifests set), else `HOSTNAME` (the pod name unless the pod sets a
    /// hostname or uses the host's network).
    pub pod_name: Option<String>,
}

impl ConfigEnv {
    /// Reads the process environment; `service_account_dir` overrides [`SERVICE_ACCOUNT_DIR`].
    pub fn from_process(service_account_dir: Option<PathBuf>) -> Self {
        Self {
            service_host: std::env::var("KUBERNETES_SERVICE_HOST").ok(),
            service_port: std::env::var("KUBERNETES_SERVICE_PORT").ok(),
            service_account_dir: service_account_dir
                .unwrap_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR)),
            kubeconfig: std::env::var_os("KUBECONFIG"),
            home: std::env::var_os("HOME").map(PathBuf::from),
            pod_name: ["POD_NAME", "HOSTNAME"]
                .iter()
                .filter_map(|v| std::env::var(v).ok())
                .find(|n| !n.is_empty()),
        }
    }
}

/// Which attempt produced the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource {
    /// The pod's service account.
    InCluster,
    /// A kubeconfig file.
    Kubeconfig,
}

/// Infers the client configuration: in-cluster first, then `KUBECONFIG` or `~/.kube/config`.
pub async fn infer(env: &ConfigEnv) -> Result<(kube::Config, ConfigSource), K8sError> {
    let in_cluster = match in_cluster(env).await {
        Ok(c) => return Ok((tuned(c), ConfigSource::InCluster)),
        Err(e) => e,
    };
    tracing::debug!("no in-cluster configuration ({in_cluster}); trying a kubeconfig");
    match kubeconfig(env).await {
        Ok(c) => Ok((tuned(c), ConfigSource::Kubeconfig)),
        Err(kubeconfig) => Err(K8sError::NoConfig {
            in_cluster: Box::new(in_cluster),
            kubeconfig: Box::new(kubeconfig),
        }),
    }
}

/// Bounds connection and request times, so a silent API server cannot hang a round.
fn tuned(mut c: kube::Config) -> kube::Config {
    c.connect_timeout = Some(Duration::from_secs(10));
    c.write_timeout = Some(Duration::from_secs(10));
    c
}

fn read_file(path: &Path, what: &'static str) -> Result<String, K8sError> {
    std::fs::read_to_string(path).map_err(|source| K8sError::ServiceAccountFile {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The in-cluster configuration: the API server from `KUBERNETES_SERVICE_HOST`/`_PORT`, the
/// token, CA bundle and namespace from the service account directory.
pub async fn in_cluster(env: &ConfigEnv) -> Result<kube::Config, K8sError> {
    let host = env
        .service_host
        .as_deref()
        .filter(|h| !h.is_empty())
        .ok_or(K8sError::NotInCluster)?;
    let port: u16 = match env.service_port.as_deref() {
        None | Some("") => 443,
        Some(p) => p
            .parse()
            .map_err(|_| K8sError::BadServicePort(p.to_owned()))?,
    };
    let server = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("https://[{v6}]:{port}"),
        _ => format!("https://{host}:{port}"),
    };
    let dir = &env.service_account_dir;
    let token_path = dir.join("token");
    let ca_path = dir.join("ca.crt");
    // Read both now, so a missing file is reported here rather than on the first request.
    read_file(&token_path, "token")?;
    read_file(&ca_path, "ca.crt")?;
    let namespace = read_file(&dir.join("namespace"), "namespace")?
        .trim()
        .to_owned();
    // The same structure a kubeconfig would hold, so kube re-reads the rotating token file.
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "in-cluster", "cluster": {
            "server": server,
            "certificate-authority": ca_path,
        }}],
        "users": [{"name": "service-account", "user": {"tokenFile": token_path}}],
        "contexts": [{"name": "in-cluster", "context": {
            "cluster": "in-cluster",
            "user": "service-account",
            "namespace": namespace,
        }}],
        "current-context": "in-cluster",
    });
    let kc = Kubeconfig::from_yaml(&doc.to_string()).map_err(K8sError::Kubeconfig)?;
    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(K8sError::Kubeconfig)
}

/// The kubeconfig configuration: every file in `KUBECONFIG`, merged, or `~/.kube/config`.
pub async fn kubeconfig(env: &ConfigEnv) -> Result<kube::Config, K8sError> {
    let paths: Vec<PathBuf> = match &env.kubeconfig {
        Some(v) if !v.is_empty() => std::env::split_paths(v)
            .filter(|p| !p.as_os_str().is_empty())
            .collect(),
        _ => match &env.home {
            Some(h) => vec![h.join(".kube").join("config")],
            None => return Err(K8sError::NoKubeconfig),
        },
    };
    let mut merged = Kubeconfig::default();
    for p in &paths {
        let one = Kubeconfig::read_from(p).map_err(|source| K8sError::KubeconfigFile {
            path: p.clone(),
            source,
        })?;
        merged = merged.merge(one).map_err(K8sError::Kubeconfig)?;
    }
    kube::Config::from_custom_kubeconfig(merged, &KubeConfigOptions::default())
        .await
        .map_err(K8sError::Kubeconfig)
}
