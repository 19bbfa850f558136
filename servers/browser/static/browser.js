// The feature browser page: talks only to the server's JSON API (see servers/browser/routes.py) and to the
// ordinary /v1/chat/completions for "try it", so what it shows is what the API returns. Data are inserted as text,
// never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { index: null, feature: null, model: null, indexes: {} };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const resp = await fetch(path, init);
  const data = await resp.json();
  if (!resp.ok) throw new Error((data.error && data.error.message) || resp.statusText);
  return data;
}

function status(msg) { $("status").textContent = msg || ""; }

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function fmt(x, digits = 3) { return Number(x).toPrecision(digits); }

function featureItem(row, extra) {
  const li = el("li");
  li.dataset.feature = row.feature;
  li.append(el("span", "#" + row.feature, "fid"), el("span", row.explanation || "(no explanation)", "expl"));
  li.append(el("span", extra !== undefined ? extra : "freq " + fmt(row.frequency), "freq"));
  li.addEventListener("click", () => showFeature(row.feature));
  return li;
}

async function loadIndexes() {
  const [health, list] = [await fetch("/health").then((r) => r.json()), await api("/v1/features/indexes")];
  state.model = health.model;
  const sel = $("index-select");
  sel.replaceChildren();
  for (const ix of list.data) {
    state.indexes[ix.name] = ix;
    sel.append(el("option", ix.name));
  }
  if (!list.data.length) { status("no feature index served (start the server with --features DIR)"); return; }
  selectIndex(list.data[0].name);
  await listPresets();
}

function selectIndex(name) {
  state.index = state.indexes[name];
  const ix = state.index;
  $("index-info").textContent = `${ix.d_sae} latents at ${ix.site} of layer ${ix.layer}; ${ix.n_explained} explained`;
  search();
}

async function search() {
  status("");
  try {
    const q = encodeURIComponent($("q").value);
    const data = await api(`/v1/features/${encodeURIComponent(state.index.name)}/search?q=${q}&limit=50`);
    $("results").replaceChildren(...data.data.map((r) => featureItem(r)));
    if (!data.data.length) $("results").append(el("li", "no match"));
  } catch (e) { status(e.message); }
}

function histogramSvg(h) {
  const ns = "http://www.w3.org/2000/svg", W = 360, H = 80, n = h.counts.length;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 16);
  const max = Math.max(1, ...h.counts);
  h.counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect");
    const bh = (c / max) * H;
    r.setAttribute("x", (i * W) / n); r.setAttribute("width", Math.max(1, W / n - 1));
    r.setAttribute("y", H - bh); r.setAttribute("height", bh);
    const t = document.createElementNS(ns, "title");
    t.textContent = `${fmt(h.edges[i])}..${fmt(h.edges[i + 1])}: ${c}`;
    r.append(t); svg.append(r);
  });
  for (const [x, anchor, v] of [[0, "start", h.edges[0]], [W, "end", h.edges[n]]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 13); t.setAttribute("font-size", "11"); t.setAttribute("text-anchor", anchor);
    t.textContent = fmt(v, 2); svg.append(t);
  }
  return svg;
}

function contextDiv(ctx, max) {
  const div = el("div", null, "ctx");
  ctx.tokens.forEach((tok, i) => {
    const a = ctx.activations[i] || 0;
    const s = el("span", tok, "tok");
    s.style.background = `rgba(255, 140, 0, ${max > 0 ? Math.min(1, Math.max(0, a / max)) : 0})`;
    s.title = fmt(a);
    div.append(s);
  });
  return div;
}

function vocabList(pairs) { return pairs.map(([tok, v]) => el("li", `${JSON.stringify(tok)} ${fmt(v)}`)); }

async function showFeature(f) {
  status("");
  try {
    const d = await api(`/v1/features/${encodeURIComponent(state.index.name)}/${f}`);
    state.feature = f;
    document.querySelectorAll("#results li").forEach((li) => li.classList.toggle("selected", li.dataset.feature == f));
    $("detail").hidden = false;
    $("detail-title").textContent = `Feature ${f}`;
    const ex = d.explanation;
    $("detail-explanation").textContent = ex
      ? `${ex.explanation} (detection ${ex.detection ?? "–"}, fuzzing ${ex.fuzzing ?? "–"}; ${ex.explainer})`
      : "(no explanation)";
    $("detail-stats").textContent =
      `frequency ${fmt(d.frequency)} · mean ${fmt(d.mean_activation)} · max ${fmt(d.max_activation)}`;
    $("histogram").replaceChildren(histogramSvg(d.histogram));
    $("contexts").replaceChildren(...d.top_contexts.map((c) => contextDiv(c, d.max_activation)));
    $("vocab-top").replaceChildren(...vocabList(d.vocab_top));
    $("vocab-bottom").replaceChildren(...vocabList(d.vocab_bottom));
    $("preset-name").value = `${state.index.name}_f${f}`;
  } catch (e) { status(e.message); }
}

// The steering of "try it" and "save as preset": one SAE edit on the chosen latent at the index's own site.
function steering() {
  const ix = state.index, mode = $("try-mode").value;
  const value = Number($("try-strength").value);
  return {
    interventions: [{
      op: "sae", layer: ix.layer, site: ix.site, sae: ix.sae,
      edits: [{ feature: state.feature, mode: mode === "clamp" ? "set" : "add", value }],
    }],
  };
}

function chatBody(steer) {
  return {
    model: state.model,
    messages: [{ role: "user", content: $("try-prompt").value }],
    max_tokens: Number($("try-max-tokens").value),
    temperature: 0,
    steering: steer,
  };
}

async function tryIt() {
  status("");
  $("out-plain").textContent = $("out-steered").textContent = "…";
  try {
    const [plain, steered] = await Promise.all([
      api("/v1/chat/completions", chatBody([])),
      api("/v1/chat/completions", chatBody(steering())),
    ]);
    $("out-plain").textContent = plain.choices[0].message.content;
    $("out-steered").textContent = steered.choices[0].message.content;
    document.body.dataset.generated = String(Number(document.body.dataset.generated || 0) + 1);
  } catch (e) {
    $("out-plain").textContent = $("out-steered").textContent = "";
    status(e.message);
  }
}

async function listPresets() {
  const data = await api("/v1/steering/presets");
  $("preset-list").replaceChildren(...data.data.map((p) => el("li", `${p.name}: ${p.description}`)));
}

async function savePreset() {
  const f = state.feature, mode = $("try-mode").value, v = $("try-strength").value;
  const body = {
    name: $("preset-name").value.trim(),
    description: $("preset-desc").value.trim() || `${mode} feature ${f} of ${state.index.name} at ${v}`,
    steering: steering(),
    overwrite: $("preset-overwrite").checked,
  };
  try {
    const saved = await api("/v1/steering/presets", body);
    $("preset-status").textContent = `saved preset ${saved.name}`;
    await listPresets();
  } catch (e) { $("preset-status").textContent = e.message; }
}

async function alignFeatures() {
  status("");
  const vector = $("align-vector").value.trim(), prompt = $("align-prompt").value.trim();
  const body = vector ? { vector } : { prompt };
  try {
    const data = await api(`/v1/features/${encodeURIComponent(state.index.name)}/align`, body);
    $("align-results").replaceChildren(...data.data.map((r) => featureItem(r, "cos " + fmt(r.cosine))));
  } catch (e) { status(e.message); }
}

function on(id, fn) {
  $(id).addEventListener("submit", (ev) => { ev.preventDefault(); fn(); });
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("steerlib-key") || "";
  $("api-key").addEventListener("change", () => { localStorage.setItem("steerlib-key", $("api-key").value); loadIndexes(); });
  $("index-select").addEventListener("change", (ev) => selectIndex(ev.target.value));
  on("search-form", search);
  on("try-form", tryIt);
  on("preset-form", savePreset);
  on("align-form", alignFeatures);
  loadIndexes().catch((e) => status(e.message));
});
