//! Reads this VM's project and zone from the GCE metadata server, for the flags left unset.
//!
//! The host is `metadata.google.internal`, or `GCE_METADATA_HOST` when set (the variable the
//! Google client libraries honour, so credentials and these reads go to the same server).
//! Every request carries `Metadata-Flavor: Google`, and an answer without that header is
//! refused: something that is not a metadata server must not decide our project.

use std::time::Duration;

/// The metadata server's default host.
pub const DEFAULT_HOST: &str = "metadata.google.internal";

/// Why the metadata server did not tell a value.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// The request did not get an answer.
    #[error("{url} did not answer")]
    Transport {
        /// The URL asked.
        url: String,
        /// The client's error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error status.
    #[error("{url} answered {status}")]
    Status {
        /// The URL asked.
        url: String,
        /// The HTTP status.
        status: reqwest::StatusCode,
    },
    /// The answer lacks `Metadata-Flavor: Google`.
    #[error("{url} answered without `Metadata-Flavor: Google`, so it is not a GCE metadata server")]
    NotMetadataServer {
        /// The URL asked.
        url: String,
    },
    /// The answer is not the documented form.
    #[error("{url} answered `{answer}`, expected {expected}")]
    Malformed {
        /// The URL asked.
        url: String,
        /// The answer, escaped and cut to 200 characters.
        answer: String,
        /// The form the answer should have.
        expected: &'static str,
    },
}

/// A small client for `computeMetadata/v1`.
#[derive(Debug, Clone)]
pub struct Metadata {
    base: String,
    http: reqwest::Client,
    attempts: u32,
}

/// The longest answer read from the metadata server; its values are short.
const MAX_ANSWER: usize = 4096;

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

    /// A client that asks once, for callers with a deadline of their own (the local zone).
    pub fn once(mut self) -> Self {
        self.attempts = 1;
        self
    }

    /// The base URL, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `GET {base}/{path}` as text, retried a few times on transport errors and 5xx.
    async fn get(&self, path: &str) -> Result<String, MetadataError> {
        let url = format!("{}/{path}", self.base);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self.get_once(&url).await {
                Ok(text) => return Ok(text),
                Err(e) => e,
            };
            let retryable = match &err {
                MetadataError::Transport { .. } => true,
                MetadataError::Status { status, .. } => status.is_server_error(),
                _ => false,
            };
            if !retryable || attempt >= self.attempts {
                return Err(err);
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
    }

    async fn get_once(&self, url: &str) -> Result<String, MetadataError> {
        let transport = |source| MetadataError::Transport {
            url: url.to_owned(),
            source,
        };
        let resp = self
            .http
            .get(url)
            .header("Metadata-Flavor", "Google")
            .send()
            .await
            .map_err(transport)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(MetadataError::Status {
                url: url.to_owned(),
                status,
            });
        }
        let flavor_ok = resp
            .headers()
            .get("metadata-flavor")
            .and_then(|v| v.to_str().ok())
            == Some("Google");
        if !flavor_ok {
            return Err(MetadataError::NotMetadataServer {
                url: url.to_owned(),
            });
        }
        let bytes = resp.bytes().await.map_err(transport)?;
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_ANSWER)]);
        Ok(text.trim().to_owned())
    }

    fn malformed(&self, path: &str, answer: &str, expected: &'static str) -> MetadataError {
        MetadataError::Malformed {
            url: format!("{}/{path}", self.base),
            answer: discovery::escape_untrusted(&answer.chars().take(200).collect::<String>()),
            expected,
        }
    }

    /// `project/project-id`.
    pub async fn project_id(&self) -> Result<String, MetadataError> {
        let p = self.get("project/project-id").await?;
        if p.is_empty() || p.len() > 100 || !p.chars().all(|c| c.is_ascii_graphic()) {
            return Err(self.malformed("project/project-id", &p, "a project id"));
        }
        Ok(p)
    }

    /// The zone name from `instance/zone` (`projects/NUMBER/zones/ZONE`).
    pub async fn zone(&self) -> Result<String, MetadataError> {
        let z = self.get("instance/zone").await?;
        match z.rsplit_once("/zones/") {
            Some((_, zone)) if crate::valid_location(zone) => Ok(zone.to_owned()),
            _ => Err(self.malformed("instance/zone", &z, "`projects/NUMBER/zones/ZONE`")),
        }
    }
}
