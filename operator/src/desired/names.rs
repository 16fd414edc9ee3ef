//! Names of a job's children, kept within Kubernetes' 63-character DNS label limit.
//!
//! A PretrainJob and a DistillJob may share a name in one namespace, so their children must
//! not: a PretrainJob's children are named after the job (`vitl`, `vitl-config`,
//! `vitl-a0-0`, as they always were), a DistillJob's after its name plus `-distill`
//! (`vitl-distill`, `vitl-distill-config`, `vitl-distill-a0-0`). The one pair that still
//! meets, a PretrainJob `x-distill` beside a DistillJob `x`, is refused by the ownership check
//! (`controller::apply::check_owner`), never overwritten.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

use crate::job::{JobKind, JobRef};

/// What a DistillJob's children add to its name.
pub const DISTILL_STEM_SUFFIX: &str = "-distill";

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

/// What every child name of `job` starts from: the name, kind-tagged for a DistillJob.
fn stem(job: &JobRef) -> Cow<'_, str> {
    match job.kind {
        JobKind::Pretrain => Cow::Borrowed(&job.name),
        JobKind::Distill => Cow::Owned(format!("{}{DISTILL_STEM_SUFFIX}", job.name)),
    }
}

/// The headless Service (the pods' DNS subdomain).
pub fn service(job: &JobRef) -> String {
    bounded(&stem(job), "")
}

/// The ConfigMap holding the trainer config.
pub fn config_map(job: &JobRef) -> String {
    bounded(&stem(job), "-config")
}

/// The Secret holding the job's progress token.
pub fn secret(job: &JobRef) -> String {
    bounded(&stem(job), "-progress")
}

/// The PodGroup of a gang-scheduled job.
pub fn pod_group(job: &JobRef) -> String {
    bounded(&stem(job), "")
}

/// Pod (and hostname) of `rank` in `attempt`. The attempt is part of the name so a new
/// gang never collides with the terminating pods of the previous one.
pub fn pod(job: &JobRef, attempt: i32, rank: i32) -> String {
    bounded(&stem(job), &format!("-a{attempt}-{rank}"))
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

    #[test]
    fn a_pretrain_job_and_a_distill_job_of_one_name_have_distinct_children() {
        let pretrain = JobRef::test("vitl");
        let distill = JobRef {
            kind: JobKind::Distill,
            ..JobRef::test("vitl")
        };
        let all = |j: &JobRef| {
            [
                service(j),
                config_map(j),
                secret(j),
                pod_group(j),
                pod(j, 0, 0),
                pod_dns(j, 1, 0),
            ]
        };
        // A PretrainJob's names are what they always were (running jobs, docs, scripts).
        assert_eq!(
            all(&pretrain),
            [
                "vitl",
                "vitl-config",
                "vitl-progress",
                "vitl",
                "vitl-a0-0",
                "vitl-a1-0.vitl.ml.svc"
            ]
        );
        assert_eq!(
            all(&distill),
            [
                "vitl-distill",
                "vitl-distill-config",
                "vitl-distill-progress",
                "vitl-distill",
                "vitl-distill-a0-0",
                "vitl-distill-a1-0.vitl-distill.ml.svc"
            ]
        );
        // Long names stay within a DNS label and distinct per kind.
        let long = "a".repeat(70);
        let (p, d) = (
            JobRef::test(&long),
            JobRef {
                kind: JobKind::Distill,
                ..JobRef::test(&long)
            },
        );
        for (a, b) in all(&p).iter().zip(all(&d).iter()).take(5) {
            assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
            assert_ne!(a, b);
        }
    }
}
