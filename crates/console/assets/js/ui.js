// Small DOM toolkit: element builder, formatting, dialogs, tables, toasts.

/**
 * Builds an element: h('button', {class: 'btn', onclick}, 'Start').
 * Props starting with "on" become listeners; `dataset`/`style` objects are
 * merged; null/false children are skipped; arrays are flattened.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the children of `el`. */
export function mount(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// ----------------------------------------------------------------- formats

let timeZone = 'UTC';
let zoneValid = true;

/** Sets the unit's time zone (settings.timezone) used by fmtTime. */
export function setTimeZone(tz) {
  try {
    new Intl.DateTimeFormat('en-GB', { timeZone: tz });
    timeZone = tz;
    zoneValid = true;
  } catch {
    timeZone = 'UTC';
    zoneValid = false;
  }
}

export function currentTimeZone() {
  return { timeZone, valid: zoneValid };
}

/** Seconds since the epoch → "2026-11-22 14:03:07" in the unit's zone. */
export function fmtTime(secs) {
  if (!secs) return '—';
  const d = new Date(secs * 1000);
  const parts = Object.fromEntries(
    new Intl.DateTimeFormat('en-GB', {
      timeZone, year: 'numeric', month: '2-digit', day: '2-digit',
      hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
    }).formatToParts(d).map((p) => [p.type, p.value]),
  );
  return `${parts.year}-${parts.month}-${parts.day} ${parts.hour}:${parts.minute}:${parts.second}`;
}

/** A <time> element in the unit's zone, with the zone in its tooltip. */
export function timeEl(secs) {
  if (!secs) return '—';
  return h('time', { datetime: new Date(secs * 1000).toISOString(), title: `${timeZone}` }, fmtTime(secs));
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i === 0 ? v : v.toFixed(v >= 100 ? 0 : 1).replace(/\.0$/, '')} ${units[i]}`;
}

export function fmtMiB(mib) {
  return fmtBytes(mib * 1024 * 1024);
}

export function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

// ------------------------------------------------------------------ pieces

const STATE_CLASS = {
  running: 'ok', booting: 'busy', stopping: 'busy', stopped: 'off', busy: 'busy',
  crashed: 'warn', critical: 'bad', dumping: 'busy', alert: 'warn',
};

/** A state badge (SPEC V4 colours). */
export function stateBadge(state, extra) {
  return h('span', { class: `badge ${STATE_CLASS[state] || 'off'}`, 'data-state': state },
    h('span', { class: 'dot', 'aria-hidden': 'true' }), state, extra ? ` · ${extra}` : null);
}

/** A meter: used of total, with a label. */
export function meter(used, total, label, { warnAt = 0.85 } = {}) {
  const ratio = total > 0 ? Math.min(used / total, 1) : used > 0 ? 1 : 0;
  const cls = used > total ? 'bad' : ratio >= warnAt ? 'warn' : 'ok';
  return h('div', { class: 'meter-wrap' },
    h('div', { class: 'meter-label' }, label),
    h('div', { class: `meter ${cls}`, role: 'meter', 'aria-valuemin': 0, 'aria-valuemax': total, 'aria-valuenow': used, 'aria-label': label },
      h('div', { class: 'fill', style: { width: `${(ratio * 100).toFixed(1)}%` } })));
}

/** An error box showing the server's message verbatim. */
export function errorBox(err) {
  if (!err) return null;
  const details = err.details && err.details.holders && err.details.holders.length
    ? h('div', { class: 'small' }, `Memory held by: ${err.details.holders.map((x) => (typeof x === 'string' ? x : x.name)).join(', ')}`)
    : null;
  return h('div', { class: 'alert error', role: 'alert' },
    h('strong', {}, err.status ? `Refused (${err.code})` : 'Error'), ' ',
    h('span', { class: 'server-message' }, err.message), details);
}

export function emptyState(title, text, action) {
  return h('div', { class: 'empty' }, h('div', { class: 'empty-title' }, title), h('p', {}, text), action || null);
}

/**
 * A table. columns: [{label, value: row => node|string, class, sort: row => key}].
 * Rows with `onOpen` get a keyboard-reachable name link (column `link`).
 */
export function table({ columns, rows, empty, caption, rowAttrs }) {
  if (!rows.length) return empty;
  return h('div', { class: 'table-wrap' },
    h('table', {},
      caption ? h('caption', { class: 'sr-only' }, caption) : null,
      h('thead', {}, h('tr', {}, columns.map((c) => h('th', { scope: 'col', class: c.class || null }, c.label)))),
      h('tbody', {}, rows.map((r) => h('tr', rowAttrs ? rowAttrs(r) : {}, columns.map((c) => h('td', { class: c.class || null }, c.value(r))))))));
}

// ---------------------------------------------------------------- dialogs

/**
 * Opens a modal dialog. `build(close)` returns its body; resolves with the
 * value passed to close(). Escape closes with undefined.
 */
export function dialog(title, build, { wide = false } = {}) {
  return new Promise((resolve) => {
    const dlg = h('dialog', { class: wide ? 'wide' : '', 'aria-labelledby': 'dlg-title' });
    let result;
    const close = (v) => {
      result = v;
      dlg.close();
    };
    dlg.addEventListener('close', () => {
      dlg.remove();
      resolve(result);
    });
    mount(dlg, h('h2', { id: 'dlg-title' }, title), build(close));
    document.body.append(dlg);
    dlg.showModal();
    const first = dlg.querySelector('[autofocus], input, select, textarea, button.primary, button');
    if (first) first.focus();
  });
}

/** Asks for confirmation of a destructive action. Resolves true/false. */
export async function confirmAction({ title, text, confirmLabel, danger = true, extra }) {
  const r = await dialog(title, (close) => h('form', {
    method: 'dialog',
    onsubmit: (e) => {
      e.preventDefault();
      close(true);
    },
  },
  h('p', {}, text),
  extra || null,
  h('div', { class: 'actions' },
    h('button', { type: 'button', class: 'btn', onclick: () => close(false) }, 'Cancel'),
    h('button', { type: 'submit', class: `btn ${danger ? 'danger' : 'primary'}`, autofocus: true }, confirmLabel))));
  return r === true;
}

// ----------------------------------------------------------------- toasts

export function toast(text, kind = 'info') {
  let area = document.getElementById('toasts');
  if (!area) {
    area = h('div', { id: 'toasts', class: 'toasts', role: 'status', 'aria-live': 'polite' });
    document.body.append(area);
  }
  const t = h('div', { class: `toast ${kind}` }, text);
  area.append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 9000 : 4000);
}

/** A labelled form field. */
export function field(label, input, hint, id) {
  const fid = id || input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = fid;
  const hintId = hint ? `${fid}-hint` : null;
  if (hintId) input.setAttribute('aria-describedby', hintId);
  return h('div', { class: 'field' },
    h('label', { for: fid }, label),
    input,
    hint ? h('div', { class: 'hint', id: hintId }, hint) : null);
}

/** Page header with title, optional subtitle and toolbar. */
export function pageHeader(title, subtitle, ...tools) {
  return h('div', { class: 'page-header' },
    h('div', {}, h('h1', { tabindex: '-1', id: 'page-title' }, title), subtitle ? h('p', { class: 'subtitle' }, subtitle) : null),
    h('div', { class: 'toolbar' }, tools));
}
