//! The cluster key: where it comes from (`--cluster_key_file` or systemd's `cluster-key`
//! credential), loading it once, and reloading it on SIGHUP.

use std::path::PathBuf;
use std::sync::Arc;

use keyring::{Keyring, KeyringError, Loaded, Sealer, SealerConfig};

use crate::NodeError;
use crate::cli::Flags;

/// The systemd credential the packaged units load from `/etc/cluster-node/key`.
pub const KEY_CREDENTIAL: &str = "cluster-key";

/// Where the key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `--cluster_key_file`: it must load.
    Flag(PathBuf),
    /// The `cluster-key` credential systemd passed in `$CREDENTIALS_DIRECTORY`. The units
    /// default it to a comment (`SetCredential=`), so one that is missing or holds only blank
    /// and `#` comment lines means "no key": a host without `/etc/cluster-node/key` runs
    /// keyless instead of failing to start.
    Credential(PathBuf),
}

impl KeySource {
    /// `--cluster_key_file`, else the credential, else nothing; reads no file.
    pub fn of(flags: &Flags) -> Option<Self> {
        if let Some(path) = &flags.cluster_key_file {
            return Some(Self::Flag(path.clone()));
        }
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY")?;
        Some(Self::Credential(PathBuf::from(dir).join(KEY_CREDENTIAL)))
    }

    /// The file.
    pub fn path(&self) -> &PathBuf {
        match self {
            Self::Flag(p) | Self::Credential(p) => p,
        }
    }

    /// Reads the file once. `Ok(None)`: a credential that is absent or only comments.
    pub fn load(&self) -> Result<Option<Loaded>, KeyringError> {
        match (self, Keyring::load(self.path())) {
            (_, Ok(loaded)) => Ok(Some(loaded)),
            (Self::Credential(_), Err(KeyringError::Empty { .. })) => Ok(None),
            (Self::Credential(_), Err(KeyringError::Read { source, .. }))
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                Ok(None)
            }
            (_, Err(e)) => Err(e),
        }
    }
}

/// The key file in use ([`KeySource`]), read once: refuses a file others can write, warns
/// about one they can read. Without a key, warns once that cluster traffic is
/// unauthenticated. Returns the sealer and the file SIGHUP reloads.
pub fn load(flags: &Flags) -> Result<(Option<Arc<Sealer>>, Option<PathBuf>), NodeError> {
    let source = KeySource::of(flags);
    let loaded = match &source {
        Some(s) => s.load()?,
        None => None,
    };
    let (Some(source), Some(loaded)) = (source, loaded) else {
        tracing::warn!(
            "no --cluster_key_file (nor a cluster-key credential: /etc/cluster-node/key under \
             the packaged units): cluster traffic is unauthenticated and unencrypted, so \
             anyone who reaches the gossip ports can join or forge deaths; create one with \
             `node keygen > FILE && chmod 600 FILE`"
        );
        return Ok((None, None));
    };
    let path = source.path().clone();
    if let Some(w) = &loaded.permission_warning {
        tracing::warn!("{w}");
    }
    tracing::info!(keys = loaded.ring.len(), path = %path.display(), "cluster key file loaded");
    let sealer = Arc::new(Sealer::new(loaded.ring, SealerConfig::default()));
    Ok((Some(sealer), Some(path)))
}

/// Re-reads the key file on every SIGHUP; a bad file keeps the previous keys. Returns the
/// watching task.
pub fn reload_on_sighup(
    path: Option<PathBuf>,
    sealer: Option<Arc<Sealer>>,
) -> Result<tokio::task::JoinHandle<()>, NodeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| NodeError::Config(format!("cannot watch SIGHUP: {e}")))?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let (Some(path), Some(sealer)) = (&path, &sealer) else {
                tracing::info!("SIGHUP received; no --cluster_key_file to reload");
                continue;
            };
            match Keyring::load(path) {
                Ok(loaded) => {
                    if let Some(w) = &loaded.permission_warning {
                        tracing::warn!("{w}");
                    }
                    tracing::info!(
                        keys = loaded.ring.len(),
                        path = %path.display(),
                        "SIGHUP: cluster key file reloaded"
                    );
                    sealer.replace(loaded.ring);
                }
                Err(e) => tracing::error!("SIGHUP: {e}; keeping the previous keys"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }

    #[test]
    fn a_credential_of_comments_or_none_means_keyless_but_a_flag_must_load() {
        let dir = tempfile::tempdir().unwrap();
        let comments = write(dir.path(), "c", "# no key on this host\n\n");
        let good = write(dir.path(), "g", &format!("# rotated 2026\n{K1}\n"));
        let bad = write(dir.path(), "b", "not base64\n");
        let missing = dir.path().join("missing");
        let cred = |p: &PathBuf| KeySource::Credential(p.clone()).load();
        assert!(cred(&comments).unwrap().is_none());
        assert!(cred(&missing).unwrap().is_none());
        assert_eq!(cred(&good).unwrap().unwrap().ring.len(), 1);
        // A credential with a bad key line names the problem instead of running keyless.
        let e = cred(&bad).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        // The flag's file must hold a key.
        let flag = |p: &PathBuf| KeySource::Flag(p.clone()).load();
        assert!(flag(&comments).is_err());
        assert!(flag(&missing).is_err());
        assert_eq!(flag(&good).unwrap().unwrap().ring.len(), 1);
    }
}
