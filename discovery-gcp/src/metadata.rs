//! Reads this VM's project and zone from the GCE metadata server, for the flags left unset.
//!
//! The host is `metadata.google.internal`, or `GCE_METADATA_HOST` when set (the variable the
//! Google client libraries honour, so credentials and these reads go to the same server).
//! Every request carries `Metadata-Flavor: Google`, and an answer without that header is
//! refused: something that is not a metadata server must not decide our project.

use std::time::Duration;

/// The metadata server's default host.
pub const DEFAULT_HOST: &str = "metadata.google.internal";

/// A small client for `computeMetadata/v1`.
#[derive(Debug, Clone)]
pub struct Metadata {
    base: String,
    http: reqwest::Client,
    attempts: u32,
}

impl Metadata {
    /// A client for `host` (`host[:port]`, no scheme).
    pub fn new(host: &str, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_default();
        Self {
            base: format!("http://{host}/computeMetadata/v1"),
            http,
            attempts: 3,
        }
    }

    /// The base URL, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET {base}/{path}` as text, retried a few times on transport errors and 5xx.
    async fn get(&self, path: &str) -> Result<String, String> {
        let url = format!("{}/{path}", self.base);
        let mut last = String::new();
        for attempt in 0..self.attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let resp = match self
                .http
                .get(&url)
                .header("Metadata-Flavor", "Google")
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    last = format!("{url}: {e}");
                    continue;
                }
            };
            let status = resp.status();
            let flavor_ok = resp
                .headers()
                .get("metadata-flavor")
                .and_then(|v| v.to_str().ok())
                == Some("Google");
            if status.is_server_error() {
                last = format!("{url} answered {status}");
                continue;
            }
            if !status.is_success() {
                return Err(format!("{url} answered {status}"));
            }
            if !flavor_ok {
                return Err(format!(
                    "{url} answered without `Metadata-Flavor: Google`, so it is not a GCE metadata server"
                ));
            }
            return resp
                .text()
                .await
                .map(|t| t.trim().to_owned())
                .map_err(|e| format!("{url}: {e}"));
        }
        Err(last)
    }

    /// `project/project-id`.
    pub async fn project_id(&self) -> Result<String, String> {
        let p = self.get("project/project-id").await?;
        if p.is_empty() {
            return Err(format!("{}/project/project-id is empty", self.base));
        }
        Ok(p)
    }

    /// The zone name from `instance/zone` (`projects/NUMBER/zones/ZONE`).
    pub async fn zone(&self) -> Result<String, String> {
        let z = self.get("instance/zone").await?;
        match z.rsplit_once("/zones/") {
            Some((_, zone)) if !zone.is_empty() && !zone.contains('/') => Ok(zone.to_owned()),
            _ => Err(format!(
                "{}/instance/zone answered `{z}`, not `projects/NUMBER/zones/ZONE`",
                self.base
            )),
        }
    }
}
