//! Flags and constructor of Kubernetes discovery.

use std::path::PathBuf;
#[cfg(feature = "k8s")]
use std::sync::Arc;

use clap::{ArgAction, Args};
#[cfg(feature = "k8s")]
use discovery::{Context, Discover, DiscoveryError};
#[cfg(feature = "k8s")]
use discovery_k8s::{ConfigEnv, K8sDiscovery, Settings};

/// Kubernetes discovery flags.
#[derive(Debug, Clone, Args)]
pub struct K8sFlags {
    /// Namespace to look in; default: the service account's (or the kubeconfig context's).
    #[arg(long = "k8s_namespace", env = "NODE_K8S_NAMESPACE", global = true)]
    pub k8s_namespace: Option<String>,

    /// Pods matching this label selector are peers, e.g. app=build-cluster.
    #[arg(
        long = "k8s_label_selector",
        env = "NODE_K8S_LABEL_SELECTOR",
        global = true
    )]
    pub k8s_label_selector: Option<String>,

    /// Peers are this Service's endpoints (from its EndpointSlices); instead of a label selector.
    #[arg(
        long = "k8s_service_name",
        env = "NODE_K8S_SERVICE_NAME",
        global = true
    )]
    pub k8s_service_name: Option<String>,

    /// Count pods that are not ready yet; readiness usually waits for the cluster to form.
    #[arg(long = "k8s_include_not_ready", env = "NODE_K8S_INCLUDE_NOT_READY", default_value_t = true, action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", global = true)]
    pub k8s_include_not_ready: bool,

    /// Where the service account is mounted (for tests).
    #[arg(
        long = "k8s_service_account_dir",
        env = "NODE_K8S_SERVICE_ACCOUNT_DIR",
        hide = true,
        global = true
    )]
    pub k8s_service_account_dir: Option<PathBuf>,
}

#[cfg(feature = "k8s")]
/// Builds the backend; the client is configured on first use.
pub fn build(flags: &K8sFlags, ctx: Context) -> Result<Arc<dyn Discover>, DiscoveryError> {
    let settings = Settings::from_flags(
        flags.k8s_namespace.clone(),
        flags.k8s_label_selector.clone(),
        flags.k8s_service_name.clone(),
        flags.k8s_include_not_ready,
    )?;
    let env = ConfigEnv::from_process(flags.k8s_service_account_dir.clone());
    Ok(K8sDiscovery::new(settings, env, ctx))
}
