//! The Secret holding the job's progress token, so it never appears in the pod spec.

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use sha2::Sha256;

use super::{child_meta, names};
use crate::job::JobRef;

/// Key of the token in the Secret.
pub const TOKEN_KEY: &str = "token";

/// Token a job's trainer presents to the progress endpoint: HMAC-SHA256 of the job's uid under
/// the operator's key. Derived rather than stored, so the endpoint can check it without reading
/// Secrets, and a recreated job (new uid) never inherits an old token.
pub fn progress_token(key: &[u8], uid: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(uid.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Secret with the job's progress token.
pub fn secret(job: &JobRef, key: &[u8]) -> Secret {
    Secret {
        metadata: child_meta(job, names::secret(job)),
        string_data: Some([(TOKEN_KEY.to_string(), progress_token(key, &job.uid))].into()),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_per_job_and_per_key_and_are_stable() {
        let a = progress_token(b"k", "uid-a");
        assert_eq!(a, progress_token(b"k", "uid-a"));
        assert_ne!(a, progress_token(b"k", "uid-b"));
        assert_ne!(a, progress_token(b"other", "uid-a"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn secret_carries_the_token_of_the_jobs_uid() {
        let job = JobRef::test("vitl");
        let s = secret(&job, b"k");
        assert_eq!(
            s.string_data.unwrap()[TOKEN_KEY],
            progress_token(b"k", "uid-vitl")
        );
    }
}
