//! The node key: one secp256k1 key per participant. It is the libp2p identity (its `PeerId`)
//! and the node's ledger account; announcements, commitments and vouchers are signed with it.
//!
//! On disk the key is 64 hex characters (the 32-byte secret) in a file readable only by its
//! owner, created on first start.

use libp2p_identity::{secp256k1, Keypair, PeerId, PublicKey};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why a key file could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum LoadKeyError {
    #[error("cannot read or write the key file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the key file {path} is not 64 hex characters of a secp256k1 secret key")]
    Malformed { path: PathBuf },
}

/// A node's secp256k1 key pair.
#[derive(Clone)]
pub struct NodeKey {
    keypair: Keypair,
    secret: [u8; 32],
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.peer_id())
    }
}

impl NodeKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let kp = secp256k1::Keypair::generate();
        Self::from_secp256k1(kp)
    }

    /// The key with this 32-byte secret (tests and deterministic simulations).
    pub fn from_secret(secret: [u8; 32]) -> Option<Self> {
        let sk = secp256k1::SecretKey::try_from_bytes(secret).ok()?;
        Some(Self::from_secp256k1(secp256k1::Keypair::from(sk)))
    }

    fn from_secp256k1(kp: secp256k1::Keypair) -> Self {
        let secret = kp.secret().to_bytes();
        Self {
            keypair: Keypair::from(kp),
            secret,
        }
    }

    /// Loads the key at `path`, or creates one there (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, LoadKeyError> {
        let io = |source| LoadKeyError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mut secret = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut secret).map_err(|_| {
                    LoadKeyError::Malformed {
                        path: path.to_owned(),
                    }
                })?;
                Self::from_secret(secret).ok_or_else(|| LoadKeyError::Malformed {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let key = Self::generate();
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    options.mode(0o600);
                }
                let mut file = options.open(path).map_err(io)?;
                writeln!(file, "{}", hex::encode(key.secret)).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The libp2p key pair (for the swarm's noise handshake and gossipsub signing).
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn public(&self) -> PublicKey {
        self.keypair.public()
    }

    pub fn peer_id(&self) -> PeerId {
        self.keypair.public().to_peer_id()
    }

    /// A 32-byte secret derived from this key for `label` (`sha256("plexus-derived-secret-v1" ||
    /// secret || label)`): the same on every start of the same key, unknown to anyone without
    /// it (a training worker's per-round audit nonce, for one).
    pub fn derive_secret(&self, label: &[u8]) -> [u8; 32] {
        let mut h = crate::hash::Sha256Stream::new();
        h.update(b"plexus-derived-secret-v1");
        h.update(&self.secret);
        h.update(label);
        h.finish().0
    }

    /// Signs `msg` (ECDSA over sha256, DER signature).
    pub fn sign(&self, msg: &[u8]) -> Vec<u8> {
        // Signing with a secp256k1 key cannot fail; the Result exists for RSA keys.
        self.keypair.sign(msg).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trips_and_signs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let a = NodeKey::load_or_create(&path).unwrap();
        let b = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        let sig = a.sign(b"hello");
        assert!(b.public().verify(b"hello", &sig));
        assert!(!b.public().verify(b"hellO", &sig));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn derived_secrets_depend_on_the_key_and_the_label_only() {
        let a = NodeKey::from_secret([3; 32]).unwrap();
        let again = NodeKey::from_secret([3; 32]).unwrap();
        let b = NodeKey::from_secret([4; 32]).unwrap();
        assert_eq!(a.derive_secret(b"x"), again.derive_secret(b"x"));
        assert_ne!(a.derive_secret(b"x"), a.derive_secret(b"y"));
        assert_ne!(a.derive_secret(b"x"), b.derive_secret(b"x"));
        assert_ne!(a.derive_secret(b"x"), [3; 32]);
    }

    #[test]
    fn malformed_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        std::fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            NodeKey::load_or_create(&path),
            Err(LoadKeyError::Malformed { .. })
        ));
    }
}
