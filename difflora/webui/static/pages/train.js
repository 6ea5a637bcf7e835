// The Training page: pick a dataset under --data-root (or upload one), set the run from a form generated
// from TrainConfig's fields and help (GET /ui/api/train/form, the CLI's flags' source), see `difflora
// check`'s preflight, then Start; the queue (one run at a time) with cancel and resume; the running job's
// progress pushed as server-sent events (lib/stream.js): step, loss, it/s, ETA, the growing loss curve
// and the sample grids as they are rendered.
import { el, errorBox } from "../lib/dom.js";
import { follow } from "../lib/stream.js";
import { lossCurve } from "../lib/curve.js";

const API = "/ui/api/train";
const BASIC = ["name", "max_steps", "rank", "learning_rate", "resolution", "batch_size", "trigger", "sample_every", "save_every"];

function fieldInput(field) {
  const id = `field-${field.name}`;
  const title = field.help + (field.path ? " (a name under the data root)" : "");
  let input;
  if (field.kind === "bool") {
    input = el("input", { id, type: "checkbox", name: field.name, checked: field.default === true });
  } else if (field.kind === "choice") {
    const blank = field.optional ? [el("option", { value: "" }, "(default)")] : [];
    input = el("select", { id, name: field.name }, blank,
      field.choices.map((c) => el("option", { value: c, selected: c === field.default }, c)));
  } else {
    const number = field.kind === "int" || field.kind === "float";
    const shown = Array.isArray(field.default) ? field.default.join(", ") : field.default;
    input = el("input", { id, name: field.name, type: number ? "number" : "text", step: number ? "any" : undefined,
      placeholder: shown ?? (field.optional ? "derived" : ""), list: field.choices.length ? `${id}-list` : undefined });
  }
  const options = field.choices.length && field.kind === "str"
    ? el("datalist", { id: `${id}-list` }, field.choices.map((c) => el("option", { value: c }))) : null;
  return el("label", { class: "field", title }, el("span", {}, field.name), input, options,
    el("small", { class: "muted small" }, field.help));
}

function parseItem(text, item) {
  if (item === "int") return parseInt(text, 10);
  if (item === "float") return parseFloat(text);
  return text;
}

// the values the user set: empty inputs and unchanged checkboxes/choices are left to the config's defaults
function formValues(form, fields) {
  const values = {};
  for (const field of fields) {
    const input = form.elements.namedItem(field.name);
    if (field.kind === "bool") {
      if (input.checked !== field.default) values[field.name] = input.checked;
    } else if (input.value.trim() === "") {
      continue;
    } else if (field.kind === "choice") {
      if (input.value !== field.default) values[field.name] = input.value;
    } else if (field.kind === "list") {
      values[field.name] = input.value.split(",").map((s) => s.trim()).filter(Boolean).map((s) => parseItem(s, field.item));
    } else {
      values[field.name] = parseItem(input.value.trim(), field.kind);
    }
  }
  return values;
}

function settingsForm(fields) {
  const basic = fields.filter((f) => BASIC.includes(f.name));
  const rest = fields.filter((f) => !BASIC.includes(f.name));
  return el("form", { id: "train-form", onsubmit: (e) => e.preventDefault() },
    el("div", { class: "grid-form basic" }, basic.map(fieldInput)),
    el("details", {}, el("summary", {}, `All settings (${rest.length} more)`),
      el("div", { class: "grid-form" }, rest.map(fieldInput))));
}

function asBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function uploadFiles(api, name, files) {
  const stem = (file) => file.name.replace(/\.[^.]*$/, "");
  const captions = new Map([...files].filter((f) => f.name.endsWith(".txt")).map((f) => [stem(f), f]));
  const body = { name, files: [] };
  for (const image of [...files].filter((f) => f.type.startsWith("image/"))) {
    const caption = captions.get(stem(image));
    body.files.push({ name: image.name, data: await asBase64(image), caption: caption ? await caption.text() : "" });
  }
  return api.post(`${API}/datasets`, body);
}

function uploadForm(api, onDone) {
  const name = el("input", { id: "upload-name", placeholder: "new-dataset", required: true });
  const files = el("input", { id: "upload-files", type: "file", multiple: true, accept: "image/png,image/jpeg,image/webp,.txt" });
  const note = el("span", { class: "muted small" });
  const send = async () => {
    note.textContent = "Uploading…";
    try {
      const made = await uploadFiles(api, name.value.trim(), files.files);
      note.textContent = `Created ${made.dataset} (${made.files.length} files).`;
      onDone(made.dataset);
    } catch (error) {
      note.replaceChildren(errorBox(error));
    }
  };
  return el("details", { class: "upload" }, el("summary", {}, "Upload a new dataset (images + same-name .txt captions)"),
    el("fieldset", {}, el("label", { class: "field" }, el("span", {}, "Folder name"), name),
      el("label", { class: "field" }, el("span", {}, "Files"), files),
      el("button", { type: "button", id: "upload", onclick: send }, "Upload"), note));
}

function statusLine(status) {
  if (!status || !status.step) return "Waiting for the first step…";
  const total = status.total_steps ? ` / ${status.total_steps}` : "";
  const rate = status.it_per_s ? `${status.it_per_s.toFixed(2)} it/s` : "";
  const eta = status.eta_s != null ? `ETA ${Math.round(status.eta_s)} s` : "";
  return [`step ${status.step}${total}`, `loss ${status.smoothed_loss.toPrecision(4)}`, rate, eta].filter(Boolean).join(" · ");
}

// the live view of one job: status line, curve and sample grids, fed by its event stream
function watcher(api, view, refresh) {
  let stream = null;
  let rows = [];
  const onEvent = (kind, data) => {
    if (kind === "progress") {
      rows = data.reset ? data.rows : rows.concat(data.rows);
      view.status.textContent = statusLine(data);
      view.status.dataset.step = data.step;
      view.curve.replaceChildren(lossCurve(rows));
    } else if (kind === "sample") {
      const img = el("img", { class: "thumb", alt: `samples at step ${data.step}`, dataset: { step: data.step } });
      view.samples.append(el("figure", {}, img, el("figcaption", { class: "muted small" }, `step ${data.step}`)));
      api.imageUrl(`/ui/api/runs/${encodeURIComponent(data.run)}/files/samples/${data.file}`).then((src) => { img.src = src; });
    } else if (kind === "state" || kind === "end") {
      view.title.textContent = `${data.name}: ${data.state}`;
      view.title.dataset.state = data.state;
      refresh();
    } else if (kind === "error") {
      view.status.replaceChildren(errorBox(data));
    }
  };
  return {
    watch(job) {
      if (stream) stream.close();
      rows = [];
      view.title.textContent = `${job.name}: ${job.state}`;
      view.title.dataset.state = job.state;
      view.samples.replaceChildren();
      view.curve.replaceChildren(lossCurve([]));
      stream = follow(api, `${API}/jobs/${encodeURIComponent(job.id)}/events`, onEvent);
    },
    close: () => stream && stream.close(),
  };
}

function jobItem(api, job, actions) {
  const buttons = [];
  if (["queued", "running"].includes(job.state)) {
    buttons.push(el("button", { class: "cancel", type: "button", onclick: () => actions.cancel(job) }, "Cancel"));
  }
  if (job.resumable) {
    buttons.push(el("button", { class: "resume", type: "button", onclick: () => actions.resume(job) }, `Resume from step ${job.checkpoint_step}`));
  }
  buttons.push(el("button", { class: "watch", type: "button", onclick: () => actions.watch(job) }, "Show"));
  const output = el("pre", { class: "output", hidden: true });
  buttons.push(el("button", { class: "show-output", type: "button", onclick: async () => {
    const response = await api.request(`${API}/jobs/${encodeURIComponent(job.id)}/output`);
    output.textContent = response.ok ? await response.text() : `${response.status} ${response.statusText}`;
    output.hidden = false;
  } }, "Output"));
  return el("li", { class: "job", dataset: { id: job.id, state: job.state, name: job.name } },
    el("b", {}, job.name), ` on ${job.dataset} — `, el("span", { class: "state" }, job.state),
    job.message ? el("div", { class: "muted small" }, job.message) : null, ...buttons, output);
}

function preflightView(report) {
  const verdict = report.ok ? `Ready: ${report.steps} steps.` : `Training would refuse this data: ${report.errors.join("; ")}`;
  return [el("p", { class: report.ok ? "ok" : "error", id: "preflight-verdict" }, verdict),
    report.note ? el("p", { class: "muted" }, report.note) : null, el("pre", {}, report.text)];
}

async function datasetPicker(api, select, chosen) {
  const { datasets } = await api.get(`${API}/datasets`);
  select.replaceChildren(...datasets.map((name) => el("option", { value: name, selected: name === chosen }, name)));
}

function layout(form) {
  const view = {
    dataset: el("select", { id: "train-dataset" }),
    report: el("div", { id: "preflight-report" }),
    check: el("button", { id: "preflight", type: "button" }, "Check (preflight)"),
    start: el("button", { id: "start", type: "button", class: "primary", disabled: true }, "Start"),
    jobs: el("ul", { id: "jobs" }),
    title: el("h3", { id: "live-title" }, "No run selected"),
    status: el("p", { id: "progress" }),
    curve: el("div", { id: "curve" }),
    samples: el("div", { id: "samples", class: "pictures" }),
  };
  view.section = [
    el("h1", {}, "Training"),
    el("p", { class: "muted", id: "policy" }, form.policy),
    el("h2", {}, "Dataset"), el("label", { class: "field" }, el("span", {}, "Folder under the data root"), view.dataset),
    el("h2", {}, "Settings"),
    el("p", { class: "muted small", id: "train-note" }, `Adapters are written to ${form.output_dir}. This server ` +
      `composes adapters on ${form.server_model}: train on the same base (the model field, a name under the ` +
      "data root; empty: the embedded tiny model) for the adapter to be usable here."),
    el("div", { class: "toolbar" }, view.check, view.start), view.report,
    el("h2", {}, "Queue"), view.jobs,
    el("h2", {}, "Progress"), view.title, view.status, view.curve, view.samples,
  ];
  return view;
}

export async function render(root, api) {
  let form;
  try {
    form = await api.get(`${API}/form`);
  } catch (error) {
    root.replaceChildren(el("h1", {}, "Training"), errorBox(error));
    return;
  }
  const view = layout(form);
  const settings = settingsForm(form.fields);
  const upload = uploadForm(api, (name) => datasetPicker(api, view.dataset, name));
  root.replaceChildren(...view.section);
  view.dataset.parentElement.after(upload);
  view.check.parentElement.before(settings);
  await datasetPicker(api, view.dataset);
  wire(api, view, form.fields, settings);
}

function wire(api, view, fields, settings) {
  let checked = null;
  const body = () => ({ dataset: view.dataset.value, values: formValues(settings, fields) });
  const invalidate = () => { checked = null; view.start.disabled = true; };
  settings.addEventListener("input", invalidate);
  view.dataset.addEventListener("change", invalidate);
  const live = watcher(api, view, () => refresh());
  let shown = "";
  const refresh = async () => {
    const { jobs } = await api.get(`${API}/jobs`);
    const text = JSON.stringify(jobs);
    if (text !== shown) {  // redrawn only on a change: an opened output stays open
      shown = text;
      view.jobs.replaceChildren(...jobs.slice().reverse().map((job) => jobItem(api, job, actions)));
    }
    return jobs;
  };
  const act = (fn) => async (job) => {
    try { live.watch(await fn(job)); } catch (error) { view.report.replaceChildren(errorBox(error)); }
    await refresh();
  };
  const actions = {
    cancel: act((job) => api.post(`${API}/jobs/${job.id}/cancel`, {})),
    resume: act((job) => api.post(`${API}/jobs/${job.id}/resume`, {})),
    watch: async (job) => live.watch(job),
  };
  view.check.addEventListener("click", async () => {
    invalidate();
    try {
      const sent = body();
      const report = await api.post(`${API}/preflight`, sent);
      view.report.replaceChildren(...preflightView(report).filter(Boolean));
      if (report.ok) { checked = JSON.stringify(sent); view.start.disabled = false; }
    } catch (error) { view.report.replaceChildren(errorBox(error)); }
  });
  view.start.addEventListener("click", () => {
    if (checked !== JSON.stringify(body())) return invalidate();
    view.start.disabled = true;
    return act(() => api.post(`${API}/jobs`, body()))();
  });
  const timer = setInterval(() => refresh().catch(() => {}), 3000);
  api.onLeave(() => { clearInterval(timer); live.close(); });
  refresh().then((jobs) => {
    const active = jobs.find((job) => ["running", "cancelling", "queued"].includes(job.state));
    if (active) live.watch(active);
  }).catch((error) => view.jobs.replaceChildren(errorBox(error)));
}
