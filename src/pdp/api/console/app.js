// msgnode console. Plain JavaScript, no dependencies. Everything shown comes from the
// node and is treated as text (textContent only, never innerHTML): decisions carry inputs.
'use strict';

const API = '/console/api/';
const MAX_ROWS = 200;
const $ = (selector) => document.querySelector(selector);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === 'class') node.className = value;
    else if (key === 'on') for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else node[key] = value;
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// The nodes among `items` (leaving out the absent ones).
function present(...items) {
  return items.filter((item) => item !== null && item !== undefined);
}

// `path` without the directory all of `paths` share.
function trimmer(paths) {
  if (!paths.length) return (p) => p;
  let prefix = paths[0].slice(0, paths[0].lastIndexOf('/') + 1);
  for (const p of paths) while (!p.startsWith(prefix)) prefix = prefix.slice(0, prefix.slice(0, -1).lastIndexOf('/') + 1);
  return (p) => p.slice(prefix.length);
}

async function api(path, options) {
  const response = await fetch(API + path, Object.assign({ credentials: 'same-origin' }, options || {}));
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error((body && body.message) || response.statusText);
  return body;
}

function shortTime(iso) {
  return (iso || '').replace(/^.*T/, '').replace(/Z$/, '');
}

function resultCell(result) {
  return el('td', { class: result }, result);
}

// ---- bundle status and reloads ----
let currentRevision = null;
let writable = false;

async function refreshStatus() {
  let status;
  try { status = await api('status'); } catch (e) { $('#reload-status').textContent = 'status: ' + e.message; return; }
  const load = status.load;
  $('#revision').textContent = 'revision ' + (load.revision || 'none');
  writable = status.write;
  $('#mode').textContent = status.write ? 'write mode' : 'read-only';
  $('#mode').classList.toggle('write', status.write);
  $('#shadow-write').hidden = !status.write;
  const box = $('#reload-status');
  box.replaceChildren();
  const served = el('div', {}, 'serving ', el('b', {}, load.revision || 'nothing'),
    load.activated_at ? ' since ' + load.activated_at : '',
    load.decision_engine ? ' (' + load.decision_engine + ')' : '');
  if (load.last_load_ok || !load.last_attempt_at) {
    box.append(el('div', { class: 'ok', id: 'reload-ok' }, served,
      el('div', { class: 'muted' }, 'last reload ' + (load.last_attempt_at || '—') + ': ok')));
  } else {
    box.append(el('div', { class: 'failed', id: 'reload-failed' }, served,
      el('div', {}, 'last reload failed at ' + load.last_attempt_at + ': ',
        status.last_error_at ? el('span', { class: 'location' }, status.last_error_at) : null),
      el('div', {}, load.last_error || ''),
      load.failing_tests && load.failing_tests.length ? el('div', {}, 'failing tests: ' + load.failing_tests.join(', ')) : null));
  }
  renderShadow(status.shadow);
  if (load.revision && load.revision !== currentRevision) {
    currentRevision = load.revision;
    refreshCoverage();
    refreshFixtures();
  }
}

// ---- live tail ----
let source = null;
const seen = new Set();

function filterQuery() {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData($('#filters'))) if (String(value).trim()) params.set(key, String(value).trim());
  return params.toString();
}

function openTail() {
  if (source) source.close();
  seen.clear();
  $('#tail-rows').replaceChildren();
  const query = filterQuery();
  source = new EventSource(API + 'events' + (query ? '?' + query : ''));
  source.addEventListener('open', () => { $('#tail-state').textContent = 'live' + (query ? ' (filtered)' : ''); });
  source.addEventListener('error', () => { $('#tail-state').textContent = 'reconnecting…'; });
  source.addEventListener('lagged', (e) => { $('#tail-state').textContent = 'live — ' + e.data + ' decisions skipped (too fast to show)'; });
  source.addEventListener('decision', (e) => {
    let d;
    try { d = JSON.parse(e.data); } catch (_) { return; }
    if (seen.has(d.decision_id)) return;
    seen.add(d.decision_id);
    const rows = $('#tail-rows');
    rows.prepend(el('tr', { className: 'decision' },
      el('td', {}, shortTime(d.timestamp)), resultCell(d.result), el('td', {}, d.kind),
      el('td', {}, d.user), el('td', {}, d.addresses.join(' ')), el('td', {}, d.reasons.join('; ')),
      el('td', {}, d.enforcement_point),
      el('td', {}, el('a', { class: 'id', title: 'try in the playground', on: { click: () => tryLogged(d.decision_id) } }, d.decision_id))));
    while (rows.children.length > MAX_ROWS) rows.lastChild.remove();
  });
}

// ---- counts chart (hand-drawn SVG) ----
const SVG = 'http://www.w3.org/2000/svg';

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

async function refreshCounts() {
  let data;
  try { data = await api('counts'); } catch (_) { return; }
  const step = data.bucket_seconds;
  const now = Math.floor(Date.now() / 1000 / step) * step;
  const n = 60;
  const starts = Array.from({ length: n }, (_, i) => now - (n - 1 - i) * step);
  const byStart = new Map(data.buckets.map((b) => [b.start, b.counts]));
  const keys = [...new Set(data.buckets.flatMap((b) => Object.keys(b.counts)))].sort();
  const total = (s) => keys.reduce((sum, k) => sum + ((byStart.get(s) || {})[k] || 0), 0);
  const max = Math.max(1, ...starts.map(total));
  const chart = $('#chart');
  chart.replaceChildren();
  const [w, h, left, bottom] = [900, 180, 40, 20];
  const slot = (w - left - 10) / n;
  const y = (v) => h - bottom - (v * (h - bottom - 10)) / max;
  chart.append(svg('line', { x1: left, y1: y(0), x2: w - 10, y2: y(0), stroke: '#999' }));
  chart.append(svg('line', { x1: left, y1: y(0), x2: left, y2: 10, stroke: '#999' }));
  for (const v of [0, max]) {
    const t = svg('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end', 'font-size': 10 });
    t.textContent = v;
    chart.append(t);
  }
  const label = svg('text', { x: w - 10, y: h - 4, 'text-anchor': 'end', 'font-size': 10 });
  label.textContent = 'last ' + (n * step / 60) + ' min, stacked';
  chart.append(label);
  const color = (key) => {
    const [kind, result] = key.split('/');
    const shades = result === 'allow' ? ['#1f8a4c', '#52b788', '#95d5b2', '#2d6a4f', '#74c69d']
      : result === 'deny' ? ['#c0392b', '#e76f51', '#9d0208', '#f4a261', '#dc2f02'] : ['#566573', '#b9770e', '#7d3c98', '#2456a6', '#16a085'];
    const kinds = [...new Set(keys.map((k) => k.split('/')[0]))];
    return shades[kinds.indexOf(kind) % shades.length];
  };
  starts.forEach((s, i) => {
    let base = 0;
    for (const key of keys) {
      const v = (byStart.get(s) || {})[key] || 0;
      if (!v) continue;
      const bar = svg('rect', { x: left + i * slot + 1, y: y(base + v), width: Math.max(1, slot - 2), height: y(base) - y(base + v), fill: color(key), 'data-key': key });
      const tip = svg('title', {});
      tip.textContent = key + ': ' + v;
      bar.append(tip);
      chart.append(bar);
      base += v;
    }
  });
  const legend = $('#legend');
  legend.replaceChildren();
  for (const key of keys) {
    const sum = data.buckets.reduce((acc, b) => acc + (b.counts[key] || 0), 0);
    const item = el('span', {}, key + ' ' + sum);
    item.style.setProperty('--swatch', color(key));
    legend.append(item);
  }
}

// ---- shadow ----
function verdictText(v) {
  return v.allow ? 'allow' : 'deny' + (v.reasons.length ? ': ' + v.reasons.join('; ') : '');
}

function renderShadow(shadow) {
  const status = $('#shadow-status');
  status.replaceChildren(...present(shadow.revision
    ? el('div', {}, 'candidate ', el('b', {}, shadow.revision), ' from ' + shadow.source + ' — ' + shadow.evaluated + ' decisions shadowed, ' + shadow.dropped + ' dropped (queue full)')
    : el('div', { class: 'muted' }, 'no candidate loaded ([pdp] shadow' + (writable ? ', or load one below' : '') + ')'),
  shadow.last_error ? el('div', { class: 'failed' }, 'last candidate refused: ' + shadow.last_error) : null));
  $('#shadow-groups').replaceChildren(...shadow.groups.map(([g, count]) => el('tr', {},
    el('td', {}, el('span', { class: g.from }, g.from), ' → ', el('span', { class: g.to }, g.to)),
    el('td', {}, g.kind), el('td', {}, g.reason), el('td', {}, count))));
  $('#shadow-recent').replaceChildren(...shadow.recent.slice(0, 20).map((d) => el('tr', {},
    el('td', {}, shortTime(d.timestamp)),
    el('td', {}, el('a', { class: 'id', on: { click: () => tryLogged(d.decision_id) } }, d.decision_id)),
    el('td', {}, verdictText(d.live)), el('td', {}, verdictText(d.candidate)))));
}

async function loadCandidate() {
  const file = $('#shadow-file').files[0];
  if (!file) return;
  try {
    await api('shadow', { method: 'PUT', body: file, headers: { 'Content-Type': 'application/gzip' } });
  } catch (e) { alert('candidate refused: ' + e.message); }
  refreshStatus();
}

async function unloadCandidate() {
  try { await api('shadow', { method: 'DELETE' }); } catch (e) { alert(e.message); }
  refreshStatus();
}

// ---- playground ----
function showSide(id, side, masked) {
  const box = $(id + ' .verdict');
  if (!side) { box.replaceChildren(el('span', { class: 'muted' }, 'no revision')); return; }
  box.replaceChildren(...present(
    el('div', { class: 'big ' + (side.allow ? 'allow' : 'deny') }, side.allow ? 'allow' : 'deny'),
    el('ul', {}, side.reasons.map((r) => el('li', { class: 'reason' }, r))),
    el('div', { class: 'muted' }, 'revision ' + side.revision),
    masked.length ? el('div', { class: 'muted' }, 'decided with masked fields: ' + masked.join(', ')) : null));
}

async function decide(body) {
  $('#pg-source').textContent = '…';
  try {
    const result = await api('playground', { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
    $('#pg-source').textContent = 'decided: ' + result.source;
    showSide('#pg-active', result.active, result.masked);
    showSide('#pg-candidate', result.candidate, result.masked);
  } catch (e) {
    $('#pg-source').textContent = 'error: ' + e.message;
  }
}

function runPlayground() {
  const fixture = $('#pg-fixture').value;
  const decisionId = $('#pg-decision').value.trim();
  if (decisionId) return decide({ decision_id: decisionId });
  if (fixture) return decide({ fixture });
  let input;
  try { input = JSON.parse($('#pg-input').value); } catch (e) { $('#pg-source').textContent = 'input is not JSON: ' + e.message; return; }
  return decide({ input });
}

function tryLogged(id) {
  $('#pg-fixture').value = '';
  $('#pg-decision').value = id;
  $('#playground').scrollIntoView();
  decide({ decision_id: id });
}

async function refreshFixtures() {
  let list;
  try { list = await api('fixtures'); } catch (_) { return; }
  $('#pg-fixture').replaceChildren(el('option', { value: '' }, '—'),
    ...list.map((f) => el('option', { value: f.path, title: f.description || '' }, f.path.replace(/^.*fixtures\//, '') + (f.description ? ' — ' + f.description : ''))));
}

// ---- coverage ----
async function refreshCoverage() {
  let report;
  try { report = await api('coverage'); } catch (e) { $('#coverage-files').textContent = e.message; return; }
  $('#coverage-total').textContent = report.percent === null ? '' : '(' + report.percent.toFixed(1) + '% total, ' + report.passed + ' passed, ' + report.failed + ' failed)';
  const short = trimmer(report.files.map((f) => f.file));
  $('#coverage-files').replaceChildren(...report.files.map((file) => {
    const covered = new Set(file.covered);
    const uncovered = new Set(file.not_covered);
    const lines = (file.source || '').split('\n').map((text, i) => el('span', {
      class: covered.has(i + 1) ? 'cov' : uncovered.has(i + 1) ? 'uncov' : '',
    }, String(i + 1).padStart(4) + '  ' + text));
    return el('details', {}, el('summary', {}, short(file.file) + ' — ' + file.percent.toFixed(1) + '% (' + file.not_covered.length + ' lines not covered)'),
      el('pre', { class: 'source' }, lines));
  }));
}

// ---- start ----
document.addEventListener('DOMContentLoaded', () => {
  $('#filters').addEventListener('submit', (e) => { e.preventDefault(); openTail(); });
  $('#filters-clear').addEventListener('click', () => { $('#filters').reset(); openTail(); });
  $('#pg-run').addEventListener('click', runPlayground);
  $('#shadow-load').addEventListener('click', loadCandidate);
  $('#shadow-unload').addEventListener('click', unloadCandidate);
  openTail();
  refreshStatus();
  refreshCounts();
  setInterval(refreshStatus, 2000);
  setInterval(refreshCounts, 5000);
});
