// Switchboard dashboard: follows /v1/stream (Server-Sent Events) and draws
// every section as HTML + hand-written SVG. No framework, no build step.
//
// The stream is read with fetch() instead of EventSource because EventSource
// cannot send an Authorization header, and the admin token must not travel
// in a URL (where logs and history would keep it).
'use strict';

const WINDOW_MS = 300 * 1000;
const INSTANCE_POINTS = 60;
const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem('switchboard.token') || '',
  frame: null,
  routes: {},     // route -> {rps, err, p50, p99: [[t, v], ...]}
  topics: {},     // topic -> [[t, v], ...]
  instances: {},  // service/id -> [[t, v], ...]
  frames: 0,
  lastRenderMs: 0,
  // The first frame, in ms since the page started loading (performance.now()):
  // its data arrived, render() returned, its layout was done, it was painted.
  firstFrame: null,
};
window.__switchboard = state; // for tests and curious operators
const serviceEls = new Map(); // service name -> its element on the page

function esc(s) {
  return String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}
function num(v, digits = 1) {
  if (v == null) return '–';
  if (Math.abs(v) >= 1000) return (v / 1000).toFixed(1) + 'k';
  return Number(v).toFixed(digits);
}
function ms(v) { return v == null ? '–' : v < 10 ? v.toFixed(2) + ' ms' : v < 1000 ? v.toFixed(0) + ' ms' : (v / 1000).toFixed(2) + ' s'; }
function pct(v) { return (v * 100).toFixed(v > 0 && v < 0.1 ? 1 : 0) + '%'; }
function ago(now, t) {
  if (!t) return '–';
  const s = Math.max(0, Math.round((now - t) / 1000));
  return s < 60 ? s + 's ago' : Math.round(s / 60) + 'm ago';
}

// A sparkline of [t, v] points over [t0, t1]; nulls break the line.
function spark(points, t0, t1, cls = '', w = 120, h = 24) {
  return sparks([[points, cls]], t0, t1, w, h);
}

// Several lines on one scale (p50 and p99 latency): [[points, class], ...].
// A point between two gaps is drawn as a dot, so sparse traffic still shows.
function sparks(lines, t0, t1, w = 120, h = 24) {
  let max = 0;
  for (const [points] of lines) for (const [, v] of points) if (v != null && v > max) max = v;
  if (max <= 0) max = 1;
  let paths = '';
  for (const [points, cls] of lines) {
    let d = '';
    let run = 0;
    for (const [t, v] of points) {
      if (v == null || t < t0) { if (run === 1) d += 'h0.8'; run = 0; continue; }
      const x = ((t - t0) / (t1 - t0)) * w;
      const y = h - 1 - (v / max) * (h - 2);
      d += (run ? 'L' : 'M') + x.toFixed(1) + ' ' + y.toFixed(1);
      run += 1;
    }
    if (run === 1) d += 'h0.8';
    paths += `<path class="${cls}" d="${d}"/>`;
  }
  return `<svg class="spark" viewBox="0 0 ${w} ${h}" preserveAspectRatio="none" aria-hidden="true">${paths}</svg>`;
}

// A strip of breaker states over the window, from its transitions.
function strip(transitions, current, t0, t1, w = 300) {
  const ts = transitions.filter((x) => x.t >= t0);
  let rects = '';
  let from = t0;
  // Before the first transition in the window: the state it left.
  const before = { open: 'closed', half_open: 'open', closed: 'half_open' };
  let st = ts.length ? before[ts[0].to] || 'closed' : current;
  for (const x of ts) {
    rects += seg(from, x.t, st);
    from = x.t;
    st = x.to;
  }
  rects += seg(from, t1, current);
  function seg(a, b, s) {
    const x = ((a - t0) / (t1 - t0)) * w;
    const width = Math.max(0.5, ((b - a) / (t1 - t0)) * w);
    return `<rect class="${esc(s)}" x="${x.toFixed(1)}" y="0" width="${width.toFixed(1)}" height="10"><title>${esc(s)}</title></rect>`;
  }
  return `<svg class="strip" viewBox="0 0 ${w} 10" preserveAspectRatio="none">${rects}</svg>`;
}

function push(list, t, v, keep) {
  list.push([t, v]);
  if (typeof keep === 'number') { while (list.length > keep) list.shift(); } else { while (list.length && list[0][0] < keep) list.shift(); }
}

function setHistory(h) {
  state.routes = h.routes || {};
  state.topics = h.topics || {};
  state.instances = h.instances || {};
}

function onFrame(f, arrived) {
  const t0 = f.t - WINDOW_MS;
  for (const r of f.routes) {
    const s = (state.routes[r.route] ||= { rps: [], err: [], p50: [], p99: [] });
    if (!s.rps.length || s.rps[s.rps.length - 1][0] < f.t) {
      push(s.rps, f.t, r.rps, t0); push(s.err, f.t, r.error_rate, t0);
      push(s.p50, f.t, r.p50_ms, t0); push(s.p99, f.t, r.p99_ms, t0);
    }
  }
  if (f.bus) for (const tp of f.bus.topics) {
    const s = (state.topics[tp.topic] ||= []);
    if (!s.length || s[s.length - 1][0] < f.t) push(s, f.t, tp.rate, t0);
  }
  for (const svc of f.services) for (const i of svc.instances) {
    const s = (state.instances[svc.name + '/' + i.id] ||= []);
    if (!s.length || s[s.length - 1][0] < f.t) push(s, f.t, i.latency_ms, INSTANCE_POINTS);
  }
  state.frame = f;
  state.frames += 1;
  const start = performance.now();
  render(f);
  state.lastRenderMs = performance.now() - start;
  document.body.dataset.frames = String(state.frames);
  if (state.frames === 1) {
    const first = (state.firstFrame = { arrivedMs: arrived, renderedMs: start + state.lastRenderMs });
    requestAnimationFrame(() => {
      // Reading a layout property forces style and layout of what render() built.
      void document.documentElement.scrollWidth;
      first.laidOutMs = performance.now();
      // A task queued from a frame callback runs after that frame is painted.
      setTimeout(() => { first.paintedMs = performance.now(); }, 0);
    });
  }
}

function render(f) {
  const t1 = f.t;
  const t0 = t1 - WINDOW_MS;
  const info = [];
  if (f.info.bus) info.push('bus ' + f.info.bus);
  if (f.info.store) info.push('registry ' + f.info.store);
  $('info').textContent = info.join(' · ');
  $('footer').textContent = `switchboard ${f.info.version} · frame ${new Date(f.t).toLocaleTimeString()} · rendered in ${state.lastRenderMs.toFixed(0)} ms`;

  // Breakers.
  const counts = {};
  for (const b of f.breakers) counts[b.state] = (counts[b.state] || 0) + 1;
  $('breaker-summary').textContent = Object.entries(counts).map(([k, v]) => `${v} ${k.replace('_', '-')}`).join(', ');
  let html = '<div class="scroll"><table><thead><tr><th>route</th><th>instance</th><th>state</th><th class="num">failure rate</th><th class="num">calls</th><th>last 5 min</th></tr></thead><tbody>';
  for (const b of f.breakers) {
    const tr = f.transitions.filter((x) => x.route === b.route && x.instance === b.instance);
    const retry = b.retry_after_ms != null ? ` <span class="muted">${(b.retry_after_ms / 1000).toFixed(1)}s</span>` : '';
    html += `<tr data-breaker="${esc(b.route + ' ' + b.instance)}" data-state="${esc(b.state)}"><td>${esc(b.route)}</td><td title="${esc(b.addr)}">${esc(b.instance)}</td>`
      + `<td><span class="state ${esc(b.state)}">${esc(b.state.replace('_', '-'))}</span>${retry}</td>`
      + `<td class="num">${pct(b.failure_rate)}</td><td class="num">${b.failed}/${b.calls}</td><td>${strip(tr, b.state, t0, t1)}</td></tr>`;
  }
  html += '</tbody></table></div>';
  if (f.transitions.length) {
    html += '<p class="muted">' + f.transitions.slice(-6).reverse().map((x) =>
      `${new Date(x.t).toLocaleTimeString()} ${esc(x.route)} ${esc(x.instance)} → <span class="state ${esc(x.to)}">${esc(x.to.replace('_', '-'))}</span>`).join('<br>') + '</p>';
  }
  $('breakers').innerHTML = html;

  // Routes.
  html = '';
  for (const r of f.routes) {
    const s = state.routes[r.route] || { rps: [], err: [], p50: [], p99: [] };
    html += `<div class="route" data-route="${esc(r.route)}"><span class="name" title="${esc(r.service)}">${esc(r.route)}</span>`
      + `<span class="metric">req/s <b>${num(r.rps)}</b><br>${spark(s.rps, t0, t1)}</span>`
      + `<span class="metric">errors <b>${pct(r.error_rate)}</b><br>${spark(s.err, t0, t1, 'err')}</span>`
      + `<span class="metric"><span class="key p50">p50</span> <b>${ms(r.p50_ms)}</b> <span class="key p99">p99</span> <b>${ms(r.p99_ms)}</b><br>${sparks([[s.p99, 'p99'], [s.p50, 'p50']], t0, t1)}</span></div>`;
  }
  $('routes').innerHTML = html || '<p class="muted">no routes</p>';

  // Services: one element per service, kept from frame to frame, so an
  // element scrolled out of view keeps its size while the browser skips its
  // layout and paint (content-visibility: auto in app.css); with 1,000
  // instances that is most of a frame's layout.
  let n = 0;
  let passing = 0;
  const box = $('services');
  if (!serviceEls.size) box.textContent = '';
  const seen = new Set();
  let prev = null;
  for (const svc of f.services) {
    const up = svc.instances.filter((i) => i.status === 'passing').length;
    n += svc.instances.length;
    passing += up;
    html = `<h3>${esc(svc.name)} <span class="muted">${up}/${svc.instances.length} passing</span></h3>`
      + '<div class="scroll"><table><thead><tr><th>instance</th><th>address</th><th>version</th><th title="the later of the last active check and the last TTL heartbeat">last check</th><th class="num">req/s</th><th>latency</th></tr></thead><tbody>';
    for (const i of svc.instances) {
      const s = state.instances[svc.name + '/' + i.id] || [];
      html += `<tr data-instance="${esc(i.id)}" data-status="${esc(i.status)}"><td><span class="dot ${esc(i.status)}" title="${esc(i.status)}"></span>${esc(i.id)}</td>`
        + `<td>${esc(i.addr)}</td><td>${esc(i.version || '–')}</td>`
        + `<td${i.last_check ? ` title="${i.last_check_by === 'heartbeat' ? 'heartbeat' : 'check'} at ${esc(new Date(i.last_check).toLocaleTimeString())}"` : ''} data-last-check="${i.last_check || ''}">${ago(f.t, i.last_check)}</td>`
        + `<td class="num">${num(i.rps)}</td><td>${ms(i.latency_ms)} ${spark(s, t1 - INSTANCE_POINTS * 1000, t1)}</td></tr>`;
    }
    html += '</tbody></table></div>';
    let el = serviceEls.get(svc.name);
    if (!el) {
      el = document.createElement('div');
      el.className = 'service';
      el.dataset.service = svc.name;
      // Until it is first laid out: a heading and a table head (3.5rem), the rows (2.07rem each).
      el.style.containIntrinsicSize = `auto ${(3.5 + 2.07 * svc.instances.length).toFixed(1)}rem`;
      serviceEls.set(svc.name, el);
    }
    el.innerHTML = html;
    const at = prev ? prev.nextSibling : box.firstChild;
    if (at !== el) box.insertBefore(el, at);
    prev = el;
    seen.add(svc.name);
  }
  for (const [name, el] of serviceEls) {
    if (!seen.has(name)) { el.remove(); serviceEls.delete(name); }
  }
  $('service-summary').textContent = `${f.services.length} services, ${passing}/${n} instances passing`;
  if (!f.services.length) box.innerHTML = '<p class="muted">no services</p>';

  // Bus.
  const bus = f.bus;
  if (!bus) {
    $('bus-summary').textContent = '';
    $('bus').innerHTML = '<p class="muted">this gateway was started without a bus</p>';
    return;
  }
  const lag = bus.groups.reduce((a, g) => a + (g.lag || 0), 0);
  $('bus-summary').textContent = `${bus.topics.length} topics · lag ${lag} · ${bus.redelivered} redelivered · ${bus.dead_lettered} dead-lettered`;
  html = '<div class="scroll"><table><thead><tr><th>topic</th><th class="num">events/s</th><th class="num">total</th><th>last 5 min</th></tr></thead><tbody>';
  for (const tp of bus.topics) {
    html += `<tr data-topic="${esc(tp.topic)}"><td>${esc(tp.topic)}</td><td class="num">${num(tp.rate)}</td><td class="num">${tp.published}</td><td>${spark(state.topics[tp.topic] || [], t0, t1)}</td></tr>`;
  }
  html += '</tbody></table></div><div class="scroll"><table><thead><tr><th>group</th><th>topic</th><th class="num">lag</th><th class="num">delivered</th><th class="num">acked</th><th class="num">redelivered</th><th class="num">dead letters</th><th class="num" title="handed back to the group at shutdown: released by a handler, or held">handed back</th></tr></thead><tbody>';
  for (const g of bus.groups) {
    html += `<tr data-group="${esc(g.group)}"><td>${esc(g.group)}</td><td>${esc(g.topic)}</td><td class="num">${g.lag ?? '–'}</td><td class="num">${g.delivered}</td><td class="num">${g.acked}</td>`
      + `<td class="num">${g.redelivered}</td><td class="num${g.dead_lettered ? ' bad' : ''}">${g.dead_lettered}</td><td class="num">${(g.released ?? 0) + (g.held ?? 0)}</td></tr>`;
  }
  html += '</tbody></table></div><h2>Latest events</h2><div class="scroll"><table class="tail"><thead><tr><th>time</th><th>type</th><th>id</th><th>correlation id</th></tr></thead><tbody>';
  for (const e of bus.recent) {
    html += `<tr><td>${new Date(e.time_ms).toLocaleTimeString()}</td><td>${esc(e.type)}</td><td>${esc(e.id)}</td><td>${esc(e.correlation_id || '–')}</td></tr>`;
  }
  html += '</tbody></table></div>';
  $('bus').innerHTML = html;
}

function authHeaders() {
  return state.token ? { Authorization: 'Bearer ' + state.token } : {};
}

function setConnected(on, text) {
  document.body.dataset.connected = String(on);
  const c = $('conn');
  c.className = 'pill ' + (on ? 'on' : 'off');
  c.textContent = text;
}

async function connect() {
  let res;
  try {
    res = await fetch('/v1/stream', { headers: authHeaders(), cache: 'no-store' });
  } catch (e) {
    setConnected(false, 'offline, retrying');
    return setTimeout(connect, 2000);
  }
  if (res.status === 401) {
    setConnected(false, 'token needed');
    $('token').hidden = false;
    $('token-error').textContent = state.token ? 'that token was refused' : '';
    return;
  }
  if (!res.ok || !res.body) {
    setConnected(false, 'error ' + res.status + ', retrying');
    return setTimeout(connect, 2000);
  }
  $('token').hidden = true;
  setConnected(true, 'live');
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        handle(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
      }
    }
  } catch (e) { /* the connection broke: reconnect below */ }
  setConnected(false, 'reconnecting');
  setTimeout(connect, 2000);
}

function handle(block) {
  const arrived = performance.now();
  let event = 'message';
  let data = '';
  for (const line of block.split('\n')) {
    if (line.startsWith('event: ')) event = line.slice(7);
    else if (line.startsWith('data: ')) data += line.slice(6);
  }
  if (!data) return;
  const value = JSON.parse(data);
  if (event === 'history') setHistory(value);
  else if (event === 'sample') onFrame(value, arrived);
}

async function search(q) {
  const box = $('results');
  box.hidden = false;
  box.textContent = 'searching…';
  let res;
  try {
    res = await fetch('/v1/search?q=' + encodeURIComponent(q), { headers: authHeaders() });
  } catch (e) {
    box.textContent = 'search failed: ' + e;
    return;
  }
  const body = await res.json();
  if (!res.ok) {
    box.innerHTML = `<p class="bad">${esc(body.detail || res.status)}</p>`;
    return;
  }
  const mark = (s) => esc(s).replace(new RegExp(esc(q).replace(/[.*+?^${}()|[\]\\]/g, '\\$&'), 'gi'), (m) => `<mark>${m}</mark>`);
  let html = `<h2>Results for “${esc(body.q)}” <button type="button" id="close-results">close</button></h2>`;
  html += `<h2 class="muted">requests (${body.requests.length})</h2>`;
  if (body.requests.length) {
    html += '<div class="scroll"><table class="tail"><thead><tr><th>time</th><th>request id</th><th>method</th><th>route</th><th>instance</th><th class="num">status</th><th class="num">duration</th><th class="num">attempts</th></tr></thead><tbody>';
    for (const r of body.requests) {
      html += `<tr><td>${new Date(r.t).toLocaleTimeString()}</td><td>${mark(r.request_id)}</td><td>${esc(r.method)}</td><td>${esc(r.route || '–')}</td><td>${esc(r.instance || '–')}</td>`
        + `<td class="num${r.status >= 500 ? ' bad' : ''}">${r.status}</td><td class="num">${ms(r.duration_ms)}</td><td class="num">${r.attempts}</td></tr>`;
    }
    html += '</tbody></table></div>';
  }
  html += `<h2 class="muted">events (${body.events.length})</h2>`;
  if (body.events.length) {
    html += '<div class="scroll"><table class="tail"><thead><tr><th>time</th><th>type</th><th>id</th><th>correlation id</th><th>source</th></tr></thead><tbody>';
    for (const e of body.events) {
      html += `<tr><td>${new Date(e.time_ms).toLocaleTimeString()}</td><td>${esc(e.type)}</td><td>${mark(e.id)}</td><td>${mark(e.correlation_id || '–')}</td><td>${esc(e.source)}</td></tr>`;
    }
    html += '</tbody></table></div>';
  }
  box.innerHTML = html;
  $('close-results').addEventListener('click', () => { box.hidden = true; });
}

document.addEventListener('DOMContentLoaded', () => {
  $('search').addEventListener('submit', (e) => {
    e.preventDefault();
    const q = $('q').value.trim();
    if (q) search(q);
  });
  $('token').addEventListener('submit', (e) => {
    e.preventDefault();
    state.token = $('token-input').value.trim();
    sessionStorage.setItem('switchboard.token', state.token);
    connect();
  });
  connect();
});
