//! [`TrainingJob`] for the two custom resources of `dinoflow-api`.

use dinoflow_api::cluster::ClusterSpec;
use dinoflow_api::status::JobStatus;

use super::{JobKind, TeacherSource, TrainingJob};
use crate::{Error, Result};

impl TrainingJob for dinoflow_api::PretrainJob {
    const KIND: JobKind = JobKind::Pretrain;

    fn cluster(&self) -> &ClusterSpec {
        &self.spec.cluster
    }

    fn spec_value(&self) -> Result<serde_json::Value> {
        serde_json::to_value(&self.spec).map_err(|source| Error::Serde {
            what: "PretrainJob spec",
            source,
        })
    }

    fn job_status(&self) -> Option<&JobStatus> {
        self.status.as_ref()
    }
}

impl TrainingJob for dinoflow_api::DistillJob {
    const KIND: JobKind = JobKind::Distill;

    fn cluster(&self) -> &ClusterSpec {
        &self.spec.cluster
    }

    fn spec_value(&self) -> Result<serde_json::Value> {
        serde_json::to_value(&self.spec).map_err(|source| Error::Serde {
            what: "DistillJob spec",
            source,
        })
    }

    fn job_status(&self) -> Option<&JobStatus> {
        self.status.as_ref()
    }

    fn teacher(&self) -> Option<TeacherSource> {
        let t = &self.spec.teacher;
        match (&t.pretrain_job, &t.checkpoint) {
            (Some(job), _) => Some(TeacherSource::PretrainJob(job.clone())),
            (None, Some(c)) => Some(TeacherSource::Checkpoint(c.path.clone())),
            // The CRD requires one of them; without either there is nothing to wait for.
            (None, None) => None,
        }
    }
}
