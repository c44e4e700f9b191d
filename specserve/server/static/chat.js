// The chat page: streams from the server's own /v1/chat/completions with `speculation.trace`, so that
// every chunk says which side produced its token (an extension field OpenAI clients ignore).
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];  // the messages so far, as the API takes them
let controller = null;  // aborts the running stream
const askForKey = setupKeyBox(loadInfo);

async function loadInfo() {
  try {
    const info = await (await api("/v1/specserve/info")).json();
    $("model").textContent = info.model;
    const method = $("method");
    method.replaceChildren(...info.methods.map((m) => new Option(m, m)));
    method.value = info.methods.includes(info.speculation) ? info.speculation : "ngram";
    const k = $("k");
    k.replaceChildren(new Option("auto", "auto"));
    for (let i = 0; i <= info.k_limit; i++) k.append(new Option(String(i), String(i)));
    const rows = [
      ["target", `${info.target_backend}`],
      ["draft", info.draft ? `${info.draft_backend}: ${info.draft}` : "none (model-free methods)"],
      ["kernels", info.specserve_kernels],
      ["context", `${info.n_ctx} tokens`],
      ["CPU", info.cpu],
    ];
    if (info.auto) rows.push(["auto", info.auto]);
    $("server-info").replaceChildren(...rows.flatMap(([name, value]) => {
      const dt = document.createElement("dt");
      const dd = document.createElement("dd");
      dt.textContent = name;
      dd.textContent = value;
      return [dt, dd];
    }));
    showError("");
  } catch (err) {
    if (err.status === 401) askForKey();
    showError(err.status === 503 ? `server not ready: ${err.message}` : err.message);
    if (err.status === 503) setTimeout(loadInfo, 2000);
  }
}

function turn(who) {
  const div = document.createElement("div");
  div.className = "turn";
  div.innerHTML = `<div class="who"></div><div class="text"></div>`;
  div.querySelector(".who").textContent = who;
  $("transcript").append(div);
  return div.querySelector(".text");
}

function requestBody(prompt) {
  const speculation = { method: $("method").value, trace: true };
  const k = $("k").value;
  speculation.k = k === "auto" ? "auto" : Number(k);
  if ($("acceptance").value === "tolerance") {
    speculation.acceptance = "tolerance";
    speculation.delta = Number($("delta").value);
  }
  const body = {
    messages: [...conversation, { role: "user", content: prompt }],
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    stream: true,
    speculation,
  };
  if ($("logprobs").checked) body.logprobs = true;
  return body;
}

// Live figures of one reply, from the tokens' origins.
class ReplyStats {
  constructor() {
    this.start = performance.now();
    this.tokens = 0;
    this.windows = new Map();  // window index -> origin of its tokens
  }
  add(origin) {
    this.tokens += 1;
    if (origin.window > 0) this.windows.set(origin.window, origin);
    const windows = [...this.windows.values()];
    const drafted = windows.reduce((s, w) => s + w.drafted, 0);
    const accepted = windows.reduce((s, w) => s + w.accepted, 0);
    const seconds = (performance.now() - this.start) / 1000;
    $("tokens").textContent = String(this.tokens);
    $("tps").textContent = (this.tokens / seconds).toFixed(1);
    if (drafted > 0) {
      $("acceptance-gauge").value = accepted / drafted;
      $("acceptance-rate").textContent = `${(100 * accepted / drafted).toFixed(0)}% (${accepted}/${drafted})`;
    }
    if (origin.window > 0) {
      $("draft-ms").textContent = `${origin.draft_ms.toFixed(1)} ms`;
      $("verify-ms").textContent = `${origin.verify_ms.toFixed(1)} ms`;
    }
    drawSparkline($("k-spark"), windows.map((w) => w.drafted));
  }
}

function tokenSpan(text, origin) {
  const span = document.createElement("span");
  span.className = `tok ${origin.source}`;
  span.textContent = text;
  let title = origin.source === "cache" ? "from the response cache" : `${origin.source} token`;
  if (origin.window > 0) title += ` · window ${origin.window}: ${origin.drafted} drafted, ${origin.accepted} accepted`;
  if (origin.logprob !== null && origin.logprob !== undefined) title += ` · logprob ${origin.logprob.toFixed(3)}`;
  span.title = title;
  span.dataset.source = origin.source;
  return span;
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(prompt) {
  showError("");
  const body = requestBody(prompt);
  turn("you").textContent = prompt;
  const out = turn("assistant");
  out.parentElement.classList.add("reply");
  const stats = new ReplyStats();
  let text = "";
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      const piece = choice && choice.delta && choice.delta.content;
      if (piece) {
        const origin = (chunk.specserve && chunk.specserve.token) || { source: "target", window: 0 };
        out.append(tokenSpan(piece, origin));
        text += piece;
        stats.add(origin);
      }
      if (chunk.speculative) {
        const s = chunk.speculative;
        out.parentElement.dataset.finish = choice ? choice.finish_reason : "";
        if (s.drafted > 0) $("acceptance-rate").textContent = `${(100 * s.acceptance_rate).toFixed(0)}% (${s.accepted}/${s.drafted})`;
      }
    }
    conversation.push({ role: "user", content: prompt }, { role: "assistant", content: text });
  } catch (err) {
    if (err.name !== "AbortError") {
      if (err.status === 401) askForKey();
      showError(err.message);
      out.parentElement.dataset.finish = "error";
    } else {
      out.parentElement.dataset.finish = "stopped";
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || controller) return;
  $("prompt").value = "";
  send(prompt);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  conversation.length = 0;
  $("transcript").replaceChildren();
});
$("acceptance").addEventListener("change", () => {
  const lossy = $("acceptance").value === "tolerance";
  $("delta-box").hidden = !lossy;
  $("lossy-warning").hidden = !lossy;
});
loadInfo();
