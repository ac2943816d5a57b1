// lexvla search page: plain JS, no build step. All data goes into the DOM as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let lastTextQuery = null; // the heat map in the detail view is for the last *text* query
let searchSeq = 0; // only the latest search may update the page (responses can arrive out of order)

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") node.textContent = v;
    else if (k === "style") Object.assign(node.style, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.appendChild(c);
  return node;
}

function setStatus(msg, isError = false) {
  $("status").textContent = msg;
  $("status").classList.toggle("error", isError);
}

async function api(url, options) {
  const res = await fetch(url, options);
  let body = null;
  try { body = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : res.statusText;
    throw new Error(`${res.status}: ${detail}`);
  }
  return body;
}

// 3 decimals for ordinary weights, 2 significant digits for tiny ones (random test models)
const fmt = (v) => (Math.abs(v) >= 0.01 ? v.toFixed(3) : v.toPrecision(2));

function wordList(words, key) {
  const max = Math.max(...words.map((w) => w[key]), 1e-12);
  return el("ul", { class: "words" }, words.map((w) => el("li", { title: `${w.word}: query ${w.query_weight.toFixed(4)} x image ${w.doc_weight.toFixed(4)}` }, [
    el("span", { class: "w", text: w.word }),
    el("span", { class: "bar", style: { width: `${(100 * w[key]) / max}%` } }),
    el("span", { class: "c", text: fmt(w[key]) }),
  ])));
}

function renderResults(data) {
  const results = $("results");
  results.replaceChildren();
  const chips = $("query-words");
  chips.replaceChildren(el("span", { class: "note", text: "query words:" }),
    ...data.query_words.slice(0, 12).map((w) => el("span", { class: "chip", text: `${w.word} ${fmt(w.weight)}` })));
  chips.hidden = data.query_words.length === 0;
  for (const hit of data.hits) {
    const tile = el("div", { class: "tile", tabindex: "0", "data-id": hit.id, title: "click for the explanation" }, [
      el("img", { src: hit.image_url, alt: hit.id, loading: "lazy" }),
      el("div", { class: "meta" }, [
        el("div", { class: "head" }, [
          el("span", { class: "id", text: `#${hit.rank} ${hit.id}` }),
          el("span", { class: "score", text: hit.score.toFixed(4) }),
        ]),
        wordList(hit.words, "contribution"),
        el("div", { class: "more note", text: hit.n_shared_words > hit.words.length
          ? `top ${hit.words.length} of ${hit.n_shared_words} shared words` : `${hit.n_shared_words} shared words` }),
      ]),
    ]);
    tile.addEventListener("click", () => openDetail(hit.id));
    tile.addEventListener("keydown", (e) => { if (e.key === "Enter") openDetail(hit.id); });
    results.appendChild(tile);
  }
  const caps = $("caption-list");
  caps.replaceChildren(...data.captions.map((c) => el("li", {}, [
    el("span", { text: `${c.text}  ` }),
    el("span", { class: "note", text: `${c.score.toFixed(4)}: ${c.words.map((w) => w.word).join(", ")}` }),
  ])));
  $("captions").hidden = data.captions.length === 0;
  const what = data.kind === "text" ? `"${data.query}"` : `image ${data.query}`;
  setStatus(`${data.hits.length} of ${data.items} images for ${what} in ${data.took_ms.toFixed(1)} ms; ` +
            "each tile lists the shared words by contribution (query weight x image weight), which sum to its score.");
}

async function searchText(q) {
  q = q.trim();
  if (!q) return;
  setStatus("searching...");
  const seq = ++searchSeq;
  try {
    const data = await api(`/api/search?${new URLSearchParams({ q })}`);
    if (seq !== searchSeq) return;
    lastTextQuery = q;
    history.replaceState(null, "", `?${new URLSearchParams({ q })}`);
    renderResults(data);
  } catch (err) { if (seq === searchSeq) setStatus(err.message, true); }
}

async function searchImage(file) {
  setStatus(`searching by image ${file.name}...`);
  const form = new FormData();
  form.append("file", file);
  const seq = ++searchSeq;
  try {
    const data = await api("/api/search/image", { method: "POST", body: form });
    if (seq !== searchSeq) return;
    lastTextQuery = null;
    renderResults(data);
  } catch (err) { if (seq === searchSeq) setStatus(err.message, true); }
}

let detailSeq = 0;

async function openDetail(id) {
  const seq = ++detailSeq;
  const params = { id };
  if (lastTextQuery) params.q = lastTextQuery;
  $("detail-title").textContent = id;
  $("detail-summary").textContent = "computing the explanation...";
  for (const img of ["detail-image", "detail-wordcloud", "detail-patches", "detail-heatmap"]) $(img).removeAttribute("src");
  $("detail-words").replaceChildren();
  $("heatmap-figure").hidden = true;
  $("detail").hidden = false;
  try {
    const ex = await api(`/api/explain?${new URLSearchParams(params)}`);
    if (seq !== detailSeq) return; // another image was opened meanwhile
    $("detail-image").src = ex.image_url;
    $("detail-wordcloud").src = ex.wordcloud_url;
    $("detail-patches").src = ex.patches_url;
    $("detail-summary").textContent = `${ex.active_words} active words; patch grid ${ex.grid[0]}x${ex.grid[1]}; ` +
      `top words: ${ex.words.slice(0, 10).map((w) => w.word).join(", ")}`;
    if (ex.query) {
      $("detail-heatmap").src = ex.query.heatmap_url;
      $("heatmap-caption").textContent = `which patches "${ex.query.text}" lights up (score ${ex.query.score.toFixed(4)})`;
      $("heatmap-figure").hidden = false;
      const rows = ex.query.shared_words.map((w) => el("tr", {}, [el("td", { text: w.word }), el("td", { class: "num", text: w.weight.toFixed(4) })]));
      $("detail-words").replaceChildren(el("table", { id: "shared-words" }, [
        el("thead", {}, [el("tr", {}, [el("th", { text: "shared word" }), el("th", { text: "image x query" })])]),
        el("tbody", {}, rows)]));
    }
  } catch (err) { if (seq === detailSeq) $("detail-summary").textContent = err.message; }
}

function closeDetail() { $("detail").hidden = true; }

$("search-form").addEventListener("submit", (e) => { e.preventDefault(); searchText($("q").value); });
$("upload").addEventListener("change", (e) => { if (e.target.files.length) searchImage(e.target.files[0]); });
$("close").addEventListener("click", closeDetail);
$("detail").addEventListener("click", (e) => { if (e.target === $("detail")) closeDetail(); });
document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });

api("/api/info").then((info) => {
  $("info").textContent = `${info.items} images, model ${info.model}, ${info.vocabulary} words, backend ${info.backend}`;
}).catch((err) => setStatus(err.message, true));

const initial = new URLSearchParams(location.search).get("q");
if (initial) { $("q").value = initial; searchText(initial); }
