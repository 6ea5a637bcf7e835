// Token-aware calls to the server. With `difflora serve --token`, the first call answered 401 asks for the
// token (the dialog in index.html), keeps it in sessionStorage (this tab only) and sends it as
// `Authorization: Bearer`; a later 401 (a wrong or changed token) asks again. No cookie is ever set, so
// another site cannot make this browser send authorised requests.
const KEY = "difflora-token";
let asking = null;
let leaving = [];

function headers(extra = {}) {
  const token = sessionStorage.getItem(KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function askToken(wrong) {
  if (asking) return asking;
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  document.getElementById("token-error").textContent = wrong ? "That token was refused; try again." : "";
  asking = new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      sessionStorage.setItem(KEY, input.value.trim());
      input.value = "";
      asking = null;
      resolve();
    }, { once: true });
  });
  dialog.showModal();
  return asking;
}

async function request(path, options = {}) {
  for (;;) {
    const sent = sessionStorage.getItem(KEY);
    const response = await fetch(path, { ...options, headers: headers(options.headers) });
    if (response.status !== 401) return response;
    await askToken(Boolean(sent));
  }
}

async function failure(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    message = (await response.json()).error || message;
  } catch (_) { /* not JSON: keep the status line */ }
  return new Error(message);
}

async function json(path, options) {
  const response = await request(path, options);
  if (!response.ok) throw await failure(response);
  return response.json();
}

async function blob(path, options) {
  const response = await request(path, options);
  if (!response.ok) throw await failure(response);
  return response.blob();
}

function post(path, body) {
  return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
}

export default {
  request,
  get: (path) => json(path),
  post: (path, body) => json(path, post(path, body)),
  postBlob: (path, body) => blob(path, post(path, body)),
  // an object URL for a token-protected image (an <img src> cannot send the bearer header)
  imageUrl: async (path) => URL.createObjectURL(await blob(path)),
  onLeave: (fn) => leaving.push(fn),
  leave: () => {
    const fns = leaving;
    leaving = [];
    for (const fn of fns) fn();
  },
};
