// otakit dashboard: plain JavaScript, no build step, no third-party code.
//
// It calls the management API (/api/v1) with the token the operator signs in with: an admin
// token, or a viewer token (read-only: the page then shows no control that changes anything).
// The token is kept in this tab's sessionStorage and sent only in the Authorization header,
// never in a URL. Every piece of data is put on the page with textContent (never as HTML).
(() => {
  "use strict";

  const TOKEN_KEY = "otakit.adminToken";
  const ROLE_KEY = "otakit.role"; // admin or viewer, as /api/v1/whoami said at sign-in
  const POLL_MS = 1500; // live progress: deployments, rollouts and devices are polled this often
  const PAGE = 25; // deployments shown before "Show more"
  const DEVICE_PAGE = 100; // devices per page: the registry is never loaded whole
  const ARTIFACT_PAGE = 100; // artifacts per page (and the choices when deploying)
  const AUDIT_PAGE = 50; // audit records per page
  const ARTIFACT_NAME = /[^A-Za-z0-9._+-]/g; // what an artifact's name may not contain
  const MAX_ARTIFACT_NAME = 128;
  const LIVE_STATES = ["scheduled", "running", "paused"];
  const COUNT_ORDER = ["Applied", "Applying", "Unknown", "Downloading", "Interrupted", "Error", "Reverted"];
  const VIEWS = ["deployments", "devices", "artifacts", "audit"];
  const DELTA_LIVE = ["queued", "making"]; // a delta in these states is read again at each poll

  const $ = (id) => document.getElementById(id);

  // --- small DOM helpers ------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function when(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  }

  function ago(iso) {
    if (!iso) return "never";
    const seconds = Math.max(0, Math.round((Date.now() - new Date(iso).getTime()) / 1000));
    if (seconds < 60) return `${seconds} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} d ago`;
  }

  function size(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
  }

  function timeTag(iso, text) {
    return el("time", { datetime: iso || undefined, title: iso ? when(iso) : undefined, text });
  }

  // --- the API ----------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(call, status, code, message) {
      super(message);
      this.call = call;
      this.status = status;
      this.code = code;
    }

    describe() {
      const status = this.status ? `${this.status} ` : "";
      return `${this.call}: ${status}${this.code}: ${this.message}`;
    }
  }

  async function api(method, path, body, token, pageOf) {
    const bearer = token || sessionStorage.getItem(TOKEN_KEY);
    const headers = { accept: "application/json" };
    if (bearer) headers.authorization = `Bearer ${bearer}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    const call = `${method} ${path.split("?")[0]}`;
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
      });
    } catch (err) {
      throw new ApiError(call, 0, "NETWORK", `the server did not answer (${err.message})`);
    }
    const text = response.status === 204 ? "" : await response.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (err) {
        data = null;
      }
    }
    if (!response.ok) {
      const code = (data && data.error) || "HTTP";
      const message = (data && data.message) || response.statusText || "the call failed";
      throw new ApiError(call, response.status, code, message);
    }
    if (pageOf) pageOf.next = response.headers.get("x-next-cursor");
    return data;
  }

  // One page of a paged list (GET): its items and the cursor of the next page (null: the last).
  async function apiPage(path, params) {
    const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined));
    const found = { next: null };
    const items = await api("GET", `${path}?${query}`, undefined, undefined, found);
    return { items, next: found.next };
  }

  // --- messages ---------------------------------------------------------------------------------

  let errorSource = null; // "poll" errors clear themselves on the next good poll

  function showError(err, source) {
    const text = err instanceof ApiError ? err.describe() : String(err.message || err);
    $("error-text").textContent = text;
    errorSource = source || "action";
    show($("error"), true);
  }

  function clearError(source) {
    if (source && errorSource !== source) return;
    show($("error"), false);
    errorSource = null;
  }

  let noticeTimer = null;

  function notify(text) {
    const notice = $("notice");
    notice.textContent = text;
    show(notice, true);
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => show(notice, false), 6000);
  }

  // A call the operator asked for: show its failure; a rejected token signs out.
  async function act(work) {
    try {
      clearError("action");
      return await work();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        signOut(`The server no longer accepts this token: ${err.message}`);
      } else {
        showError(err, "action");
      }
      return undefined;
    }
  }

  // --- sign in and out --------------------------------------------------------------------------

  const state = {
    view: "deployments",
    deployments: [],
    rollouts: new Map(), // rollout id -> { rollout, key }
    shown: PAGE,
    artifacts: [],
    products: [],
    devices: [],
    deviceCounts: null, // { total, statuses } of the devices matching the filters but status
    devicePages: { key: null, cursors: [null], next: null }, // cursors of the pages seen so far
    artifactPages: { cursors: [null], next: null },
    audit: [],
    auditPages: { key: null, cursors: [null], next: null },
    confirmingDelete: null, // the artifact id whose delete is being confirmed
    deltas: new Map(), // artifact id -> { deltas: [...] (null: being read), error } of its open deltas
    uploading: false,
    moreDeployments: false,
    drawer: null, // { serial, older: bool, last: id }
    pollTimer: null,
    polling: false,
  };

  async function signIn(event) {
    event.preventDefault();
    const input = $("token");
    const token = input.value.trim();
    const problem = $("login-error");
    show(problem, false);
    if (!token) {
      problem.textContent = "Enter an admin or viewer token.";
      show(problem, true);
      input.focus();
      return;
    }
    $("login-button").disabled = true;
    try {
      const me = await api("GET", "/api/v1/whoami", undefined, token);
      sessionStorage.setItem(TOKEN_KEY, token);
      setRole(me);
      input.value = "";
      enter();
    } catch (err) {
      const why =
        err instanceof ApiError && (err.status === 401 || err.status === 403)
          ? `The server refused this token: ${err.message}`
          : err instanceof ApiError
            ? err.describe()
            : String(err);
      problem.textContent = why;
      show(problem, true);
      input.select();
    } finally {
      $("login-button").disabled = false;
    }
  }

  // Admin or viewer: a viewer's page has no control that changes anything (the server refuses
  // them anyway). Until the server has said, the role of the sign-in stands.
  function setRole(me) {
    const role = me && me.role === "admin" ? "admin" : "viewer";
    sessionStorage.setItem(ROLE_KEY, role);
    applyRole(role, me ? me.actor : null);
  }

  function applyRole(role, actor) {
    const changed = document.body.dataset.role !== role;
    document.body.dataset.role = role;
    const badge = $("role");
    badge.textContent = role === "viewer" ? "viewer · read-only" : "admin";
    if (actor) badge.title = `Signed in as ${actor}`;
    show(badge, true);
    if (changed) {
      for (const card of cards.values()) delete card.dataset.signature; // controls drawn again
      $("artifact-rows").dataset.signature = "";
    }
  }

  function isAdmin() {
    return document.body.dataset.role === "admin";
  }

  function signOut(reason) {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(ROLE_KEY);
    delete document.body.dataset.role;
    show($("role"), false);
    clearTimeout(state.pollTimer);
    state.deployments = [];
    state.rollouts.clear();
    state.devices = [];
    state.devicePages = { key: null, cursors: [null], next: null };
    state.artifactPages = { cursors: [null], next: null };
    state.audit = [];
    state.auditPages = { key: null, cursors: [null], next: null };
    state.confirmingDelete = null;
    state.deltas.clear();
    $("deployment-list").replaceChildren();
    $("device-rows").replaceChildren();
    $("artifact-rows").replaceChildren();
    $("audit-rows").replaceChildren();
    for (const body of [$("device-rows"), $("artifact-rows"), $("audit-rows")]) body.dataset.signature = "";
    for (const card of cards.values()) card.remove();
    cards.clear();
    closeDrawer();
    clearError();
    show($("nav"), false);
    show($("sign-out"), false);
    $("updated").textContent = "";
    for (const view of VIEWS) show($(`view-${view}`), false);
    show($("view-login"), true);
    const problem = $("login-error");
    problem.textContent = reason || "";
    show(problem, Boolean(reason));
    $("token").focus();
  }

  function enter() {
    applyRole(sessionStorage.getItem(ROLE_KEY) || "viewer", null);
    api("GET", "/api/v1/whoami")
      .then(setRole)
      .catch((err) => {
        if (err instanceof ApiError && err.status === 401) signOut(`The server no longer accepts this token: ${err.message}`);
      });
    show($("view-login"), false);
    show($("login-error"), false);
    show($("nav"), true);
    show($("sign-out"), true);
    route();
    loadReferenceData();
  }

  // --- views ------------------------------------------------------------------------------------

  function route() {
    if (!sessionStorage.getItem(TOKEN_KEY)) return;
    const wanted = location.hash.replace(/^#/, "");
    state.view = VIEWS.includes(wanted) ? wanted : "deployments";
    for (const view of VIEWS) show($(`view-${view}`), view === state.view);
    for (const link of document.querySelectorAll("#nav a")) {
      if (link.dataset.view === state.view) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    if (state.view !== "devices") closeDrawer();
    poll();
  }

  async function poll() {
    clearTimeout(state.pollTimer);
    if (!sessionStorage.getItem(TOKEN_KEY)) return;
    if (state.polling) {
      state.pollTimer = setTimeout(poll, 100);
      return;
    }
    state.polling = true;
    try {
      if (!document.hidden) {
        if (state.view === "deployments") await refreshDeployments();
        else if (state.view === "devices") await refreshDevices();
        else if (state.view === "artifacts") await refreshArtifacts();
        else if (state.view === "audit") await refreshAudit();
        clearError("poll");
        $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        state.polling = false;
        signOut(`The server no longer accepts this token: ${err.message}`);
        return;
      }
      showError(err, "poll");
    } finally {
      state.polling = false;
    }
    if (sessionStorage.getItem(TOKEN_KEY)) state.pollTimer = setTimeout(poll, POLL_MS);
  }

  async function loadReferenceData() {
    try {
      const [products, artifacts] = await Promise.all([
        api("GET", "/api/v1/products"),
        apiPage("/api/v1/artifacts", { limit: ARTIFACT_PAGE }),
      ]);
      state.products = products;
      state.artifacts = artifacts.items;
      fillProducts();
      fillArtifactChoices();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) signOut(err.message);
      else showError(err, "poll");
    }
  }

  function fillProducts() {
    const names = state.products.map((p) => p.name);
    $("product-names").replaceChildren(...names.map((n) => el("option", { value: n })));
    const filter = $("f-product");
    const chosen = filter.value;
    filter.replaceChildren(
      el("option", { value: "", text: "All" }),
      ...names.map((n) => el("option", { value: n, text: n })),
    );
    filter.value = names.includes(chosen) ? chosen : "";
  }

  function fillArtifactChoices() {
    const select = $("c-artifact");
    const chosen = select.value;
    select.replaceChildren(
      el("option", { value: "", text: state.artifacts.length ? "Choose an artifact" : "No artifacts uploaded" }),
      ...state.artifacts.map((a) =>
        el("option", { value: a.id, text: `${a.name} ${a.version} (${a.id.slice(0, 12)})` }),
      ),
    );
    if (state.artifacts.some((a) => a.id === chosen)) select.value = chosen;
  }

  // --- deployments ------------------------------------------------------------------------------

  function countsKey(d) {
    return JSON.stringify([d.counts, d.active, d.cancelled_at]);
  }

  async function refreshDeployments() {
    // one page: as many as are shown (and one more, to know whether to offer "Show more")
    const found = await apiPage("/api/v1/deployments", {
      limit: state.shown,
      active: $("show-finished").checked ? "" : "true",
    });
    const deployments = found.items;
    state.moreDeployments = found.next !== null;
    const visible = visibleDeployments(deployments);
    // A rollout is read again while it can change by itself, or when its devices moved.
    const stale = visible.filter((d) => {
      if (d.rollout_id === null || d.rollout_id === undefined) return false;
      const known = state.rollouts.get(d.rollout_id);
      return !known || LIVE_STATES.includes(known.rollout.state) || known.key !== countsKey(d);
    });
    const fresh = await Promise.all(
      stale.map((d) => api("GET", `/api/v1/rollouts/${d.rollout_id}`).then((r) => [d, r])),
    );
    for (const [d, rollout] of fresh) state.rollouts.set(rollout.id, { rollout, key: countsKey(d) });
    state.deployments = deployments;
    renderDeployments();
  }

  function visibleDeployments(deployments) {
    const all = $("show-finished").checked ? deployments : deployments.filter((d) => d.active);
    return all.slice(0, state.shown);
  }

  const cards = new Map(); // deployment id -> card element

  function renderDeployments() {
    const list = $("deployment-list");
    const all = $("show-finished").checked
      ? state.deployments
      : state.deployments.filter((d) => d.active);
    const visible = all.slice(0, state.shown);
    const keep = new Set();
    visible.forEach((d, index) => {
      let card = cards.get(d.id);
      if (!card) {
        card = newCard(d);
        cards.set(d.id, card);
      }
      const known = d.rollout_id ? state.rollouts.get(d.rollout_id) : undefined;
      fillCard(card, d, known ? known.rollout : null);
      if (list.children[index] !== card) list.insertBefore(card, list.children[index] || null);
      keep.add(card);
    });
    for (const [id, card] of cards) {
      if (!keep.has(card)) {
        card.remove();
        cards.delete(id);
      }
    }
    show($("deployments-empty"), state.deployments.length === 0);
    show($("deployments-more"), all.length > visible.length || Boolean(state.moreDeployments));
  }

  function newCard(d) {
    return el(
      "article",
      { class: "card deployment", "data-testid": `deployment-${d.id}`, dataset: { deploymentId: d.id } },
      el("div", { class: "card-head" }),
      el("div", { class: "card-body" }),
      el("div", { class: "card-controls" }),
    );
  }

  function fillCard(card, d, rollout) {
    const signature = JSON.stringify([d, rollout]);
    if (card.dataset.signature === signature) return; // nothing moved: leave the DOM alone
    card.dataset.signature = signature;
    if (rollout) card.dataset.rolloutId = rollout.id;
    const [head, body, controls] = card.children;
    head.replaceChildren(...cardHead(d, rollout));
    body.replaceChildren(...cardBody(d, rollout));
    // an open abort/cancel form stays while there is still something to abort
    const confirming = controls.querySelector("form");
    const over = rollout ? !LIVE_STATES.includes(rollout.state) : !d.active;
    if (!confirming || over) keepFocus(controls, () => controls.replaceChildren(...cardControls(d, rollout)));
  }

  // Re-render ``container`` without losing keyboard focus: focus returns to the new element
  // with the same data-testid.
  function keepFocus(container, render) {
    const focused = document.activeElement;
    const testid = focused && container.contains(focused) ? focused.dataset.testid : null;
    render();
    if (testid) {
      const again = container.querySelector(`[data-testid="${CSS.escape(testid)}"]`);
      if (again) again.focus();
    }
  }

  function deploymentState(d, rollout) {
    if (rollout) return rollout.state;
    if (d.cancelled_at) return "cancelled";
    return d.active ? "active" : "expired";
  }

  function artifactName(id) {
    const artifact = state.artifacts.find((a) => a.id === id);
    return artifact ? artifact.name : id.slice(0, 12);
  }

  function cardHead(d, rollout) {
    const stateName = deploymentState(d, rollout);
    const title = el(
      "h2",
      {},
      `Deployment ${d.id} `,
      el("span", { class: "muted", text: `· ${artifactName(d.artifact_id)} ${d.version}` }),
    );
    const badges = [el("span", { class: `badge state-${stateName}`, "data-testid": `state-${d.id}`, text: stateName })];
    if (rollout) {
      badges.push(
        el("span", { class: "badge", "data-testid": `phase-of-${d.id}`, text: `phase ${rollout.phase} of ${rollout.phases.length}` }),
      );
      if (rollout.awaiting_approval) {
        // held for an operator: a manual phase, or a phase that holds no device yet (it never
        // passes by itself: its devices may not have enrolled yet)
        const current = rollout.phases[rollout.phase - 1];
        const empty = !current || !current.targeted;
        const ready = !empty && (100 * current.succeeded) / current.targeted >= current.success;
        const text = empty ? "waiting for devices" : ready ? "ready for approval" : "manual phase";
        badges.push(
          el("span", {
            class: `badge ${ready ? "state-paused" : ""}`,
            "data-testid": `approval-${d.id}`,
            title: empty
              ? `No device falls into phase ${rollout.phase} yet: it is held until one does, or until it is approved`
              : undefined,
            text,
          }),
        );
      }
      if (rollout.window && !rollout.window_open && LIVE_STATES.includes(rollout.state)) {
        badges.push(el("span", { class: "badge", title: rollout.next_window ? `opens ${when(rollout.next_window)}` : undefined, text: "window closed" }));
      }
    }
    const facts = [
      el("code", { class: "condition", text: d.condition }),
      el("span", { class: "muted", text: ` · created ${when(d.created_at)}` }),
    ];
    if (rollout) facts.push(el("span", { class: "muted", text: ` · rollout ${rollout.id}` }));
    if (d.downgrade) facts.push(el("span", { class: "muted", text: " · downgrade" }));
    const out = [el("div", { class: "title-row" }, title, el("span", { class: "badges" }, badges)), el("p", { class: "facts-line" }, facts)];
    const reason = rollout ? rollout.reason : null;
    if (reason) out.push(el("p", { class: `reason state-${stateName}`, "data-testid": `reason-${d.id}`, text: `Reason: ${reason}` }));
    return out;
  }

  function countsLine(d, prefix) {
    const counts = { ...d.counts };
    return el(
      "ul",
      { class: "legend", "aria-label": "Devices per status" },
      COUNT_ORDER.map((name) =>
        el(
          "li",
          { "data-testid": `${prefix}-${name}`, dataset: { count: counts[name] || 0 } },
          el("span", { class: `swatch s-${name}`, "aria-hidden": "true" }),
          `${name} `,
          el("strong", { text: String(counts[name] || 0) }),
        ),
      ),
      anonymousCount(d) ? el("li", { "data-testid": `${prefix}-anonymous`, text: `(${anonymousCount(d)} anonymous)` }) : null,
    );
  }

  function anonymousCount(d) {
    return Object.values(d.anonymous || {}).reduce((sum, n) => sum + n, 0);
  }

  function stackedBar(counts, total, label, testid) {
    const bar = el("div", {
      class: "bar",
      role: "img",
      "aria-label": label,
      "data-testid": testid,
    });
    for (const name of COUNT_ORDER) {
      const value = counts[name] || 0;
      if (!value || !total) continue;
      const segment = el("span", { class: `seg s-${name}`, title: `${name}: ${value}` });
      segment.style.width = `${Math.min(100, (100 * value) / total)}%`;
      bar.append(segment);
    }
    return bar;
  }

  function cardBody(d, rollout) {
    // a rollout counts its devices per phase; a plain deployment says how many registered
    // devices its target matches (null: a tag condition the server does not count)
    const targeted = rollout ? rollout.targeted : d.targeted;
    const known = typeof targeted === "number";
    const reporting = sum(d.counts);
    const total = known ? Math.max(targeted, reporting) : reporting;
    const applied = d.counts.Applied || 0;
    const devices = (n) => `${n} device${n === 1 ? "" : "s"}`;
    let summary;
    if (known) summary = `${devices(targeted)} targeted · ${applied} applied`;
    else if (reporting) summary = `${devices(reporting)} reporting · ${applied} applied`;
    else summary = "No device has reported yet (targets a tag condition)";
    const out = [
      el("p", { class: "summary", "data-testid": `summary-${d.id}`, text: summary }),
      stackedBar(d.counts, total, summary, `bar-${d.id}`),
      countsLine(d, `count-${d.id}`),
    ];
    if (rollout) out.push(phaseTable(d, rollout));
    return out;
  }

  function sum(counts) {
    return Object.values(counts || {}).reduce((a, b) => a + b, 0);
  }

  function phaseName(phase) {
    return phase.group ? `group ${phase.group}` : `${phase.percent}%`;
  }

  function phaseRules(phase) {
    const rules = [`success ${phase.success}%`];
    if (phase.max_errors !== null && phase.max_errors !== undefined) rules.push(`max ${phase.max_errors} errors`);
    if (phase.max_errors_percent !== null && phase.max_errors_percent !== undefined) rules.push(`max ${phase.max_errors_percent}% errors`);
    if (rules.length > 1) rules.push(`then ${phase.on_error}`);
    if (phase.manual) rules.push("manual");
    return rules.join(" · ");
  }

  function phaseTable(d, rollout) {
    const rows = rollout.phases.map((phase) => {
      const inFlight =
        (phase.counts.Downloading || 0) + (phase.counts.Interrupted || 0) + (phase.counts.Applying || 0) +
        Math.max(0, (phase.counts.Applied || 0) - phase.succeeded);
      const targeted = phase.targeted;
      const label = `Phase ${phase.number}: ${phase.succeeded} of ${targeted} devices updated, ${phase.failed} failed, ${inFlight} in progress`;
      const bar = el("div", {
        class: "bar",
        role: "progressbar",
        "aria-label": label,
        "aria-valuemin": 0,
        "aria-valuemax": targeted,
        "aria-valuenow": phase.succeeded,
        "data-testid": `phase-${rollout.id}-${phase.number}`,
        dataset: {
          status: phase.status,
          targeted,
          succeeded: phase.succeeded,
          failed: phase.failed,
          inProgress: inFlight,
        },
      });
      const denominator = Math.max(targeted, phase.succeeded + phase.failed + inFlight);
      for (const [cls, value, name] of [
        ["s-Applied", phase.succeeded, "updated"],
        ["s-Downloading", inFlight, "in progress"],
        ["s-Error", phase.failed, "failed"],
      ]) {
        if (!value || !denominator) continue;
        const segment = el("span", { class: `seg ${cls}`, title: `${name}: ${value}` });
        segment.style.width = `${Math.min(100, (100 * value) / denominator)}%`;
        bar.append(segment);
      }
      const shownStatus = phase.status === "current" && rollout.state === "aborted" ? "stopped" : phase.status;
      // a phase without devices is not passed: it shows none updated, never "100 %"
      const numbers = targeted
        ? `${phase.succeeded}/${targeted} updated (${Math.round((100 * phase.succeeded) / targeted)}%)`
        : el("span", { class: phase.status === "current" ? "phase-empty" : "muted", text: "no devices yet" });
      return el(
        "tr",
        { class: `phase phase-${phase.status}` },
        el("th", { scope: "row" }, `${phase.number}. ${phaseName(phase)}`),
        el("td", {}, el("span", { class: `badge phase-status-${shownStatus}`, text: shownStatus })),
        el("td", { class: "bar-cell" }, bar),
        el(
          "td",
          { class: "numbers", "data-testid": `phase-text-${rollout.id}-${phase.number}` },
          numbers,
          phase.failed ? ` · ${phase.failed} failed` : "",
          inFlight ? ` · ${inFlight} in progress` : "",
        ),
        el("td", { class: "muted rules", text: phaseRules(phase) }),
      );
    });
    return el(
      "table",
      { class: "phases", "data-testid": `phases-${rollout.id}` },
      el("caption", { class: "sr-only", text: `Phases of rollout ${rollout.id}` }),
      el(
        "thead",
        {},
        el("tr", {}, ["Phase", "Status", "Progress", "Devices", "Rules"].map((h) => el("th", { scope: "col", text: h }))),
      ),
      el("tbody", {}, rows),
    );
  }

  function cardControls(d, rollout) {
    if (!isAdmin()) return []; // a viewer changes nothing
    if (!rollout) {
      if (!d.active) return [];
      return [dangerButton(`cancel-${d.id}`, "Cancel deployment…", () => confirmForm(d, null))];
    }
    const id = rollout.id;
    const buttons = [];
    const running = rollout.state === "running";
    if (running || rollout.state === "scheduled") {
      buttons.push(actionButton(`pause-${id}`, "Pause", () => rolloutAction(rollout, "pause")));
    }
    if (rollout.state === "paused") {
      buttons.push(actionButton(`resume-${id}`, "Resume", () => rolloutAction(rollout, "resume")));
    }
    if (running) {
      const last = rollout.phase >= rollout.phases.length;
      buttons.push(
        actionButton(`approve-${id}`, last ? `Approve phase ${rollout.phase} (complete)` : `Approve phase ${rollout.phase}`, () =>
          rolloutAction(rollout, "approve", { phase: rollout.phase }),
        ),
      );
    }
    if (LIVE_STATES.includes(rollout.state)) {
      buttons.push(dangerButton(`abort-${id}`, "Abort…", () => confirmForm(d, rollout)));
    }
    return buttons;
  }

  function actionButton(testid, text, handler) {
    return el("button", {
      type: "button",
      class: "secondary",
      "data-testid": testid,
      text,
      onclick: async (event) => {
        const button = event.currentTarget;
        button.disabled = true;
        try {
          await handler();
        } finally {
          button.disabled = false;
        }
      },
    });
  }

  function dangerButton(testid, text, handler) {
    return el("button", { type: "button", class: "danger", "data-testid": testid, text, onclick: handler });
  }

  // Abort (rollout) or cancel (plain deployment): confirmed in place, with a reason.
  function confirmForm(d, rollout) {
    const card = cards.get(d.id);
    const controls = card.querySelector(".card-controls");
    const key = rollout ? `${rollout.id}` : `d${d.id}`;
    const what = rollout ? `Abort rollout ${rollout.id}` : `Cancel deployment ${d.id}`;
    const reason = el("input", { id: `reason-input-${key}`, maxlength: 200, "data-testid": `abort-reason-${key}`, placeholder: "bad build" });
    const form = el(
      "form",
      {
        class: "confirm",
        "aria-label": what,
        onsubmit: async (event) => {
          event.preventDefault();
          submit.disabled = true;
          const done = rollout
            ? await rolloutAction(rollout, "abort", reason.value.trim() ? { reason: reason.value.trim() } : undefined)
            : await act(async () => {
                await api("POST", `/api/v1/deployments/${d.id}/cancel`);
                notify(`Deployment ${d.id} cancelled.`);
                return true;
              });
          submit.disabled = false;
          if (done !== undefined) {
            controls.replaceChildren();
            delete card.dataset.signature;
            await poll();
          }
        },
      },
      el("p", {}, rollout
        ? "Stops the rollout for good: the deployment is cancelled and devices downloading it are told to stop."
        : "Stops offering this deployment to devices."),
      el("label", { for: `reason-input-${key}` }, rollout ? "Reason (optional)" : "Note (not stored)"),
      reason,
    );
    const submit = el("button", { type: "submit", class: "danger", "data-testid": `abort-confirm-${key}`, text: what });
    const back = el("button", {
      type: "button",
      class: "secondary",
      "data-testid": `abort-cancel-${key}`,
      text: "Keep it",
      onclick: () => {
        controls.replaceChildren(...cardControls(d, rollout));
      },
    });
    form.append(el("div", { class: "buttons" }, submit, back));
    controls.replaceChildren(form);
    reason.focus();
  }

  async function rolloutAction(rollout, action, body) {
    return act(async () => {
      const result = await api("POST", `/api/v1/rollouts/${rollout.id}/${action}`, body);
      state.rollouts.set(result.id, { rollout: result, key: "" });
      const past = { pause: "paused", resume: "resumed", abort: "aborted", approve: "approved" }[action];
      notify(`Rollout ${rollout.id} ${past}: now ${result.state}, phase ${result.phase} of ${result.phases.length}.`);
      await poll();
      return true;
    });
  }

  // --- creating a deployment --------------------------------------------------------------------

  function parsePhases(text) {
    const parts = text.split(",").map((p) => p.trim()).filter(Boolean);
    return parts.map((part) => {
      let match = /^(\d+(?:\.\d+)?)\s*%?$/.exec(part);
      if (match) {
        const percent = Number(match[1]);
        if (!(percent > 0 && percent <= 100)) {
          throw new Error(`phase "${part}": a share is above 0% and at most 100%`);
        }
        return { percent };
      }
      match = /^group:\s*([A-Za-z0-9._:-]{1,64})$/.exec(part);
      if (match) return { group: match[1] };
      throw new Error(`phase "${part}": expected N% or group:NAME`);
    });
  }

  function numberField(id, name) {
    const text = $(id).value.trim();
    if (text === "") return null;
    const value = Number(text);
    if (!Number.isFinite(value) || value < 0) throw new Error(`${name}: expected a number of 0 or more`);
    return value;
  }

  async function createDeployment(event) {
    event.preventDefault();
    const problem = $("create-error");
    show(problem, false);
    let request;
    try {
      const artifact = $("c-artifact").value;
      const product = $("c-product").value.trim();
      const group = $("c-group").value.trim();
      if (!artifact) throw new Error("choose an artifact");
      if (!product) throw new Error("enter the product to deploy to");
      const deployment = { artifact_id: artifact, product };
      if (group) deployment.group = group;
      const phases = parsePhases($("c-phases").value);
      if (phases.length === 0) {
        request = ["/api/v1/deployments", deployment];
      } else {
        const success = numberField("c-success", "success");
        const maxErrors = numberField("c-max-errors", "max errors");
        const confirm = numberField("c-confirm", "confirm timeout");
        for (const phase of phases) {
          if (success !== null) phase.success = success;
          if (maxErrors !== null) phase.max_errors_percent = maxErrors;
          phase.on_error = $("c-on-error").value;
          phase.manual = $("c-manual").checked;
        }
        const body = { deployment, phases };
        if (confirm !== null) body.confirm_timeout = Math.round(confirm);
        request = ["/api/v1/rollouts", body];
      }
    } catch (err) {
      problem.textContent = err.message;
      show(problem, true);
      return;
    }
    const submit = $("create-form").querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const created = await api("POST", ...request);
      const text = created.deployment_id
        ? `Deployment ${created.deployment_id} created with rollout ${created.id} (${created.state}).`
        : `Deployment ${created.id} created.`;
      notify(text);
      $("c-phases").value = "";
      $("create").open = false;
      await poll();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) {
        signOut(err.message);
        return;
      }
      problem.textContent = err instanceof ApiError ? err.describe() : String(err);
      show(problem, true);
    } finally {
      submit.disabled = false;
    }
  }

  // --- devices ----------------------------------------------------------------------------------

  // The filters are applied by the server, which answers one page and the counts: a refresh
  // costs one page and one grouped count whatever the size of the fleet.
  function deviceFilters() {
    return {
      product: $("f-product").value,
      group: $("f-group").value.trim(),
      status: $("f-status").value,
      version: $("f-version").value.trim(),
      q: $("f-serial").value.trim(),
    };
  }

  async function refreshDevices() {
    const filters = deviceFilters();
    const sort = $("f-sort").value;
    const key = JSON.stringify([filters, sort]);
    if (state.devicePages.key !== key) state.devicePages = { key, cursors: [null] };
    const pages = state.devicePages;
    const cursor = pages.cursors[pages.cursors.length - 1];
    const [found, counts] = await Promise.all([
      apiPage("/api/v1/devices", { ...filters, sort, limit: DEVICE_PAGE, cursor }),
      apiPage("/api/v1/device-counts", { ...filters, status: "" }),
    ]);
    if (state.devicePages !== pages) return; // the filters changed meanwhile
    state.devices = found.items;
    pages.next = found.next;
    state.deviceCounts = counts.items;
    renderDevices();
    if (state.drawer && !state.drawer.older) await loadHistory(false);
  }

  function renderDevices() {
    const rows = state.devices;
    const signature = JSON.stringify([rows, Math.floor(Date.now() / 10000)]);
    const body = $("device-rows");
    if (body.dataset.signature !== signature) {
      body.dataset.signature = signature;
      keepFocus(body, () => body.replaceChildren(...rows.map(deviceRow)));
    }
    const counts = state.deviceCounts || { total: 0, statuses: {} };
    const status = $("f-status").value;
    const matching = status ? counts.statuses[status] || 0 : counts.total;
    const pages = state.devicePages;
    const first = (pages.cursors.length - 1) * DEVICE_PAGE;
    let summary =
      `${matching} matching device${matching === 1 ? "" : "s"}` +
      (matching !== counts.total ? ` (of ${counts.total}).` : ".");
    if (rows.length && (first > 0 || pages.next)) {
      summary += ` Showing ${first + 1}–${first + rows.length}.`;
    }
    $("device-summary").textContent = summary;
    show($("devices-prev"), pages.cursors.length > 1);
    show($("devices-next"), Boolean(pages.next));
  }

  function turnDevicePage(forward) {
    const pages = state.devicePages;
    if (forward && pages.next) pages.cursors.push(pages.next);
    else if (!forward && pages.cursors.length > 1) pages.cursors.pop();
    else return;
    $("device-rows").dataset.signature = "";
    poll();
  }

  function deviceRow(device) {
    const tags = device.tags || {};
    const status = device.status || "none";
    return el(
      "tr",
      { "data-testid": `device-row-${device.serial}`, dataset: { status, version: device.version || "" } },
      el(
        "th",
        { scope: "row" },
        el("button", {
          type: "button",
          class: "link",
          "data-testid": `device-${device.serial}`,
          "aria-label": `History of ${device.serial}`,
          text: device.serial,
          onclick: () => openDrawer(device.serial),
        }),
      ),
      el("td", { text: device.product || "—" }),
      el("td", { text: tags.deviceGroup || "—" }),
      el("td", { text: device.board || "—" }),
      el("td", { text: device.version || "—" }),
      el(
        "td",
        {},
        el("span", { class: `badge status-${status}`, text: device.status || "never reported" }),
        realError(device.error) ? el("span", { class: "muted", text: ` ${device.error}` }) : null,
      ),
      el("td", {}, timeTag(device.last_seen, ago(device.last_seen))),
    );
  }

  // extFwInfo's "Error": "None" means no error (the server stores none; older rows may have it)
  function realError(error) {
    return Boolean(error) && error !== "None";
  }

  let filterTimer = null;

  function filtersChanged() {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      $("device-rows").dataset.signature = "";
      poll();
    }, 250);
  }

  // --- a device's history -----------------------------------------------------------------------

  let returnFocus = null;

  async function openDrawer(serial) {
    returnFocus = document.activeElement;
    state.drawer = { serial, older: false, last: null };
    $("drawer-title").textContent = `Device ${serial}`;
    $("drawer-device").replaceChildren();
    $("drawer-offer").className = "muted";
    $("drawer-offer").textContent = "…";
    $("history-rows").replaceChildren();
    $("history-rows").dataset.signature = "";
    show($("drawer"), true);
    $("drawer-close").focus();
    await act(() => loadHistory(false));
  }

  function closeDrawer() {
    if (!state.drawer) return;
    state.drawer = null;
    show($("drawer"), false);
    if (returnFocus && document.contains(returnFocus)) returnFocus.focus();
    returnFocus = null;
  }

  async function loadHistory(older) {
    const drawer = state.drawer;
    if (!drawer) return;
    const serial = encodeURIComponent(drawer.serial);
    const before = older && drawer.last ? `&before=${drawer.last}` : "";
    const [device, entries, twin] = await Promise.all([
      older ? Promise.resolve(null) : api("GET", `/api/v1/devices/${serial}`),
      api("GET", `/api/v1/devices/${serial}/history?limit=50${before}`),
      older ? Promise.resolve(null) : api("GET", `/api/v1/devices/${serial}/twin`),
    ]);
    if (state.drawer !== drawer) return; // closed or another device opened meanwhile
    if (twin) showOffer(twin);
    if (device) {
      const tags = device.tags || {};
      const facts = [
        ["Product", device.product],
        ["Group", tags.deviceGroup],
        ["Board", device.board],
        ["Version", device.version],
        ["Status", device.status ? `${device.status}${realError(device.error) ? ` (${device.error})` : ""}` : "never reported"],
        ["Last seen", device.last_seen ? `${when(device.last_seen)} (${ago(device.last_seen)})` : "never"],
      ];
      $("drawer-device").replaceChildren(
        ...facts.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v || "—" })]),
      );
    }
    const rows = entries.map((h) =>
      el(
        "tr",
        { "data-testid": `history-${h.id}`, dataset: { status: h.status, source: h.source } },
        el("td", {}, timeTag(h.at, when(h.at))),
        el("td", {}, el("span", { class: `badge status-${h.status}`, text: h.status })),
        el("td", { text: realError(h.error) ? h.error : "" }),
        el("td", { text: h.version || "" }),
        el("td", { text: h.deployment_id ?? "" }),
        el("td", { text: h.source }),
        el("td", { text: h.boots ?? "" }),
      ),
    );
    const body = $("history-rows");
    if (older) {
      body.append(...rows);
      drawer.older = true;
      body.dataset.signature = "";
    } else {
      // redrawn only when a report came (the drawer is refreshed with the devices)
      const signature = JSON.stringify([drawer.serial, entries]);
      if (body.dataset.signature !== signature) {
        body.dataset.signature = signature;
        body.replaceChildren(...rows);
      }
    }
    if (entries.length) drawer.last = entries[entries.length - 1].id;
    show($("history-empty"), $("history-rows").children.length === 0);
    show($("history-more"), entries.length === 50);
  }

  // What the device is offered now (its twin's desired state): the job its next check-in gets.
  function showOffer(twin) {
    const offer = $("drawer-offer");
    const info = twin.desired && twin.desired.extFwInfo;
    if (!info) {
      offer.className = "muted";
      offer.dataset.version = "";
      offer.textContent = "Nothing is offered to this device now.";
      return;
    }
    const sha = String(info.sha256 || "").toLowerCase();
    const artifact = state.artifacts.find((a) => a.id === sha);
    offer.className = "";
    offer.dataset.version = String(info.version);
    offer.replaceChildren(
      `Offered now: version ${artifact ? artifact.version : info.version}`,
      artifact ? ` (${artifact.name})` : "",
      `, ${size(info.size)}, `,
      el("code", { title: sha, text: `${sha.slice(0, 12)}…` }),
    );
  }

  // --- artifacts --------------------------------------------------------------------------------

  async function refreshArtifacts() {
    const pages = state.artifactPages;
    const found = await apiPage("/api/v1/artifacts", {
      limit: ARTIFACT_PAGE,
      cursor: pages.cursors[pages.cursors.length - 1],
    });
    pages.next = found.next;
    state.artifacts = found.items;
    show($("artifacts-prev"), pages.cursors.length > 1);
    show($("artifacts-next"), Boolean(pages.next));
    fillArtifactChoices();
    // open deltas on this page are read again while one is still being made (live progress)
    // or the last read failed
    const live = state.artifacts.filter((a) => {
      const open = state.deltas.get(a.id);
      return open && (!open.deltas || open.error || open.deltas.some((d) => DELTA_LIVE.includes(d.state)));
    });
    await Promise.all(live.map((a) => loadDeltas(a.id)));
    const signature = artifactSignature();
    const body = $("artifact-rows");
    if (body.dataset.signature !== signature) {
      body.dataset.signature = signature;
      keepFocus(body, () => body.replaceChildren(...artifactRows()));
    }
    show($("artifacts-empty"), state.artifacts.length === 0);
  }

  function artifactSignature() {
    return JSON.stringify([state.artifacts, state.confirmingDelete, isAdmin(), [...state.deltas]]);
  }

  // Each artifact's row, and below an image's the table of its deltas when they are open.
  function artifactRows() {
    return state.artifacts.flatMap((a) => {
      const open = state.deltas.get(a.id);
      return open ? [artifactRow(a), deltasRow(a, open)] : [artifactRow(a)];
    });
  }

  function turnArtifactPage(forward) {
    const pages = state.artifactPages;
    if (forward && pages.next) pages.cursors.push(pages.next);
    else if (!forward && pages.cursors.length > 1) pages.cursors.pop();
    else return;
    poll();
  }

  function artifactRow(a) {
    const signature = a.signature === "valid" && a.signed_by ? `valid (key ${a.signed_by})` : a.signature;
    const confirming = state.confirmingDelete === a.id;
    return el(
      "tr",
      { "data-testid": `artifact-${a.id}`, class: confirming ? "confirming" : undefined },
      el("th", { scope: "row", text: a.name }),
      el("td", { text: a.version }),
      el("td", { text: a.kind }),
      el("td", { text: size(a.size), title: `${a.size} bytes` }),
      el("td", { text: a.board || "—" }),
      el("td", { text: a.product || "—" }),
      el("td", { text: signature }),
      el("td", {}, el("code", { title: a.sha256, text: `${a.sha256.slice(0, 12)}…` })),
      el("td", {}, timeTag(a.created_at, when(a.created_at))),
      el("td", {}, a.kind === "image" ? deltasToggle(a) : el("span", { class: "muted", text: "—" })),
      el("td", { class: "row-actions" }, isAdmin() ? artifactActions(a, confirming) : null),
    );
  }

  // --- an image's deltas: read from GET /api/v1/artifacts/{id} (the list does not have them)

  function deltasToggle(a) {
    const open = state.deltas.has(a.id);
    return el("button", {
      type: "button",
      class: "secondary",
      "data-testid": `deltas-toggle-${a.id}`,
      "aria-expanded": open ? "true" : "false",
      "aria-controls": open ? `deltas-${a.id}` : undefined,
      "aria-label": `${open ? "Hide" : "Show"} the deltas to ${a.name} ${a.version}`,
      text: open ? "Hide" : "Show",
      onclick: async () => {
        if (state.deltas.has(a.id)) {
          state.deltas.delete(a.id);
          refreshArtifactRows();
          return;
        }
        state.deltas.set(a.id, { deltas: null, error: null });
        refreshArtifactRows();
        await act(() => loadDeltas(a.id));
        refreshArtifactRows();
      },
    });
  }

  // Read an artifact's deltas into state.deltas (if they are still open). A refusal is shown in
  // their row; a rejected token is left to the caller (it signs out).
  async function loadDeltas(id) {
    const open = state.deltas.get(id);
    if (!open) return;
    let found;
    try {
      const artifact = await api("GET", `/api/v1/artifacts/${encodeURIComponent(id)}`);
      found = { deltas: artifact.deltas || [], error: null };
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) throw err;
      found = { deltas: open.deltas, error: err instanceof ApiError ? err.describe() : String(err.message || err) };
    }
    if (state.deltas.get(id) === open) state.deltas.set(id, found); // not closed meanwhile
  }

  function deltasRow(a, open) {
    let content;
    if (open.error) {
      content = el("p", { class: "error-text", text: open.error });
    } else if (!open.deltas) {
      content = el("p", { class: "muted", text: "Reading the deltas…" });
    } else if (!open.deltas.length) {
      content = el("p", {
        class: "muted",
        "data-testid": `deltas-none-${a.id}`,
        text: "None: deltas to an image are made when it is deployed, from its product's earlier images.",
      });
    } else {
      content = el(
        "table",
        { class: "deltas" },
        el("caption", { class: "sr-only", text: `Deltas to ${a.name} ${a.version}` }),
        el(
          "thead",
          {},
          el("tr", {}, ["From base", "Compression", "State", "Size", "Ratio"].map((h) => el("th", { scope: "col", text: h }))),
        ),
        el("tbody", {}, open.deltas.map((d) => deltaRow(a, d))),
      );
    }
    const columns = $("artifact-table").tHead.rows[0].cells.length;
    return el(
      "tr",
      { id: `deltas-${a.id}`, class: "deltas-row", "data-testid": `deltas-${a.id}` },
      el("td", { colspan: columns }, content),
    );
  }

  function deltaRow(a, d) {
    const base = d.base_artifact_id ? state.artifacts.find((x) => x.id === d.base_artifact_id) : undefined;
    const from = d.base_artifact_id
      ? [
          el("code", { title: d.base_artifact_id, text: `${d.base_artifact_id.slice(0, 12)}…` }),
          base ? el("span", { class: "muted", text: ` ${base.name} ${base.version}` }) : null,
        ]
      : [
          el("span", { class: "muted", text: "image " }),
          el("code", { title: `image SHA-256 ${d.base_sha256}`, text: `${d.base_sha256.slice(0, 12)}…` }),
        ];
    const making = DELTA_LIVE.includes(d.state);
    const stateText = d.state === "making" ? `making ${d.progress}%` : d.state;
    return el(
      "tr",
      {
        "data-testid": `delta-${a.id}-${d.base_sha256.slice(0, 12)}-${d.compression}`,
        dataset: { state: d.state, progress: d.progress, size: d.size ?? "" },
      },
      el("td", {}, from),
      el("td", { text: d.compression }),
      el(
        "td",
        {},
        el("span", { class: `badge delta-${d.state}`, text: stateText }),
        making
          ? el("progress", { max: 100, value: d.progress, "aria-label": `Delta from ${d.base_sha256.slice(0, 12)}: ${d.progress}%` })
          : null,
        d.state === "failed" && d.error ? el("span", { class: "muted", text: ` ${d.error}` }) : null,
      ),
      d.size === null || d.size === undefined
        ? el("td", { class: "muted", text: "—" })
        : el("td", { title: `${d.size} bytes`, text: size(d.size) }),
      el("td", { text: d.ratio ? `${d.ratio}x` : "—", title: d.ratio ? `the image is ${d.ratio} times its size` : undefined }),
    );
  }

  function artifactActions(a, confirming) {
    if (confirming) {
      return el(
        "div",
        { class: "row-confirm", role: "group", "aria-label": `Delete ${a.name} ${a.version}` },
        el("span", { text: `Delete ${a.name} ${a.version} for good?` }),
        el("button", {
          type: "button",
          class: "danger",
          "data-testid": `delete-confirm-${a.id}`,
          text: "Delete",
          onclick: async (event) => {
            event.currentTarget.disabled = true;
            const done = await act(async () => {
              await api("DELETE", `/api/v1/artifacts/${a.id}`);
              notify(`Artifact ${a.name} ${a.version} (${a.id.slice(0, 12)}) deleted.`);
              return true;
            });
            state.confirmingDelete = null;
            if (done) {
              state.deltas.delete(a.id);
              loadReferenceData();
            }
            await poll();
          },
        }),
        el("button", {
          type: "button",
          class: "secondary",
          "data-testid": `delete-cancel-${a.id}`,
          text: "Keep it",
          onclick: () => {
            state.confirmingDelete = null;
            refreshArtifactRows();
          },
        }),
      );
    }
    return [
      el("button", {
        type: "button",
        class: "secondary",
        "data-testid": `deploy-${a.id}`,
        text: "Deploy…",
        onclick: () => {
          fillArtifactChoices();
          $("c-artifact").value = a.id;
          if (a.product && !$("c-product").value) $("c-product").value = a.product;
          $("create").open = true;
          location.hash = "#deployments";
          $("c-product").focus();
        },
      }),
      " ",
      el("button", {
        type: "button",
        class: "danger",
        "data-testid": `delete-${a.id}`,
        text: "Delete…",
        onclick: () => {
          state.confirmingDelete = a.id;
          refreshArtifactRows();
          const keep = document.querySelector(`[data-testid="delete-cancel-${CSS.escape(a.id)}"]`);
          if (keep) keep.focus();
        },
      }),
    ];
  }

  function refreshArtifactRows() {
    const body = $("artifact-rows");
    body.dataset.signature = artifactSignature();
    keepFocus(body, () => body.replaceChildren(...artifactRows()));
  }

  // An upload with its progress: XMLHttpRequest, as fetch reports no upload progress. The
  // file is sent as it is (streamed by the browser); the server names the artifact after it.
  function uploadArtifact(event) {
    event.preventDefault();
    if (state.uploading) return;
    const problem = $("upload-error");
    show(problem, false);
    const file = $("u-file").files[0];
    if (!file) {
      problem.textContent = "choose a file to upload";
      show(problem, true);
      return;
    }
    const name = (file.name.replace(ARTIFACT_NAME, "_") || "artifact").slice(-MAX_ARTIFACT_NAME);
    const query = new URLSearchParams({ name });
    const product = $("u-product").value.trim();
    const version = $("u-version").value.trim();
    if (product) query.set("product", product);
    if (version) query.set("expect_version", version);
    const bar = $("upload-progress");
    const status = $("upload-status");
    const submit = $("upload-form").querySelector("button[type=submit]");
    bar.max = Math.max(1, file.size);
    bar.value = 0;
    bar.dataset.loaded = "0";
    show(bar, true);
    status.textContent = `Uploading ${name} (${size(file.size)})…`;
    submit.disabled = true;
    state.uploading = true;
    const xhr = new XMLHttpRequest();
    const call = "POST /api/v1/artifacts";
    const moved = (loaded, total) => {
      bar.max = Math.max(1, total);
      bar.value = loaded;
      bar.dataset.loaded = String(loaded);
      status.textContent = `Uploading ${name}: ${size(loaded)} of ${size(total)} (${Math.floor((100 * loaded) / Math.max(1, total))}%)`;
    };
    xhr.upload.addEventListener("progress", (e) => {
      if (e.lengthComputable) moved(e.loaded, e.total);
    });
    const finish = () => {
      state.uploading = false;
      submit.disabled = false;
    };
    xhr.addEventListener("load", () => {
      finish();
      let data = null;
      try {
        data = xhr.responseText ? JSON.parse(xhr.responseText) : null;
      } catch (err) {
        data = null;
      }
      if (xhr.status === 200 || xhr.status === 201) {
        moved(file.size, file.size);
        const again = xhr.status === 200 ? " (already uploaded)" : "";
        status.textContent = `Uploaded ${data.name} ${data.version} (${data.id.slice(0, 12)})${again}.`;
        notify(`Artifact ${data.name} ${data.version} uploaded${again}.`);
        $("u-file").value = "";
        loadReferenceData();
        poll();
        return;
      }
      if (xhr.status === 401) {
        signOut(`The server no longer accepts this token: ${(data && data.message) || "refused"}`);
        return;
      }
      const err = new ApiError(call, xhr.status, (data && data.error) || "HTTP", (data && data.message) || xhr.statusText || "the upload failed");
      status.textContent = "";
      show(bar, false);
      problem.textContent = err.describe();
      show(problem, true);
    });
    xhr.addEventListener("error", () => {
      finish();
      show(bar, false);
      status.textContent = "";
      problem.textContent = new ApiError(call, 0, "NETWORK", "the server did not answer").describe();
      show(problem, true);
    });
    xhr.open("POST", `/api/v1/artifacts?${query}`);
    xhr.setRequestHeader("authorization", `Bearer ${sessionStorage.getItem(TOKEN_KEY)}`);
    xhr.setRequestHeader("content-type", "application/octet-stream");
    xhr.setRequestHeader("accept", "application/json");
    xhr.send(file);
  }

  // --- the audit log ----------------------------------------------------------------------------

  async function refreshAudit() {
    const filters = { action: $("a-action").value, actor: $("a-actor").value.trim() };
    const key = JSON.stringify(filters);
    if (state.auditPages.key !== key) state.auditPages = { key, cursors: [null], next: null };
    const pages = state.auditPages;
    const found = await apiPage("/api/v1/audit", {
      ...filters,
      limit: AUDIT_PAGE,
      cursor: pages.cursors[pages.cursors.length - 1],
    });
    if (state.auditPages !== pages) return; // the filters changed meanwhile
    pages.next = found.next;
    state.audit = found.items;
    const body = $("audit-rows");
    const signature = JSON.stringify(state.audit);
    if (body.dataset.signature !== signature) {
      body.dataset.signature = signature;
      body.replaceChildren(...state.audit.map(auditRow));
    }
    show($("audit-empty"), state.audit.length === 0);
    show($("audit-prev"), pages.cursors.length > 1);
    show($("audit-next"), Boolean(pages.next));
  }

  function auditRow(e) {
    const details = Object.entries(e.details || {})
      .filter(([, v]) => v !== null && v !== undefined)
      .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
    return el(
      "tr",
      { "data-testid": `audit-${e.id}`, dataset: { action: e.action, actor: e.actor } },
      el("td", {}, timeTag(e.at, when(e.at))),
      el("td", { text: e.actor }),
      el("td", {}, el("code", { text: e.action })),
      el("td", { text: e.target }),
      el("td", { class: "details", text: details.join(" · ") }),
    );
  }

  function turnAuditPage(forward) {
    const pages = state.auditPages;
    if (forward && pages.next) pages.cursors.push(pages.next);
    else if (!forward && pages.cursors.length > 1) pages.cursors.pop();
    else return;
    poll();
  }

  let auditTimer = null;

  function auditFiltersChanged() {
    clearTimeout(auditTimer);
    auditTimer = setTimeout(poll, 250);
  }

  // --- wiring -----------------------------------------------------------------------------------

  function start() {
    $("login-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut(""));
    $("error-close").addEventListener("click", () => clearError());
    $("create-form").addEventListener("submit", createDeployment);
    $("create").addEventListener("toggle", () => {
      if ($("create").open) loadReferenceData();
    });
    $("c-artifact").addEventListener("change", () => {
      const chosen = state.artifacts.find((a) => a.id === $("c-artifact").value);
      if (chosen && chosen.product && !$("c-product").value) $("c-product").value = chosen.product;
    });
    $("show-finished").addEventListener("change", () => {
      renderDeployments();
      poll();
    });
    $("deployments-more").addEventListener("click", () => {
      state.shown += PAGE;
      poll();
    });
    $("device-filters").addEventListener("input", filtersChanged);
    $("device-filters").addEventListener("change", filtersChanged);
    $("device-filters").addEventListener("submit", (event) => event.preventDefault());
    $("devices-next").addEventListener("click", () => turnDevicePage(true));
    $("devices-prev").addEventListener("click", () => turnDevicePage(false));
    $("artifacts-next").addEventListener("click", () => turnArtifactPage(true));
    $("upload-form").addEventListener("submit", uploadArtifact);
    $("audit-filters").addEventListener("input", auditFiltersChanged);
    $("audit-filters").addEventListener("change", auditFiltersChanged);
    $("audit-filters").addEventListener("submit", (event) => event.preventDefault());
    $("audit-next").addEventListener("click", () => turnAuditPage(true));
    $("audit-prev").addEventListener("click", () => turnAuditPage(false));
    $("artifacts-prev").addEventListener("click", () => turnArtifactPage(false));
    $("drawer-close").addEventListener("click", closeDrawer);
    $("history-more").addEventListener("click", () => act(() => loadHistory(true)));
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && state.drawer) closeDrawer();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) poll();
    });
    window.addEventListener("hashchange", route);
    api("GET", "/healthz")
      .then((health) => {
        $("server-version").textContent = `server ${health.version}`;
      })
      .catch(() => {});
    if (sessionStorage.getItem(TOKEN_KEY)) {
      show($("view-login"), false);
      enter();
    } else {
      signOut("");
    }
  }

  start();
})();
