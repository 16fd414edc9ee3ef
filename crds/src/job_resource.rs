//! What `PretrainJob` and `DistillJob` share as Kubernetes resources (group, version, scope,
//! status, the printer columns of `kubectl get`), defined once for both kinds.

/// Adds the shared resource attributes to a `#[derive(CustomResource)]` spec struct that names
/// only its own `kind`, `plural` and `shortname`: a second `#[kube(...)]` attribute, which
/// kube's derive merges with the struct's own.
macro_rules! job_resource {
    ($(#[$attr:meta])* $vis:vis struct $name:ident $body:tt) => {
        $(#[$attr])*
        #[kube(
            crates(kube_core = "::kube_core"),
            group = "dinoflow.dev",
            version = "v1alpha1",
            category = "dinoflow",
            namespaced,
            status = "crate::status::JobStatus",
            derive = "PartialEq",
            printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
            printcolumn(name = "Iteration", type_ = "integer", json_path = ".status.iteration"),
            printcolumn(name = "Total", type_ = "integer", json_path = ".status.totalIterations"),
            printcolumn(name = "Nodes", type_ = "integer", json_path = ".spec.cluster.nodes"),
            printcolumn(
                name = "GPUs/Node",
                type_ = "integer",
                json_path = ".spec.cluster.gpusPerNode"
            ),
            printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts"),
            printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
        )]
        $vis struct $name $body
    };
}

pub(crate) use job_resource;
