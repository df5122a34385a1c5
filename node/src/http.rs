//! The HTTP endpoints: the internal API on the private port, health on the public port.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use serde::{Deserialize, Serialize};

use crate::cluster::SharedView;

/// What the handlers read.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// One entry per cluster this node is in.
    pub clusters: Vec<SharedView>,
    /// True once discovery has answered at least once.
    pub discovered: Arc<AtomicBool>,
    /// What `GET /metrics` serves.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// One member in `GET /v1/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberJson {
    /// The member's UUID.
    pub uuid: String,
    /// Its gossip address.
    pub address: String,
    /// `scheduler` or `worker`.
    pub role: String,
    /// `alive`: a list holds only the members its coordinator sees alive; failed and departed
    /// members are removed from it.
    pub state: String,
    /// Whether it is this node.
    pub this: bool,
    /// Seconds since this node first saw it in a list.
    pub age_seconds: f64,
}

/// One cluster in `GET /v1/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterJson {
    /// `scheduler` or `all`.
    pub cluster: String,
    /// The gossip port.
    pub port: u16,
    /// The member-list version.
    pub version: u64,
    /// This node's UUID.
    pub this: String,
    /// The members, oldest first.
    pub members: Vec<MemberJson>,
}

/// The body of `GET /v1/members`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MembersJson {
    /// The clusters, scheduler first when present.
    pub clusters: Vec<ClusterJson>,
}

/// Builds the body of `GET /v1/members`.
pub fn members_json(state: &ApiState) -> MembersJson {
    let now = Instant::now();
    let clusters = state
        .clusters
        .iter()
        .map(|v| {
            let v = v.read().unwrap_or_else(|p| p.into_inner());
            ClusterJson {
                cluster: v.name.to_owned(),
                port: v.port,
                version: v.list.ver,
                this: v.me.uuid.to_string(),
                members: v
                    .list
                    .members
                    .iter()
                    .map(|m| MemberJson {
                        uuid: m.uuid.to_string(),
                        address: m.addr.to_string(),
                        role: m.role.to_string(),
                        state: "alive".to_owned(),
                        this: m.uuid == v.me.uuid,
                        age_seconds: v
                            .first_seen
                            .iter()
                            .find(|(u, _)| *u == m.uuid)
                            .map_or(0.0, |(_, t)| now.duration_since(*t).as_secs_f64()),
                    })
                    .collect(),
            }
        })
        .collect();
    MembersJson { clusters }
}

async fn members(State(state): State<ApiState>) -> Json<MembersJson> {
    Json(members_json(&state))
}

async fn metrics(State(state): State<ApiState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::metrics::CONTENT_TYPE,
        )],
        state.metrics.render(),
    )
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<ApiState>) -> impl IntoResponse {
    if state.discovered.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: discovery has not answered yet\n",
        )
    }
}

/// The internal API, on `private_ip:private_port`.
pub fn private_router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/members", get(members))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
}

/// The public listener of schedulers.
pub fn public_router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}
