// The console's only way to the edge: the public API with the pasted bearer token (sessionStorage).
const KEY = "noetl.console";

export const session = {
  get token() { return sessionStorage.getItem(`${KEY}.token`) || ""; },
  set token(v) { v ? sessionStorage.setItem(`${KEY}.token`, v) : sessionStorage.removeItem(`${KEY}.token`); },
  get tenant() { return sessionStorage.getItem(`${KEY}.tenant`) || ""; },
  set tenant(v) { sessionStorage.setItem(`${KEY}.tenant`, v); },
  get project() { return sessionStorage.getItem(`${KEY}.project`) || ""; },
  set project(v) { sessionStorage.setItem(`${KEY}.project`, v); },
  clear() { for (const k of ["token", "tenant", "project"]) sessionStorage.removeItem(`${KEY}.${k}`); },
};

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem && problem.detail ? `${status} ${problem.title || ""}: ${problem.detail}` : `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.token}`, ...extra };
}

export async function api(path, { method = "GET", body, query } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, String(v));
  }
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(url, init);
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

export function scopePath(rest = "") {
  const t = encodeURIComponent(session.tenant), p = encodeURIComponent(session.project);
  return `/api/v1/tenants/${t}/projects/${p}${rest}`;
}

export function executionPath(id, rest = "") {
  return scopePath(`/executions/${encodeURIComponent(id)}${rest}`);
}

/**
 * Server-Sent Events read with fetch (EventSource cannot send an Authorization header).
 * Resumes after the last seen id (Last-Event-ID) when the connection drops; stop() ends it.
 */
export function follow(path, { after = 0, onEvent, onState = () => {} }) {
  const ctl = new AbortController();
  let last = after;
  let stopped = false;
  (async () => {
    while (!stopped) {
      try {
        const resp = await fetch(path, { headers: headers({ "Last-Event-ID": String(last), Accept: "text/event-stream" }), signal: ctl.signal });
        if (!resp.ok) { onState(`stream: HTTP ${resp.status}`); if (resp.status < 500) return; }
        else {
          onState("live");
          const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
          let buf = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buf += value;
            let cut;
            while ((cut = buf.indexOf("\n\n")) >= 0) {
              const block = buf.slice(0, cut);
              buf = buf.slice(cut + 2);
              const frame = { id: null, event: "message", data: "" };
              for (const line of block.split("\n")) {
                if (line.startsWith("id: ")) frame.id = Number(line.slice(4));
                else if (line.startsWith("event: ")) frame.event = line.slice(7);
                else if (line.startsWith("data: ")) frame.data += line.slice(6);
              }
              if (frame.id !== null && frame.data) {
                last = Math.max(last, frame.id);
                onEvent(frame.id, JSON.parse(frame.data));
              }
            }
          }
        }
      } catch (e) {
        if (stopped) return;
        onState(`stream: ${e.message || e}`);
      }
      if (!stopped) { onState("reconnecting"); await new Promise((r) => setTimeout(r, 1000)); }
    }
  })();
  return { stop() { stopped = true; ctl.abort(); } };
}
