//! This node's availability zone: `--zone`, else what the platform says (bounded by a short
//! timeout, so a slow metadata server never stalls start-up), else none. The choice and where
//! it came from are logged once.

use std::time::Duration;

use discovery::Discover;
use membership::Zone;

/// How long start-up waits for the platform's answer.
pub const LOCAL_ZONE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the zone came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZoneSource {
    /// `--zone` (or `NODE_ZONE`).
    Flag,
    /// The backend's platform (metadata server, the Kubernetes node's label).
    Platform,
    /// Neither: the node has no zone.
    Unknown,
}

/// Chooses the zone: `flag` when set, else the backend's `local_zone` within `timeout`. A
/// platform answer that is not a valid zone is logged (escaped) and ignored.
pub async fn resolve(
    flag: Option<Zone>,
    backend: &dyn Discover,
    timeout: Duration,
) -> (Option<Zone>, ZoneSource) {
    if let Some(z) = flag {
        return (Some(z), ZoneSource::Flag);
    }
    let answer = match tokio::time::timeout(timeout, backend.local_zone()).await {
        Ok(answer) => answer,
        Err(_) => {
            tracing::warn!(
                backend = backend.name(),
                "the platform did not tell this node's zone within {timeout:?}; running without \
                 one (set --zone to name it)"
            );
            return (None, ZoneSource::Unknown);
        }
    };
    match answer.as_deref().map(Zone::new) {
        Some(Ok(z)) => (Some(z), ZoneSource::Platform),
        Some(Err(e)) => {
            tracing::warn!(
                backend = backend.name(),
                zone = %discovery::escape_untrusted(answer.as_deref().unwrap_or_default()),
                "the platform's zone is unusable ({e}); running without one (set --zone to name it)"
            );
            (None, ZoneSource::Unknown)
        }
        None => (None, ZoneSource::Unknown),
    }
}

/// [`resolve`], logging what was chosen and where it came from.
pub async fn choose(flag: Option<Zone>, backend: &dyn Discover, timeout: Duration) -> Option<Zone> {
    let (zone, source) = resolve(flag, backend, timeout).await;
    let from = match source {
        ZoneSource::Flag => "--zone",
        ZoneSource::Platform => backend.name(),
        ZoneSource::Unknown => "none",
    };
    tracing::info!(
        zone = zone.as_ref().map_or("none", |z| z.as_str()),
        source = from,
        "zone chosen"
    );
    zone
}

#[cfg(test)]
mod tests {
    use discovery::{BoxFuture, DiscoveryError, Report};

    use super::*;

    /// A backend whose platform answers `zone` after `delay`.
    struct Platform {
        zone: Option<&'static str>,
        delay: Duration,
    }

    impl Discover for Platform {
        fn name(&self) -> &'static str {
            "test"
        }

        fn discover(&self) -> BoxFuture<'_, Result<Report, DiscoveryError>> {
            Box::pin(async { Ok(Report::default()) })
        }

        fn local_zone(&self) -> BoxFuture<'_, Option<String>> {
            Box::pin(async move {
                tokio::time::sleep(self.delay).await;
                self.zone.map(str::to_owned)
            })
        }
    }

    fn platform(zone: Option<&'static str>, delay_ms: u64) -> Platform {
        Platform {
            zone,
            delay: Duration::from_millis(delay_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_flag_wins_then_the_platform_then_none() {
        let t = LOCAL_ZONE_TIMEOUT;
        let flag = Some(Zone::new("eu-west-1a").unwrap());
        let (z, s) = resolve(flag, &platform(Some("us-east-1b"), 0), t).await;
        assert_eq!((z, s), (flag, ZoneSource::Flag));
        let (z, s) = resolve(None, &platform(Some("us-east-1b"), 10), t).await;
        assert_eq!(z.map(|z| z.to_string()).as_deref(), Some("us-east-1b"));
        assert_eq!(s, ZoneSource::Platform);
        let (z, s) = resolve(None, &platform(None, 0), t).await;
        assert_eq!((z, s), (None, ZoneSource::Unknown));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_or_lying_platform_never_stalls_start_up() {
        let t0 = tokio::time::Instant::now();
        let (z, s) = resolve(
            None,
            &platform(Some("us-east-1b"), 60_000),
            LOCAL_ZONE_TIMEOUT,
        )
        .await;
        assert_eq!((z, s), (None, ZoneSource::Unknown));
        assert_eq!(t0.elapsed(), LOCAL_ZONE_TIMEOUT);
        for bad in [
            "",
            "a\nMember [10.0.0.1]:1 - x",
            "zone\u{1b}[2J",
            &"z".repeat(64),
        ] {
            let leaked: &'static str = Box::leak(bad.to_owned().into_boxed_str());
            let (z, s) = resolve(None, &platform(Some(leaked), 0), LOCAL_ZONE_TIMEOUT).await;
            assert_eq!((z, s), (None, ZoneSource::Unknown), "{bad:?}");
        }
    }
}
