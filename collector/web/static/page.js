// The collector's page: the jobs, and one job's readings, from /api/v1 (docs/web.md).
// Every name comes from agents: it goes into the page as text (textContent), never as markup.
"use strict";

const REFRESH_MS = 2000;
const PHASE_COLOURS = {
  type_i: "rgba(70, 130, 180, 0.12)",
  transition: "rgba(255, 165, 0, 0.15)",
  type_ii: "rgba(60, 179, 113, 0.12)",
  refresh: "rgba(220, 20, 60, 0.12)",
  unstable: "rgba(128, 0, 128, 0.12)",
};
let selected = null; // the job shown
let charts = {}; // uPlot charts by element id
let shownKey = ""; // the job (and its series count) the charts were made for
const marks = { events: [], spans: [] }; // what the energy chart shades and marks, read at each draw

function text(tag, value, cls) {
  const el = document.createElement(tag);
  el.textContent = value === null || value === undefined ? "—" : String(value);
  if (cls) el.className = cls;
  return el;
}

function fmt(x, digits = 4) {
  return x === null || x === undefined ? "—" : Number(x).toPrecision(digits);
}

function fillRows(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren(
    ...rows.map((cells) => {
      const tr = document.createElement("tr");
      tr.append(...cells);
      return tr;
    })
  );
}

async function getJSON(path) {
  const answer = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (!answer.ok) throw new Error(`${path}: ${answer.status}`);
  return answer.json();
}

function selectedFromHash() {
  const m = /^#job=(.*)$/.exec(location.hash);
  return m ? decodeURIComponent(m[1]) : null;
}

function showJobs(jobs) {
  document.getElementById("no-jobs").hidden = jobs.length > 0;
  if (selected === null && jobs.length) selected = jobs[0].job;
  fillRows(
    document.getElementById("jobs"),
    jobs.map((j) => {
      const link = document.createElement("a");
      link.href = "#job=" + encodeURIComponent(j.job);
      link.textContent = j.job;
      const first = document.createElement("td");
      first.append(link);
      const phases = Object.entries(j.layer_phases).map(([p, n]) => `${p} ${n}`).join(", ");
      return [
        first,
        text("td", j.run),
        text("td", j.phase, "phase"),
        text("td", j.step),
        text("td", j.ranks.live),
        text("td", j.ranks.stale),
        text("td", j.paused ? "paused" : "no"),
        text("td", phases),
        text("td", j.transitions),
      ];
    })
  );
  for (const [i, tr] of document.querySelectorAll("#jobs tbody tr").entries()) {
    tr.classList.toggle("selected", jobs[i].job === selected);
    tr.dataset.job = jobs[i].job;
  }
}

// Job-scope phases as spans of steps: [from step, to step, phase].
function phaseSpans(events, first, last, current) {
  const job = events.filter((e) => e.scope === "job");
  const spans = [];
  let start = first;
  let phase = job.length ? job[0].from : current;
  for (const e of job) {
    spans.push([start, e.step, phase]);
    start = e.step;
    phase = e.to;
  }
  spans.push([start, last, phase]);
  return spans;
}

function phasePlugin(getEvents, getSpans) {
  return {
    hooks: {
      drawClear: [
        (u) => {
          const ctx = u.ctx;
          const { top, height } = u.bbox;
          for (const [a, b, phase] of getSpans()) {
            const x0 = u.valToPos(a, "x", true);
            const x1 = u.valToPos(b, "x", true);
            ctx.fillStyle = PHASE_COLOURS[phase] || "rgba(0,0,0,0.05)";
            ctx.fillRect(x0, top, Math.max(1, x1 - x0), height);
          }
        },
      ],
      draw: [
        (u) => {
          const ctx = u.ctx;
          const { top, height } = u.bbox;
          for (const e of getEvents()) {
            const x = u.valToPos(e.step, "x", true);
            ctx.strokeStyle = e.scope === "job" ? "crimson" : "rgba(128,128,128,0.6)";
            ctx.setLineDash(e.scope === "job" ? [] : [3, 3]);
            ctx.beginPath();
            ctx.moveTo(x, top);
            ctx.lineTo(x, e.scope === "job" ? top + height : top + height / 6);
            ctx.stroke();
          }
          ctx.setLineDash([]);
        },
      ],
    },
  };
}

function chart(id, opts, data) {
  const el = document.getElementById(id);
  if (charts[id]) {
    charts[id].setData(data);
    return;
  }
  el.replaceChildren();
  opts.width = Math.max(400, Math.min(1000, document.body.clientWidth - 40));
  opts.height = 220;
  charts[id] = new uPlot(opts, data, el);
}

function drawHeatmap(history) {
  const canvas = document.getElementById("heatmap");
  const ctx = canvas.getContext("2d");
  const names = history.layer_names;
  const rows = history.layer_entropy_change;
  const label = 140;
  const rowH = Math.max(6, Math.min(20, Math.floor(400 / Math.max(1, names.length))));
  canvas.height = Math.max(40, names.length * rowH);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  let scale = 0;
  for (const row of rows) for (const v of row) if (v !== null) scale = Math.max(scale, Math.abs(v));
  const cellW = (canvas.width - label) / Math.max(1, rows.length);
  ctx.font = "11px system-ui, sans-serif";
  names.forEach((name, j) => {
    ctx.fillStyle = "#222";
    ctx.fillText(name.slice(0, 22), 2, j * rowH + rowH - 3); // canvas text: never markup
    rows.forEach((row, i) => {
      const v = row[j];
      if (v === null || v === undefined) {
        ctx.fillStyle = "#bbb"; // undefined, not zero
      } else {
        const t = scale > 0 ? v / scale : 0;
        ctx.fillStyle = t >= 0 ? `rgba(200, 30, 30, ${t})` : `rgba(30, 60, 200, ${-t})`;
      }
      ctx.fillRect(label + i * cellW, j * rowH, Math.ceil(cellW), rowH - 1);
    });
  });
}

function showJob(detail) {
  const section = document.getElementById("job");
  section.hidden = false;
  section.dataset.job = detail.summary.job;
  document.getElementById("job-name").textContent = detail.summary.job;
  document.getElementById("job-phase").textContent = detail.summary.phase || "—";
  const latest = detail.latest;
  document.getElementById("job-latest").textContent = latest
    ? `step ${latest.step}: energy ${fmt(latest.energy)}, temperature ${fmt(latest.temperature)} ` +
      `[${fmt(latest.temperature_low)}, ${fmt(latest.temperature_high)}], engine ${latest.engine || "—"}`
    : "no reading yet";
  const events = detail.events;
  fillRows(
    document.getElementById("events"),
    events
      .slice()
      .reverse()
      .map((e) => [
        text("td", e.step),
        text("td", e.scope),
        text("td", e.layer),
        text("td", e.from, "phase"),
        text("td", e.to, "phase"),
        text("td", e.statistic),
        text("td", fmt(e.confidence, 3)),
      ])
  );
  const sites = latest ? latest.sites : [];
  fillRows(
    document.getElementById("sites"),
    sites.map((s) => [text("td", s.name), text("td", s.function), text("td", fmt(s.efficiency, 3)), text("td", s.engine || "—")])
  );
  const h = detail.history;
  if (!h || !h.step.length) return;
  const key = detail.summary.job + "\u0000" + h.layer_names.length;
  if (key !== shownKey) {
    for (const c of Object.values(charts)) c.destroy();
    charts = {};
    shownKey = key;
  }
  const first = h.step[0];
  const last = h.step[h.step.length - 1];
  marks.events = events;
  marks.spans = phaseSpans(events, first, last, detail.summary.phase);
  const plugin = phasePlugin(() => marks.events, () => marks.spans);
  chart(
    "energy",
    { plugins: [plugin], scales: { x: { time: false } }, axes: [{}, { size: 80 }], series: [{ label: "step" }, { label: "energy", stroke: "black" }] },
    [h.step, h.energy]
  );
  chart(
    "temperature",
    {
      scales: { x: { time: false } },
      axes: [{}, { size: 80 }],
      series: [
        { label: "step" },
        { label: "T", stroke: "firebrick" },
        { label: "low", stroke: "rgba(178,34,34,0.3)" },
        { label: "high", stroke: "rgba(178,34,34,0.3)" },
      ],
      bands: [{ series: [3, 2], fill: "rgba(178,34,34,0.12)" }],
    },
    [h.step, h.temperature, h.temperature_low, h.temperature_high]
  );
  drawHeatmap(h);
}

async function refresh() {
  try {
    const { jobs } = await getJSON("api/v1/jobs");
    selected = selectedFromHash() ?? selected;
    showJobs(jobs);
    if (selected !== null && jobs.some((j) => j.job === selected)) {
      showJob(await getJSON("api/v1/jobs/" + encodeURIComponent(selected)));
    }
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    document.getElementById("status").textContent = "cannot reach the collector: " + err.message;
  }
}

window.addEventListener("hashchange", () => {
  selected = selectedFromHash();
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
