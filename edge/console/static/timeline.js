// The event timeline: pages of the timeline route, rendered through a virtual window (only the visible rows
// are in the DOM), the next page fetched when the window nears the end of what is loaded.
import { api, executionPath } from "./api.js";
import { h, when } from "./dom.js";

const ROW = 24;        // px, fixed: the window is computed from scrollTop
const PAGE = 200;      // rows per request
const OVERSCAN = 10;   // rows drawn above and below the visible ones
const TYPE_GROUPS = ["", "execution.", "step.", "command.", "call.error", "callback.", "user."];

function typeClass(type) {
  if (type === "call.error" || type === "step.failed" || type === "execution.failed") return "t-error";
  if (type.startsWith("user.")) return "t-user";
  return `t-${type.split(".")[0]}`;
}

export class Timeline {
  constructor(executionId, { onPick, steps = [] }) {
    this.id = executionId;
    this.onPick = onPick;
    this.rows = [];          // loaded rows of the current step filter, in seq order
    this.cursor = 0;         // after_seq of the next page
    this.more = true;        // a full page came back last time: there may be more
    this.loading = null;
    this.requests = 0;
    this.step = "";
    this.type = "";
    this.typeSel = h("select", { id: "tl-type" }, TYPE_GROUPS.map((t) => h("option", { value: t }, t || "any type")));
    this.stepSel = h("select", { id: "tl-step" }, h("option", { value: "" }, "any step"), steps.map((n) => h("option", { value: n }, n)));
    this.count = h("span", { id: "tl-count", class: "muted" });
    this.spacer = h("div", { class: "tl-spacer" });
    this.win = h("div", { class: "tl-window" });
    this.box = h("div", { id: "timeline", class: "tl-box", tabindex: 0 }, this.spacer, this.win);
    this.el = h("section", { id: "timeline-panel" },
      h("h2", {}, "Timeline ", this.count),
      h("div", { class: "tl-filters" }, this.typeSel, this.stepSel),
      h("div", { class: "tl-head" }, ["seq", "time", "Δt", "type", "step", "#", "summary"].map((c) => h("span", {}, c))),
      this.box);
    this.box.addEventListener("scroll", () => this.draw());
    this.typeSel.addEventListener("change", () => { this.type = this.typeSel.value; this.box.scrollTop = 0; this.draw(); });
    this.stepSel.addEventListener("change", () => { this.step = this.stepSel.value; this.reset(); });
  }

  visible() {
    return this.type ? this.rows.filter((r) => (this.type.endsWith(".") ? r.type.startsWith(this.type) : r.type === this.type)) : this.rows;
  }

  reset() {
    this.rows = [];
    this.cursor = 0;
    this.more = true;
    this.box.scrollTop = 0;
    this.fetchMore();
  }

  async fetchMore() {
    if (this.loading || !this.more) return this.loading;
    const step = this.step;
    this.loading = (async () => {
      this.requests += 1;
      const page = await api(executionPath(this.id, "/timeline"), { query: { after_seq: this.cursor, limit: PAGE, step: step || undefined } });
      if (step !== this.step) return;
      for (const r of page.rows) if (!this.rows.length || r.seq > this.rows[this.rows.length - 1].seq) this.rows.push(r);
      if (page.rows.length) this.cursor = page.rows[page.rows.length - 1].seq;
      if (page.next_after_seq !== null && page.next_after_seq !== undefined) { this.cursor = page.next_after_seq; this.more = true; }
      else this.more = false;
    })();
    try { await this.loading; } finally { this.loading = null; }
    this.draw();
  }

  /** A new event arrived live: read what follows the loaded rows, if the end was reached. */
  async live() {
    if (this.more || this.loading) return;
    this.more = true;
    await this.fetchMore();
  }

  draw() {
    const rows = this.visible();
    this.spacer.style.height = `${(rows.length + (this.more ? 1 : 0)) * ROW}px`;
    const top = this.box.scrollTop, height = this.box.clientHeight || 400;
    const first = Math.max(0, Math.floor(top / ROW) - OVERSCAN);
    const last = Math.min(rows.length, Math.ceil((top + height) / ROW) + OVERSCAN);
    this.win.style.transform = `translateY(${first * ROW}px)`;
    this.win.replaceChildren(...rows.slice(first, last).map((r) => this.row(r)));
    this.count.textContent = `${this.rows.length} loaded${this.more ? ", more on scroll" : ""} · ${this.requests} request(s)`;
    // Near the end of what is loaded (or a filter left too few rows to fill the box): the next page.
    if (this.more && (last >= rows.length - OVERSCAN || rows.length * ROW < height)) this.fetchMore();
  }

  row(r) {
    const dt = r.dt_ms === null || r.dt_ms === undefined ? "" : r.dt_ms >= 1000 ? `+${(r.dt_ms / 1000).toFixed(2)}s` : `+${r.dt_ms}ms`;
    return h("div", { class: `tl-row ${typeClass(r.type)}`, dataset: { seq: r.seq, type: r.type }, title: JSON.stringify(r.payload), onclick: () => this.onPick(r) },
      h("span", { class: "num" }, String(r.seq)), h("span", {}, when(r.ts).slice(11)), h("span", { class: "num" }, dt),
      h("span", { class: "type" }, r.type), h("span", {}, r.step || ""), h("span", { class: "num" }, r.attempt ?? ""),
      h("span", { class: "summary" }, r.summary));
  }
}
