// The playground: a request for POST /generate built from the form (so the image is the API's, bit for bit),
// any number of adapters each with a weight and a text-encoder weight, a session history of renders, and
// a sweep over one or two adapters' weights (POST /ui/api/sweep: `difflora generate --sweep`'s grid).
import { el, errorBox } from "../lib/dom.js";

const history = [];  // this tab's renders: {url, parameters, seed}

function field(label, input) {
  return el("label", { class: "field" }, el("span", {}, label), input);
}

function slider(cls, value, limit, label) {
  const range = el("input", { type: "range", class: cls, min: -limit, max: limit, step: "0.05", value, "aria-label": label });
  const shown = el("output", {}, range.value);
  range.addEventListener("input", () => { shown.textContent = range.value; });
  return { range, node: el("span", { class: "slider" }, range, shown) };
}

function adapterRow(name, rows) {
  const weight = slider("weight", "1", 2, `${name} weight`);
  const te = slider("te-weight", "1", 2, `${name} text-encoder weight`);
  const linked = el("input", { type: "checkbox", class: "te-linked", checked: true, "aria-label": `${name}: text encoder follows the weight` });
  const sync = () => {
    te.range.disabled = linked.checked;
    if (linked.checked) { te.range.value = weight.range.value; te.node.querySelector("output").textContent = te.range.value; }
  };
  weight.range.addEventListener("input", sync);
  linked.addEventListener("change", sync);
  sync();
  const row = el("div", { class: "adapter-row", dataset: { name } },
    el("b", {}, name), field("weight", weight.node),
    el("label", { class: "field" }, linked, el("span", {}, "TE = weight")), field("TE weight", te.node),
    el("button", { type: "button", class: "remove", onclick: () => row.remove() }, "remove"));
  rows.append(row);
}

// the adapters as the spec grammar writes them: NAME:WEIGHT[:TE_WEIGHT],...
function adapterSpec(rows) {
  return [...rows.querySelectorAll(".adapter-row")].map((row) => {
    const weight = row.querySelector(".weight").value;
    const te = row.querySelector(".te-linked").checked ? "" : `:${row.querySelector(".te-weight").value}`;
    return `${row.dataset.name}:${weight}${te}`;
  }).join(",");
}

function requestFrom(form, rows) {
  const value = (name) => form.elements[name].value.trim();
  const body = {
    prompt: value("prompt"), negative_prompt: value("negative_prompt"), adapters: adapterSpec(rows),
    steps: Number(value("steps")), width: Number(value("width")), height: Number(value("height")),
    guidance: Number(value("guidance")), scheduler: value("scheduler"),
  };
  if (value("seed") !== "") body.seed = Number(value("seed"));
  return body;
}

function pngUrl(base64) {
  const raw = atob(base64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i += 1) bytes[i] = raw.charCodeAt(i);
  return URL.createObjectURL(new Blob([bytes], { type: "image/png" }));
}

function showRender(output, entry) {
  output.replaceChildren(
    el("img", { id: "result-image", src: entry.url, alt: entry.parameters }),
    el("pre", { id: "result-parameters" }, entry.parameters),
    el("a", { id: "result-download", href: entry.url, download: `difflora-${entry.seed}.png` }, "Download PNG"));
}

function historyStrip(strip, output) {
  strip.replaceChildren(...history.map((entry, index) => el("button", {
    type: "button", class: "history-item", title: entry.parameters, onclick: () => showRender(output, entry),
  }, el("img", { src: entry.url, alt: `render ${index + 1}` }))));
}

function form(options, names) {
  const d = options.defaults;
  const number = (name, value, min, max, step = 1) => el("input", { name, type: "number", value, min, max, step });
  return el("form", { id: "generate-form", class: "grid-form", onsubmit: (e) => e.preventDefault() },
    field("Prompt", el("textarea", { name: "prompt", rows: 2, required: true })),
    field("Negative prompt", el("textarea", { name: "negative_prompt", rows: 1 }, d.negative_prompt)),
    field("Seed (empty: random)", number("seed", "", 0, 2 ** 31 - 1)),
    field("Steps", number("steps", d.steps, 1, options.limits.steps)),
    field("Width", number("width", d.width, 8, options.limits.size, 8)),
    field("Height", number("height", d.height, 8, options.limits.size, 8)),
    field("Guidance", number("guidance", d.guidance, 0, 100, 0.5)),
    field("Sampler", el("select", { name: "scheduler" }, options.samplers.map((s) => el("option", { value: s, selected: s === d.scheduler }, s)))),
    field("Add adapter", el("select", { id: "adapter-choice" }, names.map((n) => el("option", { value: n }, n)))));
}

function sweepBuilder(names) {
  const choice = (id) => el("select", { id }, el("option", { value: "" }, "—"), names.map((n) => el("option", { value: n }, n)));
  return el("fieldset", { id: "sweep" }, el("legend", {}, "Sweep (labelled grid)"),
    field("Columns: adapter", choice("sweep-a")), field("weights", el("input", { id: "sweep-a-weights", value: "0,0.5,1" })),
    field("Rows: adapter", choice("sweep-b")), field("weights", el("input", { id: "sweep-b-weights", value: "0,1" })),
    el("button", { type: "button", id: "sweep-button" }, "Render sweep"));
}

function sweepEntries(root) {
  return ["a", "b"].map((k) => [root.querySelector(`#sweep-${k}`).value, root.querySelector(`#sweep-${k}-weights`).value.trim()])
    .filter(([name]) => name).map(([name, weights]) => `${name}:${weights}`);
}

async function run(status, button, work) {
  button.disabled = true;
  status.replaceChildren(el("span", { class: "muted" }, "Rendering…"));
  try {
    await work();
    status.replaceChildren();
  } catch (error) {
    status.replaceChildren(errorBox(error));
  } finally {
    button.disabled = false;
  }
}

export async function render(root, api) {
  const [options, library] = await Promise.all([api.get("/ui/api/options"), api.get("/ui/api/adapters")]);
  const names = library.adapters.filter((a) => !a.error).map((a) => a.name);
  const rows = el("div", { id: "adapter-rows" });
  const output = el("section", { id: "result" });
  const strip = el("section", { id: "history", class: "history" });
  const status = el("div", { id: "status" });
  const theForm = form(options, names);
  const add = el("button", { type: "button", id: "add-adapter", onclick: () => adapterRow(theForm.querySelector("#adapter-choice").value, rows) }, "Add");
  const generate = el("button", { type: "button", id: "generate", class: "primary" }, "Generate");
  const sweep = sweepBuilder(names);
  generate.addEventListener("click", () => run(status, generate, async () => {
    const result = await api.post("/generate", { ...requestFrom(theForm, rows), format: "json" });
    const entry = { url: pngUrl(result.images[0]), parameters: result.parameters[0], seed: result.seeds[0] };
    history.unshift(entry);
    showRender(output, entry);
    historyStrip(strip, output);
  }));
  const sweepButton = sweep.querySelector("#sweep-button");
  sweepButton.addEventListener("click", () => run(status, sweepButton, async () => {
    const grid = await api.postBlob("/ui/api/sweep", { ...requestFrom(theForm, rows), sweep: sweepEntries(sweep) });
    const url = URL.createObjectURL(grid);
    output.replaceChildren(el("img", { id: "sweep-image", src: url, alt: "sweep grid" }),
      el("a", { href: url, download: "difflora-sweep.png" }, "Download grid"));
  }));
  root.append(el("h1", {}, "Playground"), theForm, el("p", {}, add), rows,
    el("p", {}, generate), sweep, status, output, el("h2", {}, "This session"), strip);
  historyStrip(strip, output);
}
