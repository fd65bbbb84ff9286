// The operations console: fetches server-rendered fragments with the admin key in the
// X-API-Key header (never in a URL or cookie), swaps them in, refreshes them every few
// seconds, and sends the row buttons to the JSON API. No framework, no build step.
"use strict";

const KEY = "streamsvc.console.key";
const EVERY_MS = 5000;
const view = { window: "", filters: new URLSearchParams(), cursor: "" };
let timer = 0;

const $ = (selector) => document.querySelector(selector);

function headers() {
  const key = sessionStorage.getItem(KEY);
  return key ? { "X-API-Key": key } : {};
}

async function problemOf(response) {
  try {
    const problem = await response.json();
    return problem.detail || problem.title || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function partUrl(part) {
  const query = new URLSearchParams();
  if (part === "overview" && view.window) query.set("window", view.window);
  if (part === "operations") {
    for (const [name, value] of view.filters) if (value.trim()) query.set(name, value.trim());
    if (view.cursor) query.set("cursor", view.cursor);
  }
  const search = query.toString();
  return `/console/parts/${part}${search ? `?${search}` : ""}`;
}

// Load one fragment into its place; false when the key was refused (the login shows why).
async function load(element) {
  const response = await fetch(partUrl(element.dataset.part), {
    headers: headers(), cache: "no-store", credentials: "omit",
  });
  if (response.status === 401 || response.status === 403) {
    askForKey(await problemOf(response));
    return false;
  }
  if (!response.ok) {
    element.replaceChildren(Object.assign(document.createElement("p"), {
      className: "problem", textContent: await problemOf(response),
    }));
    return true;
  }
  element.innerHTML = await response.text();  // rendered and escaped by the server
  return true;
}

async function refresh() {
  clearTimeout(timer);
  try {
    const parts = [...document.querySelectorAll("[data-part]")];
    const loaded = await Promise.all(parts.map(load));
    if (loaded.every(Boolean)) {
      $("#console").hidden = false;
      $("#live").textContent = `updated ${new Date().toLocaleTimeString()}`;
      timer = setTimeout(refresh, EVERY_MS);
    }
  } catch (error) {
    $("#live").textContent = `service unreachable (${error.message}); retrying`;
    timer = setTimeout(refresh, EVERY_MS);
  }
}

function askForKey(reason) {
  clearTimeout(timer);
  $("#console").hidden = true;
  $("#login").hidden = false;
  $("#login-reason").textContent = reason;
  $("#live").textContent = "needs an admin key";
  $("#key").focus();
}

function flash(text, bad) {
  const note = $("#flash");
  note.textContent = text;
  note.className = bad ? "flash problem" : "flash";
  note.hidden = false;
}

// The row and type buttons: the same JSON API routes every client uses.
const ACTIONS = {
  retry: (id) => ["POST", `/api/operations/${encodeURIComponent(id)}/retry`],
  cancel: (id) => ["DELETE", `/api/operations/${encodeURIComponent(id)}`],
  pause: (type) => ["POST", `/api/types/${encodeURIComponent(type)}/pause`],
  resume: (type) => ["POST", `/api/types/${encodeURIComponent(type)}/resume`],
};

async function act(action, subject, button) {
  const [method, url] = ACTIONS[action](subject);
  if (button) button.disabled = true;
  const response = await fetch(url, { method, headers: headers(), credentials: "omit" });
  if (response.ok) {
    const done = await response.json();
    flash(`${action}: ${subject}${done.status ? ` is ${done.status}` : ""}`, false);
  } else {
    flash(`${action} ${subject}: ${await problemOf(response)}`, true);
  }
  await refresh();
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const action = button.dataset.action;
  if (action === "page" || action === "first") {
    view.cursor = action === "page" ? button.dataset.cursor : "";
    refresh();
  } else if (action in ACTIONS) {
    act(action, button.dataset.id || button.dataset.type, button);
  }
});

document.addEventListener("DOMContentLoaded", () => {
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("#key").value.trim());
    $("#key").value = "";
    $("#login").hidden = true;
    refresh();
  });
  $("#forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    askForKey("Key forgotten.");
  });
  $("#window").addEventListener("change", (event) => {
    view.window = event.target.value;
    refresh();
  });
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    view.filters = new URLSearchParams(new FormData(event.target));
    view.cursor = "";
    refresh();
  });
  $("#filters").addEventListener("reset", () => {
    view.filters = new URLSearchParams();
    view.cursor = "";
    setTimeout(refresh);
  });
  $("#pause-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = event.target.elements.operationType;
    if (input.value.trim()) act("pause", input.value.trim(), null);
    input.value = "";
  });
  refresh();
});
