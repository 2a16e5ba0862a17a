// The flowactors dashboard: a view of what the API returns, kept live by /events.
// The token comes from the URL once (?token=...), is kept for this tab only, and is sent
// as a bearer header on every request; the events stream is read with fetch (EventSource
// cannot send headers) and resumed with Last-Event-ID, so no event is missed or doubled.
"use strict";

const COLORS = ["#2f6fdf", "#e4572e", "#17a673", "#9c51e0", "#f2a71b", "#0fa3b1", "#d6336c",
                "#6c757d", "#5c7c2a", "#8c564b"];
const TIMELINE_MAX = 300;

const state = {
  token: null,
  jobs: new Map(),      // job_id -> JobView
  order: [],            // job ids, in submission order
  series: new Map(),    // job_id -> {reward: [[it, r]], heldout: [[it, s]], timeline: []}
  lastId: null,         // the position of the last event received
  selected: null,       // the job of the job page, or null
  refreshTimer: null,
  drawPending: false,
};

const $ = (id) => document.getElementById(id);

function takeToken() {
  const url = new URL(window.location.href);
  const fromUrl = url.searchParams.get("token");
  if (fromUrl) {
    sessionStorage.setItem("flowactors-token", fromUrl);
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem("flowactors-token");
}

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

// --- the API -----------------------------------------------------------------------------

let rpcId = 0;

async function rpc(method, params) {
  const res = await fetch("/rpc", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Authorization": "Bearer " + state.token},
    body: JSON.stringify({jsonrpc: "2.0", id: ++rpcId, method, params: params || {}}),
  });
  const body = await res.json();
  if (body.error) throw new Error(body.error.message);
  return body.result;
}

async function refresh() {
  state.refreshTimer = null;
  try {
    const views = await rpc("training.list_jobs");
    for (const view of views) {
      if (!state.jobs.has(view.job_id)) state.order.push(view.job_id);
      state.jobs.set(view.job_id, view);
    }
    if (state.selected) {
      await refreshCheckpoints(state.selected);
      await refreshTrajectories(state.selected);
    }
    showMessage("");
  } catch (err) {
    showMessage("Cannot reach the API: " + err.message);
  }
  drawSoon();
}

function refreshSoon() {
  if (state.refreshTimer === null) state.refreshTimer = setTimeout(refresh, 250);
}

async function refreshCheckpoints(jobId) {
  const infos = await rpc("training.checkpoints", {job_id: jobId});
  const view = state.jobs.get(jobId);
  const body = $("checkpoints").tBodies[0];
  body.replaceChildren(...infos.map((c) => row([
    c.iteration, fixed(c.validation_score), fixed(c.metrics.avg_reward), fixed(c.metrics.loss),
    c.pruned ? "pruned" : (view && view.best_checkpoint === c.iteration ? "kept, best" : "kept"),
  ])));
}

async function refreshTrajectories(jobId) {
  const view = state.jobs.get(jobId);
  const chosen = parseInt($("traj-iteration").value, 10);
  const iteration = chosen > 0 ? chosen : (view ? view.progress.current_iteration : 0);
  const body = $("trajectories").tBodies[0];
  if (iteration < 1) { body.replaceChildren(); return; }
  const params = {job_id: jobId, iteration: iteration, limit: 200};
  if ($("traj-failed").checked) params.success = false;
  const found = await rpc("training.export_trajectories", params);
  body.replaceChildren(...found.map((t) => row([
    t.iteration + (t.superseded ? " (superseded)" : ""), `${t.query_index}.${t.index}`, t.query,
    fixed(t.reward), t.success ? "yes" : "no", t.steps, t.error || "",
  ])));
}

// --- the event stream --------------------------------------------------------------------

async function stream() {
  for (;;) {
    try {
      const headers = {"Authorization": "Bearer " + state.token};
      if (state.lastId !== null) headers["Last-Event-ID"] = String(state.lastId);
      const res = await fetch("/events?after=0", {headers, cache: "no-store"});
      if (!res.ok) throw new Error("HTTP " + res.status);
      setLive(true);
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, {stream: true});
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (err) {
      // fall through: reconnect
    }
    setLive(false);
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

function setLive(live) {
  const badge = $("live");
  badge.textContent = live ? "live" : "reconnecting";
  badge.classList.toggle("off", !live);
}

function onFrame(block) {
  let id = null;
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("id:")) id = parseInt(line.slice(3), 10);
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  onEvent(JSON.parse(data));
  if (id !== null) state.lastId = id;
}

function seriesOf(jobId) {
  let s = state.series.get(jobId);
  if (!s) {
    s = {reward: [], heldout: [], timeline: []};
    state.series.set(jobId, s);
  }
  return s;
}

function onEvent(ev) {
  const s = seriesOf(ev.stream);
  const d = ev.data;
  if (ev.type === "job.iteration_completed") {
    s.reward = s.reward.filter((p) => p[0] < d.iteration);  // re-run after a recovery
    s.reward.push([d.iteration, d.avg_reward]);
  } else if (ev.type === "job.checkpoint_saved") {
    s.heldout = s.heldout.filter((p) => p[0] < d.iteration);
    s.heldout.push([d.iteration, d.validation_score]);
  } else if (ev.type === "job.recovered") {
    const from = d.from_checkpoint === null ? 0 : d.from_checkpoint;
    s.reward = s.reward.filter((p) => p[0] <= from);
    s.heldout = s.heldout.filter((p) => p[0] <= from);
  }
  s.timeline.push(ev);
  if (s.timeline.length > TIMELINE_MAX) s.timeline.shift();
  $("log").textContent = "log position " + ev.position;
  refreshSoon();
  drawSoon();
}

// --- drawing -----------------------------------------------------------------------------

function drawSoon() {
  if (state.drawPending) return;
  state.drawPending = true;
  requestAnimationFrame(() => { state.drawPending = false; draw(); });
}

function colorOf(jobId) {
  const index = state.order.indexOf(jobId);
  return COLORS[(index < 0 ? state.order.length : index) % COLORS.length];
}

function fixed(x, digits = 3) {
  return x === null || x === undefined ? "-" : Number(x).toFixed(digits);
}

function cell(content, cls) {
  const td = document.createElement("td");
  if (content instanceof Node) td.append(content); else td.textContent = String(content);
  if (cls) td.className = cls;
  return td;
}

function row(cells) {
  const tr = document.createElement("tr");
  tr.append(...cells.map((c) => cell(c)));
  return tr;
}

function progressBar(view) {
  const wrap = document.createElement("span");
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = view.progress.percent_complete + "%";
  bar.append(fill);
  wrap.append(bar, `${view.progress.current_iteration}/${view.progress.total_iterations}`);
  return wrap;
}

function draw() {
  const route = /^#\/job\/(.+)$/.exec(window.location.hash);
  state.selected = route ? decodeURIComponent(route[1]) : null;
  $("overview").hidden = state.selected !== null;
  $("job").hidden = $("job-details").hidden = state.selected === null;
  drawJobs();
  const shown = state.selected ? [state.selected] : state.order;
  drawChart($("reward-chart"), shown, "reward", null);
  drawChart($("heldout-chart"), shown, "heldout", [0, 1]);
  drawLegend(shown);
  if (state.selected) drawJob(state.selected);
}

// The final held-out score once completed, else the latest checkpoint's.
function heldOut(jobId) {
  const v = state.jobs.get(jobId);
  if (v && v.validation_score !== null) return v.validation_score;
  const points = (state.series.get(jobId) || {heldout: []}).heldout;
  return points.length ? points[points.length - 1][1] : null;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

// A job's row is built once and updated in place: a row replaced under the pointer would
// swallow the click.
const jobRows = new Map();

function jobRow(jobId) {
  let r = jobRows.get(jobId);
  if (r) return r;
  const tr = document.createElement("tr");
  tr.dataset.job = jobId;
  const cells = Array.from({length: 9}, () => document.createElement("td"));
  const swatch = document.createElement("span");
  swatch.className = "swatch";
  cells[0].append(swatch, document.createTextNode(jobId));
  const badge = document.createElement("span");
  cells[2].append(badge);
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  bar.append(fill);
  const count = document.createElement("span");
  cells[3].append(bar, count);
  for (const c of cells.slice(4)) c.className = "num";
  tr.append(...cells);
  tr.addEventListener("click", () => {
    window.location.hash = "#/job/" + encodeURIComponent(jobId);
  });
  r = {tr, cells, swatch, badge, fill, count};
  jobRows.set(jobId, r);
  return r;
}

function drawJobs() {
  const body = $("jobs").tBodies[0];
  state.order.forEach((jobId, i) => {
    const v = state.jobs.get(jobId);
    const r = jobRow(jobId);
    r.tr.dataset.status = v.status;
    r.swatch.style.background = colorOf(jobId);
    setText(r.cells[1], v.agent_id);
    setText(r.badge, v.status);
    r.badge.className = "status " + v.status;
    r.fill.style.width = v.progress.percent_complete + "%";
    setText(r.count, `${v.progress.current_iteration}/${v.progress.total_iterations}`);
    setText(r.cells[4], fixed(v.metrics.avg_reward));
    setText(r.cells[5], fixed(v.metrics.success_rate));
    setText(r.cells[6], fixed(heldOut(jobId)));
    setText(r.cells[7], "$" + fixed(v.cost.cost_usd, 4));
    setText(r.cells[8], v.best_checkpoint === null ? "-" : String(v.best_checkpoint));
    if (body.children[i] !== r.tr) body.insertBefore(r.tr, body.children[i] || null);
  });
  $("empty").hidden = state.order.length > 0;
}

function svgEl(name, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function drawChart(svg, jobIds, key, fixedRange) {
  const W = 600, H = 260, L = 44, R = 12, T = 10, B = 26;
  const all = jobIds.flatMap((j) => (state.series.get(j) || {})[key] || []);
  let xMax = 1;
  for (const j of jobIds) {
    const v = state.jobs.get(j);
    if (v) xMax = Math.max(xMax, v.progress.total_iterations);
  }
  for (const p of all) xMax = Math.max(xMax, p[0]);
  let [yMin, yMax] = fixedRange || [Math.min(0, ...all.map((p) => p[1])),
                                    Math.max(1, ...all.map((p) => p[1]))];
  if (yMax === yMin) yMax = yMin + 1;
  const x = (it) => L + (W - L - R) * it / xMax;
  const y = (v) => T + (H - T - B) * (1 - (v - yMin) / (yMax - yMin));
  const parts = [];
  for (let i = 0; i <= 4; i++) {
    const v = yMin + (yMax - yMin) * i / 4;
    parts.push(svgEl("line", {class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v)}));
    const label = svgEl("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"});
    label.textContent = v.toFixed(2);
    parts.push(label);
  }
  parts.push(svgEl("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  for (const it of [0, Math.round(xMax / 2), xMax]) {
    const label = svgEl("text", {x: x(it), y: H - 8, "text-anchor": "middle"});
    label.textContent = String(it);
    parts.push(label);
  }
  for (const jobId of jobIds) {
    const points = ((state.series.get(jobId) || {})[key] || []);
    const color = colorOf(jobId);
    const line = svgEl("polyline", {
      stroke: color, "data-job": jobId, "data-points": String(points.length),
      points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "),
    });
    parts.push(line);
    if (key === "heldout") {
      for (const p of points) parts.push(svgEl("circle", {cx: x(p[0]), cy: y(p[1]), r: 3, fill: color}));
    }
  }
  svg.replaceChildren(...parts);
}

function drawLegend(jobIds) {
  const items = jobIds.map((jobId) => {
    const span = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = colorOf(jobId);
    span.append(swatch, jobId);
    return span;
  });
  $("legend").replaceChildren(...items);
}

function drawJob(jobId) {
  const v = state.jobs.get(jobId);
  $("job-title").textContent = "Job " + jobId;
  const status = $("job-status");
  status.textContent = v ? v.status : "unknown";
  status.className = "status " + (v ? v.status : "");
  $("pause").disabled = !v || !["queued", "running"].includes(v.status);
  $("resume").disabled = !v || v.status !== "paused";
  $("cancel").disabled = !v || !["queued", "running", "paused"].includes(v.status);
  $("job-progress").replaceChildren(...(v ? [progressBar(v)] : []));
  $("job-facts").textContent = v ? [
    `agent ${v.agent_id}`, `task ${v.task}`, `reward ${fixed(v.metrics.avg_reward)}`,
    `success ${fixed(v.metrics.success_rate)}`, `held-out ${fixed(heldOut(jobId))}`,
    `cost $${fixed(v.cost.cost_usd, 4)}`, `best checkpoint ${v.best_checkpoint ?? "-"}`,
    `attempts ${v.attempts}`, ...(v.error ? [`error ${v.error.reason}: ${v.error.message}`] : []),
    ...(v.forked_from ? [`forked from ${v.forked_from.parent_id} at ${v.forked_from.at_iteration}`] : []),
    ...(v.forks.length ? ["forks " + v.forks.map((f) => `${f.child_id} (at ${f.at_iteration})`).join(", ")] : []),
  ].join(" · ") : "";
  const events = (state.series.get(jobId) || {timeline: []}).timeline.slice().reverse();
  $("timeline").tBodies[0].replaceChildren(...events.map((ev) => row([
    ev.position, ev.recorded_at.replace("T", " ").slice(0, 23), ev.type.replace("job.", ""),
    summary(ev),
  ])));
}

function summary(ev) {
  const d = ev.data;
  switch (ev.type) {
    case "job.iteration_completed":
      return `iteration ${d.iteration}: reward ${fixed(d.avg_reward)}, success ${fixed(d.success_rate)}`;
    case "job.checkpoint_saved":
      return `checkpoint ${d.iteration}: held-out ${fixed(d.validation_score)}`;
    case "job.paused": return `at iteration ${d.iteration}`;
    case "job.cancelled": return `at iteration ${d.iteration} (${d.reason})`;
    case "job.completed": return `after ${d.iteration} iterations, held-out ${fixed(d.validation_score)}`;
    case "job.failed": return `${d.reason}: ${d.error_type}: ${d.message}`;
    case "job.recovered": return `from checkpoint ${d.from_checkpoint ?? "none"} (attempt ${d.attempt})`;
    case "job.submitted": return `agent ${d.spec.agent_id}, task ${d.spec.task}`;
    case "job.forked": return `from job ${d.parent_id} at checkpoint ${d.at_iteration}`;
    case "job.fork_created": return `job ${d.child_id} forked at checkpoint ${d.at_iteration}`;
    default: return "";
  }
}

async function control(command) {
  const jobId = state.selected;
  if (!jobId) return;
  for (const id of ["pause", "resume", "cancel"]) $(id).disabled = true;
  try {
    const view = await rpc("training." + command, {job_id: jobId});
    state.jobs.set(jobId, view);
    showMessage("");
  } catch (err) {
    showMessage(`Cannot ${command} job ${jobId}: ${err.message}`);
  }
  drawSoon();
  refreshSoon();
}

function main() {
  state.token = takeToken();
  if (!state.token) {
    showMessage("No token: open the URL that `flowactors serve` printed (it ends in ?token=...).");
    return;
  }
  for (const command of ["pause", "resume", "cancel"]) {
    $(command).addEventListener("click", () => control(command));
  }
  window.addEventListener("hashchange", () => { drawSoon(); refreshSoon(); });
  for (const id of ["traj-iteration", "traj-failed"]) $(id).addEventListener("change", refreshSoon);
  refresh().then(stream);
}

main();
