// The console's only script (an ES module, no build step): click a table
// header to sort its rows; on the live page, follow the monitor's figures
// from /v1/stats/stream (server-sent events).

function cellValue(row, index) {
  const cell = row.cells[index];
  if (!cell) return "";
  return cell.dataset.sort ?? cell.textContent.trim();
}

function compare(a, b) {
  const x = parseFloat(a), y = parseFloat(b);
  const numeric = a !== "" && b !== "" && !isNaN(x) && !isNaN(y) && /^[-+.\d]/.test(a) && /^[-+.\d]/.test(b);
  if (a === "" || a === "–") return (b === "" || b === "–") ? 0 : 1;
  if (b === "" || b === "–") return -1;
  return numeric ? x - y : a.localeCompare(b);
}

function makeSortable(table) {
  const headers = table.tHead ? Array.from(table.tHead.rows[0].cells) : [];
  headers.forEach((th, index) => {
    th.addEventListener("click", () => {
      const descending = th.classList.contains("asc");
      headers.forEach((h) => h.classList.remove("asc", "desc"));
      th.classList.add(descending ? "desc" : "asc");
      const body = table.tBodies[0];
      const rows = Array.from(body.rows);
      rows.sort((r1, r2) => {
        const order = compare(cellValue(r1, index), cellValue(r2, index));
        return descending ? -order : order;
      });
      rows.forEach((r) => body.appendChild(r));
    });
  });
}

function fmt(value, digits = 3) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function sparkline(svg, values) {
  const w = Number(svg.getAttribute("width")), h = Number(svg.getAttribute("height"));
  const max = Math.max(1, ...values);
  const step = values.length > 1 ? w / (values.length - 1) : w;
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(h - (v / max) * (h - 2) - 1).toFixed(1)}`);
  svg.innerHTML = `<polyline fill="none" stroke="#2d6cdf" stroke-width="1.5" points="${points.join(" ")}"/>`;
}

function follow() {
  const state = document.getElementById("live-state");
  const history = [];
  const source = new EventSource("/v1/stats/stream");
  source.addEventListener("stats", (event) => {
    const stats = JSON.parse(event.data);
    const w = stats.window ?? {};
    const t = stats.total ?? {};
    state.textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.updates = String(Number(document.body.dataset.updates ?? 0) + 1);
    const rps = typeof w.rps === "number" ? w.rps : 0;
    history.push(rps);
    if (history.length > 120) history.shift();
    document.getElementById("rps").textContent = fmt(rps, 1);
    document.getElementById("p50").textContent = `${fmt(w.latency_ms?.p50)} ms`;
    document.getElementById("p99").textContent = `${fmt(w.latency_ms?.p99)} ms`;
    document.getElementById("error-rate").textContent = fmt(w.error_rate, 4);
    document.getElementById("count").textContent = String(w.count ?? 0);
    const drift = w.drift;
    document.getElementById("drift").textContent = drift ? `${fmt(drift.max)} (${drift.max_of ?? ""})` : "–";
    sparkline(document.getElementById("spark"), history);
    const versions = w.versions ?? {};
    const total = Object.values(versions).reduce((a, b) => a + b, 0);
    const body = document.querySelector("#versions tbody");
    body.innerHTML = "";
    for (const [version, count] of Object.entries(versions)) {
      const lat = (w.latency_ms_by_version ?? {})[version] ?? {};
      const row = body.insertRow();
      for (const text of [`v${version}`, String(count), total ? `${(100 * count / total).toFixed(1)}%` : "–", fmt(lat.p50), fmt(lat.p99)]) {
        row.insertCell().textContent = text;
      }
    }
    const alerts = document.getElementById("alerts");
    alerts.innerHTML = "";
    for (const alert of stats.alerts ?? []) {
      const li = document.createElement("li");
      li.textContent = `${alert.alert} ${alert.state}, value ${fmt(alert.value)}, since ${alert.active_since ?? "?"}`;
      alerts.appendChild(li);
    }
    if (!alerts.children.length) alerts.innerHTML = "<li>none</li>";
    document.getElementById("total").textContent =
      `${t.count ?? 0} requests, p99 ${fmt(t.latency_ms?.p99)} ms, error rate ${fmt(t.error_rate, 4)}`;
  });
  source.addEventListener("error", (event) => {
    if (event.data) {
      const e = JSON.parse(event.data);
      state.textContent = `monitor: ${e.error?.message ?? "unavailable"}`;
    }
  });
}

document.querySelectorAll("table.sortable").forEach(makeSortable);
if (document.getElementById("live-state")) follow();
