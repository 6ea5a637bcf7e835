// The Runs page: every run folder in the adapter folders (GET /ui/api/runs), newest first; #/runs/NAME
// shows one run: its plan, time breakdown, loss and validation curves (SVG drawn from loss.csv's rows),
// the gradient heat map when the run wrote one, the sample grids by step and its configuration.
import { el, errorBox } from "../lib/dom.js";
import { lossCurve } from "../lib/curve.js";

const API = "/ui/api/runs";

function picture(api, run, file, alt) {
  const img = el("img", { class: "thumb", alt });
  api.imageUrl(`${API}/${encodeURIComponent(run)}/files/${file}`).then((src) => { img.src = src; }).catch(() => img.remove());
  return img;
}

function runCard(api, run) {
  const link = el("a", { href: `#/runs/${encodeURIComponent(run.name)}` }, run.name);
  return el("article", { class: "card run", dataset: { name: run.name } },
    el("h3", {}, link),
    el("p", { class: "muted" }, `${run.steps} steps logged · ${run.adapter ? "adapter written" : "no adapter (unfinished)"}`),
    el("p", { class: "muted small" }, `last change ${new Date(run.modified * 1000).toLocaleString()}`),
    run.last_sample ? el("div", { class: "pictures" }, picture(api, run.name, `samples/${run.last_sample}`, "newest samples")) : null);
}

function timingTable(timing) {
  const entries = Object.entries(timing).filter(([, value]) => typeof value === "number");
  if (!entries.length) return el("p", { class: "muted" }, "No time breakdown (the run has not ended).");
  const total = timing.total || 1;
  return el("table", { class: "facts", id: "timing" }, entries.map(([phase, seconds]) =>
    el("tr", {}, el("th", {}, phase), el("td", {}, `${seconds.toFixed(1)} s`),
      el("td", {}, phase === "total" ? "" : `${Math.round((100 * seconds) / total)}%`))));
}

function samplesByStep(api, detail) {
  if (!detail.samples.length) return el("p", { class: "muted" }, "No sample grids.");
  return el("div", { class: "pictures", id: "run-samples" }, detail.samples.map((file) =>
    el("figure", {}, picture(api, detail.name, `samples/${file}`, file),
      el("figcaption", { class: "muted small" }, `step ${parseInt(file.slice(5, 11), 10)}${file.includes("-ema") ? " (EMA)" : ""}`))));
}

async function showRun(root, api, name) {
  const detail = await api.get(`${API}/${encodeURIComponent(name)}`);
  const validation = detail.rows.filter((row) => row.validation_loss != null);
  root.replaceChildren(
    el("p", {}, el("a", { href: "#/runs" }, "← all runs")),
    el("h1", {}, `Run ${detail.name}`),
    el("p", { class: "muted" }, detail.adapter ? "Finished: the adapter is in the library." : "Not finished (no adapter file)."),
    el("h2", {}, "Loss"),
    el("div", { id: "run-curve" }, lossCurve(detail.rows)),
    el("p", { class: "muted small" }, `${detail.rows.length} steps; light: per step, dark: moving average` +
      (validation.length ? `, orange: validation loss (${validation.length} measurements)` : "")),
    detail.gradients ? el("h2", {}, "Gradient norms (heat map)") : null,
    detail.gradients ? el("div", { class: "pictures" }, picture(api, detail.name, "gradients.png", "gradient heat map")) : null,
    el("h2", {}, "Sample grids by step"), samplesByStep(api, detail),
    el("h2", {}, "Time"), timingTable(detail.timing),
    el("h2", {}, "Plan"), el("pre", { id: "plan" }, detail.plan || "(no plan.txt)"),
    el("h2", {}, "Configuration"), el("pre", {}, detail.config || "(no config.toml)"));
}

async function showList(root, api) {
  const { runs } = await api.get(API);
  root.replaceChildren(el("h1", {}, "Runs"),
    el("p", { class: "muted" }, "Training runs in the adapter folders (<name>.run beside <name>.safetensors), newest first."),
    runs.length ? el("div", { class: "cards", id: "runs" }, runs.map((run) => runCard(api, run)))
      : el("p", { class: "muted" }, "No runs yet: start one on the Training page."));
}

export async function render(root, api, arg) {
  try {
    await (arg ? showRun(root, api, arg) : showList(root, api));
  } catch (error) {
    root.replaceChildren(el("h1", {}, "Runs"), errorBox(error));
  }
}
