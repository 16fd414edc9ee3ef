//! Names of a job's children, kept within Kubernetes' 63-character DNS label limit.

use sha2::{Digest, Sha256};

use crate::job::JobRef;

/// Longest DNS label (pod hostname, Service name).
const MAX_LABEL: usize = 63;

/// `base` + `suffix`, shortening `base` with a hash when the result would exceed 63 characters,
/// so long job names still give valid, distinct, stable names.
pub fn bounded(base: &str, suffix: &str) -> String {
    if base.len() + suffix.len() <= MAX_LABEL {
        return format!("{base}{suffix}");
    }
    let hash = hex::encode(&Sha256::digest(base.as_bytes())[..4]);
    let keep = MAX_LABEL - suffix.len() - hash.len() - 1;
    let head = base[..keep].trim_end_matches(['-', '.']);
    format!("{head}-{hash}{suffix}")
}

/// The headless Service (the pods' DNS subdomain).
pub fn service(job: &JobRef) -> String {
    bounded(&job.name, "")
}

/// The ConfigMap holding the trainer config.
pub fn config_map(job: &JobRef) -> String {
    bounded(&job.name, "-config")
}

/// The Secret holding the job's progress token.
pub fn secret(job: &JobRef) -> String {
    bounded(&job.name, "-progress")
}

/// The PodGroup of a gang-scheduled job.
pub fn pod_group(job: &JobRef) -> String {
    bounded(&job.name, "")
}

/// Pod (and hostname) of `rank` in `attempt`. The attempt is part of the name so a new
/// gang never collides with the terminating pods of the previous one.
pub fn pod(job: &JobRef, attempt: i32, rank: i32) -> String {
    bounded(&job.name, &format!("-a{attempt}-{rank}"))
}

/// DNS name of a pod through the headless Service; rank 0's is `MASTER_ADDR`.
pub fn pod_dns(job: &JobRef, attempt: i32, rank: i32) -> String {
    format!(
        "{}.{}.{}.svc",
        pod(job, attempt, rank),
        service(job),
        job.namespace
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_kept_verbatim() {
        let job = JobRef::test("vitl");
        assert_eq!(pod(&job, 2, 1), "vitl-a2-1");
        assert_eq!(pod_dns(&job, 0, 0), "vitl-a0-0.vitl.ml.svc");
        assert_eq!(config_map(&job), "vitl-config");
    }

    #[test]
    fn long_job_names_are_shortened_to_valid_distinct_labels() {
        let a = JobRef::test(&"a".repeat(80));
        let b = JobRef::test(&format!("{}b", "a".repeat(79)));
        for name in [pod(&a, 12, 11), service(&a), secret(&a), pod(&b, 12, 11)] {
            assert!(name.len() <= 63, "{name}");
            assert!(!name.starts_with('-') && !name.ends_with('-'));
        }
        assert_ne!(pod(&a, 0, 0), pod(&b, 0, 0));
        assert!(pod(&a, 12, 11).ends_with("-a12-11"));
    }
}
