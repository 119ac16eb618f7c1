//! The promotion gate: a new version becomes `production` only if its
//! validation metric is no worse than the production version's by more than
//! a relative tolerance (`PROMOTE_TOLERANCE`).
//!
//! The metric fits the task: RMSE (lower is better) for a regressor (linear
//! or imported ONNX), accuracy (higher is better) for a classifier (logistic
//! or imported ONNX). "Worse by" is relative to
//! production's value: with a tolerance of 0.05, a regression model passes
//! with an RMSE up to 1.05 × production's, a classifier with an accuracy down
//! to 0.95 × production's. The first model always passes. Models of the same
//! task are compared whatever their engine (an ONNX regressor with a linear
//! production model: both are scored on the same holdout rows); a model of
//! the other task is not comparable and stays a candidate; a person can
//! promote it.

use ml_shared::lifecycle::GateReport;
use ml_shared::messages::Metrics;
use ml_shared::model::ModelKind;

/// Default of `PROMOTE_TOLERANCE`.
pub const DEFAULT_TOLERANCE: f64 = 0.05;

/// The metric the gate compares for a family, and whether higher is better.
pub fn gate_metric(kind: ModelKind) -> (&'static str, bool) {
    if kind.is_classifier() {
        ("accuracy", true)
    } else {
        ("rmse", false)
    }
}

/// What the gate knows of a version.
#[derive(Debug, Clone, Copy)]
pub struct Contender<'a> {
    /// Its version.
    pub version: u64,
    /// Its family.
    pub kind: ModelKind,
    /// Its validation metrics.
    pub metrics: &'a Metrics,
}

/// Decides whether `candidate` replaces `production` (none: the first model).
/// The candidate's metric is known to be present and finite.
pub fn decide(
    candidate: Contender<'_>,
    production: Option<Contender<'_>>,
    tolerance: f64,
) -> GateReport {
    let (metric, higher_is_better) = gate_metric(candidate.kind);
    let value = candidate.metrics.get(metric).unwrap_or(f64::NAN);
    let report = |production_value: Option<f64>, promoted: bool, reason: String| GateReport {
        metric: metric.to_owned(),
        higher_is_better,
        candidate: value,
        production_version: production.map(|p| p.version),
        production: production_value,
        tolerance,
        promoted,
        reason,
    };
    let Some(prod) = production else {
        return report(
            None,
            true,
            format!("{metric} {value:.6}: first model, no production version to compare with"),
        );
    };
    if prod.kind.is_classifier() != candidate.kind.is_classifier() {
        return report(
            None,
            false,
            format!(
                "{metric} {value:.6} is not comparable: production v{} is {}, this model is {}; kept as candidate",
                prod.version,
                prod.kind.as_str(),
                candidate.kind.as_str()
            ),
        );
    }
    let Some(base) = prod.metrics.get(metric).filter(|v| v.is_finite()) else {
        return report(
            None,
            false,
            format!(
                "{metric} {value:.6}: production v{} has no {metric} to compare with; kept as candidate",
                prod.version
            ),
        );
    };
    let relative = relative_shortfall(value, base, higher_is_better);
    // A hair of slack so that the same model retrained (equal metric, up to
    // rounding) always passes a zero tolerance.
    let passed = relative <= tolerance + 1e-12;
    let head = format!(
        "{metric} {value:.6} vs production v{}'s {base:.6}",
        prod.version
    );
    let reason = verdict(&head, relative, passed, tolerance);
    report(Some(base), passed, reason)
}

/// How much worse `value` is than `base`, relative to `base` (≤ 0: no
/// worse; infinite when `base` is 0 and `value` is worse).
fn relative_shortfall(value: f64, base: f64, higher_is_better: bool) -> f64 {
    let worse_by = if higher_is_better {
        base - value
    } else {
        value - base
    };
    if base != 0.0 {
        worse_by / base.abs()
    } else if worse_by > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// The gate's reason: the comparison `head`, then how it went.
fn verdict(head: &str, relative: f64, passed: bool, tolerance: f64) -> String {
    let pct = |x: f64| format!("{:.2}%", 100.0 * x);
    if relative <= 0.0 {
        format!("{head}: no worse; promoted")
    } else if passed {
        format!(
            "{head}: {} worse, within the {} tolerance; promoted",
            pct(relative),
            pct(tolerance)
        )
    } else {
        format!(
            "{head}: {} worse, beyond the {} tolerance; kept as candidate",
            pct(relative),
            pct(tolerance)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(version: u64, kind: ModelKind, m: &Metrics) -> Contender<'_> {
        Contender {
            version,
            kind,
            metrics: m,
        }
    }

    #[test]
    fn regression_uses_rmse_lower_is_better() {
        let prod = Metrics::regression(0.10, 0.08, 0.99);
        let better = Metrics::regression(0.09, 0.07, 0.99);
        let slightly = Metrics::regression(0.104, 0.08, 0.99);
        let worse = Metrics::regression(0.2, 0.1, 0.9);
        let p = Some(c(2, ModelKind::Linear, &prod));
        let g = decide(c(3, ModelKind::Linear, &better), p, 0.05);
        assert!(g.promoted, "{g:?}");
        assert_eq!((g.metric.as_str(), g.production), ("rmse", Some(0.10)));
        assert!(decide(c(3, ModelKind::Linear, &slightly), p, 0.05).promoted);
        assert!(!decide(c(3, ModelKind::Linear, &slightly), p, 0.0).promoted);
        let g = decide(c(3, ModelKind::Linear, &worse), p, 0.05);
        assert!(!g.promoted);
        assert!(
            g.reason.contains("beyond the 5.00% tolerance"),
            "{}",
            g.reason
        );
        assert!(
            decide(c(3, ModelKind::Linear, &prod), p, 0.0).promoted,
            "equal passes"
        );
    }

    #[test]
    fn classification_uses_accuracy_higher_is_better() {
        let prod = Metrics::classification(0.80, 0.4, 0.85);
        let worse = Metrics::classification(0.70, 0.5, 0.8);
        let near = Metrics::classification(0.79, 0.41, 0.85);
        let p = Some(c(1, ModelKind::Logistic, &prod));
        let g = decide(c(2, ModelKind::Logistic, &worse), p, 0.05);
        assert_eq!((g.metric.as_str(), g.higher_is_better), ("accuracy", true));
        assert!(!g.promoted);
        assert!(decide(c(2, ModelKind::Logistic, &near), p, 0.05).promoted);
    }

    #[test]
    fn first_models_pass_and_other_families_do_not() {
        let m = Metrics::classification(0.5, 0.7, 0.5);
        assert!(decide(c(1, ModelKind::Logistic, &m), None, 0.0).promoted);
        let prod = Metrics::regression(0.1, 0.1, 0.9);
        let g = decide(
            c(2, ModelKind::Logistic, &m),
            Some(c(1, ModelKind::Linear, &prod)),
            1.0,
        );
        assert!(!g.promoted);
        assert!(g.reason.contains("not comparable"), "{}", g.reason);
    }

    #[test]
    fn models_of_one_task_compare_whatever_their_engine() {
        let prod = Metrics::regression(1.0, 0.8, 0.9);
        let better = Metrics::regression(0.9, 0.7, 0.92);
        let g = decide(
            c(2, ModelKind::OnnxRegressor, &better),
            Some(c(1, ModelKind::Linear, &prod)),
            0.0,
        );
        assert!(g.promoted, "{}", g.reason);
        assert_eq!(g.metric, "rmse");
        let acc = Metrics::classification(0.8, 0.4, 0.85);
        let g = decide(
            c(2, ModelKind::OnnxClassifier, &acc),
            Some(c(1, ModelKind::Logistic, &acc)),
            0.0,
        );
        assert!(g.promoted && g.metric == "accuracy", "{}", g.reason);
        let g = decide(
            c(3, ModelKind::OnnxClassifier, &acc),
            Some(c(2, ModelKind::OnnxRegressor, &better)),
            1.0,
        );
        assert!(
            !g.promoted && g.reason.contains("not comparable"),
            "{}",
            g.reason
        );
    }
}
