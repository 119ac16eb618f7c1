//! `mlctl top`: a live terminal view of the monitor's figures
//! (`ml.monitor.stats`, every `--interval`): requests per second with a
//! sparkline, latency percentiles, errors by code, the versions serving and
//! their shares, and the pending and firing alerts. `w` switches between the
//! window in progress and the totals since the monitor started; `q`, Esc or
//! Ctrl-C quits. Laid out for an 80×24 terminal (works over SSH); a larger
//! one gets more sparkline. Stats are read as JSON values, so that fields
//! the monitor adds later do not break it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ml_shared::settings::{parse_duration, NatsSettings};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Sparkline};
use ratatui::Frame;
use serde_json::Value;
use tokio::sync::mpsc;

/// `mlctl top` options.
#[derive(Debug, Clone, Args)]
pub struct TopArgs {
    /// How often to ask the monitor.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
}

/// Which figures are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The monitor's window in progress.
    Window,
    /// Everything since the monitor started.
    Total,
}

/// What the view shows: the last stats, or why there are none, and the
/// requests-per-second history for the sparkline.
#[derive(Debug)]
pub struct View {
    /// The last stats reply.
    pub stats: Option<Value>,
    /// The last error, when the monitor did not answer.
    pub error: Option<String>,
    /// Requests/s of the window, one value per poll (newest last).
    pub rps: VecDeque<u64>,
    /// Window or totals.
    pub span: Scope,
}

const HISTORY: usize = 240;

impl Default for View {
    fn default() -> Self {
        Self {
            stats: None,
            error: None,
            rps: VecDeque::with_capacity(HISTORY),
            span: Scope::Window,
        }
    }
}

impl View {
    /// Takes a stats reply (or an error).
    pub fn update(&mut self, reply: Result<Value, String>) {
        match reply {
            Ok(stats) => {
                let rps = stats["window"]["rps"].as_f64().unwrap_or(0.0);
                if self.rps.len() == HISTORY {
                    self.rps.pop_front();
                }
                self.rps.push_back(rps.max(0.0).round() as u64);
                self.stats = Some(stats);
                self.error = None;
            }
            Err(e) => self.error = Some(e),
        }
    }

    /// Draws the view.
    pub fn draw(&self, frame: &mut Frame) {
        let [title, top, middle, bottom, status] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(6),
            Constraint::Min(5),
            Constraint::Length(5),
            Constraint::Length(1),
        ])
        .areas(frame.area());
        frame.render_widget(self.title(), title);
        let empty = Value::Null;
        let stats = self.stats.as_ref().unwrap_or(&empty);
        let figures = match self.span {
            Scope::Window => &stats["window"],
            Scope::Total => &stats["total"],
        };
        let [left, right] =
            Layout::horizontal([Constraint::Length(34), Constraint::Min(20)]).areas(top);
        frame.render_widget(throughput(figures), left);
        frame.render_widget(self.sparkline(right.width), right);
        let [latency_area, versions_area] =
            Layout::horizontal([Constraint::Length(34), Constraint::Min(20)]).areas(middle);
        frame.render_widget(latency(&figures["latency_ms"]), latency_area);
        frame.render_widget(versions(figures, versions_area.width), versions_area);
        frame.render_widget(alerts(&stats["alerts"]), bottom);
        frame.render_widget(Paragraph::new(self.status(figures)), status);
    }

    fn title(&self) -> Paragraph<'static> {
        let which = match self.span {
            Scope::Window => "window in progress",
            Scope::Total => "since the monitor started",
        };
        Paragraph::new(Line::from(vec![
            Span::styled("mlctl top", Style::default().add_modifier(Modifier::BOLD)),
            Span::raw(format!("  {which}  ")),
            Span::styled("w", Style::default().fg(Color::Yellow)),
            Span::raw(" switch  "),
            Span::styled("q", Style::default().fg(Color::Yellow)),
            Span::raw(" quit"),
        ]))
    }

    /// Requests per second of the last windows, as many as fit `width`.
    fn sparkline(&self, width: u16) -> Sparkline<'static> {
        let data: Vec<u64> = self.rps.iter().copied().collect();
        let width = usize::from(width.saturating_sub(2));
        let shown = data[data.len().saturating_sub(width)..].to_vec();
        Sparkline::default()
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title("requests/s (window)"),
            )
            .data(shown)
            .style(Style::default().fg(Color::Cyan))
    }

    fn status(&self, figures: &Value) -> Line<'static> {
        match (&self.error, &self.stats) {
            (Some(e), _) => Line::styled(format!("monitor: {e}"), Style::default().fg(Color::Red)),
            (None, None) => Line::from("waiting for the monitor…"),
            (None, Some(_)) => Line::from(format!(
                "predictors {}  dropped {}  lost {}",
                figures["predictors"].as_u64().unwrap_or(0),
                figures["dropped"].as_u64().unwrap_or(0),
                figures["lost"].as_u64().unwrap_or(0),
            )),
        }
    }
}

/// A number with three decimals, or `-`.
fn num(v: &Value) -> String {
    v.as_f64().map_or("-".to_owned(), |x| format!("{x:.3}"))
}

fn throughput(figures: &Value) -> Paragraph<'static> {
    let errors = figures["errors"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "none".to_owned());
    let fixed = |v: &Value, digits: usize| {
        v.as_f64()
            .map_or("-".to_owned(), |x| format!("{x:.digits$}"))
    };
    Paragraph::new(vec![
        Line::from(format!("requests/s {:>10}", fixed(&figures["rps"], 1))),
        Line::from(format!(
            "requests   {:>10}",
            figures["count"].as_u64().unwrap_or(0)
        )),
        Line::from(format!(
            "error rate {:>10}",
            fixed(&figures["error_rate"], 4)
        )),
        Line::from(format!("errors     {errors}")),
    ])
    .block(Block::default().borders(Borders::ALL).title("Throughput"))
}

fn latency(lat: &Value) -> Paragraph<'static> {
    Paragraph::new(
        ["p50", "p90", "p99", "p999", "max"]
            .iter()
            .map(|p| Line::from(format!("{p:<5} {:>12} ms", num(&lat[*p]))))
            .collect::<Vec<_>>(),
    )
    .block(Block::default().borders(Borders::ALL).title("Latency"))
}

/// Each version's requests, share (a bar) and p99, in a panel `width` wide.
fn versions(figures: &Value, width: u16) -> Paragraph<'static> {
    let counts = figures["versions"].as_object();
    let total: u64 = counts
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    let bar_width = usize::from(width.saturating_sub(34)).max(4);
    let mut lines = Vec::new();
    for (version, count) in counts.into_iter().flatten() {
        let count = count.as_u64().unwrap_or(0);
        let share = if total > 0 {
            count as f64 / total as f64
        } else {
            0.0
        };
        let filled = (share * bar_width as f64).round() as usize;
        let by = &figures["latency_ms_by_version"][version.as_str()];
        lines.push(Line::from(format!(
            "v{version:<4} {count:>8} {:>5.1}% {}{} p99 {}",
            share * 100.0,
            "█".repeat(filled),
            "·".repeat(bar_width.saturating_sub(filled)),
            num(&by["p99"]),
        )));
    }
    if lines.is_empty() {
        lines.push(Line::from("no predictions"));
    }
    Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title("Versions"))
}

/// Pending alerts in yellow, firing ones in red.
fn alerts(active: &Value) -> Paragraph<'static> {
    let line = |alert: &Value| {
        let style = if alert["state"] == "firing" {
            Style::default().fg(Color::Red)
        } else {
            Style::default().fg(Color::Yellow)
        };
        Line::styled(
            format!(
                "{} {} value {} since {}",
                alert["alert"].as_str().unwrap_or("?"),
                alert["state"].as_str().unwrap_or("?"),
                num(&alert["value"]),
                alert["active_since"].as_str().unwrap_or("?"),
            ),
            style,
        )
    };
    let mut lines: Vec<Line> = active.as_array().into_iter().flatten().map(line).collect();
    if lines.is_empty() {
        lines.push(Line::from("none"));
    }
    Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title("Alerts"))
}

/// A key the view acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    Quit,
    Switch,
}

/// Reads keys on a thread of its own (crossterm's `read` blocks) until
/// `stop` is set.
fn keys(stop: Arc<AtomicBool>) -> mpsc::UnboundedReceiver<Key> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match event::poll(Duration::from_millis(100)) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => break,
            }
            let Ok(Event::Key(key)) = event::read() else {
                continue;
            };
            if key.kind != KeyEventKind::Press {
                continue;
            }
            let k = match key.code {
                KeyCode::Char('q') | KeyCode::Esc => Some(Key::Quit),
                KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
                    Some(Key::Quit)
                }
                KeyCode::Char('w') | KeyCode::Tab => Some(Key::Switch),
                _ => None,
            };
            if let Some(k) = k {
                if tx.send(k).is_err() {
                    break;
                }
            }
        }
    });
    rx
}

/// Runs the view until `q`.
pub async fn run(nats: &NatsSettings, args: TopArgs) -> anyhow::Result<std::process::ExitCode> {
    let client = crate::connect(nats).await?;
    let subject = nats.subjects().monitor_stats;
    let mut terminal = ratatui::try_init()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut keys = keys(stop.clone());
    let mut view = View::default();
    let mut ticker = tokio::time::interval(args.interval.max(Duration::from_millis(50)));
    let result: anyhow::Result<()> = async {
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let reply = match client.request(subject.clone(), bytes::Bytes::new()).await {
                        Ok(m) => serde_json::from_slice::<Value>(&m.payload).map_err(|e| e.to_string()),
                        Err(e) => Err(crate::unavailable(e, "monitor", &subject).to_string()),
                    };
                    view.update(reply);
                }
                key = keys.recv() => match key {
                    Some(Key::Quit) | None => break,
                    Some(Key::Switch) => {
                        view.span = match view.span {
                            Scope::Window => Scope::Total,
                            Scope::Total => Scope::Window,
                        };
                    }
                },
            }
            terminal.draw(|f| view.draw(f))?;
        }
        Ok(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    ratatui::restore();
    client.drain().await.ok();
    result.map(|()| std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use serde_json::json;

    #[test]
    fn an_80_by_24_screen_shows_throughput_latency_versions_and_alerts() {
        let mut view = View::default();
        for rps in [100.0, 250.0, 1926.6] {
            view.update(Ok(json!({
                "window": {"rps": rps, "count": 699, "error_rate": 0.001,
                           "errors": {"unknown_user": 1},
                           "latency_ms": {"p50": 0.041, "p90": 0.08, "p99": 0.127, "p999": 0.9, "max": 1.2},
                           "versions": {"1": 600, "2": 99},
                           "latency_ms_by_version": {"1": {"p99": 0.12}, "2": {"p99": 0.2}}},
                "total": {"rps": 10.0, "count": 5000, "versions": {"1": 5000}, "latency_ms": {}},
                "alerts": [{"alert": "DataDrift", "state": "firing", "active_since": "2026-12-02T07:00:00Z", "value": 0.5}]
            })));
        }
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .chunks(80)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect();
        for needle in [
            "requests/s     1926.6",
            "p99",
            "0.127",
            "v1",
            "85.8%",
            "v2",
            "DataDrift firing",
            "unknown_user=1",
        ] {
            assert!(screen.contains(needle), "{needle:?} not on\n{screen}");
        }
        view.span = Scope::Total;
        terminal.draw(|f| view.draw(f)).unwrap();
        let text: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        assert!(text.contains("since the monitor started"));
        assert!(text.contains("5000"));
    }
}
