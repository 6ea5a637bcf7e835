// The loss curve as SVG, drawn from loss.csv's rows ({step, loss, smoothed_loss, validation_loss}): the
// raw loss (light), its moving average (dark) and the validation loss (orange dots), the y axis topped at
// the 98th percentile of the raw loss so one spike does not flatten the rest (as the CLI's loss.png).
const NS = "http://www.w3.org/2000/svg";
const SIZE = { width: 640, height: 260, left: 56, right: 12, top: 14, bottom: 28 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bounds(rows) {
  const losses = rows.map((r) => r.loss).filter(Number.isFinite).sort((a, b) => a - b);
  const others = rows.flatMap((r) => [r.smoothed_loss, r.validation_loss]).filter(Number.isFinite);
  const low = Math.min(...losses, ...others);
  let high = Math.max(losses[Math.min(losses.length - 1, Math.floor(0.98 * losses.length))], ...others);
  if (!(high > low)) high = low + 1e-6;
  const first = rows[0].step;
  const last = Math.max(rows[rows.length - 1].step, first + 1);
  return { low, high, first, last };
}

function scaler(b) {
  const { width, height, left, right, top, bottom } = SIZE;
  return (step, value) => {
    const x = left + ((step - b.first) / (b.last - b.first)) * (width - left - right);
    const clipped = Math.min(Math.max(value, b.low), b.high);
    const y = top + (1 - (clipped - b.low) / (b.high - b.low)) * (height - top - bottom);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  };
}

function axes(root, b, xy) {
  const { width, height, left, right, top, bottom } = SIZE;
  root.append(svg("rect", { x: left, y: top, width: width - left - right, height: height - top - bottom,
    fill: "#fff", stroke: "#d8dde6" }));
  for (const f of [0, 0.5, 1]) {
    const value = b.low + f * (b.high - b.low);
    const [, y] = xy(b.first, value).split(",");
    root.append(svg("text", { x: 4, y: Number(y) + 4, "font-size": 11, fill: "#667085" }, value.toPrecision(3)));
    const step = Math.round(b.first + f * (b.last - b.first));
    const [x] = xy(step, b.low).split(",");
    root.append(svg("text", { x: Number(x) - 8, y: height - 8, "font-size": 11, fill: "#667085" }, String(step)));
  }
}

export function lossCurve(rows) {
  const { width, height } = SIZE;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "loss-curve",
    role: "img", "data-points": rows.length });
  root.append(svg("title", {}, `loss over ${rows.length} steps`));
  if (!rows.length) return root;
  const b = bounds(rows);
  const xy = scaler(b);
  axes(root, b, xy);
  root.append(svg("polyline", { class: "loss", fill: "none", stroke: "#aabee6", "stroke-width": 1,
    points: rows.map((r) => xy(r.step, r.loss)).join(" ") }));
  root.append(svg("polyline", { class: "smoothed", fill: "none", stroke: "#14328c", "stroke-width": 2,
    points: rows.map((r) => xy(r.step, r.smoothed_loss)).join(" ") }));
  for (const r of rows.filter((row) => Number.isFinite(row.validation_loss))) {
    const [cx, cy] = xy(r.step, r.validation_loss).split(",");
    root.append(svg("circle", { class: "validation", cx, cy, r: 3, fill: "#e67814" }));
  }
  return root;
}
