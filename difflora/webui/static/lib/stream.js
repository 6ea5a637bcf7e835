// Server-sent events read with fetch() and a stream reader: EventSource cannot send the bearer header, and
// the token must never go into a URL (logs and history keep URLs). `follow` calls onEvent(kind, data) for
// each `event:`/`data:` block until the server ends the stream or close() is called.
export function follow(api, path, onEvent) {
  const controller = new AbortController();
  const done = read(api, path, onEvent, controller.signal).catch((error) => {
    if (error.name !== "AbortError") onEvent("error", { error: error.message });
  });
  return { close: () => controller.abort(), done };
}

async function read(api, path, onEvent, signal) {
  const response = await api.request(path, { signal, headers: { Accept: "text/event-stream" } });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* keep the status line */ }
    throw new Error(message);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      dispatch(buffered.slice(0, end), onEvent);
      buffered = buffered.slice(end + 2);
    }
  }
}

function dispatch(block, onEvent) {
  let kind = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data.push(line.slice(6));
  }
  if (data.length) onEvent(kind, JSON.parse(data.join("\n")));
}
