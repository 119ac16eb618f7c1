//! The console's HTML, rendered from the registry's replies. Every value
//! that comes from outside goes through [`esc`].

use std::collections::HashMap;
use std::fmt::Write;

use ml_shared::lifecycle::{AliasMove, MoveReply};
use ml_shared::messages::{ExperimentRow, Metrics, ModelSummary, ModelsReply};
use mlctl::registry_view::{self, Filter, Sort};

use super::Viewer;

/// Escapes text for HTML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The page around `body`: navigation, the operator's state, the assets.
pub fn layout(title: &str, viewer: &Viewer, body: &str) -> String {
    let who = match (&viewer.operator, &viewer.csrf) {
        (Some(name), Some(csrf)) => format!(
            "<span id=\"operator\">signed in as <b>{}</b></span> <form method=\"post\" action=\"/logout\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button>Sign out</button></form>",
            esc(name),
            esc(csrf)
        ),
        _ => "<a id=\"sign-in\" href=\"/login\">Operator sign-in</a>".to_owned(),
    };
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · mlplatform</title><link rel="stylesheet" href="/static/console.css">
<script type="module" src="/static/console.js"></script></head>
<body><header><a class="brand" href="/models">mlplatform</a>
<nav><a href="/models">Models</a><a href="/runs">Runs</a><a href="/history">History</a><a href="/live">Live</a></nav>
<div class="who">{who}</div></header>
<main>{body}</main></body></html>"#,
        title = esc(title),
    )
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "–".to_owned())
}

fn num(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.5}"))
        .unwrap_or_else(|| "–".to_owned())
}

fn short_fingerprint(f: &str) -> String {
    f.chars().take(19).collect()
}

/// The models page.
pub fn models(viewer: &Viewer, models: &ModelsReply, compare: Option<&str>) -> String {
    let mut body = String::from("<h1>Models</h1>");
    let _ = write!(
        body,
        "<p>Production: <b id=\"production\">{}</b> · candidate: {} · {} versions</p>",
        opt(models.production.map(|v| format!("v{v}"))),
        opt(models.aliases.get("candidate").map(|v| format!("v{v}"))),
        models.models.len()
    );
    if let (Some(_), Some(csrf)) = (&viewer.operator, &viewer.csrf) {
        let _ = write!(
            body,
            r#"<form method="post" action="/console/rollback" class="action" id="rollback-form">
<input type="hidden" name="csrf" value="{}"><input name="reason" placeholder="reason" required>
<button>Roll back production</button></form>"#,
            esc(csrf)
        );
    }
    // Compare a metric across versions.
    let _ = write!(body, "<form method=\"get\" action=\"/models\" class=\"compare\"><label>Compare <select name=\"compare\" id=\"compare\">");
    for name in Metrics::NAMES {
        let selected = if compare == Some(name) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{name}</option>");
    }
    body.push_str("</select></label> <button>Chart</button></form>");
    if let Some(metric) = compare {
        body.push_str(&chart(models, metric));
    }
    body.push_str(
        "<table class=\"sortable\" id=\"models\"><thead><tr><th>version</th><th>created</th><th>kind</th><th>aliases</th><th>parent</th><th>metrics</th><th>features</th><th>data</th><th>run</th>",
    );
    if viewer.operator.is_some() {
        body.push_str("<th>action</th>");
    }
    body.push_str("</tr></thead><tbody>");
    for m in models.models.iter().rev() {
        let corrupt = models.corrupt.iter().any(|c| c.version == m.version);
        let _ = write!(
            body,
            "<tr data-version=\"{v}\"{cls}><td><a href=\"/versions/{v}\">v{v}</a></td><td>{created}</td><td>{kind}</td><td>{aliases}</td><td>{parent}</td><td>{metrics}</td><td>{features}</td><td title=\"{fp}\"><code>{fp_short}</code></td><td><code>{run}</code></td>",
            v = m.version,
            cls = if m.production { " class=\"production\"" } else { "" },
            created = esc(&m.created_at),
            kind = esc(&m.kind),
            aliases = m
                .aliases
                .iter()
                .map(|a| format!("<span class=\"alias\">{}</span>", esc(a)))
                .collect::<String>()
                + if corrupt { "<span class=\"alias bad\">corrupt</span>" } else { "" },
            parent = m
                .parent
                .map(|p| format!("<a href=\"/versions/{p}\">v{p}</a>"))
                .unwrap_or_else(|| "–".into()),
            metrics = esc(&registry_view::metrics_text(&m.metrics)),
            features = esc(&m.feature_names.join(", ")),
            fp = esc(&m.data_fingerprint),
            fp_short = esc(&short_fingerprint(&m.data_fingerprint)),
            run = esc(&m.run_id),
        );
        if let (Some(_), Some(csrf)) = (&viewer.operator, &viewer.csrf) {
            if m.production || corrupt {
                body.push_str("<td></td>");
            } else {
                let _ = write!(
                    body,
                    r#"<td><form method="post" action="/console/promote" class="promote"><input type="hidden" name="csrf" value="{csrf}"><input type="hidden" name="version" value="{v}"><input name="reason" placeholder="reason" required><button>Promote v{v}</button></form></td>"#,
                    csrf = esc(csrf),
                    v = m.version
                );
            }
        }
        body.push_str("</tr>");
    }
    body.push_str("</tbody></table>");
    if !viewer.operators_configured {
        body.push_str("<p class=\"note\">No operators are configured (GATEWAY_OPERATORS): the console is read-only.</p>");
    }
    layout("Models", viewer, &body)
}

/// A bar chart (inline SVG) of `metric` across versions.
fn chart(models: &ModelsReply, metric: &str) -> String {
    let points: Vec<(u64, f64, bool)> = models
        .models
        .iter()
        .filter_map(|m| m.metrics.get(metric).map(|v| (m.version, v, m.production)))
        .collect();
    if points.is_empty() {
        return format!(
            "<p id=\"chart\" class=\"note\">No version has {}.</p>",
            esc(metric)
        );
    }
    let max = points
        .iter()
        .map(|p| p.1.abs())
        .fold(0.0f64, f64::max)
        .max(1e-12);
    let bar = 28.0;
    let width = 640.0;
    let height = bar * points.len() as f64 + 10.0;
    let mut svg = format!(
        "<figure id=\"chart\"><figcaption>{} by version</figcaption><svg width=\"{width}\" height=\"{height}\" role=\"img\">",
        esc(metric)
    );
    for (i, (version, value, production)) in points.iter().enumerate() {
        let y = i as f64 * bar + 5.0;
        let w = (value.abs() / max * (width - 220.0)).max(1.0);
        let _ = write!(
            svg,
            "<text x=\"0\" y=\"{ty}\">v{version}</text><rect x=\"60\" y=\"{y}\" width=\"{w:.1}\" height=\"{h}\" class=\"{cls}\"/><text x=\"{tx:.1}\" y=\"{ty}\">{value:.5}</text>",
            ty = y + bar * 0.6,
            h = bar - 8.0,
            cls = if *production { "bar production" } else { "bar" },
            tx = 66.0 + w,
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// A filter and sort of the experiments log, from the query string:
/// `where` (conditions separated by `;`, as `mlctl runs --where`), `sort`
/// (a column) and `desc` (`1` for largest first).
#[derive(Debug, Clone, Default)]
pub struct RunSelection {
    /// The conditions, as typed.
    pub conditions: String,
    /// The sort column, as typed.
    pub sort: String,
    /// Largest first.
    pub desc: bool,
}

impl RunSelection {
    /// Reads the query.
    pub fn from_query(q: &HashMap<String, String>) -> Self {
        Self {
            conditions: q.get("where").cloned().unwrap_or_default(),
            sort: q.get("sort").cloned().unwrap_or_default(),
            desc: q
                .get("desc")
                .is_some_and(|d| d == "1" || d == "true" || d == "on"),
        }
    }

    /// The rows selected, or why the selection is invalid.
    pub fn apply(&self, rows: Vec<ExperimentRow>) -> Result<Vec<ExperimentRow>, String> {
        let filters = self
            .conditions
            .split(';')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::parse::<Filter>)
            .collect::<Result<Vec<_>, _>>()?;
        let sort = if self.sort.trim().is_empty() {
            None
        } else {
            Some(Sort::new(self.sort.trim(), self.desc)?)
        };
        Ok(registry_view::select(rows, &filters, sort.as_ref()))
    }

    fn query(&self) -> String {
        format!(
            "where={}&sort={}&desc={}",
            url_encode(&self.conditions),
            url_encode(&self.sort),
            if self.desc { "1" } else { "0" }
        )
    }
}

const RUN_COLUMNS: [&str; 11] = [
    "timestamp",
    "version",
    "status",
    "run_id",
    "model",
    "rmse",
    "r2",
    "accuracy",
    "roc_auc",
    "duration_ms",
    "data_fingerprint",
];

/// The runs page.
pub fn runs(viewer: &Viewer, rows: Vec<ExperimentRow>, selection: &RunSelection) -> String {
    let total = rows.len();
    let (rows, error) = match selection.apply(rows) {
        Ok(rows) => (rows, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let mut body = String::from("<h1>Runs</h1>");
    let _ = write!(
        body,
        r#"<form method="get" action="/runs" class="filter" id="runs-filter">
<label>where <input name="where" id="where" value="{w}" placeholder="r2 &gt; 0.9; status == production" size="40"></label>
<label>sort <select name="sort" id="sort"><option value=""></option>{opts}</select></label>
<label><input type="checkbox" name="desc" value="1" id="desc"{desc}> largest first</label>
<button>Apply</button> <a id="csv" href="/runs.csv?{q}">CSV</a></form>"#,
        w = esc(&selection.conditions),
        opts = registry_view::columns()
            .iter()
            .map(|c| format!(
                "<option{}>{}</option>",
                if *c == selection.sort {
                    " selected"
                } else {
                    ""
                },
                esc(c)
            ))
            .collect::<String>(),
        desc = if selection.desc { " checked" } else { "" },
        q = esc(&selection.query()),
    );
    if let Some(e) = error {
        let _ = write!(
            body,
            "<p class=\"error\" id=\"filter-error\">{}</p>",
            esc(&e)
        );
    }
    let _ = write!(
        body,
        "<p><span id=\"run-count\">{}</span> of {total} runs</p><table class=\"sortable\" id=\"runs\"><thead><tr>",
        rows.len()
    );
    for c in RUN_COLUMNS {
        let _ = write!(body, "<th>{c}</th>");
    }
    body.push_str("<th>reason</th></tr></thead><tbody>");
    for r in &rows {
        let _ = write!(
            body,
            "<tr class=\"status-{status}\"><td>{ts}</td><td data-sort=\"{vs}\">{version}</td><td>{status}</td><td><code>{run}</code></td><td>{model}</td><td data-sort=\"{rmse_s}\">{rmse}</td><td data-sort=\"{r2_s}\">{r2}</td><td data-sort=\"{acc_s}\">{acc}</td><td data-sort=\"{auc_s}\">{auc}</td><td data-sort=\"{ms}\">{ms}</td><td title=\"{fp}\"><code>{fp_short}</code></td><td class=\"reason\">{reason}</td></tr>",
            ts = esc(&r.timestamp),
            vs = r.version.map(|v| v.to_string()).unwrap_or_default(),
            version = r
                .version
                .map(|v| format!("<a href=\"/versions/{v}\">v{v}</a>"))
                .unwrap_or_else(|| "–".into()),
            status = esc(&r.status),
            run = esc(&r.run_id),
            model = esc(&r.model),
            rmse_s = r.rmse.map(|v| v.to_string()).unwrap_or_default(),
            rmse = num(r.rmse),
            r2_s = r.r2.map(|v| v.to_string()).unwrap_or_default(),
            r2 = num(r.r2),
            acc_s = r.accuracy.map(|v| v.to_string()).unwrap_or_default(),
            acc = num(r.accuracy),
            auc_s = r.roc_auc.map(|v| v.to_string()).unwrap_or_default(),
            auc = num(r.roc_auc),
            ms = r.duration_ms,
            fp = esc(&r.data_fingerprint),
            fp_short = esc(&short_fingerprint(&r.data_fingerprint)),
            reason = esc(&r.reason),
        );
    }
    body.push_str("</tbody></table>");
    layout("Runs", viewer, &body)
}

/// The experiments log as CSV, with the log's own header.
pub fn csv(rows: &[ExperimentRow]) -> String {
    let mut writer = csv::Writer::from_writer(Vec::new());
    if rows.is_empty() {
        let _ = writer.serialize(ExperimentRow::default());
        // The header alone: drop the empty row.
        let text = String::from_utf8(writer.into_inner().unwrap_or_default()).unwrap_or_default();
        return text
            .lines()
            .next()
            .map(|h| format!("{h}\n"))
            .unwrap_or_default();
    }
    for r in rows {
        if writer.serialize(r).is_err() {
            break;
        }
    }
    String::from_utf8(writer.into_inner().unwrap_or_default()).unwrap_or_default()
}

fn move_row(m: &AliasMove) -> String {
    format!(
        "<tr><td>{seq}</td><td>{ts}</td><td>{alias}</td><td>{from}</td><td>{to}</td><td>{epoch}</td><td>{action}</td><td class=\"actor\">{actor}</td><td class=\"reason\">{reason}</td></tr>",
        seq = m.seq,
        ts = esc(&m.timestamp),
        alias = m.alias.as_str(),
        from = m
            .from
            .map(|v| format!("<a href=\"/versions/{v}\">v{v}</a>"))
            .unwrap_or_else(|| "–".into()),
        to = format_args!("<a href=\"/versions/{0}\">v{0}</a>", m.to),
        epoch = opt(m.epoch),
        action = m.action.as_str(),
        actor = esc(&m.actor),
        reason = esc(&m.reason),
    )
}

const MOVE_HEAD: &str = "<thead><tr><th>seq</th><th>when</th><th>alias</th><th>from</th><th>to</th><th>epoch</th><th>action</th><th>by</th><th>why</th></tr></thead>";

/// The history page.
pub fn history(viewer: &Viewer, moves: &[AliasMove]) -> String {
    let mut body =
        format!("<h1>History</h1><table class=\"sortable\" id=\"history\">{MOVE_HEAD}<tbody>");
    for m in moves.iter().rev() {
        body.push_str(&move_row(m));
    }
    body.push_str("</tbody></table>");
    layout("History", viewer, &body)
}

/// The lineage of one version.
pub fn lineage(
    viewer: &Viewer,
    models: &ModelsReply,
    model: &ModelSummary,
    runs: &[ExperimentRow],
    moves: &[AliasMove],
) -> String {
    let v = model.version;
    let run = runs
        .iter()
        .find(|r| r.version == Some(v) || r.run_id == model.run_id);
    let mut body = format!("<h1>Lineage of v{v}</h1><ol class=\"lineage\" id=\"lineage\">");
    match run {
        Some(r) => {
            let _ = write!(
                body,
                "<li id=\"lineage-run\"><h2>Run <code>{run}</code></h2><p>{ts} · model {model} · seed {seed} · validation {vf} · {rows} training rows · {ms} ms · status <b>{status}</b></p><p class=\"reason\">{reason}</p></li>",
                run = esc(&r.run_id),
                ts = esc(&r.timestamp),
                model = esc(&r.model),
                seed = r.seed,
                vf = r.validation_fraction,
                rows = opt(r.rows_train),
                ms = r.duration_ms,
                status = esc(&r.status),
                reason = esc(&r.reason),
            );
        }
        None => {
            let _ = write!(
                body,
                "<li id=\"lineage-run\"><h2>Run <code>{}</code></h2><p class=\"note\">not in the experiments log</p></li>",
                esc(&model.run_id)
            );
        }
    }
    let _ = write!(
        body,
        "<li id=\"lineage-data\"><h2>Data</h2><p><code>{}</code></p></li>",
        esc(&model.data_fingerprint)
    );
    let same_data: Vec<String> = models
        .models
        .iter()
        .filter(|m| m.version != v && m.data_fingerprint == model.data_fingerprint)
        .map(|m| format!("<a href=\"/versions/{0}\">v{0}</a>", m.version))
        .collect();
    if !same_data.is_empty() {
        let _ = write!(
            body,
            "<p class=\"note\">Also trained on this data: {}</p>",
            same_data.join(", ")
        );
    }
    let _ = write!(
        body,
        "<li id=\"lineage-version\"><h2>Version v{v}{prod}</h2><p>{kind} · registered {created} · parent {parent} · aliases {aliases}</p><p>{metrics}</p><p>features {features}</p></li>",
        prod = if model.production { " (production)" } else { "" },
        kind = esc(&model.kind),
        created = esc(&model.created_at),
        parent = model
            .parent
            .map(|p| format!("<a href=\"/versions/{p}\">v{p}</a>"))
            .unwrap_or_else(|| "none".into()),
        aliases = if model.aliases.is_empty() {
            "none".to_owned()
        } else {
            esc(&model.aliases.join(", "))
        },
        metrics = esc(&registry_view::metrics_text(&model.metrics)),
        features = esc(&model.feature_names.join(", ")),
    );
    body.push_str("<li id=\"lineage-moves\"><h2>Alias moves</h2>");
    let relevant: Vec<&AliasMove> = moves
        .iter()
        .filter(|m| m.to == v || m.from == Some(v))
        .collect();
    if relevant.is_empty() {
        body.push_str("<p class=\"note\">No alias has named this version.</p>");
    } else {
        let _ = write!(body, "<table id=\"moves\">{MOVE_HEAD}<tbody>");
        for m in relevant {
            body.push_str(&move_row(m));
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("</li></ol>");
    layout(&format!("v{v}"), viewer, &body)
}

/// The live panel (filled by the ES module from `/v1/stats/stream`).
pub fn live(viewer: &Viewer) -> String {
    let body = r#"<h1>Live</h1>
<p class="note">The monitor's figures, updated as they arrive (<code>/v1/stats/stream</code>). <span id="live-state">connecting…</span></p>
<section class="tiles">
<div class="tile"><h3>requests/s</h3><p id="rps">–</p><svg id="spark" width="220" height="40"></svg></div>
<div class="tile"><h3>p50</h3><p id="p50">–</p></div>
<div class="tile"><h3>p99</h3><p id="p99">–</p></div>
<div class="tile"><h3>error rate</h3><p id="error-rate">–</p></div>
<div class="tile"><h3>requests (window)</h3><p id="count">–</p></div>
<div class="tile"><h3>drift</h3><p id="drift">–</p></div>
</section>
<h2>Versions</h2><table id="versions"><thead><tr><th>version</th><th>requests</th><th>share</th><th>p50 ms</th><th>p99 ms</th></tr></thead><tbody></tbody></table>
<h2>Alerts</h2><ul id="alerts"><li>none</li></ul>
<h2>Since start</h2><p id="total">–</p>"#;
    layout("Live", viewer, body)
}

/// The sign-in page.
pub fn login(viewer: &Viewer, error: Option<&str>) -> String {
    let mut body = String::from("<h1>Operator sign-in</h1>");
    if let Some(e) = error {
        let _ = write!(body, "<p class=\"error\" id=\"login-error\">{}</p>", esc(e));
    }
    if !viewer.operators_configured && error.is_none() {
        body.push_str("<p class=\"note\">No operators are configured (GATEWAY_OPERATORS).</p>");
    }
    body.push_str(
        r#"<form method="post" action="/login" id="login-form">
<label>name <input name="name" id="name" autocomplete="username" required></label>
<label>password <input type="password" name="password" id="password" autocomplete="current-password" required></label>
<button id="login-button">Sign in</button></form>"#,
    );
    layout("Sign in", viewer, &body)
}

/// The page after a promotion or rollback.
pub fn moved(viewer: &Viewer, action: &str, reply: &MoveReply) -> String {
    let body = format!(
        "<h1>{action}</h1><p id=\"moved\">{alias}: {from} → v{to} (epoch {epoch}){same}</p><p><a href=\"/models\">Models</a> · <a href=\"/history\">History</a></p>",
        action = esc(action),
        alias = reply.alias.as_str(),
        from = opt(reply.from.map(|v| format!("v{v}"))),
        to = reply.to,
        epoch = reply.epoch,
        same = if reply.moved { "" } else { " — it already was; nothing recorded" },
    );
    layout(action, viewer, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn csv_has_the_logs_header_even_when_empty() {
        let text = csv(&[]);
        assert!(
            text.starts_with("timestamp,version,run_id,status"),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1);
    }
}
