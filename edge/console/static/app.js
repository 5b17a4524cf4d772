// The console's shell: sign-in, the tenant/project picker and the hash router (#/executions, #/executions/<id>, #/dead-letters).
import { api, ApiError, session } from "./api.js";
import { flash } from "./dom.js";
import { showList } from "./list.js";
import { showExecution } from "./execution.js";
import { showDeadLetters } from "./deadletters.js";

const signinView = document.getElementById("signin-view");
let me = null;
let current = null; // the open view's cleanup (streams to stop)

const $ = (id) => document.getElementById(id);

async function signIn(token) {
  session.token = token;
  try {
    me = await api("/api/v1/whoami");
  } catch (e) {
    session.token = "";
    me = null;
    throw e;
  }
  $("who").textContent = `${me.name} (${me.role})`;
  $("signout").hidden = false;
  $("scope").hidden = false;
  $("nav").hidden = false;
  $("nav-dlq").hidden = me.role !== "admin";
  const tenants = $("tenants");
  tenants.replaceChildren(...me.tenants.filter((t) => t !== "*").map((t) => Object.assign(document.createElement("option"), { value: t })));
  if (!session.tenant && me.tenants.length && me.tenants[0] !== "*") session.tenant = me.tenants[0];
  $("tenant").value = session.tenant;
  $("project").value = session.project;
  const recent = JSON.parse(localStorage.getItem("noetl.console.projects") || "[]");
  $("projects").replaceChildren(...recent.map((p) => Object.assign(document.createElement("option"), { value: p })));
}

function allows(tenant) {
  return me && (me.tenants.includes("*") || me.tenants.includes(tenant));
}

let generation = 0;

async function route() {
  const mine = ++generation;
  if (current) { current(); current = null; }
  flash("");
  if (!me) { $("view").replaceChildren(signinView); return; }
  // Each view draws into its own box: one that finishes loading after another view opened draws into a detached box.
  const view = document.createElement("div");
  view.className = "view";
  $("view").replaceChildren(view);
  const hash = location.hash || "#/executions";
  if (hash.startsWith("#/dead-letters")) { current = await showDeadLetters(view, me); return; }  // holds no stream
  if (!session.tenant || !session.project) {
    view.replaceChildren(Object.assign(document.createElement("p"), { id: "pick-hint", textContent: "Pick a tenant and a project above." }));
    return;
  }
  const m = hash.match(/^#\/executions\/([0-9]+)/);
  const cleanup = m ? await showExecution(view, m[1], me) : await showList(view, me);
  if (mine === generation) current = cleanup; else cleanup(); // another view opened meanwhile
}

function onError(e) {
  flash(e instanceof ApiError ? e.message : String(e && e.message ? e.message : e));
}

window.addEventListener("hashchange", () => route().catch(onError));
window.addEventListener("unhandledrejection", (ev) => onError(ev.reason));

$("signin").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("signin-error").textContent = "";
  try {
    await signIn($("token").value.trim());
    $("token").value = "";
    await route();
  } catch (e) {
    $("signin-error").textContent = e instanceof ApiError && e.status === 401 ? "That token was refused (401)." : String(e.message || e);
  }
});

$("signout").addEventListener("click", () => { session.clear(); location.hash = ""; location.reload(); });

$("scope").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const tenant = $("tenant").value.trim(), project = $("project").value.trim();
  if (!allows(tenant)) { flash(`this token may not access tenant '${tenant}'`); return; }
  session.tenant = tenant;
  session.project = project;
  const recent = [project, ...JSON.parse(localStorage.getItem("noetl.console.projects") || "[]").filter((p) => p !== project)].slice(0, 10);
  localStorage.setItem("noetl.console.projects", JSON.stringify(recent));
  if (location.hash === "#/executions") route().catch(onError); else location.hash = "#/executions";
});

if (session.token) {
  signIn(session.token).then(route, (e) => { $("signin-error").textContent = String(e.message || e); });
}
