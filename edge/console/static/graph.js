// The playbook's step graph as SVG: layers by longest path from the first step, back arcs (loops back) curved,
// on_error arcs dashed, joins and loops marked, each step coloured by its status in a projection.
import { s } from "./dom.js";

const W = 150, H = 44, GAP_X = 110, GAP_Y = 26, PAD = 20;

function arcsOf(playbook) {
  const arcs = [];
  for (const step of playbook.steps) {
    for (const a of step.next || []) arcs.push({ from: step.name, to: a.step, kind: "next", when: a.when || null });
    if (step.on_error) arcs.push({ from: step.name, to: step.on_error, kind: "on-error", when: null });
  }
  return arcs;
}

function layout(playbook, arcs) {
  const names = playbook.steps.map((st) => st.name);
  const out = new Map(names.map((n) => [n, []]));
  for (const a of arcs) if (out.has(a.from) && out.has(a.to)) out.get(a.from).push(a);
  // Back arcs: those that reach a step on the current DFS path (a loop back); the rest form a DAG.
  const state = new Map(), back = new Set();
  const visit = (n) => {
    state.set(n, 1);
    for (const a of out.get(n)) {
      if (state.get(a.to) === 1) back.add(a);
      else if (!state.has(a.to)) visit(a.to);
    }
    state.set(n, 2);
  };
  for (const n of names) if (!state.has(n)) visit(n);
  const layer = new Map(names.map((n) => [n, 0]));
  for (let changed = true, rounds = 0; changed && rounds < names.length + 1; rounds++) {
    changed = false;
    for (const a of arcs) {
      if (back.has(a) || !layer.has(a.to)) continue;
      if (layer.get(a.to) < layer.get(a.from) + 1) { layer.set(a.to, layer.get(a.from) + 1); changed = true; }
    }
  }
  const rows = new Map();
  const pos = new Map();
  for (const n of names) {
    const l = layer.get(n), r = rows.get(l) || 0;
    rows.set(l, r + 1);
    pos.set(n, { x: PAD + l * (W + GAP_X), y: PAD + r * (H + GAP_Y) });
  }
  return { pos, back, width: PAD * 2 + (Math.max(...layer.values()) + 1) * (W + GAP_X) - GAP_X,
    height: PAD * 2 + Math.max(...rows.values()) * (H + GAP_Y) - GAP_Y + 30 };
}

/** Draw ``playbook`` (the catalog's JSON form) with step statuses from ``projection``; ``onPick(step)`` on a click. */
export function drawGraph(playbook, projection, onPick) {
  const arcs = arcsOf(playbook);
  const { pos, back, width, height } = layout(playbook, arcs);
  const svg = s("svg", { id: "graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" },
    s("defs", {},
      s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
        s("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead" })),
      s("marker", { id: "arrow-err", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
        s("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrowhead err" }))));
  for (const a of arcs) {
    const p = pos.get(a.from), q = pos.get(a.to);
    if (!p || !q) continue;
    let d;
    if (back.has(a) || a.from === a.to) {
      const x1 = p.x + W / 2, y1 = p.y + H, x2 = q.x + W / 2, y2 = q.y + H;
      const dip = Math.max(y1, y2) + 40;
      d = `M ${x1} ${y1} C ${x1} ${dip}, ${x2} ${dip}, ${x2} ${y2}`;
    } else {
      const x1 = p.x + W, y1 = p.y + H / 2, x2 = q.x, y2 = q.y + H / 2, mx = (x1 + x2) / 2;
      d = `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`;
    }
    const cls = `arc ${a.kind}${back.has(a) ? " back" : ""}`;
    const title = a.kind === "on-error" ? `${a.from} → ${a.to} on error` : `${a.from} → ${a.to}${a.when ? ` when ${a.when}` : ""}`;
    svg.append(s("path", { d, class: cls, "marker-end": a.kind === "on-error" ? "url(#arrow-err)" : "url(#arrow)",
      dataset: { from: a.from, to: a.to, kind: a.kind } }, s("title", {}, title)));
    if (a.when) {
      svg.append(s("text", { x: (p.x + W + q.x) / 2, y: (p.y + q.y + H) / 2 - 4, class: "arc-label" }, a.when.length > 24 ? a.when.slice(0, 23) + "…" : a.when));
    }
    if (a.kind === "on-error") {
      svg.append(s("text", { x: (p.x + W + q.x) / 2, y: (p.y + q.y + H) / 2 + 14, class: "arc-label err" }, "on_error"));
    }
  }
  for (const step of playbook.steps) {
    const p = pos.get(step.name);
    const st = projection && projection.steps ? projection.steps[step.name] : undefined;
    const status = st ? st.status : "NOT_REACHED";
    const fanout = (step.next || []).filter((a) => !a.when).length > 1;
    const marks = [step.loop ? `↻ ${step.loop.over}` : "", step.join && step.join.length ? `⋈ ${step.join.join("+")}` : "",
      fanout ? "∥ parallel" : "", step.retry ? `retry ×${step.retry.max_attempts}` : ""].filter(Boolean).join("  ");
    const kind = step.tool && step.tool.kind ? step.tool.kind : "";
    const g = s("g", { class: `node s-${status}`, transform: `translate(${p.x},${p.y})`, tabindex: 0,
      dataset: { step: step.name, status } },
      s("title", {}, `${step.name}: ${status}${st && st.attempts ? `, ${st.attempts} attempt(s)` : ""}`),
      s("rect", { width: W, height: H, rx: 6 }),
      s("text", { x: 8, y: 17, class: "name" }, step.name.length > 18 ? step.name.slice(0, 17) + "…" : step.name),
      s("text", { x: 8, y: 33, class: "meta" }, `${kind} · ${status.toLowerCase().replace("_", " ")}`),
      marks ? s("text", { x: 0, y: H + 13, class: "marks" }, marks) : null);
    g.addEventListener("click", () => onPick(step.name));
    svg.append(g);
  }
  return svg;
}
