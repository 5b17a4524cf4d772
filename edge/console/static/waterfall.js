// The waterfall: one bar per command (step, iteration, attempt) over the execution's time; the queue
// (issued → claimed by a worker) apart from the run (claimed → exit or error), a callback's wait as its own
// segment, a retry as the next attempt's own bar.
import { h } from "./dom.js";

const STEP_EVENTS = new Set(["command.issued", "command.claimed", "step.exit", "command.completed", "call.error",
  "callback.waiting", "callback.received", "step.retry", "step.enter", "step.failed"]);

export class Waterfall {
  constructor() {
    this.bars = new Map(); // key -> {step, iteration, attempt, issued, claimed, ended, outcome, waiting, received}
    this.seen = new Set();
    this.el = h("section", { id: "waterfall-panel" }, h("h2", {}, "Waterfall"), h("div", { id: "waterfall" }));
  }

  add(seq, env) {
    if (this.seen.has(seq) || !STEP_EVENTS.has(env.type) || !env.step) return;
    this.seen.add(seq);
    const p = env.payload || {};
    const it = p.iteration ?? null;
    // A command's id is <execution>:<step>:<iteration|->:<attempt>; a claim's own attempt counts redeliveries.
    const attempt = p.command_id ? Number(String(p.command_id).split(":").pop()) || env.attempt : env.attempt;
    const key = `${env.step}:${it ?? "-"}:${attempt}`;
    const t = Date.parse(env.ts);
    if (env.type === "step.enter" || env.type === "step.failed") return; // the step's bounds come from its commands
    if (env.type === "step.retry") { this.bar(key, env.step, it, attempt).retry = t; return; }
    const bar = this.bar(key, env.step, it, attempt);
    if (env.type === "command.issued") bar.issued ??= t;
    else if (env.type === "command.claimed") bar.claimed ??= t;
    else if (env.type === "callback.waiting") { bar.waiting ??= t; bar.issued ??= t; }
    else if (env.type === "callback.received") bar.received ??= t;
    else { bar.ended ??= t; bar.outcome = env.type === "call.error" ? "error" : "ok"; }
  }

  bar(key, step, iteration, attempt) {
    if (!this.bars.has(key)) this.bars.set(key, { key, step, iteration, attempt, issued: null, claimed: null, ended: null, outcome: null });
    return this.bars.get(key);
  }

  draw(now = Date.now()) {
    const box = this.el.querySelector("#waterfall");
    const bars = [...this.bars.values()].filter((b) => b.issued !== null || b.claimed !== null || b.retry);
    if (!bars.length) { box.replaceChildren(h("p", { class: "muted" }, "no step has been issued yet")); return; }
    const starts = bars.map((b) => b.retry ?? b.issued ?? b.claimed);
    const t0 = Math.min(...starts);
    const t1 = Math.max(t0 + 1, ...bars.map((b) => b.ended ?? b.received ?? (b.claimed || b.issued ? now : b.retry)));
    const pct = (t) => `${(((t - t0) / (t1 - t0)) * 100).toFixed(3)}%`;
    const span = (a, b) => ({ left: pct(a), width: `max(2px, ${(((b - a) / (t1 - t0)) * 100).toFixed(3)}%)` });
    bars.sort((a, b) => (a.retry ?? a.issued ?? a.claimed) - (b.retry ?? b.issued ?? b.claimed));
    const rows = bars.map((b) => {
      const segs = [];
      const end = b.ended ?? now;
      if (b.retry && b.issued) segs.push(["backoff", b.retry, b.issued, "waiting to retry"]);
      if (b.waiting) segs.push(["wait", b.waiting, b.received ?? b.ended ?? now, "waiting for the callback"]);
      else if (b.issued !== null) segs.push(["queue", b.issued, b.claimed ?? end, "queued: issued → claimed"]);
      if (b.claimed !== null) segs.push([b.outcome === "error" ? "run error" : b.ended ? "run" : "run running", b.claimed, end, "run: claimed → ended"]);
      else if (b.received) segs.push(["run", b.received, end, "resumed"]);
      const label = `${b.step}${b.iteration !== null && b.iteration !== undefined ? `[${b.iteration}]` : ""} #${b.attempt}`;
      return h("div", { class: "wf-row", dataset: { step: b.step, attempt: b.attempt } },
        h("span", { class: "wf-label", title: b.key }, label),
        h("span", { class: "wf-track" }, segs.map(([kind, a, c, what]) => {
          const el = h("span", { class: `bar ${kind}`, dataset: { kind: kind.split(" ")[0], step: b.step, attempt: b.attempt },
            title: `${label}: ${what}, ${Math.max(0, c - a)} ms` });
          Object.assign(el.style, span(a, c));
          return el;
        })));
    });
    box.replaceChildren(h("div", { class: "wf-scale muted" }, h("span", {}, "0"), h("span", {}, `${t1 - t0} ms`)), ...rows);
  }
}
