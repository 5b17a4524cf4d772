// One execution: header, step graph, steps and results, a waiting callback's state, waterfall, timeline and
// time travel, all kept current by the execution's SSE stream.
import { api, executionPath, follow, scopePath } from "./api.js";
import { fill, h, json, rowsTable, when, TERMINAL, flash } from "./dom.js";
import { drawGraph } from "./graph.js";
import { Timeline } from "./timeline.js";
import { Waterfall } from "./waterfall.js";

const WATERFALL_STEPS = 30;  // steps read for the waterfall (each: its own events, through the step filter)
const WATERFALL_PAGES = 5;   // pages of 1,000 events per step
const RESULT_ROWS = 20;      // rows shown of a result stored by reference

function flatten(value, path = "", out = new Map(), depth = 0) {
  if (value && typeof value === "object" && !Array.isArray(value) && depth < 4) {
    for (const [k, v] of Object.entries(value)) flatten(v, path ? `${path}.${k}` : k, out, depth + 1);
  } else out.set(path, JSON.stringify(value));
  return out;
}

export function diff(then, now) {
  const a = flatten(then), b = flatten(now), rows = [];
  for (const k of new Set([...a.keys(), ...b.keys()])) if (a.get(k) !== b.get(k)) rows.push([k, a.get(k), b.get(k)]);
  return rows.sort((x, y) => x[0].localeCompare(y[0]));
}

export async function showExecution(view, id, me) {
  let projection = await api(executionPath(id));
  let playbook = null;
  if (projection.playbook) {
    try {
      const pb = await api(scopePath(`/playbooks/${projection.playbook.path}`), { query: { version: projection.playbook.version } });
      playbook = pb.playbook;
    } catch (e) { flash(`the playbook could not be read: ${e.message}`); }
  }
  let asOf = null; // the time-travel projection, when one is picked
  const header = h("section", { id: "exec-header" });
  const graphBox = h("div", { id: "graph-box" });
  const ttBanner = h("p", { id: "tt-banner", hidden: true });
  const steps = h("section", { id: "steps-panel" });
  const callbacks = h("section", { id: "callbacks-panel" });
  const result = h("section", { id: "result-panel" }, h("h2", {}, "Result"), h("p", { class: "muted" }, "pick a step"));
  const waterfall = new Waterfall();
  const timeline = new Timeline(id, { onPick: (row) => { ttSeq.value = row.seq; }, steps: playbook ? playbook.steps.map((s) => s.name) : Object.keys(projection.steps) });
  const ttSeq = h("input", { id: "tt-seq", type: "number", min: 1, placeholder: "seq" });
  const ttOut = h("div", { id: "tt-result" });
  const travel = h("section", { id: "travel-panel" },
    h("h2", {}, "Time travel"),
    h("form", { id: "tt-form", onsubmit: (ev) => { ev.preventDefault(); travelTo(Number(ttSeq.value)); } },
      h("label", {}, "projection at seq ", ttSeq), h("button", { id: "tt-go", type: "submit" }, "go"),
      h("button", { id: "tt-now", type: "button", onclick: () => { asOf = null; ttOut.replaceChildren(); render(); } }, "back to now")),
    h("p", { class: "muted" }, "click a timeline row to pick its seq"), ttOut);
  const streamState = h("span", { id: "stream-state", class: "muted" });
  view.replaceChildren(header, h("section", { id: "graph-panel" }, h("h2", {}, "Steps graph"), ttBanner, graphBox),
    h("div", { class: "cols" }, steps, h("div", {}, callbacks, result)), waterfall.el, timeline.el, travel);

  async function pick(step) {
    result.replaceChildren(h("h2", {}, `Result of ${step}`), h("p", { class: "muted" }, "loading…"));
    try {
      // A result stored by reference: only its first rows (the edge slices the stored table), with the total.
      const r = await api(executionPath(id, `/steps/${encodeURIComponent(step)}/result`), { query: { rows: RESULT_ROWS } });
      const table = Array.isArray(r.result) && r.result.length && r.result.every((x) => x && typeof x === "object" && !Array.isArray(x));
      const body = [
        r.result_ref ? h("p", { id: "result-ref" }, `stored by reference: ${r.result_ref}`,
          r.rows_total !== null && r.rows_total !== undefined ? ` — first ${r.result.length} of ${r.rows_total} rows` : "") : null,
        r.result_ref && table ? rowsTable(r.result, RESULT_ROWS) : json(r.result)];
      const st = projection.steps[step];
      fill(result, h("h2", {}, `Result of ${step}`), h("p", { class: `status s-${r.status}` }, r.status), ...body,
        st && st.error ? h("div", {}, h("h3", {}, "error"), json(st.error)) : null);
    } catch (e) {
      result.replaceChildren(h("h2", {}, `Result of ${step}`), h("p", { class: "error" }, e.message));
    }
  }

  async function renderCallbacks() {
    const waiting = Object.entries(projection.steps).filter(([, st]) => st.status === "WAITING");
    if (!waiting.length) { callbacks.replaceChildren(); return; }
    const items = [];
    for (const [name, st] of waiting) {
      const page = await api(executionPath(id, "/timeline"), { query: { step: name, limit: 1000 } });
      const w = [...page.rows].reverse().find((r) => r.type === "callback.waiting");
      const p = w ? w.payload : {};
      const deadline = w && p.timeout_s ? new Date(Date.parse(w.ts) + p.timeout_s * 1000).toISOString() : null;
      items.push(h("li", { dataset: { step: name } }, `${name} (attempt ${st.attempts}) waiting since ${when(w ? w.ts : st.started_at)}`,
        deadline ? `, times out at ${when(deadline)}` : "", p.callback_path ? h("div", {}, "resume with POST ", h("code", {}, p.callback_path)) : null));
    }
    callbacks.replaceChildren(h("h2", {}, "Waiting callbacks"), h("ul", { id: "callbacks" }, items));
  }

  function render() {
    const x = projection;
    const cancel = h("button", { id: "cancel", type: "button", hidden: TERMINAL.has(x.status) || x.cancel_requested || me.role === "read",
      onclick: async () => {
        cancel.disabled = true;
        try { await api(executionPath(id, "/cancel"), { method: "POST" }); } catch (e) { flash(e.message); cancel.disabled = false; }
      } }, "cancel");
    fill(header,
      h("h1", {}, h("a", { href: "#/executions" }, "Executions"), " / ", id, " ", h("span", { id: "exec-status", class: `status s-${x.status}` }, x.status),
        x.cancel_requested && !TERMINAL.has(x.status) ? h("span", { class: "muted" }, " cancel requested") : null, " ", cancel),
      h("dl", { class: "facts" },
        h("dt", {}, "playbook"), h("dd", {}, x.playbook ? `${x.playbook.path}@${x.playbook.version}` : "—"),
        h("dt", {}, "created"), h("dd", {}, when(x.created_at)), h("dt", {}, "updated"), h("dd", {}, when(x.updated_at)),
        h("dt", {}, "events"), h("dd", { id: "exec-events" }, String(x.event_count)),
        h("dt", {}, "last seq"), h("dd", { id: "exec-last-seq" }, String(x.last_seq)),
        h("dt", {}, "stream"), h("dd", {}, streamState)),
      h("details", {}, h("summary", {}, "workload"), json(x.workload)),
      x.error ? h("details", { open: true }, h("summary", {}, "error"), json(x.error)) : null,
      x.user_event_count ? h("p", { class: "muted" }, `${x.user_event_count} user event(s)`) : null);
    const shown = asOf || projection;
    ttBanner.hidden = !asOf;
    ttBanner.textContent = asOf ? `showing the projection as of seq ${asOf.last_seq} (time travel)` : "";
    graphBox.replaceChildren(playbook ? drawGraph(playbook, shown, pick) : h("p", { class: "muted" }, "no playbook: events only"));
    steps.replaceChildren(h("h2", {}, "Steps"), h("table", { id: "steps", class: "list" },
      h("thead", {}, h("tr", {}, ["step", "status", "attempts", "started", "ended"].map((c) => h("th", {}, c)))),
      h("tbody", {}, Object.entries(shown.steps).map(([name, st]) => h("tr", { dataset: { step: name }, onclick: () => pick(name) },
        h("td", {}, h("span", { class: "link" }, name)), h("td", { class: `status s-${st.status}` }, st.status,
          st.queued ? h("span", { class: "muted queued" }, ` · ${st.queued} queued for pool ${st.pool}`) : null),
        h("td", { class: "num" }, String(st.attempts)), h("td", {}, when(st.started_at)), h("td", {}, when(st.ended_at)))))));
  }

  async function travelTo(seq) {
    if (!Number.isInteger(seq) || seq < 1) { flash("pick a seq (a positive integer)"); return; }
    try {
      asOf = await api(executionPath(id), { query: { as_of_seq: seq } });
    } catch (e) { flash(e.message); return; }
    const rows = diff(asOf, projection);
    ttOut.replaceChildren(
      h("p", { id: "tt-summary", dataset: { seq, lastSeq: asOf.last_seq, status: asOf.status } },
        `at seq ${seq}: ${asOf.status}, ${asOf.event_count} event(s), last seq ${asOf.last_seq}`),
      h("h3", {}, `diff to now (${rows.length} field(s) changed)`),
      h("table", { id: "tt-diff", class: "list" }, h("thead", {}, h("tr", {}, ["field", `at seq ${seq}`, "now"].map((c) => h("th", {}, c)))),
        h("tbody", {}, rows.slice(0, 200).map(([k, a, b]) => h("tr", {}, h("td", {}, k), h("td", {}, a ?? "—"), h("td", {}, b ?? "—"))))),
      h("details", {}, h("summary", {}, `projection at seq ${seq}`), json(asOf)));
    render();
  }

  async function loadWaterfall() {
    for (const name of Object.keys(projection.steps).slice(0, WATERFALL_STEPS)) {
      let after = 0;
      for (let i = 0; i < WATERFALL_PAGES; i++) {
        const page = await api(executionPath(id, "/timeline"), { query: { step: name, after_seq: after, limit: 1000 } });
        for (const r of page.rows) waterfall.add(r.seq, r);
        if (page.next_after_seq === null || page.next_after_seq === undefined) break;
        after = page.next_after_seq;
      }
    }
    waterfall.draw();
  }

  // An event is on the stream as soon as it is in the WAL, before the kernel has folded it: ask
  // for a projection at least as new as the latest event seen (min_seq), or the page could show
  // the state before the last event and never be told again.
  let refreshing = null, again = false, wanted = 0;
  async function refresh(seq) {
    wanted = Math.max(wanted, seq);
    if (refreshing) { again = true; return; }
    refreshing = (async () => {
      do {
        again = false;
        projection = await api(executionPath(id), { query: { min_seq: wanted } });
        render();
        await renderCallbacks();
      } while (again);
    })();
    try { await refreshing; } catch (e) { flash(e.message); } finally { refreshing = null; }
  }

  render();
  await renderCallbacks();
  timeline.fetchMore();
  await loadWaterfall();
  let drawTimer = null;
  const stream = follow(executionPath(id, "/stream"), {
    after: projection.last_seq,
    onState: (s) => { streamState.textContent = s; },
    onEvent: (seq, env) => {
      waterfall.add(seq, env);
      timeline.live();
      refresh(seq);
      clearTimeout(drawTimer);
      drawTimer = setTimeout(() => waterfall.draw(), 200);
    },
  });
  const ticker = setInterval(() => { if (!TERMINAL.has(projection.status)) waterfall.draw(); }, 1000);
  return () => { stream.stop(); clearInterval(ticker); clearTimeout(drawTimer); };
}
