//! The headless Service that gives every pod of the gang a stable DNS name.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};

use super::{LABEL_JOB, LABEL_JOB_KIND, child_meta, names};
use crate::job::JobRef;

/// Headless Service selecting the job's pods. `publishNotReadyAddresses` makes rank 0 resolvable
/// before any readiness probe passes, which the rendezvous needs.
pub fn service(job: &JobRef, master_port: i32) -> Service {
    Service {
        metadata: child_meta(job, names::service(job)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(
                [
                    (LABEL_JOB.to_string(), job.name.clone()),
                    (LABEL_JOB_KIND.to_string(), job.kind.as_str().to_string()),
                ]
                .into(),
            ),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".into()),
                port: master_port,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_is_headless_publishes_not_ready_and_selects_the_gang() {
        let job = JobRef::test("vitl");
        let svc = service(&job, 29500);
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        assert_eq!(spec.selector.unwrap()["dinoflow.dev/job"], "vitl");
        assert_eq!(spec.ports.unwrap()[0].port, 29500);
        assert_eq!(svc.metadata.name.as_deref(), Some("vitl"));
        let owner = &svc.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("PretrainJob", Some(true))
        );
    }
}
