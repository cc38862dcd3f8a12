// fewshot catalogue page: plain JavaScript, no build step. Talks to the JSON API of the same origin.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

// ------------------------------------------------------------------ access token
// Kept for this tab only (sessionStorage), sent as "Authorization: Bearer". A link may carry it
// in its fragment (#token=...), which never reaches the server; it is removed from the address bar.
const TOKEN_KEY = "fewshot-token";

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

function authHeaders() { return token() ? { Authorization: `Bearer ${token()}` } : {}; }

function takeTokenFromLink() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function showTokenState(message) {
  $("#token-state").textContent = message || (token() ? "token set for this tab" : "no token: classify only (if reads are open)");
}

function saveToken(event) {
  event.preventDefault();
  const value = $("#token").value.trim();
  if (value) sessionStorage.setItem(TOKEN_KEY, value); else sessionStorage.removeItem(TOKEN_KEY);
  $("#token").value = "";
  showTokenState();
  refreshStatus();
  loadArticles();
}

// Thumbnails load through fetch, so that the token goes along when reads need one.
function authImg(url, attrs) {
  const img = el("img", attrs);
  fetch(url, { headers: authHeaders() })
    .then((r) => (r.ok ? r.blob() : null))
    .then((b) => { if (b) img.src = URL.createObjectURL(b); })
    .catch(() => {});
  return img;
}

async function api(method, url, body) {
  let response;
  try {
    response = await fetch(url, { method, body, headers: authHeaders() });
  } catch (err) {
    throw new Error(`the service cannot be reached (${err.message})`);
  }
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON */ }
  if (response.status === 401) showTokenState("this needs the service's token: paste it above");
  if (!response.ok) {
    const msg = data && data.message ? data.message : `${response.status} ${response.statusText}`;
    const hint = data && data.hint ? ` (${data.hint})` : "";
    throw new Error(msg + hint);
  }
  return data;
}

function showError(box, message) {
  box.textContent = message;
  box.hidden = !message;
}

async function refreshStatus() {
  try {
    const h = await api("GET", "/health");
    $("#status").textContent = `${h.articles} articles, ${h.images} catalogue images · ${h.backbone} at ${h.image_size} px`;
  } catch (err) {
    $("#status").textContent = err.message;
  }
}

// ------------------------------------------------------------------ classify
let previewUrl = null;

async function classify(event) {
  event.preventDefault();
  const file = $("#photo").files[0];
  const errorBox = $("#classify-error");
  if (!file) { showError(errorBox, "choose a photo first"); return; }
  const button = $("#classify-btn");
  button.disabled = true;
  button.textContent = "Classifying...";
  showError(errorBox, "");
  const form = new FormData();
  form.append("file", file);
  const params = new URLSearchParams({ top_k: $("#topk").value || "5", mode: $("#mode").value });
  try {
    const res = await api("POST", `/classify?${params}`, form);
    renderResults(res, file);
  } catch (err) {
    $("#results").hidden = true;
    showError(errorBox, err.message);
  } finally {
    button.disabled = false;
    button.textContent = "Classify";
  }
}

function renderResults(res, file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("#query-preview").src = previewUrl;
  const top = res.predictions[0];
  const answer = res.answer;
  const unknown = answer && answer.unknown;
  $("#top1").textContent = unknown ? (answer.brand ? `unknown article, brand ${answer.brand}` : "unknown: none of these")
    : (top ? top.label : "no match");
  $("#top1").dataset.label = unknown ? "unknown" : (top ? top.label : "");
  $("#top1").classList.toggle("unknown", Boolean(unknown));
  const rule = res.reject && res.reject.threshold !== null
    ? ` · ${answer.open_score} score ${answer.score.toFixed(3)} vs threshold ${res.reject.threshold.toFixed(3)}` +
      (res.reject.target_far ? ` (calibrated for ${(res.reject.target_far * 100).toFixed(0)}% false accepts)` : "")
    : " · no reject threshold";
  $("#timing").textContent = `${res.mode} scores · ${res.num_articles} articles · ${res.elapsed_ms} ms${rule}`;
  const list = $("#predictions");
  list.replaceChildren();
  res.predictions.forEach((p, i) => {
    const pct = Math.max(0, Math.min(100, p.score * 100));
    list.append(el("li", { class: "prediction", "data-rank": String(i + 1), "data-label": p.label },
      el("span", { class: "rank", text: `${i + 1}.` }),
      authImg(p.image_url, { alt: p.label }),
      el("div", {},
        el("div", { class: "label", text: p.label }),
        el("div", { class: "group", text: `${p.group || "no group"} · ${p.num_images} catalogue image${p.num_images === 1 ? "" : "s"}` })),
      el("div", {},
        el("div", { class: "bar" }, el("div", { style: `width:${pct.toFixed(1)}%` })),
        el("div", { class: "score", text: `score ${p.score.toFixed(3)}` }))));
  });
  const grid = $("#neighbors");
  grid.replaceChildren();
  for (const n of res.neighbors) {
    grid.append(el("figure", { class: "neighbor", "data-label": n.label },
      authImg(n.image_url, { alt: n.label, title: n.name }),
      el("figcaption", { text: `${n.label} ${n.score.toFixed(3)}` })));
  }
  $("#results").hidden = false;
}

// ------------------------------------------------------------------ enrol / articles
let articles = [];

async function enrol(event) {
  event.preventDefault();
  const status = $("#enrol-status");
  const button = $("#enrol-btn");
  const form = new FormData();
  form.append("label", $("#enrol-label").value);
  form.append("group", $("#enrol-group").value);
  for (const f of $("#enrol-files").files) form.append("files", f);
  button.disabled = true;
  status.className = "";
  status.textContent = "enrolling...";
  try {
    const res = await api("POST", "/articles", form);
    status.className = "ok";
    status.textContent = `${res.created ? "enrolled" : "added photos to"} '${res.label}': ${res.added} photo(s), ${res.num_images} in all. The catalogue has ${res.articles} articles.`;
    const warnings = res.warnings || [];
    if (warnings.length) {
      status.append(el("ul", { class: "warnings" },
        ...warnings.map((w) => el("li", { class: "warning", "data-kind": w.kind, text: `warning: ${w.message}` }))));
    }
    $("#enrol-form").reset();
    await Promise.all([loadArticles(), refreshStatus()]);
  } catch (err) {
    status.className = "error";
    status.textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

async function removeArticle(label) {
  if (!window.confirm(`Delete '${label}' and its images from the catalogue?`)) return;
  const status = $("#enrol-status");
  try {
    const res = await api("DELETE", `/articles/${encodeURIComponent(label)}`);
    status.className = "ok";
    status.textContent = `deleted '${res.deleted}' (${res.images_removed} images)`;
    await Promise.all([loadArticles(), refreshStatus()]);
  } catch (err) {
    status.className = "error";
    status.textContent = err.message;
  }
}

async function loadArticles() {
  try {
    const res = await api("GET", "/articles");
    articles = res.articles;
    renderArticles();
  } catch (err) {
    $("#enrol-status").className = "error";
    $("#enrol-status").textContent = err.message;
  }
}

function renderArticles() {
  const filter = $("#article-filter").value.trim().toLowerCase();
  const body = $("#articles tbody");
  body.replaceChildren();
  const shown = articles.filter((a) => !filter || `${a.label} ${a.group || ""}`.toLowerCase().includes(filter));
  $("#article-count").textContent = `(${articles.length})`;
  for (const a of shown) {
    const del = el("button", { class: "delete", type: "button", title: `delete ${a.label}`, text: "delete" });
    del.addEventListener("click", () => removeArticle(a.label));
    body.append(el("tr", { "data-label": a.label },
      el("td", {}, authImg(a.image_url.replace("size=160", "size=64"), { alt: "" })),
      el("td", { text: a.label }), el("td", { text: a.group || "" }),
      el("td", { text: String(a.num_images) }), el("td", {}, del)));
  }
}

// ------------------------------------------------------------------ wiring
function setupDrop() {
  const drop = $(".file-drop");
  const input = $("#photo");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) {
      input.files = e.dataTransfer.files;
      input.dispatchEvent(new Event("change"));
    }
  });
  input.addEventListener("change", () => {
    const f = input.files[0];
    drop.querySelector("span").textContent = f ? f.name : "Choose or drop a photo";
  });
}

takeTokenFromLink();
showTokenState();
$("#token-form").addEventListener("submit", saveToken);
$("#classify-form").addEventListener("submit", classify);
$("#enrol-form").addEventListener("submit", enrol);
$("#article-filter").addEventListener("input", renderArticles);
setupDrop();
refreshStatus();
loadArticles();
