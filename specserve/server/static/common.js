// Shared by the chat page and the dashboard: the API key (kept in this tab's sessionStorage only) and
// requests to the server that turn an OpenAI-style error body into a message.
"use strict";

const KEY_ITEM = "specserve-api-key";

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) throw await errorOf(response);
  return response;
}

// The API key box and the error line, which both pages have, in their #notices element.
document.getElementById("notices").innerHTML = `
  <div id="key-box" hidden>
    <label>API key <input id="api-key" type="password" autocomplete="off" placeholder="sk-…"></label>
    <button id="key-save">use</button>
    <span class="muted">kept in this tab only</span>
  </div>
  <div id="error" role="alert" hidden></div>`;

// Shows the key box when the server wants a key; `onKey` runs after the user gives one.
function setupKeyBox(onKey) {
  const box = document.getElementById("key-box");
  const input = document.getElementById("api-key");
  document.getElementById("key-save").addEventListener("click", () => {
    sessionStorage.setItem(KEY_ITEM, input.value.trim());
    box.hidden = true;
    onKey();
  });
  return () => { box.hidden = false; input.focus(); };
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

function drawSparkline(canvas, values, max) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!values.length) return;
  const top = Math.max(max || 0, ...values, 1);
  const step = canvas.width / Math.max(values.length - 1, 1);
  ctx.strokeStyle = "#2f6fde";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = i * step;
    const y = canvas.height - 2 - (v / top) * (canvas.height - 4);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}
