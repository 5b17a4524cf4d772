// Dead letters per shard (admin): reason, original subject and stream position, when it was filed.
import { api } from "./api.js";
import { h, when } from "./dom.js";

export async function showDeadLetters(view, me) {
  if (me.role !== "admin") {
    view.replaceChildren(h("h1", {}, "Dead letters"), h("p", { class: "error" }, "the dead-letter view needs an admin token"));
    return () => {};
  }
  const shard = h("select", { id: "dlq-shard" }, Array.from({ length: me.shard_count }, (_, n) => h("option", { value: n }, `shard ${n}`)));
  const body = h("tbody");
  const more = h("button", { id: "dlq-more", type: "button", hidden: true }, "more");
  const count = h("span", { class: "muted", id: "dlq-count" });
  let after = 0, total = 0;
  async function load(reset) {
    if (reset) { after = 0; total = 0; body.replaceChildren(); }
    const page = await api("/api/v1/dead-letters", { query: { shard: shard.value, after_seq: after, limit: 100 } });
    for (const d of page.dead_letters) {
      body.append(h("tr", { dataset: { seq: d.seq, reason: d.reason } },
        h("td", { class: "num" }, String(d.seq)), h("td", {}, when(d.filed_at)), h("td", { class: "status s-FAILED" }, d.reason),
        h("td", {}, d.detail), h("td", {}, h("code", {}, d.subject ?? "")), h("td", {}, `${d.stream ?? ""} #${d.original_seq ?? ""}`),
        h("td", {}, d.consumer ?? ""), h("td", {}, h("code", { title: d.preview }, d.preview.slice(0, 80)))));
    }
    total += page.dead_letters.length;
    after = page.next_after_seq ?? after;
    more.hidden = page.next_after_seq === null;
    count.textContent = `${total} shown`;
  }
  shard.addEventListener("change", () => load(true));
  more.addEventListener("click", () => load(false));
  view.replaceChildren(h("h1", {}, "Dead letters ", count), h("p", {}, shard, " poison messages are never dropped: they are kept here with the reason."),
    h("table", { id: "dead-letters", class: "list" },
      h("thead", {}, h("tr", {}, ["seq", "filed", "reason", "detail", "subject", "from", "consumer", "message"].map((c) => h("th", {}, c)))), body),
    more);
  await load(true);
  return () => {};
}
