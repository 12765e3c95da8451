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

  paint(document);

  const source = document.body.dataset.stream;
  if (source && live && window.EventSource) {
    const events = new EventSource(source);
    events.onopen = () => connection("live");
    events.onmessage = (e) => {
      live.innerHTML = e.data; // HTML the server escaped, from this origin only
      paint(live);
      document.body.dataset.updated = String(Date.now());
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

  // Commands: forms marked data-confirm ask first. Listening on the document, so forms the
  // stream puts in later work too.
  document.addEventListener("submit", async (e) => {
    const form = e.target.closest("form[data-confirm]");
    if (!form) return;
    e.preventDefault();
    if (!window.confirm(form.dataset.confirm)) return;
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
