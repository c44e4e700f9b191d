// The operator's view: polls the server's own /metrics (Prometheus text) and keeps a few minutes of history.
"use strict";

const POLL_MS = 2000;
const HISTORY = 150;  // polls kept: 5 minutes
const el = (id) => document.getElementById(id);
const askForKey = setupKeyBox(poll);
const past = [];  // {drafted, accepted, generated, t} per poll
const acceptanceHistory = [];
const tpsHistory = [];

// Prometheus text format: name{labels} value, one sample per line.
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] || "").matchAll(/(\w+)="([^"]*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

function total(samples, name, filter = () => true) {
  return samples.filter((s) => s.name === name && filter(s.labels)).reduce((sum, s) => sum + s.value, 0);
}

function render(samples) {
  const drafted = total(samples, "specserve_drafted_tokens_total");
  const accepted = total(samples, "specserve_accepted_tokens_total");
  const generated = total(samples, "specserve_generated_tokens_total");
  const now = performance.now() / 1000;
  const previous = past[past.length - 1];
  past.push({ drafted, accepted, generated, t: now });
  if (past.length > HISTORY) past.shift();
  if (previous) {
    const d = drafted - previous.drafted;
    acceptanceHistory.push(d > 0 ? (accepted - previous.accepted) / d : 0);
    tpsHistory.push((generated - previous.generated) / (now - previous.t));
    if (acceptanceHistory.length > HISTORY) acceptanceHistory.shift();
    if (tpsHistory.length > HISTORY) tpsHistory.shift();
  }
  el("m-tps").textContent = total(samples, "specserve_tokens_per_second").toFixed(1);
  el("m-acceptance").textContent = `${(100 * total(samples, "specserve_acceptance_rate")).toFixed(0)}%`;
  el("m-active").textContent = String(total(samples, "specserve_active_sequences"));
  el("m-queue").textContent = String(total(samples, "specserve_queue_depth"));
  el("m-generated").textContent = String(generated);
  const byStatus = (first) => total(samples, "specserve_requests_total", (l) => (l.status || "").startsWith(first));
  el("m-requests").textContent = `${byStatus("2")} / ${byStatus("4")} / ${byStatus("5")}`;
  el("m-cache").textContent =
    `${total(samples, "specserve_cache_hits_total")} / ${total(samples, "specserve_cache_misses_total")}`;
  const mean = (name) => {
    const count = total(samples, `${name}_count`);
    return count ? (total(samples, `${name}_sum`) / count).toFixed(1) : "–";
  };
  el("m-latency").textContent =
    `${mean("specserve_draft_latency_ms")} / ${mean("specserve_verifier_latency_ms")} ms`;
  drawSparkline(el("acceptance-history"), acceptanceHistory, 1);
  drawSparkline(el("tps-history"), tpsHistory);
  el("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function poll() {
  try {
    const text = await (await api("/metrics")).text();
    render(parseMetrics(text));
    showError("");
  } catch (err) {
    if (err.status === 401) {
      askForKey();
      showError(err.message);
      return;  // polling resumes once a key is given
    }
    showError(`cannot read /metrics: ${err.message}`);
  }
  setTimeout(poll, POLL_MS);
}
poll();
