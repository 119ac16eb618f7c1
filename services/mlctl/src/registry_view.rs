//! How `mlctl` shows the registry: the models table (aliases, metrics, age),
//! the experiments log (filtered with `--where`, sorted with `--sort`), and
//! the alias history. Pure functions of the registry's JSON replies.

use std::cmp::Ordering;
use std::time::{Duration, SystemTime};

use ml_shared::lifecycle::{AliasMove, MoveReply, RouteReply};
use ml_shared::messages::{ExperimentRow, Metrics, ModelsReply};
use ml_shared::routing::RouteTable;
use serde_json::Value;

/// A condition on a column of the experiments log: `r2 > 0.9`,
/// `status == failed`, `model != linear`.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    field: String,
    op: Op,
    value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, ord: Ordering) -> bool {
        match self {
            Op::Lt => ord == Ordering::Less,
            Op::Le => ord != Ordering::Greater,
            Op::Gt => ord == Ordering::Greater,
            Op::Ge => ord != Ordering::Less,
            Op::Eq => ord == Ordering::Equal,
            Op::Ne => ord != Ordering::Equal,
        }
    }
}

/// The columns of the experiments log, as `--where` and `--sort` name them.
pub fn columns() -> Vec<String> {
    match serde_json::to_value(ExperimentRow::default()) {
        Ok(Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

fn check_column(name: &str) -> Result<(), String> {
    let all = columns();
    if all.iter().any(|c| c == name) {
        Ok(())
    } else {
        Err(format!(
            "unknown column {name:?}; columns: {}",
            all.join(", ")
        ))
    }
}

impl std::str::FromStr for Filter {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // Two-character operators first, so that `>=` is not read as `>`.
        const OPS: [(&str, Op); 7] = [
            (">=", Op::Ge),
            ("<=", Op::Le),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            (">", Op::Gt),
            ("<", Op::Lt),
            ("=", Op::Eq),
        ];
        let (at, token, op) = OPS
            .iter()
            .filter_map(|&(token, op)| text.find(token).map(|at| (at, token, op)))
            .min_by_key(|&(at, token, _)| (at, std::cmp::Reverse(token.len())))
            .ok_or_else(|| {
                format!("{text:?} is not a condition like \"r2 > 0.9\" or \"status == failed\"")
            })?;
        let field = text[..at].trim().to_owned();
        let value = text[at + token.len()..].trim().to_owned();
        if field.is_empty() || value.is_empty() {
            return Err(format!(
                "{text:?}: a column, an operator and a value are needed"
            ));
        }
        check_column(&field)?;
        Ok(Filter { field, op, value })
    }
}

/// Compares a cell with a literal: as numbers when both are, else as text.
/// An empty cell matches nothing.
fn compare(cell: &Value, literal: &str) -> Option<Ordering> {
    match cell {
        Value::Null => None,
        Value::Number(n) => {
            let x = n.as_f64()?;
            let y: f64 = literal.parse().ok()?;
            x.partial_cmp(&y)
        }
        Value::String(s) => Some(s.as_str().cmp(literal)),
        other => Some(other.to_string().as_str().cmp(literal)),
    }
}

impl Filter {
    /// Whether `row` satisfies the condition.
    pub fn matches(&self, row: &ExperimentRow) -> bool {
        let cell = cell(row, &self.field);
        compare(&cell, &self.value).is_some_and(|ord| self.op.holds(ord))
    }
}

fn cell(row: &ExperimentRow, field: &str) -> Value {
    serde_json::to_value(row)
        .ok()
        .and_then(|v| v.get(field).cloned())
        .unwrap_or(Value::Null)
}

/// The sort order of `mlctl runs`: a column, ascending unless `descending`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sort {
    /// The column.
    pub field: String,
    /// Largest first.
    pub descending: bool,
}

impl Sort {
    /// Checks the column name.
    pub fn new(field: &str, descending: bool) -> Result<Self, String> {
        check_column(field)?;
        Ok(Sort {
            field: field.to_owned(),
            descending,
        })
    }
}

/// Keeps the rows that satisfy every filter, sorted (empty cells last).
pub fn select(
    rows: Vec<ExperimentRow>,
    filters: &[Filter],
    sort: Option<&Sort>,
) -> Vec<ExperimentRow> {
    let mut rows: Vec<ExperimentRow> = rows
        .into_iter()
        .filter(|r| filters.iter().all(|f| f.matches(r)))
        .collect();
    if let Some(sort) = sort {
        let key = |r: &ExperimentRow| cell(r, &sort.field);
        rows.sort_by(|a, b| {
            let (ka, kb) = (key(a), key(b));
            match (ka.is_null(), kb.is_null()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => {
                    let ord = match (ka.as_f64(), kb.as_f64()) {
                        (Some(x), Some(y)) => x.total_cmp(&y),
                        _ => ka.to_string().cmp(&kb.to_string()),
                    };
                    if sort.descending {
                        ord.reverse()
                    } else {
                        ord
                    }
                }
            }
        });
    }
    rows
}

/// `rmse=0.10012 mae=0.08001 r2=0.99950`, or `-` when there is none.
pub fn metrics_text(m: &Metrics) -> String {
    let parts: Vec<String> = m
        .fields()
        .into_iter()
        .filter_map(|(name, v)| v.map(|v| format!("{name}={v:.5}")))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// How long ago an RFC 3339 time was: `42s`, `5m`, `3h`, `2d`.
pub fn age(rfc3339: &str, now: SystemTime) -> String {
    let Ok(then) = humantime::parse_rfc3339_weak(rfc3339) else {
        return "?".into();
    };
    let secs = now.duration_since(then).unwrap_or(Duration::ZERO).as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// The `mlctl models` table.
pub fn models_table(m: &ModelsReply, now: SystemTime) -> String {
    let mut out = format!(
        "{:>7}  {:<24}  {:>5}  {:<8}  {:<21}  {:>6}  {:<44}  {}\n",
        "VERSION", "CREATED", "AGE", "KIND", "ALIASES", "PARENT", "METRICS", "FEATURES"
    );
    for s in &m.models {
        out.push_str(&format!(
            "{:>7}  {:<24}  {:>5}  {:<8}  {:<21}  {:>6}  {:<44}  {}\n",
            s.version,
            s.created_at,
            age(&s.created_at, now),
            s.kind,
            s.aliases.join(","),
            opt(s.parent),
            metrics_text(&s.metrics),
            s.feature_names.join(",")
        ));
    }
    for c in &m.corrupt {
        out.push_str(&format!(
            "{:>7}  corrupt, never served: {}\n",
            c.version, c.reason
        ));
    }
    out
}

/// The `mlctl runs` table.
pub fn runs_table(rows: &[ExperimentRow]) -> String {
    let mut out = format!(
        "{:<24}  {:>7}  {:<10}  {:<20}  {:<8}  {:<44}  {:>6}  {:>6}  {:<19}  {}\n",
        "TIMESTAMP", "VERSION", "STATUS", "RUN", "MODEL", "METRICS", "ROWS", "MS", "DATA", "REASON"
    );
    for row in rows {
        let rows = match (row.rows_train, row.rows_validation) {
            (Some(t), Some(v)) => (t + v).to_string(),
            _ => "-".into(),
        };
        out.push_str(&format!(
            "{:<24}  {:>7}  {:<10}  {:<20}  {:<8}  {:<44}  {:>6}  {:>6}  {:<19}  {}\n",
            row.timestamp,
            opt(row.version),
            row.status,
            row.run_id,
            row.model,
            metrics_text(&row.metrics()),
            rows,
            row.duration_ms,
            &row.data_fingerprint[..row.data_fingerprint.len().min(19)],
            shorten(&row.reason, 80)
        ));
    }
    out
}

/// The `mlctl history` table.
pub fn history_table(moves: &[AliasMove]) -> String {
    let mut out = format!(
        "{:>4}  {:<24}  {:<10}  {:>4}  {:>4}  {:>5}  {:<8}  {:<12}  {}\n",
        "SEQ", "WHEN", "ALIAS", "FROM", "TO", "EPOCH", "ACTION", "BY", "WHY"
    );
    for m in moves {
        out.push_str(&format!(
            "{:>4}  {:<24}  {:<10}  {:>4}  {:>4}  {:>5}  {:<8}  {:<12}  {}\n",
            m.seq,
            m.timestamp,
            m.alias.as_str(),
            opt(m.from),
            m.to,
            opt(m.epoch),
            m.action.as_str(),
            m.actor,
            history_why(m)
        ));
    }
    out
}

/// The reason, with the table set or the table a production move removed.
fn history_why(m: &AliasMove) -> String {
    match (&m.route, m.route_cleared) {
        (Some(t), _) => format!("{} [{}]", m.reason, table_summary(t)),
        (None, true) => format!("{} [routing table cleared]", m.reason),
        (None, false) => m.reason.clone(),
    }
}

/// A table on one line: `v7 10%, v9 5%; shadow v8 20%; sticky`.
pub fn table_summary(t: &RouteTable) -> String {
    let mut parts: Vec<String> = Vec::new();
    let candidates: Vec<String> = t
        .candidates
        .iter()
        .map(|c| format!("v{} {}%", c.version, c.percent))
        .collect();
    if !candidates.is_empty() {
        parts.push(candidates.join(", "));
    }
    if let Some(s) = t.shadow {
        parts.push(format!("shadow v{} {}%", s.version, s.percent));
    }
    if t.sticky {
        parts.push("sticky".into());
    }
    parts.join("; ")
}

/// The routing table in force, for people.
pub fn route_lines(r: &RouteReply) -> String {
    let production = r.production.map_or("none".to_owned(), |v| format!("v{v}"));
    let Some(t) = &r.table else {
        return format!(
            "no routing table: production {production} takes all traffic (epoch {})\n",
            r.epoch
        );
    };
    let mut out = format!(
        "{:<10}  {:>7}  {:>7}\n{:<10}  {:>7}  {:>6}%\n",
        "VARIANT",
        "VERSION",
        "PERCENT",
        "production",
        production,
        100 - t.candidate_percent()
    );
    for c in &t.candidates {
        out.push_str(&format!(
            "{:<10}  {:>7}  {:>6}%\n",
            "candidate",
            format!("v{}", c.version),
            c.percent
        ));
    }
    if let Some(s) = t.shadow {
        out.push_str(&format!(
            "{:<10}  {:>7}  {:>6}%  (after the reply; never answers)\n",
            "shadow",
            format!("v{}", s.version),
            s.percent
        ));
    }
    out.push_str(&format!(
        "sticky: {}; epoch {}{}\n",
        if t.sticky {
            "yes (by user_id or routing_key)"
        } else {
            "no (random per request)"
        },
        r.epoch,
        if r.changed { "" } else { "; unchanged" }
    ));
    out
}

/// One line for a promotion or rollback: `production: v2 -> v3 (epoch 5)`.
pub fn move_line(r: &MoveReply) -> String {
    if r.moved {
        format!(
            "{}: v{} -> v{} (epoch {}){}",
            r.alias,
            opt(r.from),
            r.to,
            r.epoch,
            if r.route_cleared {
                "; routing table cleared"
            } else {
                ""
            }
        )
    } else {
        format!(
            "{}: already v{} (epoch {}); nothing changed",
            r.alias, r.to, r.epoch
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(version: Option<u64>, status: &str, r2: Option<f64>) -> ExperimentRow {
        ExperimentRow {
            version,
            status: status.into(),
            r2,
            rmse: r2.map(|r| 1.0 - r),
            model: "linear".into(),
            ..ExperimentRow::default()
        }
    }

    #[test]
    fn filters_parse_and_match() {
        let f: Filter = "r2 > 0.9".parse().unwrap();
        assert!(f.matches(&row(Some(1), "production", Some(0.95))));
        assert!(!f.matches(&row(Some(1), "production", Some(0.85))));
        assert!(
            !f.matches(&row(None, "failed", None)),
            "empty cells match nothing"
        );
        let f: Filter = "r2>=0.9".parse().unwrap();
        assert!(f.matches(&row(Some(1), "p", Some(0.9))));
        let f: Filter = "status == failed".parse().unwrap();
        assert!(f.matches(&row(None, "failed", None)));
        let f: Filter = "status!=failed".parse().unwrap();
        assert!(!f.matches(&row(None, "failed", None)));
        let f: Filter = "version <= 2".parse().unwrap();
        assert!(f.matches(&row(Some(2), "p", None)));
        assert!(!f.matches(&row(Some(3), "p", None)));
        assert!("r3 > 1"
            .parse::<Filter>()
            .unwrap_err()
            .contains("unknown column"));
        assert!("r2".parse::<Filter>().is_err());
        assert!("r2 >".parse::<Filter>().is_err());
    }

    #[test]
    fn rows_sort_by_a_metric_with_empty_cells_last() {
        let rows = vec![
            row(Some(1), "p", Some(0.5)),
            row(None, "failed", None),
            row(Some(2), "p", Some(0.9)),
            row(Some(3), "c", Some(0.7)),
        ];
        let sort = Sort::new("r2", true).unwrap();
        let versions: Vec<Option<u64>> = select(rows.clone(), &[], Some(&sort))
            .iter()
            .map(|r| r.version)
            .collect();
        assert_eq!(versions, [Some(2), Some(3), Some(1), None]);
        let sort = Sort::new("rmse", false).unwrap();
        let filters = ["r2 > 0.6".parse().unwrap()];
        let versions: Vec<Option<u64>> = select(rows, &filters, Some(&sort))
            .iter()
            .map(|r| r.version)
            .collect();
        assert_eq!(versions, [Some(2), Some(3)]);
        assert!(Sort::new("nope", false).is_err());
    }

    #[test]
    fn ages_and_metrics_read_compactly() {
        let now = humantime::parse_rfc3339("2026-01-01T12:00:00Z").unwrap();
        assert_eq!(age("2026-01-01T11:59:30.000Z", now), "30s");
        assert_eq!(age("2026-01-01T11:00:00Z", now), "1h");
        assert_eq!(age("2025-12-30T12:00:00Z", now), "2d");
        assert_eq!(age("garbage", now), "?");
        assert_eq!(
            metrics_text(&Metrics::classification(0.9, 0.25, 0.95)),
            "accuracy=0.90000 log_loss=0.25000 roc_auc=0.95000"
        );
        assert_eq!(metrics_text(&Metrics::default()), "-");
    }

    #[test]
    fn the_routing_table_prints_as_in_the_readme() {
        use ml_shared::routing::Weighted;
        let w = |version, percent| Weighted { version, percent };
        let reply = RouteReply {
            production: Some(6),
            table: Some(RouteTable {
                candidates: vec![w(7, 10), w(9, 5)],
                shadow: Some(w(8, 20)),
                sticky: true,
            }),
            epoch: 12,
            changed: false,
        };
        assert_eq!(
            route_lines(&reply),
            "VARIANT     VERSION  PERCENT\n\
             production       v6      85%\n\
             candidate        v7      10%\n\
             candidate        v9       5%\n\
             shadow           v8      20%  (after the reply; never answers)\n\
             sticky: yes (by user_id or routing_key); epoch 12; unchanged\n"
        );
        let none = RouteReply {
            table: None,
            ..reply.clone()
        };
        assert!(route_lines(&none).starts_with("no routing table: production v6"));
        let m = AliasMove {
            seq: 3,
            timestamp: "t".into(),
            alias: ml_shared::lifecycle::Alias::Production,
            from: Some(6),
            to: 7,
            epoch: Some(13),
            action: ml_shared::lifecycle::MoveAction::Promote,
            actor: "alice".into(),
            reason: "good".into(),
            kind: ml_shared::lifecycle::MoveKind::Alias,
            route: None,
            route_cleared: true,
        };
        assert!(history_table(std::slice::from_ref(&m)).contains("good [routing table cleared]"));
        let set = AliasMove {
            route: reply.table.clone(),
            route_cleared: false,
            ..m
        };
        assert!(history_table(&[set]).contains("good [v7 10%, v9 5%; shadow v8 20%; sticky]"));
    }
}
