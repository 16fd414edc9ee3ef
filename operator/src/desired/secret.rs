//! The Secret holding the job's progress token, so it never appears in the pod spec, and the
//! CA that signed the progress endpoint's certificate (when it serves TLS).

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use sha2::Sha256;

use super::{child_meta, names};
use crate::job::JobRef;

/// Key of the token in the Secret.
pub const TOKEN_KEY: &str = "token";
/// Key of the progress endpoint's CA (PEM) in the Secret.
pub const CA_KEY: &str = "ca.crt";

/// Token a job's trainer presents to the progress endpoint: HMAC-SHA256 of the job's uid and
/// run attempt under the operator's key. Derived rather than stored, so the endpoint can check
/// it without reading Secrets; a recreated job (new uid) never inherits an old token, and a pod
/// of an earlier attempt cannot report as the current one (its token names its own attempt).
/// The gang's rendezvous is keyed by it too, so the attempts' gangs cannot mix either.
pub fn progress_token(key: &[u8], uid: &str, attempt: u32) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    // The uid never contains '/', so uid/attempt pairs cannot collide.
    mac.update(format!("{uid}/{attempt}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Secret with the progress token of the job's `attempt`, and the CA when the endpoint serves
/// TLS. Rewritten for each attempt before its pods are created.
pub fn secret(job: &JobRef, key: &[u8], attempt: u32, ca: Option<&str>) -> Secret {
    let mut data = std::collections::BTreeMap::from([(
        TOKEN_KEY.to_string(),
        progress_token(key, &job.uid, attempt),
    )]);
    if let Some(ca) = ca {
        data.insert(CA_KEY.to_string(), ca.to_string());
    }
    Secret {
        metadata: child_meta(job, names::secret(job)),
        string_data: Some(data),
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_per_job_attempt_and_key_and_are_stable() {
        let a = progress_token(b"k", "uid-a", 0);
        assert_eq!(a, progress_token(b"k", "uid-a", 0));
        assert_ne!(a, progress_token(b"k", "uid-b", 0));
        assert_ne!(a, progress_token(b"k", "uid-a", 1));
        assert_ne!(a, progress_token(b"other", "uid-a", 0));
        assert_ne!(
            progress_token(b"k", "uid-1", 11),
            progress_token(b"k", "uid-11", 1)
        );
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn secret_carries_the_token_of_the_jobs_uid_and_attempt_and_the_ca() {
        let job = JobRef::test("vitl");
        let data = secret(&job, b"k", 3, None).string_data.unwrap();
        assert_eq!(data[TOKEN_KEY], progress_token(b"k", "uid-vitl", 3));
        assert!(!data.contains_key(CA_KEY), "plaintext: no CA");
        let data = secret(&job, b"k", 3, Some("PEM")).string_data.unwrap();
        assert_eq!(data[CA_KEY], "PEM");
    }
}
