// The executions list: filters, paging by the opaque token, live status of the running rows over SSE.
import { api, executionPath, follow, scopePath } from "./api.js";
import { h, when, TERMINAL } from "./dom.js";

const STATUSES = ["", "PENDING", "RUNNING", "WAITING", "COMPLETED", "FAILED", "CANCELLED"];
const LIVE_STREAMS = 3; // a browser keeps 6 HTTP/1.1 connections per host: leave room for the rest
const REFRESH_MS = 3000;
const END_EVENTS = { "execution.completed": "COMPLETED", "execution.failed": "FAILED", "execution.cancelled": "CANCELLED" };

function toIso(local) {
  return local ? new Date(local).toISOString() : "";
}

export async function showList(view) {
  const status = h("select", { id: "f-status" }, STATUSES.map((s) => h("option", { value: s }, s || "any status")));
  const playbook = h("input", { id: "f-playbook", placeholder: "playbook path" });
  const since = h("input", { id: "f-since", type: "datetime-local", step: "1" });
  const until = h("input", { id: "f-until", type: "datetime-local", step: "1" });
  const body = h("tbody");
  const more = h("button", { id: "more", type: "button", hidden: true }, "more");
  const live = h("span", { id: "list-live", class: "muted" });
  const filters = h("form", { id: "filters" }, status, playbook, h("label", {}, "since ", since), h("label", {}, "until ", until),
    h("button", { type: "submit" }, "filter"));
  view.replaceChildren(
    h("h1", {}, "Executions ", live),
    filters,
    h("table", { id: "executions", class: "list" },
      h("thead", {}, h("tr", {}, ["id", "status", "playbook", "created", "updated", "ended", "steps", "last seq"].map((c) => h("th", {}, c)))),
      body),
    more);

  let token = null;
  let rows = new Map(); // id -> {tr, summary}
  const streams = new Map(); // id -> follow handle
  let timer = null;

  function query(pageToken) {
    return { status: status.value, playbook: playbook.value.trim(), since: toIso(since.value), until: toIso(until.value), limit: 50, page_token: pageToken };
  }

  const idOf = (x) => x.execution_id ?? x.id;

  function render(x) {
    const pb = x.playbook ? `${x.playbook.path}@${x.playbook.version}` : "—";
    const steps = Object.entries(x.steps || {}).map(([k, v]) => `${k.toLowerCase()} ${v}`).join(", ");
    return h("tr", { dataset: { id: idOf(x), status: x.status } },
      h("td", {}, h("a", { href: `#/executions/${idOf(x)}` }, idOf(x))),
      h("td", { class: `status s-${x.status}` }, x.status),
      h("td", {}, pb), h("td", {}, when(x.created_at)), h("td", {}, when(x.updated_at)), h("td", {}, when(x.ended_at)),
      h("td", {}, steps), h("td", { class: "num" }, String(x.last_seq)));
  }

  function upsert(x, { append }) {
    const old = rows.get(idOf(x));
    const tr = render(x);
    if (old) old.tr.replaceWith(tr);
    else if (append) body.append(tr);
    else body.prepend(tr);
    rows.set(idOf(x), { tr, summary: x });
  }

  function watch() {
    for (const [id, st] of streams) {
      const row = rows.get(id);
      if (!row || TERMINAL.has(row.summary.status)) { st.stop(); streams.delete(id); }
    }
    for (const [id, row] of rows) {
      if (streams.size >= LIVE_STREAMS) break;
      if (TERMINAL.has(row.summary.status) || streams.has(id)) continue;
      streams.set(id, follow(executionPath(id, "/stream"), {
        after: row.summary.last_seq,
        onEvent: (seq, env) => {
          const r = rows.get(id);
          if (!r) return;
          const next = { ...r.summary, last_seq: Math.max(seq, r.summary.last_seq), updated_at: env.ts };
          if (END_EVENTS[env.type]) next.status = END_EVENTS[env.type];
          else if (env.type === "callback.waiting" && !TERMINAL.has(next.status)) next.status = "WAITING";
          else if (!TERMINAL.has(next.status) && next.status !== "RUNNING" && env.type !== "execution.requested") next.status = "RUNNING";
          upsert(next, { append: true });
          if (TERMINAL.has(next.status)) watch();
        },
      }));
    }
    live.textContent = streams.size ? `· live (${streams.size} streaming)` : "";
  }

  async function load(reset) {
    const page = await api(scopePath("/executions"), { query: query(reset ? undefined : token) });
    if (reset) { body.replaceChildren(); rows = new Map(); }
    for (const x of page.executions) upsert(x, { append: true });
    token = page.next_page_token;
    more.hidden = !token;
    watch();
  }

  async function refreshHead() {
    // New executions appear at the top: re-read the first page (newest first) and merge.
    const page = await api(scopePath("/executions"), { query: query(undefined) });
    for (const x of [...page.executions].reverse()) {
      const known = rows.get(idOf(x));
      if (!known || known.summary.last_seq < x.last_seq || known.summary.status !== x.status) upsert(x, { append: false });
    }
    watch();
  }

  filters.addEventListener("submit", (ev) => { ev.preventDefault(); load(true); });
  more.addEventListener("click", () => load(false));
  await load(true);
  let closed = false;
  const tick = () => { if (!closed) timer = setTimeout(() => refreshHead().catch(() => {}).finally(tick), REFRESH_MS); };
  tick();
  return () => { closed = true; clearTimeout(timer); for (const st of streams.values()) st.stop(); };
}
