//! Prometheus metrics of the operator (`/metrics`).

use std::time::Instant;

use dinoflow_api::status::JobPhase;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::Error;

/// The operator's metrics, registered in their own registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Reconcile runs by kind.
    pub reconciles: IntCounterVec,
    /// Reconcile failures by kind and error label.
    pub errors: IntCounterVec,
    /// Reconcile duration by kind.
    pub duration: HistogramVec,
    /// Jobs by kind and phase (as of their last reconcile).
    pub jobs: IntGaugeVec,
    /// Gang restarts by kind and cause (`counted`, `disruption`).
    pub restarts: IntCounterVec,
    /// Progress reports accepted/rejected.
    pub progress_reports: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("dinoflow_operator_reconciles_total", "Reconcile runs."),
            &["kind"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "dinoflow_operator_reconcile_errors_total",
                "Reconcile failures by error kind.",
            ),
            &["kind", "error"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "dinoflow_operator_reconcile_duration_seconds",
                "Reconcile duration.",
            )
            .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0]),
            &["kind"],
        )
        .expect("valid metric");
        let jobs = IntGaugeVec::new(
            Opts::new("dinoflow_operator_jobs", "Jobs by phase."),
            &["kind", "phase"],
        )
        .expect("valid metric");
        let restarts = IntCounterVec::new(
            Opts::new(
                "dinoflow_operator_gang_restarts_total",
                "Gang restarts by cause.",
            ),
            &["kind", "cause"],
        )
        .expect("valid metric");
        let progress_reports = IntCounterVec::new(
            Opts::new(
                "dinoflow_operator_progress_reports_total",
                "Trainer progress reports.",
            ),
            &["result"],
        )
        .expect("valid metric");
        for c in [&reconciles, &errors, &restarts, &progress_reports] {
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
        }
        registry
            .register(Box::new(duration.clone()))
            .expect("metric registered once");
        registry
            .register(Box::new(jobs.clone()))
            .expect("metric registered once");
        Self {
            registry,
            reconciles,
            errors,
            duration,
            jobs,
            restarts,
            progress_reports,
        }
    }
}

impl Metrics {
    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self, kind: &str) -> ReconcileTimer {
        self.reconciles.with_label_values(&[kind]).inc();
        ReconcileTimer {
            histogram: self.duration.with_label_values(&[kind]),
            start: Instant::now(),
        }
    }

    /// Counts a failed reconcile by error label.
    pub fn reconcile_failed(&self, kind: &str, error: &Error) {
        self.errors
            .with_label_values(&[kind, error.metric_label()])
            .inc();
    }

    /// Sets the per-phase job gauges of `kind` from a count per phase.
    pub fn set_jobs(&self, kind: &str, counts: &[(JobPhase, i64)]) {
        for phase in JobPhase::ALL {
            let n = counts
                .iter()
                .find(|(p, _)| *p == phase)
                .map_or(0, |(_, n)| *n);
            self.jobs.with_label_values(&[kind, phase.as_str()]).set(n);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Records a reconcile's duration on drop, so early returns and errors are measured too.
pub struct ReconcileTimer {
    histogram: prometheus::Histogram,
    start: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_timer_records_duration_on_drop_and_errors_are_labelled() {
        let m = Metrics::default();
        drop(m.reconcile_started("PretrainJob"));
        m.reconcile_failed("PretrainJob", &Error::NotLeader);
        m.set_jobs("PretrainJob", &[(JobPhase::Running, 2)]);
        let text = m.render();
        assert!(text.contains("dinoflow_operator_reconciles_total{kind=\"PretrainJob\"} 1"));
        assert!(text.contains(
            "dinoflow_operator_reconcile_duration_seconds_count{kind=\"PretrainJob\"} 1"
        ));
        assert!(text.contains("error=\"not_leader\""));
        assert!(text.contains("dinoflow_operator_jobs{kind=\"PretrainJob\",phase=\"Running\"} 2"));
        assert!(text.contains("dinoflow_operator_jobs{kind=\"PretrainJob\",phase=\"Failed\"} 0"));
    }
}
