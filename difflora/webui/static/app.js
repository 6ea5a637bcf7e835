// The UI's router. Pages: #/library, #/playground, #/train, #/runs (and #/NAME/ARG, e.g. #/library/style).
//
// Page contract: each page is a module static/pages/NAME.js, loaded with a dynamic import only when
// navigated to, exporting
//     export async function render(root, api, arg)   // root: the emptied <main> element;
//                                                    // api: lib/api.js's default export (token-aware fetch);
//                                                    // arg: the part of the hash after the page name, or "".
// A page keeps no global state between renders, and stops its own timers/streams when `root` is replaced:
// it may register a cleanup with api.onLeave(fn), called before the next page renders.
import api from "./lib/api.js";

const PAGES = ["library", "playground", "train", "runs"];
let rendering = 0;

function route() {
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const page = PAGES.includes(name) ? name : "library";
  return { page, arg: rest.map(decodeURIComponent).join("/") };
}

async function show() {
  const { page, arg } = route();
  const ticket = ++rendering;
  api.leave();
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.page === page);
  }
  const root = document.getElementById("page");
  root.replaceChildren();
  root.dataset.page = page;
  try {
    const module = await import(`./pages/${page}.js`);
    if (ticket === rendering) await module.render(root, api, arg);
  } catch (error) {
    if (ticket !== rendering) return;
    const message = document.createElement("p");
    message.className = "error";
    message.textContent = `This page could not be shown: ${error.message}`;
    root.replaceChildren(message);
  }
}

window.addEventListener("hashchange", show);
show();
