//! The cluster key ring: parses the key file and seals cluster-internal traffic with an AEAD.
//!
//! A key file holds one base64-encoded 32-byte key per line. The first key is the primary:
//! every message is sealed with it. Every key opens messages, so a key can be rotated with no
//! downtime (memberlist's keyring model): add the new key as a secondary everywhere, make it
//! primary everywhere, then remove the old one.
//!
//! [`Keyring`] does the raw sealing: XChaCha20-Poly1305 with a random 24-byte nonce, so nonces
//! never need coordination. [`Sealer`] adds what a network protocol needs on top: a timestamp
//! inside the sealed payload, a window outside which messages are stale, and a bounded cache of
//! recently seen nonces, so a captured message replayed later is dropped.
//!
//! No error, `Debug` output or log line of this crate contains key material.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Bytes in a key.
pub const KEY_LEN: usize = 32;
/// Bytes in a nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes in the authentication tag.
pub const TAG_LEN: usize = 16;
/// The format version, the first byte of every sealed message.
pub const FORMAT: u8 = 1;
/// Bytes that [`Keyring::seal`] adds: format byte, nonce and tag.
pub const RAW_OVERHEAD: usize = 1 + NONCE_LEN + TAG_LEN;
/// Bytes that [`Sealer::seal`] adds: the raw overhead and an 8-byte timestamp.
pub const OVERHEAD: usize = RAW_OVERHEAD + 8;
/// The most keys a file may hold; rotation needs two.
pub const MAX_KEYS: usize = 16;
/// The largest key file read, in bytes: 16 keys take 720 bytes, the rest leaves room for
/// comments. Reads stop here, so a file that never ends (a device) cannot stall start-up.
pub const MAX_FILE_LEN: u64 = 4 * 1024;

/// Why a key file could not be used or a message was dropped. No variant holds key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The key file could not be read.
    #[error("cannot read the cluster key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file is larger than any valid one.
    #[error(
        "the cluster key file {path} is larger than {MAX_FILE_LEN} bytes: it must hold only base64 keys, one per line"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The path is not a regular file: a FIFO, a device or a directory would block or never end.
    #[error(
        "the cluster key file {path} is a {kind}, not a regular file: point --cluster_key_file at a file written by `node keygen > FILE`"
    )]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// Users other than the owner can change the key file, so they could plant their own key.
    #[error(
        "the cluster key file {path} has mode {mode:04o}, so other users can change it: run `chmod 600 {path}` (or at least `chmod go-w {path}`)"
    )]
    Writable {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file holds no key.
    #[error(
        "the cluster key file {origin} holds no key: put one base64-encoded 32-byte key per line (`node keygen` prints one)"
    )]
    Empty {
        /// The file, or `<text>`.
        origin: String,
    },
    /// The key file holds too many keys.
    #[error("the cluster key file {origin} holds more than {MAX_KEYS} keys: remove retired keys")]
    TooManyKeys {
        /// The file, or `<text>`.
        origin: String,
    },
    /// A line is not a key. The line's content is never shown.
    #[error(
        "line {line} of the cluster key file {origin} is not a key: {problem}; each line must be one base64-encoded 32-byte key (`node keygen` prints one)"
    )]
    BadLine {
        /// The file, or `<text>`.
        origin: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong, without the content.
        problem: String,
    },
    /// A sealed message is too short or of an unknown format.
    #[error("sealed message is too short or of an unknown format")]
    Malformed,
    /// No key opened the message: another key, another cluster, or tampering.
    #[error("message failed authentication: wrong cluster key, another cluster, or tampered")]
    Unauthenticated,
    /// The message's timestamp is outside the accepted window.
    #[error(
        "message timestamp is {skew_ms} ms away from this host's clock, outside the {window_s} s window: check that clocks are synchronised (NTP)"
    )]
    Stale {
        /// How far the timestamp is from now, in milliseconds.
        skew_ms: i64,
        /// The window, in seconds.
        window_s: u64,
    },
    /// The message was received before.
    #[error("message was already received: a replay")]
    Replayed,
}

impl KeyringError {
    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyringError::Malformed => "sealed_malformed",
            KeyringError::Unauthenticated => "auth_failed",
            KeyringError::Stale { .. } => "stale",
            KeyringError::Replayed => "replayed",
            _ => "key_file",
        }
    }
}

/// One key. Its `Debug` output never shows the bytes.
#[derive(Clone)]
pub struct Key {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new(bytes.into()),
        }
    }
}

/// The keys of a key file: the first seals, all open.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// A key file that was read, and what is wrong with its permissions, if anything.
#[derive(Debug)]
pub struct Loaded {
    /// The keys.
    pub ring: Keyring,
    /// Set when group or others can read the file. A file they can write is refused instead.
    pub permission_warning: Option<String>,
}

/// Prints a new random key, base64-encoded, for a key file.
pub fn generate() -> String {
    let bytes: [u8; KEY_LEN] = rand::random();
    STANDARD.encode(bytes)
}

impl Keyring {
    /// A ring of the given keys; the first is the primary. Fails when `keys` is empty.
    pub fn new(keys: Vec<Key>) -> Result<Self, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty {
                origin: "<keys>".into(),
            });
        }
        Ok(Self { keys })
    }

    /// Parses key-file text: one base64 key per line; blank lines and `#` comments are skipped.
    /// `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeyringError> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem: String| KeyringError::BadLine {
                origin: origin.to_owned(),
                line: i + 1,
                problem,
            };
            // The decoder's own error names the offending byte, which is part of the secret.
            let bytes = STANDARD
                .decode(line)
                .map_err(|_| bad("not valid base64".into()))?;
            let bytes: [u8; KEY_LEN] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| bad(format!("decodes to {} bytes, not {KEY_LEN}", bytes.len())))?;
            if keys.len() == MAX_KEYS {
                return Err(KeyringError::TooManyKeys {
                    origin: origin.to_owned(),
                });
            }
            keys.push(Key::from_bytes(&bytes));
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty {
                origin: origin.to_owned(),
            });
        }
        Ok(Self { keys })
    }

    /// Reads and parses a key file. Refuses anything but a regular file (before opening it, so a
    /// FIFO cannot block), a file group or others can write, and a file over [`MAX_FILE_LEN`]
    /// (the read itself is bounded); warns when group or others can read it.
    pub fn load(path: &Path) -> Result<Loaded, KeyringError> {
        use std::io::Read as _;
        let read = |source| KeyringError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        check_file(path, &meta)?;
        let file = std::fs::File::open(path).map_err(read)?;
        // The path may have been swapped between the check and the open: check what was opened.
        check_file(path, &file.metadata().map_err(read)?)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_LEN + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        if bytes.len() as u64 > MAX_FILE_LEN {
            return Err(KeyringError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = String::from_utf8(bytes).map_err(|_| {
            read(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not UTF-8 text",
            ))
        })?;
        let ring = Self::parse(&text, &path.display().to_string())?;
        Ok(Loaded {
            ring,
            permission_warning: permission_warning(path, &meta),
        })
    }

    /// How many keys the ring holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a ring holds at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Seals `plain` with the primary key: format byte, random nonce, ciphertext and tag.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        self.seal_with_nonce(aad, plain, &nonce)
    }

    fn seal_with_nonce(&self, aad: &[u8], plain: &[u8], nonce: &[u8; NONCE_LEN]) -> Vec<u8> {
        let ct = self.keys[0]
            .cipher
            .encrypt(XNonce::from_slice(nonce), Payload { msg: plain, aad })
            .expect("xchacha20poly1305 encrypts any message below 256 GiB");
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(FORMAT);
        out.extend_from_slice(nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a message sealed by any key of the ring.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeyringError> {
        if sealed.len() < RAW_OVERHEAD || sealed[0] != FORMAT {
            return Err(KeyringError::Malformed);
        }
        let nonce = XNonce::from_slice(&sealed[1..1 + NONCE_LEN]);
        let msg = &sealed[1 + NONCE_LEN..];
        self.keys
            .iter()
            .find_map(|k| k.cipher.decrypt(nonce, Payload { msg, aad }).ok())
            .ok_or(KeyringError::Unauthenticated)
    }
}

/// Refuses what is not a regular file, or what group or others can write.
fn check_file(path: &Path, meta: &std::fs::Metadata) -> Result<(), KeyringError> {
    if !meta.is_file() {
        return Err(KeyringError::NotRegular {
            path: path.to_owned(),
            kind: file_kind(meta),
        });
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o022 != 0 {
            return Err(KeyringError::Writable {
                path: path.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}

fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "device";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    "special file"
}

#[cfg(unix)]
fn permission_warning(path: &Path, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = meta.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then(|| {
        format!(
            "the cluster key file {} has mode {mode:04o}, so other users can read it: run `chmod 600 {}`",
            path.display(),
            path.display()
        )
    })
}

#[cfg(not(unix))]
fn permission_warning(_path: &Path, _meta: &std::fs::Metadata) -> Option<String> {
    None
}

/// The milliseconds since the Unix epoch, as [`Sealer`] stamps them.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Settings of a [`Sealer`].
#[derive(Debug, Clone, Copy)]
pub struct SealerConfig {
    /// Messages whose timestamp is further than this from the local clock are stale.
    pub window: Duration,
    /// The most nonces remembered. When full, the earliest-stamped is forgotten and every
    /// message stamped no later than it is refused, so a replay is never accepted; size it above
    /// the messages received within two windows.
    pub replay_capacity: usize,
}

impl Default for SealerConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            replay_capacity: 1 << 17,
        }
    }
}

/// Nonces seen within the window, ordered by their timestamps.
///
/// Eviction takes the earliest stamp, never the earliest arrival: a message from a peer whose
/// clock runs ahead carries a late stamp, so it is forgotten last and cannot raise the floor
/// above the stamps of honest messages (it used to be evicted first, refusing every honest
/// message for as long as that clock was ahead).
#[derive(Debug, Default)]
struct ReplayCache {
    seen: HashSet<[u8; NONCE_LEN]>,
    by_time: BTreeSet<(u64, [u8; NONCE_LEN])>,
    /// Messages stamped at or before this were forgotten early; they are refused.
    floor: u64,
}

/// Seals and opens protocol messages: timestamped, windowed and replay-checked.
///
/// The sealed payload is `timestamp_ms (u64 big-endian) || message`; the nonce doubles as the
/// message's identity in the replay cache. The ring can be swapped at any time (SIGHUP).
pub struct Sealer {
    ring: RwLock<Arc<Keyring>>,
    cfg: SealerConfig,
    replay: Mutex<ReplayCache>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("ring", &*self.ring())
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Sealer {
    /// A sealer using `ring`.
    pub fn new(ring: Keyring, cfg: SealerConfig) -> Self {
        Self {
            ring: RwLock::new(Arc::new(ring)),
            cfg,
            replay: Mutex::new(ReplayCache::default()),
        }
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Keyring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the ring, e.g. after the key file was edited.
    pub fn replace(&self, ring: Keyring) {
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ring);
    }

    /// Seals `msg` stamped with `now_ms`.
    pub fn seal_at(&self, aad: &[u8], msg: &[u8], now_ms: u64) -> Vec<u8> {
        let mut plain = Vec::with_capacity(8 + msg.len());
        plain.extend_from_slice(&now_ms.to_be_bytes());
        plain.extend_from_slice(msg);
        self.ring().seal(aad, &plain)
    }

    /// Seals `msg` stamped with the current time.
    pub fn seal(&self, aad: &[u8], msg: &[u8]) -> Vec<u8> {
        self.seal_at(aad, msg, unix_ms())
    }

    /// Opens a message, checks its timestamp against `now_ms` and that it is not a replay.
    pub fn open_at(&self, aad: &[u8], sealed: &[u8], now_ms: u64) -> Result<Vec<u8>, KeyringError> {
        let mut plain = self.ring().open(aad, sealed)?;
        if plain.len() < 8 {
            return Err(KeyringError::Malformed);
        }
        let ts = u64::from_be_bytes(plain[..8].try_into().expect("8 bytes"));
        let window = u64::try_from(self.cfg.window.as_millis()).unwrap_or(u64::MAX);
        if ts.abs_diff(now_ms) > window {
            let skew = i64::try_from(ts.abs_diff(now_ms)).unwrap_or(i64::MAX);
            return Err(KeyringError::Stale {
                skew_ms: if ts < now_ms { -skew } else { skew },
                window_s: self.cfg.window.as_secs(),
            });
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().expect("checked");
        self.remember(nonce, ts, now_ms, window)?;
        plain.drain(..8);
        Ok(plain)
    }

    /// Opens a message at the current time.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, KeyringError> {
        self.open_at(aad, sealed, unix_ms())
    }

    fn remember(
        &self,
        nonce: [u8; NONCE_LEN],
        ts: u64,
        now_ms: u64,
        window: u64,
    ) -> Result<(), KeyringError> {
        let mut c = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        if c.seen.contains(&nonce) || (c.floor > 0 && ts <= c.floor) {
            return Err(KeyringError::Replayed);
        }
        // Forget what is outside the window: the timestamp check refuses it anyway.
        let horizon = now_ms.saturating_sub(window);
        while let Some(&(t, n)) = c.by_time.first() {
            if t >= horizon {
                break;
            }
            c.by_time.pop_first();
            c.seen.remove(&n);
        }
        while c.by_time.len() >= self.cfg.replay_capacity.max(1) {
            let Some((t, n)) = c.by_time.pop_first() else {
                break;
            };
            c.seen.remove(&n);
            c.floor = c.floor.max(t);
        }
        if c.floor > 0 && ts <= c.floor {
            return Err(KeyringError::Replayed);
        }
        c.seen.insert(nonce);
        c.by_time.insert((ts, nonce));
        Ok(())
    }
}

/// The associated data that binds a message to a cluster name and a logical cluster
/// (`scheduler`, `all` or `multicast`).
pub fn aad(cluster_name: &str, logical: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + cluster_name.len() + logical.len());
    v.extend_from_slice(b"cluster-key/v1\0");
    v.extend_from_slice(cluster_name.as_bytes());
    v.push(0);
    v.extend_from_slice(logical.as_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn ring(text: &str) -> Keyring {
        Keyring::parse(text, "test").unwrap()
    }

    fn sealer(text: &str) -> Sealer {
        Sealer::new(ring(text), SealerConfig::default())
    }

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(ring(&format!("{a}\n{b}\n")).len(), 2);
    }

    #[test]
    fn the_primary_seals_and_every_key_opens() {
        let old = ring(K1);
        let both = ring(&format!("{K2}\n# retiring\n\n{K1}\n"));
        let sealed = both.seal(b"aad", b"hello");
        assert_eq!(both.open(b"aad", &sealed).unwrap(), b"hello");
        assert!(matches!(
            old.open(b"aad", &sealed),
            Err(KeyringError::Unauthenticated)
        ));
        let from_old = old.seal(b"aad", b"hi");
        assert_eq!(both.open(b"aad", &from_old).unwrap(), b"hi");
    }

    #[test]
    fn another_cluster_or_logical_cluster_never_verifies() {
        let r = ring(K1);
        let sealed = r.seal(&aad("prod", "all"), b"x");
        assert!(r.open(&aad("prod", "scheduler"), &sealed).is_err());
        assert!(r.open(&aad("staging", "all"), &sealed).is_err());
        assert!(r.open(&aad("prod", "all"), &sealed).is_ok());
    }

    #[test]
    fn bad_key_files_name_the_line_but_never_the_content() {
        let secret_ish = "c2VjcmV0LXNlY3JldC1zZWNyZXQ=";
        let e = Keyring::parse(&format!("{K1}\n{secret_ish}\n"), "/etc/k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("/etc/k") && e.contains("not 32"));
        assert!(!e.contains(secret_ish) && !e.contains("secret"), "{e}");
        let e = Keyring::parse("not base64!!", "f").unwrap_err().to_string();
        assert!(e.contains("not valid base64") && !e.contains("!!"), "{e}");
        let e = Keyring::parse("# only a comment\n", "f")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds no key") && e.contains("node keygen"),
            "{e}"
        );
        let many = std::iter::repeat_n(K1, MAX_KEYS + 1)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(matches!(
            Keyring::parse(&many, "f"),
            Err(KeyringError::TooManyKeys { .. })
        ));
        assert!(!format!("{:?}", ring(K1)).contains(K1));
    }

    /// A fresh directory under the temp dir, removed by the caller.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keyring-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs `Keyring::load` on a thread, so a load that blocks fails the test instead of
    /// hanging it.
    fn load_within_5s(path: &Path) -> Result<Loaded, KeyringError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.to_owned();
        std::thread::spawn(move || {
            let _ = tx.send(Keyring::load(&p));
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("loading the key file blocked for 5 s")
    }

    #[test]
    fn loading_warns_about_readable_files_and_refuses_writable_ones() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("perms");
        let path = dir.join("key");
        std::fs::write(&path, format!("{K1}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let l = Keyring::load(&path).unwrap();
        let w = l.permission_warning.unwrap();
        assert!(w.contains("0644") && w.contains("chmod 600"), "{w}");
        for mode in [0o620, 0o602, 0o666] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = Keyring::load(&path).unwrap_err();
            assert!(matches!(e, KeyringError::Writable { .. }), "{e:?}");
            let e = e.to_string();
            let fix = format!("chmod 600 {}", path.display());
            assert!(
                e.contains(&format!("{mode:04o}")) && e.contains(&fix) && e.contains("go-w"),
                "{e}"
            );
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Keyring::load(&path).unwrap().permission_warning.is_none());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(Keyring::load(&path).unwrap().permission_warning.is_none());
        let missing = Keyring::load(&dir.join("absent")).unwrap_err().to_string();
        assert!(missing.contains("absent"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_fifo_a_device_or_a_directory_is_refused_without_blocking() {
        let dir = temp_dir("special");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg("-m")
            .arg("600")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        // Nobody writes to the FIFO: opening it for reading would block for good.
        let e = load_within_5s(&fifo).unwrap_err();
        assert!(
            matches!(e, KeyringError::NotRegular { kind: "FIFO", .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // /dev/zero never ends and reports a length of 0.
        let e = load_within_5s(Path::new("/dev/zero")).unwrap_err();
        assert!(
            matches!(e, KeyringError::NotRegular { kind: "device", .. }),
            "{e:?}"
        );
        let e = load_within_5s(&dir).unwrap_err();
        assert!(
            matches!(
                e,
                KeyringError::NotRegular {
                    kind: "directory",
                    ..
                }
            ),
            "{e:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_file_over_the_bound_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("large");
        let path = dir.join("key");
        // Valid keys, then comments up to one byte over the bound.
        let mut text = format!("{K1}\n");
        while text.len() < MAX_FILE_LEN as usize + 1 {
            text.push_str("# padding\n");
        }
        text.truncate(MAX_FILE_LEN as usize + 1);
        std::fs::write(&path, &text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Keyring::load(&path).unwrap_err();
        assert!(matches!(e, KeyringError::TooLarge { .. }), "{e:?}");
        text.truncate(MAX_FILE_LEN as usize);
        std::fs::write(&path, &text).unwrap();
        assert_eq!(Keyring::load(&path).unwrap().ring.len(), 1);
        // The bound leaves room for the most keys a file may hold, with CRLF line ends.
        let most = std::iter::repeat_n(K1, MAX_KEYS)
            .collect::<Vec<_>>()
            .join("\r\n");
        assert!((most.len() as u64) < MAX_FILE_LEN / 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stale_messages_and_replays_are_refused() {
        let s = sealer(K1);
        let now = 1_000_000_000;
        let m = s.seal_at(b"a", b"member x is dead", now);
        assert_eq!(s.open_at(b"a", &m, now + 10).unwrap(), b"member x is dead");
        assert!(matches!(
            s.open_at(b"a", &m, now + 20),
            Err(KeyringError::Replayed)
        ));
        // Captured a minute ago and replayed now: outside the window.
        let old = s.seal_at(b"a", b"leave", now - 60_000);
        assert!(matches!(
            s.open_at(b"a", &old, now),
            Err(KeyringError::Stale {
                skew_ms: -60_000,
                ..
            })
        ));
        let future = s.seal_at(b"a", b"leave", now + 31_000);
        assert!(matches!(
            s.open_at(b"a", &future, now),
            Err(KeyringError::Stale { .. })
        ));
    }

    #[test]
    fn a_full_replay_cache_refuses_what_it_forgot() {
        let s = Sealer::new(
            ring(K1),
            SealerConfig {
                window: Duration::from_secs(30),
                replay_capacity: 4,
            },
        );
        let now = 5_000_000;
        let msgs: Vec<Vec<u8>> = (0..6).map(|i| s.seal_at(b"", b"m", now + i)).collect();
        for m in &msgs {
            s.open_at(b"", m, now + 10).unwrap();
        }
        for m in &msgs {
            assert!(matches!(
                s.open_at(b"", m, now + 10),
                Err(KeyringError::Replayed)
            ));
        }
        // Fresher messages still pass.
        let fresh = s.seal_at(b"", b"m", now + 100);
        s.open_at(b"", &fresh, now + 100).unwrap();
    }

    #[test]
    fn a_peer_whose_clock_runs_ahead_never_gets_honest_messages_refused() {
        let s = Sealer::new(
            ring(K1),
            SealerConfig {
                window: Duration::from_secs(30),
                replay_capacity: 4,
            },
        );
        let now = 5_000_000;
        // One accepted message stamped 20 s ahead, then enough honest traffic to fill the cache
        // several times over.
        let ahead = s.seal_at(b"", b"fast clock", now + 20_000);
        s.open_at(b"", &ahead, now).unwrap();
        let honest: Vec<Vec<u8>> = (0..12).map(|i| s.seal_at(b"", b"m", now + i)).collect();
        for (i, m) in honest.iter().enumerate() {
            s.open_at(b"", m, now + i as u64)
                .unwrap_or_else(|e| panic!("honest message {i} refused: {e}"));
        }
        // True replays, evicted or not, are still refused, the fast one included.
        for m in honest.iter().chain([&ahead]) {
            assert!(matches!(
                s.open_at(b"", m, now + 20),
                Err(KeyringError::Replayed)
            ));
        }
        let later = s.seal_at(b"", b"m", now + 1_000);
        s.open_at(b"", &later, now + 1_000).unwrap();
    }

    #[test]
    fn the_ring_can_be_swapped_while_in_use() {
        let s = sealer(K1);
        let m = s.seal(b"", b"x");
        s.replace(ring(K2));
        assert!(matches!(
            s.open(b"", &m),
            Err(KeyringError::Unauthenticated)
        ));
        s.replace(ring(&format!("{K2}\n{K1}")));
        assert_eq!(s.open(b"", &m).unwrap(), b"x");
    }

    proptest! {
        #[test]
        fn sealed_messages_round_trip(msg in proptest::collection::vec(any::<u8>(), 0..2000),
                                      aad_ in proptest::collection::vec(any::<u8>(), 0..64)) {
            let s = sealer(K1);
            let sealed = s.seal(&aad_, &msg);
            prop_assert_eq!(sealed.len(), msg.len() + OVERHEAD);
            prop_assert_eq!(s.open(&aad_, &sealed).unwrap(), msg);
        }

        #[test]
        fn garbage_never_opens_or_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let s = sealer(K1);
            prop_assert!(s.open(b"", &data).is_err());
        }

        #[test]
        fn flipping_any_bit_breaks_authentication(msg in proptest::collection::vec(any::<u8>(), 0..100),
                                                  bit in any::<usize>()) {
            let s = sealer(K1);
            let mut sealed = s.seal(b"", &msg);
            let i = bit % (sealed.len() * 8);
            sealed[i / 8] ^= 1 << (i % 8);
            prop_assert!(s.open(b"", &sealed).is_err());
        }

        #[test]
        fn key_file_parser_never_panics(text in "\\PC{0,300}") {
            let _ = Keyring::parse(&text, "fuzz");
        }
    }
}
