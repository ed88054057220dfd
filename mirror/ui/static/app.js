// slipway status page: keeps the live parts current from
// /v2/_slipway/status and runs prefetch jobs. Rows are cloned from the
// page's <template> elements and filled with textContent: nothing the
// server sends (an upstream's error text, a repository name) is ever
// parsed as HTML.
"use strict";
(function () {
  var POLL_MS = 2000, JOB_POLL_MS = 1000, MAX_JOB_POLLS = 3600;

  function $(id) { return document.getElementById(id); }

  function bytes(n) {
    if (n < 1024) { return n + " B"; }
    var units = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"], i = -1;
    do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
    return n.toFixed(1) + " " + units[i];
  }

  function ago(now, t) {
    if (!t) { return "never"; }
    var s = Math.floor((Date.parse(now) - Date.parse(t)) / 1000);
    if (s < 0) { return "in " + (-s) + " s"; }
    if (s < 60) { return s + " s ago"; }
    if (s < 3600) { return Math.floor(s / 60) + " min ago"; }
    if (s < 48 * 3600) { return Math.floor(s / 3600) + " h ago"; }
    return Math.floor(s / 86400) + " days ago";
  }

  function pct(r) { return (r * 100).toFixed(1) + " %"; }

  function short(d) {
    var i = d.indexOf(":");
    return i >= 0 && d.length - i > 13 ? d.slice(i + 1, i + 13) : d;
  }

  function ratio(r) {
    return r.ratio === null ? "no requests" : pct(r.ratio) + " (" + r.hits + " of " + r.total + ")";
  }

  var STATES = { ok: "OK", failing: "Failing", rate_limited: "Rate limited", idle: "Not used yet" };

  // row clones template id and calls fill with a setter of its fields.
  function row(id, fill) {
    var tr = $(id).content.firstElementChild.cloneNode(true);
    fill(function (name, text) {
      var el = tr.querySelector('[data-f="' + name + '"]');
      el.textContent = text;
      return el;
    }, tr);
    return tr;
  }

  function setTime(el, now, t) {
    el.textContent = ago(now, t);
    if (t) { el.setAttribute("datetime", t); } else { el.removeAttribute("datetime"); }
  }

  function renderUpstreams(st) {
    var body = $("upstreams");
    if (!body || st.upstreams.length === 0) { return; }
    body.replaceChildren.apply(body, st.upstreams.map(function (u) {
      return row("upstream-row", function (f) {
        f("name", u.name);
        f("url", u.url);
        f("default", "default").hidden = !u["default"];
        var s = f("state", STATES[u.state] || u.state);
        s.className = "state state-" + u.state;
        s.setAttribute("data-state", u.state);
        f("backoff", u.backoff_until ? "until " + u.backoff_until : "").hidden = !u.backoff_until;
        setTime(f("last_success", ""), st.now, u.last_success);
        setTime(f("last_error", ""), st.now, u.last_error);
        f("last_error_text", u.last_error_text || "");
        f("ratelimit", u.ratelimit_remaining === null ? "—" : String(u.ratelimit_remaining));
        f("requests", String(u.requests));
        f("stale", String(u.stale));
      });
    }));
  }

  function renderDisk(st) {
    var d = st.disk, budget = d.max_size > 0;
    $("disk-used").textContent = bytes(d.bytes) + (budget ? " of " + bytes(d.max_size) + " (" + pct(d.used_ratio || 0) + ")" : "");
    $("disk-blobs").textContent = d.blobs + " (" + bytes(d.blob_bytes) + ")";
    $("disk-manifests").textContent = d.manifests + " (" + bytes(d.manifest_bytes) + ")";
    $("disk-evicted").textContent = d.evicted_blobs + " blobs, " + d.evicted_manifests + " manifests (" + bytes(d.evicted_bytes) + ")";
    $("hit-5m").textContent = ratio(st.hit_ratio["5m"]);
    $("hit-1h").textContent = ratio(st.hit_ratio["1h"]);
    var meter = $("disk-meter");
    if (meter) {
      meter.value = d.bytes;
      meter.textContent = pct(d.used_ratio || 0);
    }
    var next = $("evict-next");
    if (next) {
      next.replaceChildren.apply(next, d.next_eviction.map(function (c) {
        return row("evict-row", function (f) {
          f("digest", short(c.digest)).title = c.digest;
          f("kind", c.kind);
          f("size", bytes(c.size));
          setTime(f("last_use", ""), st.now, c.last_use);
        });
      }));
      $("evict-none").hidden = d.next_eviction.length > 0;
      $("evict-table").hidden = d.next_eviction.length === 0;
    }
  }

  function renderFills(st) {
    var body = $("fills");
    body.replaceChildren.apply(body, st.fills.map(function (x) {
      return row("fill-row", function (f) {
        f("digest", short(x.digest)).title = x.digest;
        f("repo", (x.upstream ? x.upstream + "/" : "") + x.repo);
        var bar = f("bar", "");
        bar.setAttribute("aria-label", "Downloaded of " + short(x.digest));
        if (x.size >= 0) { bar.max = x.size; bar.value = x.bytes; }
        var b = f("bytes", bytes(x.bytes) + " of " + (x.size >= 0 ? bytes(x.size) : "?"));
        b.setAttribute("data-bytes", x.bytes);
        b.setAttribute("data-size", x.size);
        f("rate", bytes(Math.floor(x.rate)) + "/s");
        f("waiters", String(x.waiters));
      });
    }));
    $("fills-none").hidden = st.fills.length > 0;
    $("fills-table").hidden = st.fills.length === 0;
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (body) {
        if (!r.ok) { throw new Error(errorText(r, body)); }
        return body;
      });
    });
  }

  function errorText(r, body) {
    var e = body && body.errors && body.errors[0];
    return r.status + (e ? ": " + e.message : " " + r.statusText);
  }

  var failures = 0;
  function poll() {
    if (document.hidden) { setTimeout(poll, POLL_MS); return; }
    getJSON("/v2/_slipway/status").then(function (st) {
      failures = 0;
      var now = $("now");
      now.textContent = st.now.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC");
      now.setAttribute("datetime", st.now);
      $("live").textContent = "· live";
      renderUpstreams(st);
      renderDisk(st);
      renderFills(st);
    }).catch(function (err) {
      failures++;
      $("live").textContent = "· not updating (" + err.message + ")";
    }).then(function () {
      setTimeout(poll, POLL_MS * Math.min(1 + failures, 15));
    });
  }

  function refreshRepos() {
    var body = $("repos"), q = body.getAttribute("data-q") || "", c = body.getAttribute("data-cursor") || "";
    var url = "/v2/_slipway/repos?q=" + encodeURIComponent(q) + (c ? "&cursor=" + encodeURIComponent(c) : "");
    return Promise.all([getJSON(url), getJSON("/v2/_slipway/status")]).then(function (res) {
      var page = res[0], now = res[1].now;
      body.replaceChildren.apply(body, page.rows.map(function (r) {
        return row("repo-row", function (f) {
          var where = f("where", r.pushed ? "pushed" : r.upstream);
          if (r.pushed) { where.className = "pushed"; }
          f("repo", r.repo);
          f("tag", r.tag);
          f("digest", short(r.digest)).title = r.digest;
          f("size", r.stored ? bytes(r.size) : "evicted");
          setTime(f("last_use", ""), now, r.last_use);
        });
      }));
      $("repos-none").hidden = page.rows.length > 0;
    });
  }

  function renderJob(job) {
    $("pf-table").hidden = false;
    var body = $("pf-images-rows");
    body.replaceChildren.apply(body, job.images.map(function (im) {
      return row("job-row", function (f) {
        f("image", im.image);
        f("state", im.state);
        f("blobs", im.blobs_done + " of " + im.blobs_total);
        f("bytes", bytes(im.bytes));
        f("error", im.error || "");
      });
    }));
    var what = job.images_done + " of " + job.images_total + " images, " + job.blobs_done + " of " +
      job.blobs_total + " blobs, " + bytes(job.bytes) + " fetched";
    $("pf-status").textContent = (job.state === "running" ? "Prefetching: " : job.state === "done" ? "Done: " : "Finished with errors: ") + what;
  }

  function followJob(url, polls, button) {
    getJSON(url).then(function (job) {
      renderJob(job);
      if (job.state === "running" && polls < MAX_JOB_POLLS) {
        setTimeout(function () { followJob(url, polls + 1, button); }, JOB_POLL_MS);
        return;
      }
      button.disabled = false;
      refreshRepos().catch(function () {});
    }).catch(function (err) {
      $("pf-status").textContent = "Prefetch: " + err.message;
      button.disabled = false;
    });
  }

  function setupPrefetch() {
    var form = $("prefetch");
    if (!form) { return; }
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var images = $("pf-images").value.split("\n").map(function (s) { return s.trim(); }).filter(Boolean);
      var platform = $("pf-platform").value.trim();
      var button = form.querySelector("button");
      button.disabled = true;
      $("pf-status").textContent = "Starting…";
      fetch("/v2/_slipway/prefetch/jobs", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ images: images, platform: platform })
      }).then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (body) {
          if (r.status !== 202) { throw new Error(errorText(r, body)); }
          renderJob(body);
          followJob("/v2/_slipway/prefetch/jobs/" + encodeURIComponent(body.id), 0, button);
        });
      }).catch(function (err) {
        $("pf-status").textContent = "Prefetch: " + err.message;
        button.disabled = false;
      });
    });
  }

  setupPrefetch();
  setTimeout(poll, POLL_MS);
})();
