// The library: a card per adapter (GET /ui/api/adapters), filtered by base and searched by name or trigger
// word; #/library/NAME shows one card's whole story (GET /ui/api/adapters/NAME).
import { bytes, el, errorBox } from "../lib/dom.js";

function rankText(facts) {
  const counts = (value) => (typeof value === "object" ? Object.entries(value).map(([k, n]) => `${k}×${n}`).join(" ") : value);
  return `rank ${counts(facts.rank)} · alpha ${counts(facts.alpha)}`;
}

function components(card) {
  return el("ul", { class: "components" },
    Object.entries(card.components || {}).map(([name, facts]) => el("li", {},
      el("b", {}, name), ` ${rankText(facts)} · ${facts.modules} modules`,
      el("div", { class: "muted small" }, `targets: ${facts.targets.join(", ")}`))));
}

function verdicts(card) {
  return el("ul", { class: "verdicts" }, (card.verdicts || []).map((v) =>
    el("li", { class: v.complete ? "ok" : "warn", title: v.summary }, v.complete ? "✓ " : "⚠ ", v.summary)));
}

function picture(api, url, alt) {
  const img = el("img", { alt, class: "thumb" });
  api.imageUrl(url).then((src) => { img.src = src; }).catch(() => img.remove());
  return img;
}

function card(api, item) {
  if (item.error) return el("article", { class: "card broken" }, el("h3", {}, item.name), errorBox(item));
  const triggers = item.trigger_words.length ? item.trigger_words.join(", ") : "—";
  return el("article", { class: "card", dataset: { name: item.name } },
    el("h3", {}, el("a", { href: `#/library/${encodeURIComponent(item.name)}` }, item.name)),
    el("p", { class: "muted" }, `${item.base_model || "unknown base"} · ${item.family_label}`),
    el("dl", {},
      el("dt", {}, "trigger"), el("dd", {}, triggers),
      el("dt", {}, "steps"), el("dd", {}, item.steps ?? "—"),
      el("dt", {}, "images"), el("dd", {}, item.images ?? "—"),
      el("dt", {}, "created"), el("dd", {}, item.created || "—"),
      el("dt", {}, "size"), el("dd", {}, bytes(item.bytes))),
    components(item),
    verdicts(item),
    el("div", { class: "pictures" },
      item.sample_grid && picture(api, item.sample_grid, `${item.name}: last sample grid`),
      item.loss_curve && picture(api, item.loss_curve, `${item.name}: loss curve`)));
}

function matches(item, base, text) {
  if (base && (item.base_model || "unknown") !== base) return false;
  if (!text) return true;
  const words = [item.name, ...(item.trigger_words || [])].map((w) => w.toLowerCase());
  return words.some((w) => w.includes(text));
}

async function renderList(root, api) {
  const data = await api.get("/ui/api/adapters");
  document.getElementById("model").textContent = `model: ${data.model}`;
  const base = el("select", { id: "filter-base", "aria-label": "Base model" },
    el("option", { value: "" }, "all bases"), data.bases.map((b) => el("option", { value: b }, b)));
  const search = el("input", { id: "search", type: "search", placeholder: "name or trigger word" });
  const grid = el("section", { id: "cards", class: "cards" });
  const update = () => {
    const text = search.value.trim().toLowerCase();
    const shown = data.adapters.filter((item) => matches(item, base.value, text));
    grid.replaceChildren(...shown.map((item) => card(api, item)));
    if (!shown.length) grid.append(el("p", { class: "muted" }, data.adapters.length ? "No adapter matches." : "No adapters in the adapter folders yet."));
  };
  base.addEventListener("change", update);
  search.addEventListener("input", update);
  root.append(el("h1", {}, "Library"), el("div", { class: "toolbar" }, base, search), grid);
  update();
}

function table(object) {
  return el("table", { class: "facts" }, Object.entries(object || {}).map(([k, v]) =>
    el("tr", {}, el("th", {}, k), el("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v)))));
}

async function renderDetail(root, api, name) {
  const item = await api.get(`/ui/api/adapters/${encodeURIComponent(name)}`);
  const config = Object.values(item.config || {})[0] || item.config;
  root.append(
    el("p", {}, el("a", { href: "#/library" }, "← Library")),
    el("h1", {}, item.name),
    card(api, item),
    el("h2", {}, "Training configuration"),
    Object.keys(config || {}).length ? table(config) : el("p", { class: "muted" }, "This adapter carries no training configuration."),
    el("h2", {}, "Run timing (seconds)"),
    item.timing ? table(item.timing) : el("p", { class: "muted" }, "No run folder with timing.json beside this adapter."),
    item.plan && el("details", {}, el("summary", {}, "Plan"), el("pre", {}, item.plan)),
    el("h2", {}, "Training facts"), table(item.train_facts),
    item.sample_grids.length ? el("h2", {}, "Sample grids") : null,
    el("div", { class: "pictures" }, item.sample_grids.map((g) => el("figure", {}, picture(api, g.url, g.name), el("figcaption", {}, g.name)))));
}

export async function render(root, api, arg) {
  try {
    await (arg ? renderDetail(root, api, arg) : renderList(root, api));
  } catch (error) {
    root.append(errorBox(error));
  }
}
