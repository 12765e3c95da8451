// voicefleet dashboard: the live part of each page over server-sent events, and the rollout
// commands (confirmed, then POSTed with the session's CSRF token). No framework, no build.
"use strict";
(() => {
  const csrf = document.querySelector('meta[name="csrf"]')?.content || "";
  const live = document.getElementById("live");
  const conn = document.getElementById("conn");
  const flash = document.getElementById("flash");

  // Bar widths come as data-w: the page's CSP allows no inline style attributes.
  function paint(root) {
    for (const seg of root.querySelectorAll("[data-w]")) seg.style.width = seg.dataset.w + "%";
  }

  function connection(state) {
    if (!conn) return;
    conn.textContent = state;
    conn.dataset.state = state;
  }

  function say(text, bad) {
    if (!flash) return;
    flash.textContent = text;
    flash.className = bad ? "flash bad" : "flash";
    flash.hidden = false;
  }

  // Charts: each .plot[data-chart] holds its data as JSON (chart.py); uPlot draws it. Those of
  // the live part are drawn again after each swap (the old ones destroyed first).
  let plots = [];
  const css = getComputedStyle(document.documentElement);
  const colour = (name) => css.getPropertyValue("--" + name).trim() || "#888";
  function fmt(v, unit) {
    if (v == null) return "-";
    return unit === "%" ? (100 * v).toFixed(1) + "%" : +v.toFixed(3) + (unit || "");
  }
  function drawCharts(root) {
    if (!window.uPlot) return;
    for (const box of root.querySelectorAll(".plot[data-chart]")) {
      let spec;
      try {
        spec = JSON.parse(box.dataset.chart);
      } catch {
        continue;
      }
      const unit = spec.series.length ? spec.series[0].unit : "";
      const size = () => ({ width: Math.max(box.clientWidth, 200), height: 180 });
      const opts = {
        ...size(),
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
        scales: {
          x: { time: true },
          y: { range: (u, lo, hi) => [0, Math.max(hi || 0, spec.ymax || 0, unit === "%" ? 0.01 : 1)] },
        },
        axes: [
          { stroke: colour("muted"), grid: { stroke: colour("line") } },
          { stroke: colour("muted"), grid: { stroke: colour("line") }, values: (u, ticks) => ticks.map((t) => fmt(t, unit)) },
        ],
        series: [
          {},
          ...spec.series.map((s) => ({
            label: s.label,
            stroke: colour(s.colour),
            width: 2,
            dash: s.dash ? [6, 4] : undefined,
            spanGaps: true,
            paths: s.step ? uPlot.paths.stepped({ align: 1 }) : undefined,
            value: (u, v) => fmt(v, s.unit),
          })),
        ],
      };
      box.textContent = "";
      const plot = new uPlot(opts, spec.data, box);
      box.dataset.drawn = String(spec.data[0].length);
      plots.push({ plot, size });
    }
  }
  window.addEventListener("resize", () => {
    for (const p of plots) p.plot.setSize(p.size());
  });

  // What the live part holds, as this browser writes it out (before paint adds widths): a
  // stream's first message is usually the very page just loaded, and is then not swapped in.
  let shown = live ? live.innerHTML : "";
  paint(document);
  drawCharts(document);

  const source = document.body.dataset.stream;
  if (source && live && window.EventSource) {
    const events = new EventSource(source);
    events.onopen = () => connection("live");
    let pending = null;
    const swap = (html) => {
      // Open <details> (a flag's editor) stay open across the swap.
      const open = [...live.querySelectorAll("details[open][id]")].map((d) => d.id);
      for (const p of plots) p.plot.destroy();
      plots = [];
      live.innerHTML = html; // HTML the server escaped, from this origin only
      for (const id of open) document.getElementById(id)?.setAttribute("open", "");
      paint(live);
      drawCharts(document);
      document.body.dataset.updated = String(Date.now());
    };
    // Someone typing in a form on the page keeps what they typed, and a button being pressed
    // stays the one released (a swap between the two would eat the click): the change waits.
    const typing = () => {
      const a = document.activeElement;
      return a && live.contains(a) && a.matches("input, textarea, select");
    };
    let pressing = false;
    const flush = () => {
      if (pending !== null && !pressing && !typing()) {
        const html = pending;
        pending = null;
        delete document.body.dataset.pending;
        swap(html);
      }
    };
    live.addEventListener("pointerdown", () => {
      pressing = true;
    });
    const released = () => {
      pressing = false;
      setTimeout(flush, 0); // after the click this release makes (dispatched in the same task)
    };
    document.addEventListener("pointerup", released);
    document.addEventListener("pointercancel", released);
    window.addEventListener("blur", released); // released outside the window
    live.addEventListener("focusout", () => setTimeout(flush, 0));
    const normal = document.createElement("template");
    events.onmessage = (e) => {
      normal.innerHTML = e.data;
      if (normal.innerHTML === shown) {
        connection("live");
        return;
      }
      shown = normal.innerHTML;
      pending = e.data;
      document.body.dataset.pending = "1";
      flush();
      connection("live");
    };
    events.addEventListener("expired", () => {
      events.close();
      const here = location.pathname + location.search;
      location.assign("/dashboard/login?next=" + encodeURIComponent(here));
    });
    events.onerror = () => {
      // Reconnects by itself unless the server refused (logged out): then reload to log in.
      if (events.readyState === EventSource.CLOSED) {
        connection("disconnected");
        setTimeout(() => location.reload(), 5000);
      } else {
        connection("reconnecting");
      }
    };
  } else {
    connection("");
  }

  // An instance's log: appended as it is written, the newest kept in view (unless the reader
  // scrolled up), at most MAX_LOG characters.
  const log = document.getElementById("log");
  if (log && log.dataset.tail && window.EventSource) {
    const MAX_LOG = 500000;
    const tail = new EventSource(log.dataset.tail);
    tail.addEventListener("reset", () => {
      log.textContent = "";
    });
    tail.addEventListener("log", (e) => {
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      log.append(document.createTextNode(e.data));
      if (log.textContent.length > MAX_LOG) log.textContent = log.textContent.slice(-MAX_LOG);
      if (atEnd) log.scrollTop = log.scrollHeight;
      log.dataset.lines = String((log.dataset.lines | 0) + e.data.split("\n").length - 1);
    });
  }

  // A question may name what was typed into its form: "{replicas}" is that field's value.
  function question(form) {
    return form.dataset.confirm.replace(/\{(\w+)\}/g, (all, name) => {
      const field = form.elements.namedItem(name);
      return field && "value" in field ? field.value : all;
    });
  }

  // Commands: forms marked data-confirm ask first. Listening on the document, so forms the
  // stream puts in later work too.
  document.addEventListener("submit", async (e) => {
    const form = e.target.closest("form[data-confirm]");
    if (!form) return;
    e.preventDefault();
    if (!window.confirm(question(form))) return;
    const button = form.querySelector("button");
    if (button) button.disabled = true;
    try {
      const response = await fetch(form.getAttribute("action"), {
        method: "POST",
        credentials: "same-origin",
        headers: {
          "X-CSRF-Token": csrf,
          Accept: "application/json",
          "Content-Type": "application/x-www-form-urlencoded",
        },
        body: new URLSearchParams(new FormData(form)),
      });
      const answer = await response.json().catch(() => ({}));
      say(response.ok ? answer.message : answer.detail || response.statusText, !response.ok);
    } catch (err) {
      say("the server did not answer: " + err, true);
    } finally {
      if (button) button.disabled = false;
    }
  });
})();
