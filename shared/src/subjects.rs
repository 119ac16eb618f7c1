//! NATS subject names, all under one configurable prefix (`ML_SUBJECT_PREFIX`).
//!
//! The README's subjects table documents each one; keep the two in step.

/// The full set of subjects for one deployment, computed once from the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    /// The prefix itself (default `ml`).
    pub prefix: String,
    /// Public request-reply endpoint of the predictors (queue group).
    pub predict: String,
    /// Request-reply: train now; answered by a trainer with the run's outcome.
    pub train: String,
    /// Request-reply (binary): a trainer submits an artifact and its run record.
    pub registry_submit: String,
    /// Request-reply (binary): the current production model, for predictors.
    pub registry_production: String,
    /// Request-reply (JSON): every stored model version.
    pub registry_models: String,
    /// Request-reply (JSON): the experiments log.
    pub registry_runs: String,
    /// Request-reply (JSON): a trainer reports a run that produced no model.
    pub registry_run_failed: String,
    /// Request-reply (JSON): make a version the production model.
    pub registry_promote: String,
    /// Request-reply (JSON): back to the previous production version.
    pub registry_rollback: String,
    /// Request-reply (JSON): every alias move.
    pub registry_history: String,
    /// Request-reply (binary): an operator imports an ONNX model.
    pub registry_import: String,
    /// Request-reply (JSON): read, set or clear the routing table.
    pub registry_route: String,
    /// Broadcast (binary): a new production model, to every predictor.
    pub model_production: String,
    /// Publish (JSON): batches of latency events, predictors to the monitor.
    pub monitor_events: String,
    /// Request-reply (JSON): the monitor's current statistics.
    pub monitor_stats: String,
    /// Publish (JSON): the monitor's alerts as they fire and resolve.
    pub alerts: String,
    /// Request-reply (JSON): true outcomes of earlier predictions, to the monitor.
    pub feedback: String,
}

impl Subjects {
    /// The default prefix, `ml`.
    pub const DEFAULT_PREFIX: &'static str = "ml";

    /// Builds every subject under `prefix`.
    pub fn new(prefix: &str) -> Self {
        let p = prefix.trim_end_matches('.');
        Self {
            prefix: p.to_owned(),
            predict: format!("{p}.predict"),
            train: format!("{p}.train"),
            registry_submit: format!("{p}.registry.submit"),
            registry_production: format!("{p}.registry.production"),
            registry_models: format!("{p}.registry.models"),
            registry_runs: format!("{p}.registry.runs"),
            registry_run_failed: format!("{p}.registry.run_failed"),
            registry_promote: format!("{p}.registry.promote"),
            registry_rollback: format!("{p}.registry.rollback"),
            registry_history: format!("{p}.registry.history"),
            registry_import: format!("{p}.registry.import"),
            registry_route: format!("{p}.registry.route"),
            model_production: format!("{p}.model.production"),
            monitor_events: format!("{p}.monitor.events"),
            monitor_stats: format!("{p}.monitor.stats"),
            alerts: format!("{p}.alerts"),
            feedback: format!("{p}.feedback"),
        }
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new(Self::DEFAULT_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_is_applied_once() {
        let s = Subjects::new("acme.ml.");
        assert_eq!(s.predict, "acme.ml.predict");
        assert_eq!(s.model_production, "acme.ml.model.production");
    }
}
