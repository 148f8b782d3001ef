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

/// The fewest characters a cluster passphrase may have.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// The salt every passphrase is stretched with. It is the same for every cluster, so that the
/// passphrase alone gives the key on every device, with nothing else to share; what keeps a
/// cluster apart is its passphrase. 21 bytes, above argon2's minimum of 8, so it is used as is.
const PASSPHRASE_SALT: &[u8] = b"exo-rs cluster key v1";
/// argon2id's memory cost, KiB (64 MiB): a Raspberry Pi with 1 GiB can afford it, and guessing
/// passphrases costs an attacker 64 MiB per guess in flight.
const PASSPHRASE_MEMORY_KIB: u32 = 64 * 1024;
/// argon2id's passes over that memory.
const PASSPHRASE_PASSES: u32 = 3;
/// argon2id's lanes: one, computed on one thread (argon2's `parallel` feature is off).
const PASSPHRASE_LANES: u32 = 1;

/// A 256-bit secret shared by every node of one cluster.
///
/// Written as 64 hexadecimal digits (the form `cluster.key` holds), or derived from a
/// passphrase that people can type on every device (see [`ClusterKey::parse`]).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; 32]);

impl ClusterKey {
    /// A new random key.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// Parses a key as a user gives it (surrounding white space is ignored): 64 hexadecimal
    /// digits are the key itself; any other text of at least [`MIN_PASSPHRASE_CHARS`]
    /// characters is a passphrase, stretched into the key with argon2id (64 MiB, 3 passes, 1
    /// lane, the fixed salt `exo-rs cluster key v1`; 0.3 s on one x86-64 core), so the
    /// same passphrase gives the same key on every device while each guess costs an attacker
    /// that much work. The passphrase is used as typed, as UTF-8, less surrounding white space.
    /// Text of 32 or more hexadecimal digits only, but not 64, is refused as a mistyped key
    /// rather than taken for a passphrase. `origin` names where the text came from, for the
    /// error message.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let text = text.trim();
        let bad = |message: String| Error::ClusterKey {
            origin: origin.to_owned(),
            message,
        };
        let hex_digits = text.bytes().all(|b| b.is_ascii_hexdigit());
        if hex_digits && text.len() == 64 {
            let mut key = [0u8; 32];
            for (i, byte) in key.iter_mut().enumerate() {
                let pair = text.get(2 * i..2 * i + 2).unwrap_or("");
                *byte = u8::from_str_radix(pair, 16).map_err(|_| {
                    bad(format!("`{pair}` at position {} is not hexadecimal", 2 * i))
                })?;
            }
            return Ok(Self(key));
        }
        if hex_digits && text.len() >= 32 {
            return Err(bad(format!(
                "{} hexadecimal digits look like a mistyped key: a key has exactly 64",
                text.len()
            )));
        }
        let chars = text.chars().count();
        if chars < MIN_PASSPHRASE_CHARS {
            return Err(bad(format!(
                "expected 64 hexadecimal digits or a passphrase of at least \
                 {MIN_PASSPHRASE_CHARS} characters, got {chars} characters"
            )));
        }
        stretch_passphrase(text)
            .map(Self)
            .map_err(|e| bad(format!("cannot derive a key from the passphrase: {e}")))
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

    /// The key's bytes, for the join exchange that hands it to a new device.
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A key received from another device of the cluster.
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
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
    /// What a user needs to know to put the other devices in this cluster. For a key this
    /// node generated, how to share it: copy the file, give its digits, or use a passphrase
    /// everywhere instead. Never contains the secret itself.
    pub fn share_hint(&self) -> String {
        match &self.origin {
            KeyOrigin::Given => format!(
                "cluster key {} given; start the other devices with the same --cluster-key (or EXO_CLUSTER_KEY)",
                self.fingerprint
            ),
            KeyOrigin::File { path } => format!(
                "cluster key {} from {}; to add a device, copy that file into its $EXO_HOME or start it with --cluster-key and the 64 hexadecimal digits the file holds",
                self.fingerprint,
                path.display()
            ),
            KeyOrigin::Generated { path } => format!(
                "generated a new cluster key (fingerprint {fingerprint}) in {path}; every device of a cluster needs the same key: \
                 copy {path} into the other devices' $EXO_HOME, \
                 or start them with --cluster-key <the 64 hexadecimal digits in that file> (or EXO_CLUSTER_KEY=<digits>); \
                 or instead choose a passphrase of at least {MIN_PASSPHRASE_CHARS} characters \
                 and start every device, this one too, with --cluster-key \"<passphrase>\"",
                fingerprint = self.fingerprint,
                path = path.display(),
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
pub fn resolve_cluster_key(
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

/// The 32-byte key argon2id derives from `passphrase` with this crate's fixed parameters.
fn stretch_passphrase(passphrase: &str) -> Result<[u8; 32], argon2::Error> {
    let params = argon2::Params::new(
        PASSPHRASE_MEMORY_KIB,
        PASSPHRASE_PASSES,
        PASSPHRASE_LANES,
        Some(32),
    )?;
    let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let mut key = [0u8; 32];
    argon2.hash_password_into(passphrase.as_bytes(), PASSPHRASE_SALT, &mut key)?;
    Ok(key)
}

/// Writes a secret readable only by its owner: to a temporary file first, then renamed, so a
/// crash never leaves half a key behind.
pub(crate) fn write_secret(home: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
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
        // Upper-case digits are the same key.
        let upper = ClusterKey::parse(&key.to_hex().to_uppercase(), "test").unwrap();
        assert_eq!(upper, key);

        let err = ClusterKey::parse("abc", "--cluster-key").unwrap_err();
        assert!(err.to_string().contains("--cluster-key"), "{err}");
    }

    #[test]
    fn hex_keys_are_the_key_bytes_themselves() {
        let key = ClusterKey::parse(&"5eed".repeat(16), "test").unwrap();
        assert_eq!(key.0, [0x5e, 0xed].repeat(16).as_slice());
        assert_eq!(key.to_hex(), "5eed".repeat(16));
    }

    #[test]
    fn a_passphrase_gives_the_same_key_on_every_machine() {
        // Computed once, independently (Python's argon2-cffi: argon2id, 65536 KiB, 3 passes,
        // 1 lane, 32 bytes, salt `exo-rs cluster key v1`). Changing any parameter changes
        // every cluster's key, and fails here.
        const EXPECTED: &str = "cd8b2eba6de0e95d1f09f53ed5feb03ba596ce4b6196ed61667bf7c567c50be3";
        let key = ClusterKey::parse("correct horse battery staple", "--cluster-key").unwrap();
        assert_eq!(key.to_hex(), EXPECTED);
        // As typed: surrounding white space (a trailing newline in a file) does not count.
        let again = ClusterKey::parse("  correct horse battery staple\n", "f").unwrap();
        assert_eq!(again, key);
        // Anything else is another key.
        let other = ClusterKey::parse("correct horse battery stapler", "f").unwrap();
        assert_ne!(other, key);
        // 64 characters that are not all hexadecimal digits are a passphrase too.
        assert!(ClusterKey::parse(&"zz".repeat(32), "f").is_ok());
    }

    #[test]
    fn short_passphrases_and_mistyped_keys_are_refused_with_the_rule() {
        let err = ClusterKey::parse("hunter2hunt", "--cluster-key").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("--cluster-key"), "{text}");
        assert!(
            text.contains("64 hexadecimal digits or a passphrase of at least 12 characters"),
            "{text}"
        );
        assert!(text.contains("got 11 characters"), "{text}");
        // Characters, not bytes: eleven non-ASCII letters are still too few.
        let err = ClusterKey::parse(&"é".repeat(11), "f").unwrap_err();
        assert!(err.to_string().contains("got 11 characters"), "{err}");
        assert!(ClusterKey::parse("", "f").is_err());

        // A key with a digit lost in copying is not silently another cluster's passphrase.
        let key = ClusterKey::generate().to_hex();
        let err = ClusterKey::parse(&key[1..], "f").unwrap_err();
        assert!(err.to_string().contains("63 hexadecimal digits"), "{err}");
        let err = ClusterKey::parse(&format!("{key}0"), "f").unwrap_err();
        assert!(err.to_string().contains("a key has exactly 64"), "{err}");
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
        let hint = info.share_hint();
        assert!(hint.contains("generated a new cluster key"), "{hint}");
        assert!(hint.contains(&info.fingerprint), "{hint}");
        let (again, info) = resolve_cluster_key(None, &home).unwrap();
        assert_eq!(again, key);
        assert!(matches!(info.origin, KeyOrigin::File { .. }));
        let written = std::fs::read_to_string(home.join(CLUSTER_KEY_FILE)).unwrap();
        assert_eq!(written, format!("{}\n", key.to_hex()));
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
    fn a_generated_key_comes_with_every_way_to_share_it_but_not_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let (key, info) = resolve_cluster_key(None, dir.path()).unwrap();
        let path = dir.path().join(CLUSTER_KEY_FILE);
        let hint = info.share_hint();
        // Copy the file, give its digits by flag or environment, or choose a passphrase.
        assert!(hint.contains(&format!("copy {}", path.display())), "{hint}");
        assert!(hint.contains("$EXO_HOME"), "{hint}");
        assert!(
            hint.contains("--cluster-key <the 64 hexadecimal digits"),
            "{hint}"
        );
        assert!(hint.contains("EXO_CLUSTER_KEY"), "{hint}");
        assert!(
            hint.contains("passphrase of at least 12 characters"),
            "{hint}"
        );
        assert!(!hint.contains(&key.to_hex()), "{hint}");

        // Once the file exists the hint says where it is read from, and still how to share.
        let (_, info) = resolve_cluster_key(None, dir.path()).unwrap();
        let hint = info.share_hint();
        assert!(
            hint.contains("from") && hint.contains("copy that file"),
            "{hint}"
        );
        assert!(!hint.contains("generated"), "{hint}");
    }

    #[test]
    fn a_corrupt_identity_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(NODE_KEY_FILE), b"not a key").unwrap();
        let err = load_or_create_identity(dir.path()).unwrap_err();
        assert!(err.to_string().contains("node.key"), "{err}");
    }
}
