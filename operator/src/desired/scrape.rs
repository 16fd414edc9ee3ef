//! How Prometheus finds a trainer's `/metrics` (`training.logging.metricsPort`): a container
//! port named `metrics`, which the chart's PodMonitor selects, and the `prometheus.io/*`
//! annotations that the common `kubernetes-pods` scrape config of a plain Prometheus reads.

use k8s_openapi::api::core::v1::{ContainerPort, Pod};

use super::pods::TRAINER_CONTAINER;

pub const SCRAPE_ANNOTATION: &str = "prometheus.io/scrape";
pub const PORT_ANNOTATION: &str = "prometheus.io/port";
pub const PATH_ANNOTATION: &str = "prometheus.io/path";
/// Name of the trainer container's metrics port (the PodMonitor's `port`).
pub const METRICS_PORT_NAME: &str = "metrics";

/// `spec.training.logging.metricsPort` of a job's spec (as `TrainingJob::spec_value` gives
/// it); None when it is 0 (no endpoint) or not a port.
pub fn metrics_port(spec: &serde_json::Value) -> Option<i32> {
    spec.pointer("/training/logging/metricsPort")
        .and_then(serde_json::Value::as_i64)
        .filter(|p| (1..=65535).contains(p))
        .map(|p| p as i32)
}

/// Declares the metrics port on the trainer container and annotates the pod for scraping.
/// Annotations the user set in `cluster.podTemplate` (e.g. `prometheus.io/scrape: "false"`)
/// are kept.
pub fn annotate(pod: &mut Pod, port: Option<i32>) {
    let Some(port) = port else { return };
    let annotations = pod
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    for (k, v) in [
        (SCRAPE_ANNOTATION, "true".to_string()),
        (PORT_ANNOTATION, port.to_string()),
        (PATH_ANNOTATION, "/metrics".to_string()),
    ] {
        annotations.entry(k.to_string()).or_insert(v);
    }
    let trainer = pod
        .spec
        .iter_mut()
        .flat_map(|s| s.containers.iter_mut())
        .find(|c| c.name == TRAINER_CONTAINER);
    if let Some(c) = trainer {
        let ports = c.ports.get_or_insert_with(Vec::new);
        if !ports.iter().any(|p| p.container_port == port) {
            ports.push(ContainerPort {
                name: Some(METRICS_PORT_NAME.into()),
                container_port: port,
                protocol: Some("TCP".into()),
                ..Default::default()
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use serde_json::json;

    fn trainer_pod() -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: TRAINER_CONTAINER.into(),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_port_comes_from_the_training_config_and_zero_means_none() {
        let spec = |p| json!({"training": {"logging": {"metricsPort": p}}});
        assert_eq!(metrics_port(&spec(9464)), Some(9464));
        assert_eq!(metrics_port(&spec(0)), None);
        assert_eq!(metrics_port(&json!({"training": {}})), None);
    }

    #[test]
    fn the_pod_is_annotated_and_declares_a_named_metrics_port() {
        let mut pod = trainer_pod();
        annotate(&mut pod, Some(9464));
        let a = pod.metadata.annotations.as_ref().unwrap();
        assert_eq!(a[SCRAPE_ANNOTATION], "true");
        assert_eq!(a[PORT_ANNOTATION], "9464");
        assert_eq!(a[PATH_ANNOTATION], "/metrics");
        let ports = pod.spec.unwrap().containers[0].ports.clone().unwrap();
        assert_eq!(ports[0].name.as_deref(), Some(METRICS_PORT_NAME));
        assert_eq!(ports[0].container_port, 9464);
    }

    #[test]
    fn a_users_annotation_wins_and_no_port_means_no_change() {
        let mut pod = trainer_pod();
        pod.metadata.annotations =
            Some([(SCRAPE_ANNOTATION.to_string(), "false".to_string())].into());
        annotate(&mut pod, Some(9464));
        assert_eq!(
            pod.metadata.annotations.as_ref().unwrap()[SCRAPE_ANNOTATION],
            "false"
        );
        let mut plain = trainer_pod();
        annotate(&mut plain, None);
        assert_eq!(plain, trainer_pod());
    }
}
