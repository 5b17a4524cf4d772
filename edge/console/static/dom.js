// Small DOM helpers: elements built from text nodes only (nothing from the API is ever parsed as markup).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

/** Replace ``el``'s children, leaving out null and undefined (replaceChildren would write them as text). */
export function fill(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

export function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

export function when(ts) {
  if (!ts) return "—";
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? ts : d.toISOString().replace("T", " ").replace("Z", "");
}

export function flash(message) {
  const el = document.getElementById("flash");
  el.textContent = message || "";
  el.hidden = !message;
}

/** A table of the first rows of a list of objects (a result stored by reference). */
export function rowsTable(rows, max = 20) {
  const cols = [];
  for (const r of rows.slice(0, max)) for (const k of Object.keys(r)) if (!cols.includes(k)) cols.push(k);
  return h("table", { class: "rows" },
    h("thead", {}, h("tr", {}, cols.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.slice(0, max).map((r) => h("tr", {}, cols.map((c) => h("td", {}, typeof r[c] === "object" ? JSON.stringify(r[c]) : String(r[c] ?? "")))))));
}

export const TERMINAL = new Set(["COMPLETED", "FAILED", "CANCELLED"]);
