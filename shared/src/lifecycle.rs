//! A model's life in the registry, as JSON on NATS: aliases (`production`,
//! `candidate`), the promotion gate's report, promotions, rollbacks, the
//! history of every alias move, and failed runs.

use serde::{Deserialize, Serialize};

use crate::messages::TrainParams;
use crate::routing::{RouteError, RouteProblem, RouteTable, Weighted};

/// A name for a version. The predictors serve `production`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alias {
    /// The version the predictors serve.
    Production,
    /// The newest registered version, whether or not the gate promoted it.
    Candidate,
}

impl Alias {
    /// Every alias.
    pub const ALL: [Alias; 2] = [Alias::Production, Alias::Candidate];

    /// The name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Alias::Production => "production",
            Alias::Candidate => "candidate",
        }
    }
}

impl std::fmt::Display for Alias {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What moved an alias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveAction {
    /// A new version was registered (`candidate`).
    Register,
    /// The promotion gate passed a new version (`production`).
    Gate,
    /// A person or a script promoted a version.
    Promote,
    /// Back to the previous production version.
    Rollback,
    /// The registry, at start-up, moved off a version it cannot serve.
    Recovery,
    /// A routing table was set (`ml.registry.route`).
    RouteSet,
    /// The routing table was removed (`ml.registry.route`, or the registry
    /// at start-up when it names a version it cannot serve).
    RouteClear,
}

impl MoveAction {
    /// The name, as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            MoveAction::Register => "register",
            MoveAction::Gate => "gate",
            MoveAction::Promote => "promote",
            MoveAction::Rollback => "rollback",
            MoveAction::Recovery => "recovery",
            MoveAction::RouteSet => "route_set",
            MoveAction::RouteClear => "route_clear",
        }
    }
}

/// One alias move, as recorded in the registry's `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasMove {
    /// Position in the history, from 1, without gaps.
    pub seq: u64,
    /// When (RFC 3339).
    pub timestamp: String,
    /// Which alias.
    pub alias: Alias,
    /// The version it named before (none if it named none).
    pub from: Option<u64>,
    /// The version it names now.
    pub to: u64,
    /// For `production`: the production epoch after the move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// What moved it.
    pub action: MoveAction,
    /// Which service or user (`trainer`, `registry`, `alice`).
    pub actor: String,
    /// Why.
    pub reason: String,
    /// An alias move, or a routing-table change (lines written before
    /// routing tables existed read as `alias`).
    #[serde(default)]
    pub kind: MoveKind,
    /// For a `route_set` move: the table set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<RouteTable>,
    /// For a production move: the routing table in force was removed with it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub route_cleared: bool,
}

/// What a history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveKind {
    /// An alias named another version (`to`).
    #[default]
    Alias,
    /// The routing table changed; production (`to`) stayed, the epoch moved.
    Route,
}

/// The promotion gate's decision on a new version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReport {
    /// The metric compared: `rmse` (lower is better) for a regression model,
    /// `accuracy` (higher is better) for a classifier.
    pub metric: String,
    /// Whether a higher value of the metric is better.
    pub higher_is_better: bool,
    /// The new version's value.
    pub candidate: f64,
    /// The production version it was compared with, if any.
    pub production_version: Option<u64>,
    /// The production version's value, if comparable.
    pub production: Option<f64>,
    /// How much worse, relative to production's value, the new version may be.
    pub tolerance: f64,
    /// Whether the new version became production.
    pub promoted: bool,
    /// The decision in a sentence.
    pub reason: String,
}

/// A request on `ml.registry.promote`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The version to serve.
    pub version: u64,
    /// Why (recorded in the history).
    pub reason: String,
    /// Who (recorded in the history).
    pub actor: String,
}

/// A request on `ml.registry.rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// Why (recorded in the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who (recorded in the history).
    pub actor: String,
}

/// The reply to a promotion or a rollback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveReply {
    /// The alias moved.
    pub alias: Alias,
    /// The version it named before.
    pub from: Option<u64>,
    /// The version it names now.
    pub to: u64,
    /// The production epoch now.
    pub epoch: u64,
    /// False when the version already held the alias (nothing recorded).
    pub moved: bool,
    /// True when the move removed the routing table that was in force
    /// (absent otherwise).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub route_cleared: bool,
}

/// A request on `ml.registry.route`: `{}` reads the table; a table
/// (`candidates`, `shadow`, `sticky`) sets it; `{"clear":true}` removes it.
/// A change needs an `actor` (and takes a `reason`), as a promotion does.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRequest {
    /// Versions served beside production, with their percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<Weighted>>,
    /// The shadow version and its percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<Weighted>,
    /// A sticky split (by user or `routing_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<bool>,
    /// Remove the table.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clear: bool,
    /// Why (recorded in the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Who (recorded in the history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

/// What a [`RouteRequest`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteAction {
    /// The table in force and the epoch.
    Read,
    /// Set this table (checked by [`RouteTable::check`]).
    Set(RouteTable),
    /// Remove the table.
    Clear,
}

impl RouteRequest {
    /// What the request asks for, or why it is not a request.
    pub fn action(&self) -> Result<RouteAction, RouteError> {
        let sets = self.candidates.is_some() || self.shadow.is_some() || self.sticky.is_some();
        let change = match (self.clear, sets) {
            (true, true) => {
                return Err(RouteError::new(
                    RouteProblem::Conflicting,
                    "\"clear\" cannot go with a table (candidates, shadow, sticky)",
                ))
            }
            (true, false) => RouteAction::Clear,
            (false, true) => {
                let table = RouteTable {
                    candidates: self.candidates.clone().unwrap_or_default(),
                    shadow: self.shadow,
                    sticky: self.sticky.unwrap_or(false),
                };
                table.check()?;
                RouteAction::Set(table)
            }
            (false, false) if self.reason.is_some() || self.actor.is_some() => {
                return Err(RouteError::new(
                    RouteProblem::Conflicting,
                    "nothing to do: send a table, {\"clear\":true}, or {} to read",
                ))
            }
            (false, false) => return Ok(RouteAction::Read),
        };
        if self.actor.as_deref().is_none_or(|a| a.trim().is_empty()) {
            return Err(RouteError::new(
                RouteProblem::BadText,
                "a change needs an \"actor\" (who, recorded in the history)",
            ));
        }
        Ok(change)
    }
}

/// The reply of `ml.registry.route`: the table in force (none when
/// production takes all traffic), production and the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteReply {
    /// The production version, if any.
    pub production: Option<u64>,
    /// The table in force.
    pub table: Option<RouteTable>,
    /// The production epoch (which table changes move, like promotions).
    pub epoch: u64,
    /// Whether this request changed the table (false for a read, or a
    /// clear with no table).
    pub changed: bool,
}

/// A request on `ml.registry.history` (an empty payload means the newest
/// [`crate::messages::Page::DEFAULT_LIMIT`] moves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRequest {
    /// Only the most recent moves (at most [`crate::messages::Page::MAX_LIMIT`]).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Skip this many of the most recent moves first (to page back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
}

impl HistoryRequest {
    /// The page this request asks for.
    pub fn page(&self) -> crate::messages::Page {
        crate::messages::Page {
            limit: self.limit,
            offset: self.offset,
        }
    }
}

/// The alias history, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryReply {
    /// The moves of the page asked for, oldest first.
    pub moves: Vec<AliasMove>,
    /// How many moves the history holds in all.
    #[serde(default)]
    pub total: usize,
}

/// A trainer's report of a run that produced no model (JSON on
/// `ml.registry.run_failed`); the registry logs it with `status=failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailedRun {
    /// Unique id of the run.
    pub run_id: String,
    /// When the run started, ms since the Unix epoch.
    pub started_ms: u64,
    /// How long it took until it failed.
    pub duration_ms: u64,
    /// The parameters.
    pub params: TrainParams,
    /// The data file.
    pub data_path: String,
    /// Fingerprint of the data file, when it could be read.
    #[serde(default)]
    pub data_fingerprint: Option<String>,
    /// Why it failed.
    pub reason: String,
}

/// The registry's reply to a [`FailedRun`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedReply {
    /// Always true: the row is on disk.
    pub recorded: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_shape() {
        let p: PromoteRequest =
            serde_json::from_str(r#"{"version":3,"reason":"fixes #12","actor":"alice"}"#).unwrap();
        assert_eq!((p.version, p.actor.as_str()), (3, "alice"));
        assert!(serde_json::from_str::<PromoteRequest>(r#"{"version":3}"#).is_err());
        let r: RollbackRequest = serde_json::from_str(r#"{"actor":"bob"}"#).unwrap();
        assert_eq!(r.reason, None);
        let h: HistoryRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(h.limit, None);
        let m = AliasMove {
            seq: 1,
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            alias: Alias::Production,
            from: None,
            to: 1,
            epoch: Some(1),
            action: MoveAction::Gate,
            actor: "registry".into(),
            reason: "first model".into(),
            kind: MoveKind::Alias,
            route: None,
            route_cleared: false,
        };
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains(r#""alias":"production","from":null,"to":1,"epoch":1,"action":"gate""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<AliasMove>(&json).unwrap(), m);
        // A line written before routing tables existed reads as an alias move.
        let old = r#"{"seq":1,"timestamp":"t","alias":"production","from":null,"to":1,"epoch":1,"action":"gate","actor":"registry","reason":"r"}"#;
        let read: AliasMove = serde_json::from_str(old).unwrap();
        assert_eq!(
            (read.kind, read.route, read.route_cleared),
            (MoveKind::Alias, None, false)
        );
    }

    #[test]
    fn route_requests_say_what_they_ask_for() {
        let parse = |s: &str| serde_json::from_str::<RouteRequest>(s).unwrap().action();
        assert_eq!(parse("{}").unwrap(), RouteAction::Read);
        assert_eq!(
            parse(r#"{"clear":true,"actor":"a"}"#).unwrap(),
            RouteAction::Clear
        );
        let set = parse(
            r#"{"candidates":[{"version":7,"percent":10}],"shadow":{"version":8,"percent":20},"sticky":true,"reason":"r","actor":"a"}"#,
        )
        .unwrap();
        let RouteAction::Set(t) = set else {
            panic!("a table")
        };
        assert_eq!((t.candidate_percent(), t.sticky), (10, true));
        let problem = |s: &str| parse(s).unwrap_err().problem;
        assert_eq!(
            problem(r#"{"clear":true,"sticky":true,"actor":"a"}"#),
            RouteProblem::Conflicting
        );
        assert_eq!(
            problem(r#"{"reason":"r","actor":"a"}"#),
            RouteProblem::Conflicting
        );
        assert_eq!(
            problem(r#"{"candidates":[{"version":7,"percent":10}]}"#),
            RouteProblem::BadText
        );
        assert_eq!(
            problem(r#"{"candidates":[{"version":7,"percent":100}],"actor":"a"}"#),
            RouteProblem::PercentOutOfRange
        );
        assert!(serde_json::from_str::<RouteRequest>(r#"{"candidate":[]}"#).is_err());
    }
}
