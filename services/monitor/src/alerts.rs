//! Alert rules, evaluated on every reporting window, with Prometheus's
//! life cycle: a rule whose condition holds goes *pending*; once it has held
//! for the rule's `for` duration it *fires*; when it stops holding, a firing
//! alert *resolves* (a pending one just goes back to inactive).
//!
//! The rules come from a TOML file (`MONITOR_ALERTS`) or, by default, from
//! `alerts.toml` beside this crate's manifest, built in. Firing and resolved
//! alerts are printed as a marked line and published on `ml.alerts` as JSON
//! ([`AlertNotice`]).

use std::path::Path;
use std::time::Duration;

use ml_shared::settings::parse_duration;
use serde::{Deserialize, Serialize};

use crate::stats::Snapshot;

/// The built-in rules (the text of `services/monitor/alerts.toml`).
pub const DEFAULT_RULES: &str = include_str!("../alerts.toml");

/// Why the rules cannot be used; the monitor does not start with them.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The file cannot be read.
    #[error("cannot read alert rules {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or a rule is wrong.
    #[error("alert rules {origin}: {message}")]
    Invalid {
        /// The file, or `built-in`.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// What a rule watches: one value per reporting window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Median latency, ms.
    LatencyP50Ms,
    /// 90th percentile latency, ms.
    LatencyP90Ms,
    /// 95th percentile latency, ms.
    LatencyP95Ms,
    /// 99th percentile latency, ms.
    LatencyP99Ms,
    /// 99.9th percentile latency, ms.
    LatencyP999Ms,
    /// Largest latency, ms.
    LatencyMaxMs,
    /// Share of requests answered with an error, 0 to 1.
    ErrorRate,
    /// Error replies.
    Errors,
    /// Requests answered.
    Requests,
    /// Successful predictions.
    Predictions,
    /// Requests per second.
    Rps,
    /// Events dropped at the predictors.
    DroppedEvents,
    /// Events lost in transit.
    LostEvents,
    /// The window's largest PSI (features and predictions).
    DriftPsi,
    /// The window's lowest label agreement of a shadow with what was served.
    ShadowAgreement,
    /// The window's largest mean absolute difference of a shadow's predictions.
    ShadowMeanAbsDiff,
    /// The window's lowest live accuracy of a version (classifiers).
    LiveAccuracy,
    /// The window's largest live log-loss of a version (classifiers).
    LiveLogLoss,
    /// The window's largest live RMSE of a version (regressors).
    LiveRmse,
    /// The window's largest live MAE of a version (regressors).
    LiveMae,
    /// Labels of the window for predictions forgotten (past the horizon or cap).
    FeedbackExpired,
    /// Labels of the window for ids never held.
    FeedbackUnknown,
}

impl Metric {
    /// The metric's name in rule files.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::LatencyP50Ms => "latency_p50_ms",
            Metric::LatencyP90Ms => "latency_p90_ms",
            Metric::LatencyP95Ms => "latency_p95_ms",
            Metric::LatencyP99Ms => "latency_p99_ms",
            Metric::LatencyP999Ms => "latency_p999_ms",
            Metric::LatencyMaxMs => "latency_max_ms",
            Metric::ErrorRate => "error_rate",
            Metric::Errors => "errors",
            Metric::Requests => "requests",
            Metric::Predictions => "predictions",
            Metric::Rps => "rps",
            Metric::DroppedEvents => "dropped_events",
            Metric::LostEvents => "lost_events",
            Metric::DriftPsi => "drift_psi",
            Metric::ShadowAgreement => "shadow_agreement",
            Metric::ShadowMeanAbsDiff => "shadow_mean_abs_diff",
            Metric::LiveAccuracy => "live_accuracy",
            Metric::LiveLogLoss => "live_log_loss",
            Metric::LiveRmse => "live_rmse",
            Metric::LiveMae => "live_mae",
            Metric::FeedbackExpired => "feedback_expired",
            Metric::FeedbackUnknown => "feedback_unknown",
        }
    }

    /// The metric's value in a window; `None` when it has none (latency and
    /// error rate without requests, drift not computed).
    pub fn value(self, s: &Snapshot) -> Option<f64> {
        let latency = |f: fn(&crate::stats::LatencyMs) -> f64| s.latency_ms.as_ref().map(f);
        match self {
            Metric::LatencyP50Ms => latency(|l| l.p50),
            Metric::LatencyP90Ms => latency(|l| l.p90),
            Metric::LatencyP95Ms => latency(|l| l.p95),
            Metric::LatencyP99Ms => latency(|l| l.p99),
            Metric::LatencyP999Ms => latency(|l| l.p999),
            Metric::LatencyMaxMs => latency(|l| l.max),
            Metric::ErrorRate => s.error_rate,
            Metric::Errors => Some(s.errors.values().sum::<u64>() as f64),
            Metric::Requests => Some(s.count as f64),
            Metric::Predictions => Some(s.versions.values().sum::<u64>() as f64),
            Metric::Rps => Some(s.rps),
            Metric::DroppedEvents => Some(s.dropped as f64),
            Metric::LostEvents => Some(s.lost as f64),
            Metric::DriftPsi => s.drift.as_ref().map(|d| d.max),
            Metric::ShadowAgreement => lowest(s.shadow.values().map(|r| r.label_agreement)),
            Metric::ShadowMeanAbsDiff => highest(s.shadow.values().map(|r| Some(r.mean_abs_diff))),
            Metric::LiveAccuracy => lowest(s.live.values().map(|r| r.accuracy)),
            Metric::LiveLogLoss => highest(s.live.values().map(|r| r.log_loss)),
            Metric::LiveRmse => highest(s.live.values().map(|r| r.rmse)),
            Metric::LiveMae => highest(s.live.values().map(|r| r.mae)),
            Metric::FeedbackExpired => Some(s.feedback.expired as f64),
            Metric::FeedbackUnknown => Some(s.feedback.unknown as f64),
        }
    }
}

/// The smallest of the present values (`None` when none is).
fn lowest(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.flatten().reduce(f64::min)
}

/// The largest of the present values (`None` when none is).
fn highest(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.flatten().reduce(f64::max)
}

/// Which side of the bound fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Fires when the value is greater than the bound.
    Above,
    /// Fires when the value is less than the bound.
    Below,
}

/// One alert rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique name, e.g. `LatencyP99High`.
    pub name: String,
    /// What it watches.
    pub metric: Metric,
    /// Above or below.
    pub op: Op,
    /// The bound.
    pub threshold: f64,
    /// How long the condition must hold before the alert fires.
    pub hold: Duration,
    /// A free label (`page`, `warning`, …).
    pub severity: String,
}

impl Rule {
    fn holds(&self, value: f64) -> bool {
        match self.op {
            Op::Above => value > self.threshold,
            Op::Below => value < self.threshold,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rule: Vec<RuleSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    name: String,
    metric: Metric,
    above: Option<f64>,
    below: Option<f64>,
    #[serde(rename = "for")]
    hold: Option<HoldSpec>,
    severity: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HoldSpec {
    Seconds(f64),
    Text(String),
}

/// Parses a rules file; `origin` names it in errors.
pub fn parse_rules(text: &str, origin: &str) -> Result<Vec<Rule>, RulesError> {
    let invalid = |message: String| RulesError::Invalid {
        origin: origin.to_owned(),
        message,
    };
    let file: RulesFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let mut rules: Vec<Rule> = Vec::with_capacity(file.rule.len());
    for spec in file.rule {
        let name = spec.name.trim().to_owned();
        if name.is_empty() {
            return Err(invalid("a rule has an empty name".into()));
        }
        if rules.iter().any(|r| r.name == name) {
            return Err(invalid(format!("two rules are named {name:?}")));
        }
        let (op, threshold) = match (spec.above, spec.below) {
            (Some(t), None) => (Op::Above, t),
            (None, Some(t)) => (Op::Below, t),
            _ => {
                return Err(invalid(format!(
                    "rule {name:?}: give exactly one of `above` and `below`"
                )))
            }
        };
        if !threshold.is_finite() {
            return Err(invalid(format!("rule {name:?}: the bound is not finite")));
        }
        let hold = match spec.hold {
            None => Duration::ZERO,
            Some(HoldSpec::Seconds(s)) if s.is_finite() && s >= 0.0 => Duration::from_secs_f64(s),
            Some(HoldSpec::Seconds(s)) => {
                return Err(invalid(format!("rule {name:?}: `for` = {s} is negative")))
            }
            Some(HoldSpec::Text(t)) => {
                parse_duration(&t).map_err(|e| invalid(format!("rule {name:?}: `for`: {e}")))?
            }
        };
        rules.push(Rule {
            name,
            metric: spec.metric,
            op,
            threshold,
            hold,
            severity: spec.severity.unwrap_or_else(|| "warning".into()),
        });
    }
    Ok(rules)
}

/// The rules of `path`, or the built-in ones.
pub fn load_rules(path: Option<&Path>) -> Result<Vec<Rule>, RulesError> {
    match path {
        None => parse_rules(DEFAULT_RULES, "built-in"),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
                path: path.display().to_string(),
                source,
            })?;
            parse_rules(&text, &path.display().to_string())
        }
    }
}

/// Firing or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeState {
    /// The condition has held for the rule's `for`.
    Firing,
    /// A firing alert's condition no longer holds.
    Resolved,
}

/// A firing or resolved alert, printed and published on `ml.alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertNotice {
    /// The rule's name.
    pub alert: String,
    /// Firing or resolved.
    pub state: NoticeState,
    /// The rule's severity label.
    pub severity: String,
    /// What the rule watches.
    pub metric: Metric,
    /// The metric's value in the window that changed the state.
    pub value: f64,
    /// Above or below.
    pub op: Op,
    /// The bound.
    pub threshold: f64,
    /// The rule's `for`, seconds.
    pub for_s: f64,
    /// When the condition began to hold (RFC 3339).
    pub active_since: String,
    /// When the state changed (RFC 3339).
    pub ts: String,
    /// The window's drift per feature, for a drift rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AlertNotice {
    /// The marked line printed for people:
    /// `… ALERT FIRING DataDrift severity=warning drift_psi=0.431 above 0.2 for 2m since … (feature_1=0.431 …)`.
    pub fn to_text(&self) -> String {
        let op = match self.op {
            Op::Above => "above",
            Op::Below => "below",
        };
        let detail = self
            .detail
            .as_deref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        match self.state {
            NoticeState::Firing => format!(
                "{} ALERT FIRING {} severity={} {}={} {op} {} for {} since {}{detail}",
                self.ts,
                self.alert,
                self.severity,
                self.metric.as_str(),
                number(self.value),
                self.threshold,
                humantime::format_duration(Duration::from_secs_f64(self.for_s)),
                self.active_since,
            ),
            NoticeState::Resolved => format!(
                "{} ALERT RESOLVED {} severity={} {}={} (active since {}){detail}",
                self.ts,
                self.alert,
                self.severity,
                self.metric.as_str(),
                number(self.value),
                self.active_since,
            ),
        }
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// An alert pending or firing, as `ml.monitor.stats` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActiveAlert {
    /// The rule's name.
    pub alert: String,
    /// `pending` or `firing`.
    pub state: String,
    /// When the condition began to hold (RFC 3339).
    pub active_since: String,
    /// The last value seen.
    pub value: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Inactive,
    Pending { since_ms: u64 },
    Firing { since_ms: u64 },
}

/// The rules and where each stands.
#[derive(Debug)]
pub struct Alerts {
    rules: Vec<(Rule, State, f64)>,
}

impl Alerts {
    /// Every rule inactive.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules: rules
                .into_iter()
                .map(|r| (r, State::Inactive, f64::NAN))
                .collect(),
        }
    }

    /// The rules.
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter().map(|(r, _, _)| r)
    }

    /// Evaluates every rule on the window `s`, ended at `now_ms` (ms since
    /// the Unix epoch), and returns the alerts that fired or resolved.
    pub fn evaluate(&mut self, s: &Snapshot, now_ms: u64) -> Vec<AlertNotice> {
        let mut notices = Vec::new();
        for (rule, state, last) in &mut self.rules {
            let Some(value) = rule.metric.value(s) else {
                continue;
            };
            *last = value;
            let notice = |state: NoticeState, since_ms: u64| AlertNotice {
                alert: rule.name.clone(),
                state,
                severity: rule.severity.clone(),
                metric: rule.metric,
                value,
                op: rule.op,
                threshold: rule.threshold,
                for_s: rule.hold.as_secs_f64(),
                active_since: ml_shared::time::rfc3339_ms(since_ms),
                ts: ml_shared::time::rfc3339_ms(now_ms),
                detail: (rule.metric == Metric::DriftPsi)
                    .then(|| s.drift.as_ref().map(drift_detail))
                    .flatten(),
            };
            let hold_ms = rule.hold.as_millis() as u64;
            match (*state, rule.holds(value)) {
                (State::Inactive, true) if hold_ms == 0 => {
                    *state = State::Firing { since_ms: now_ms };
                    notices.push(notice(NoticeState::Firing, now_ms));
                }
                (State::Inactive, true) => *state = State::Pending { since_ms: now_ms },
                (State::Pending { since_ms }, true) => {
                    if now_ms.saturating_sub(since_ms) >= hold_ms {
                        *state = State::Firing { since_ms };
                        notices.push(notice(NoticeState::Firing, since_ms));
                    }
                }
                (State::Firing { .. }, true) | (State::Inactive, false) => {}
                (State::Pending { .. }, false) => *state = State::Inactive,
                (State::Firing { since_ms }, false) => {
                    *state = State::Inactive;
                    notices.push(notice(NoticeState::Resolved, since_ms));
                }
            }
        }
        notices
    }

    /// Names of the firing alerts.
    pub fn firing(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter(|(_, s, _)| matches!(s, State::Firing { .. }))
            .map(|(r, _, _)| r.name.clone())
            .collect()
    }

    /// Whether the rule named `name` is firing.
    pub fn is_firing(&self, name: &str) -> bool {
        self.rules
            .iter()
            .any(|(r, s, _)| r.name == name && matches!(s, State::Firing { .. }))
    }

    /// The pending and firing alerts.
    pub fn active(&self) -> Vec<ActiveAlert> {
        self.rules
            .iter()
            .filter_map(|(r, s, last)| {
                let (state, since_ms) = match s {
                    State::Inactive => return None,
                    State::Pending { since_ms } => ("pending", since_ms),
                    State::Firing { since_ms } => ("firing", since_ms),
                };
                Some(ActiveAlert {
                    alert: r.name.clone(),
                    state: state.into(),
                    active_since: ml_shared::time::rfc3339_ms(*since_ms),
                    value: *last,
                })
            })
            .collect()
    }
}

fn drift_detail(d: &crate::drift::DriftReport) -> String {
    let mut parts: Vec<String> = d
        .features
        .iter()
        .map(|(name, psi)| format!("{name}={psi:.3}"))
        .collect();
    parts.push(format!("prediction={:.3}", d.prediction));
    parts.push(format!("samples={} model=v{}", d.samples, d.model_version));
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Aggregate;

    fn window(p99_ms: Option<f64>, errors: u64, count: u64) -> Snapshot {
        let mut s = Aggregate::default().snapshot(Duration::from_secs(10), 0);
        s.count = count;
        s.latency_ms = p99_ms.map(|p| crate::stats::LatencyMs {
            mean: p / 2.0,
            p50: p / 2.0,
            p90: p,
            p95: p,
            p99: p,
            p999: p,
            max: p,
        });
        if errors > 0 {
            s.errors.insert("bad_request".into(), errors);
        }
        s.error_rate = (count > 0).then(|| errors as f64 / count as f64);
        s
    }

    #[test]
    fn the_built_in_rules_parse() {
        let rules = load_rules(None).unwrap();
        let names: Vec<&str> = rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "LatencyP99High",
                "ErrorRateHigh",
                "NoPredictions",
                "DataDrift"
            ]
        );
        let drift = &rules[3];
        assert_eq!(
            (drift.metric, drift.op, drift.threshold),
            (Metric::DriftPsi, Op::Above, 0.2)
        );
        assert_eq!(drift.hold, Duration::from_secs(120));
        assert_eq!(rules[2].op, Op::Below);
    }

    #[test]
    fn bad_rule_files_say_what_is_wrong() {
        for (text, expect) in [
            ("[[rule]]\nname='a'\nmetric='latency_p99_ms'\n", "exactly one"),
            (
                "[[rule]]\nname='a'\nmetric='latency_p99_ms'\nabove=1\nbelow=2\n",
                "exactly one",
            ),
            ("[[rule]]\nname='a'\nmetric='p99'\nabove=1\n", "unknown variant"),
            (
                "[[rule]]\nname='a'\nmetric='rps'\nabove=1\nfor='soon'\n",
                "`for`",
            ),
            (
                "[[rule]]\nname='a'\nmetric='rps'\nabove=1\n[[rule]]\nname='a'\nmetric='rps'\nabove=2\n",
                "two rules",
            ),
            ("[[rule]]\nname='a'\nmetric='rps'\nabove=1\ncolour=2\n", "unknown field"),
            ("not toml", "alert rules t.toml"),
        ] {
            let err = parse_rules(text, "t.toml").unwrap_err().to_string();
            assert!(err.contains(expect), "{text:?}: {err}");
        }
        let rules =
            parse_rules("[[rule]]\nname='a'\nmetric='rps'\nbelow=1\nfor=30\n", "t").unwrap();
        assert_eq!(rules[0].hold, Duration::from_secs(30));
        assert!(parse_rules("", "t").unwrap().is_empty());
    }

    #[test]
    fn pending_then_firing_then_resolved() {
        let rules = parse_rules(
            "[[rule]]\nname='Slow'\nmetric='latency_p99_ms'\nabove=10\nfor='20s'\nseverity='page'\n",
            "t",
        )
        .unwrap();
        let mut alerts = Alerts::new(rules);
        let t0 = 1_800_000_000_000;
        let at = |s: u64| t0 + s * 1000;
        assert!(alerts.evaluate(&window(Some(5.0), 0, 10), at(0)).is_empty());
        assert!(alerts
            .evaluate(&window(Some(50.0), 0, 10), at(10))
            .is_empty());
        assert_eq!(alerts.active()[0].state, "pending");
        // No requests: no value, the state holds.
        assert!(alerts.evaluate(&window(None, 0, 0), at(20)).is_empty());
        assert!(alerts
            .evaluate(&window(Some(50.0), 0, 10), at(25))
            .is_empty());
        let fired = alerts.evaluate(&window(Some(60.0), 0, 10), at(30));
        assert_eq!(fired.len(), 1);
        let n = &fired[0];
        assert_eq!(
            (n.state, n.value, n.for_s),
            (NoticeState::Firing, 60.0, 20.0)
        );
        assert_eq!(n.active_since, ml_shared::time::rfc3339_ms(at(10)));
        let text = n.to_text();
        assert!(
            text.contains(
                "ALERT FIRING Slow severity=page latency_p99_ms=60 above 10 for 20s since"
            ),
            "{text}"
        );
        assert!(alerts.is_firing("Slow"));
        assert_eq!(alerts.firing(), ["Slow"]);
        assert!(alerts
            .evaluate(&window(Some(70.0), 0, 10), at(40))
            .is_empty());
        let resolved = alerts.evaluate(&window(Some(2.0), 0, 10), at(50));
        assert_eq!(resolved[0].state, NoticeState::Resolved);
        assert!(
            resolved[0].to_text().contains("ALERT RESOLVED Slow"),
            "{}",
            resolved[0].to_text()
        );
        assert!(alerts.active().is_empty());
        // A condition that stops holding while pending never fires.
        alerts.evaluate(&window(Some(50.0), 0, 10), at(60));
        alerts.evaluate(&window(Some(1.0), 0, 10), at(70));
        assert!(alerts
            .evaluate(&window(Some(50.0), 0, 10), at(90))
            .is_empty());
    }

    #[test]
    fn zero_for_fires_at_once_and_below_rules_work() {
        let rules = parse_rules(
            "[[rule]]\nname='Errors'\nmetric='error_rate'\nabove=0.5\n\
             [[rule]]\nname='Idle'\nmetric='predictions'\nbelow=1\n",
            "t",
        )
        .unwrap();
        let mut alerts = Alerts::new(rules);
        let fired = alerts.evaluate(&window(Some(1.0), 8, 10), 1000);
        let names: Vec<&str> = fired.iter().map(|n| n.alert.as_str()).collect();
        // 8 errors of 10 and no successful prediction (versions is empty).
        assert_eq!(names, ["Errors", "Idle"]);
        let resolved = alerts.evaluate(&window(Some(1.0), 0, 10), 2000);
        assert_eq!(resolved.len(), 1, "{resolved:?}");
        assert_eq!(resolved[0].alert, "Errors");
    }
}
