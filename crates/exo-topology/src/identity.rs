//! The node's identity (an ed25519 key pair) and the cluster key (a pre-shared secret), both
//! kept in the node's home folder.
//!
//! The identity must be unique per device: it is what other nodes call this node. Copying a
//! home folder copies the identity, which is why the event loop watches for two nodes that
//! present the same one. The cluster key must be the same on every device of a cluster: libp2p's
//! private-network layer encrypts every byte with it before the Noise handshake, so a node with
//! another key cannot even start a handshake.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the node identity in the home folder.
pub const NODE_KEY_FILE: &str = "node.key";
/// File name of the cluster key in the home folder.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";

/// A 256-bit secret shared by every node of one cluster.
///
/// Written as 64 hexadecimal digits (the form `--cluster-key` and `cluster.key` use).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// Parses 64 hexadecimal digits (surrounding white space is ignored). `origin` names where
    /// the text came from, for the error message.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let text = text.trim();
        let bad = |message: String| Error::ClusterKey {
            origin: origin.to_owned(),
            message,
        };
        if text.len() != 64 {
            return Err(bad(format!(
                "expected 64 hexadecimal digits, got {} characters",
                text.chars().count()
            )));
        }
        let mut key = [0u8; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            let pair = text.get(2 * i..2 * i + 2).unwrap_or("");
            *byte = u8::from_str_radix(pair, 16)
                .map_err(|_| bad(format!("`{pair}` at position {} is not hexadecimal", 2 * i)))?;
        }
        Ok(Self(key))
    }

    /// The key as 64 lowercase hexadecimal digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// A short public fingerprint of the key: safe to print and compare between devices.
    pub fn fingerprint(&self) -> String {
        self.psk().fingerprint().to_string()
    }

    /// A secret for one `purpose` (such as `"exo.shard.v1 credential"`), derived from the key
    /// one way: knowing it reveals neither the key nor the secrets of other purposes. Other
    /// services of the cluster (the shard transport) authenticate with these.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"exo-rs cluster key derivation v1\0");
        hasher.update(purpose.as_bytes());
        hasher.update(b"\0");
        hasher.update(self.0);
        hasher.finalize().into()
    }

    pub(crate) fn psk(&self) -> PreSharedKey {
        PreSharedKey::new(self.0)
    }
}

impl fmt::Debug for ClusterKey {
    // Never print the secret itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey(fingerprint {})", self.fingerprint())
    }
}

/// Where the cluster key in use came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KeyOrigin {
    /// Given in the configuration (`--cluster-key` or `EXO_CLUSTER_KEY`).
    Given,
    /// Read from the home folder.
    File {
        /// The key file.
        path: PathBuf,
    },
    /// Generated at this start and written to the home folder.
    Generated {
        /// The key file written.
        path: PathBuf,
    },
}

/// The cluster key a node runs with, described without the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterKeyInfo {
    /// Where the key came from.
    pub origin: KeyOrigin,
    /// The key's public fingerprint; equal fingerprints mean equal keys.
    pub fingerprint: String,
}

impl ClusterKeyInfo {
    /// One or two sentences telling a user how to put the other devices in this cluster.
    pub fn share_hint(&self) -> String {
        match &self.origin {
            KeyOrigin::Given => format!(
                "cluster key {} given; start the other devices with the same --cluster-key",
                self.fingerprint
            ),
            KeyOrigin::File { path } | KeyOrigin::Generated { path } => format!(
                "cluster key {} in {}; to add a device, copy that file into its $EXO_HOME or start it with --cluster-key \"$(cat {})\"",
                self.fingerprint,
                path.display(),
                path.display()
            ),
        }
    }
}

/// Loads the node identity from `home/node.key`, creating it (and `home`) if absent.
pub(crate) fn load_or_create_identity(home: &Path) -> Result<Keypair> {
    let path = home.join(NODE_KEY_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes).map_err(|e| Error::Identity {
            path: path.clone(),
            message: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|e| Error::Identity {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            write_secret(home, &path, &bytes)?;
            tracing::info!(path = %path.display(), peer = %keypair.public().to_peer_id(), "created a node identity");
            Ok(keypair)
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The cluster key to use: the given one, else `home/cluster.key`, else a new one written there.
pub(crate) fn resolve_cluster_key(
    given: Option<&ClusterKey>,
    home: &Path,
) -> Result<(ClusterKey, ClusterKeyInfo)> {
    let path = home.join(CLUSTER_KEY_FILE);
    let (key, origin) = if let Some(key) = given {
        (key.clone(), KeyOrigin::Given)
    } else {
        match std::fs::read_to_string(&path) {
            Ok(text) => (
                ClusterKey::parse(&text, &path.display().to_string())?,
                KeyOrigin::File { path },
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ClusterKey::generate();
                write_secret(home, &path, format!("{}\n", key.to_hex()).as_bytes())?;
                (key, KeyOrigin::Generated { path })
            }
            Err(e) => return Err(Error::io(path, e)),
        }
    };
    let info = ClusterKeyInfo {
        fingerprint: key.fingerprint(),
        origin,
    };
    Ok((key, info))
}

/// Writes a secret readable only by its owner: to a temporary file first, then renamed, so a
/// crash never leaves half a key behind.
fn write_secret(home: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::create_dir_all(home).map_err(|e| Error::io(home, e))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(&tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn cluster_keys_round_trip_through_hex_and_errors_name_the_origin() {
        let key = ClusterKey::generate();
        let parsed = ClusterKey::parse(&format!("  {}\n", key.to_hex()), "test").unwrap();
        assert_eq!(parsed, key);
        assert_eq!(parsed.fingerprint(), key.fingerprint());
        assert!(!format!("{key:?}").contains(&key.to_hex()));

        let err = ClusterKey::parse("abc", "--cluster-key").unwrap_err();
        assert!(err.to_string().contains("--cluster-key"), "{err}");
        let err = ClusterKey::parse(&"zz".repeat(32), "f").unwrap_err();
        assert!(err.to_string().contains("`zz`"), "{err}");
    }

    #[test]
    fn derived_secrets_depend_on_key_and_purpose() {
        let key = ClusterKey::generate();
        let again = ClusterKey::parse(&key.to_hex(), "test").unwrap();
        assert_eq!(key.derive("a"), again.derive("a"));
        assert_ne!(key.derive("a"), key.derive("b"));
        assert_ne!(key.derive("a"), ClusterKey::generate().derive("a"));
        assert_ne!(key.derive("a"), key.0);
    }

    #[test]
    fn identity_and_cluster_key_are_created_once_and_kept_private() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("exo");
        let first = load_or_create_identity(&home).unwrap();
        let second = load_or_create_identity(&home).unwrap();
        assert_eq!(first.public(), second.public());

        let (key, info) = resolve_cluster_key(None, &home).unwrap();
        assert!(matches!(info.origin, KeyOrigin::Generated { .. }));
        assert!(info.share_hint().contains("cluster.key"));
        let (again, info) = resolve_cluster_key(None, &home).unwrap();
        assert_eq!(again, key);
        assert!(matches!(info.origin, KeyOrigin::File { .. }));
        let given = ClusterKey::generate();
        let (used, info) = resolve_cluster_key(Some(&given), &home).unwrap();
        assert_eq!((used, info.origin), (given, KeyOrigin::Given));

        #[cfg(unix)]
        for file in [NODE_KEY_FILE, CLUSTER_KEY_FILE] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(home.join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn a_corrupt_identity_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_KEY_FILE), b"not a key").unwrap();
        let err = load_or_create_identity(dir.path()).unwrap_err();
        assert!(err.to_string().contains("node.key"), "{err}");
    }
}
