//! Authentication of the rendezvous and of the ring links: HMAC-SHA256 under the job's token
//! (`DINOFLOW_PROGRESS_TOKEN`, the secret the operator derives from the job's uid and run
//! attempt), over a fresh challenge, so a pod of another job cannot join or feed a gang and a
//! recorded handshake cannot be replayed.
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of a challenge and of a tag.
pub(super) const LEN: usize = 32;

/// The job's shared secret. `None`: an unauthenticated gang (hand-launched runs without the
/// operator); every rank of a gang must agree on having one.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AuthKey(Option<Vec<u8>>);

impl std::fmt::Debug for AuthKey {
    // A secret: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "AuthKey(<redacted>)"
        } else {
            "AuthKey(none)"
        })
    }
}

impl AuthKey {
    /// The key of a job token; `None` for an unauthenticated gang.
    pub fn new(token: Option<&str>) -> Self {
        Self(token.map(|t| t.as_bytes().to_vec()))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    fn mac(&self) -> Hmac<Sha256> {
        // Without a token the tag still binds the handshake to its challenge and contents.
        Hmac::<Sha256>::new_from_slice(self.0.as_deref().unwrap_or_default())
            .expect("HMAC accepts keys of any length")
    }

    /// Tag over `parts`, each length-prefixed so that no two part lists collide.
    pub(super) fn tag(&self, parts: &[&[u8]]) -> [u8; LEN] {
        let mut mac = self.mac();
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// Constant-time check of a tag made by [`AuthKey::tag`].
    pub(super) fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut mac = self.mac();
        for p in parts {
            mac.update(&(p.len() as u64).to_le_bytes());
            mac.update(p);
        }
        mac.verify_slice(tag).is_ok()
    }
}

/// A fresh random challenge.
pub(super) fn challenge() -> [u8; LEN] {
    rand::random()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_depend_on_key_and_every_part_and_the_key_is_not_printed() {
        let k = AuthKey::new(Some("s3cret"));
        let t = k.tag(&[b"ab", b"c"]);
        assert!(k.verify(&[b"ab", b"c"], &t));
        assert!(!k.verify(&[b"a", b"bc"], &t), "part boundaries are bound");
        assert!(!AuthKey::new(Some("other")).verify(&[b"ab", b"c"], &t));
        assert!(!AuthKey::new(None).verify(&[b"ab", b"c"], &t));
        assert_eq!(format!("{k:?}"), "AuthKey(<redacted>)");
        assert_ne!(challenge(), challenge());
    }
}
