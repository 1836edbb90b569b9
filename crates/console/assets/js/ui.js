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

/** A selector finding `el` again after a redraw, or null. */
function focusKey(el) {
  if (el.id) return `#${CSS.escape(el.id)}`;
  for (const attr of ['data-pm-op', 'data-remedy', 'data-op', 'data-action']) {
    if (el.hasAttribute(attr)) {
      const scope = el.closest('[data-pm], [data-vm], [data-volume]');
      const scopeSel = scope ? ['data-pm', 'data-vm', 'data-volume'].filter((a) => scope.hasAttribute(a)).map((a) => `[${a}="${CSS.escape(scope.getAttribute(a))}"] `)[0] : '';
      return `${scopeSel}[${attr}="${CSS.escape(el.getAttribute(attr))}"]`;
    }
  }
  if (el.tagName === 'A' && el.getAttribute('href')) return `a[href="${CSS.escape(el.getAttribute('href'))}"]`;
  return null;
}

/**
 * Like mount, for views redrawn by polling: the element that had the focus
 * (a button, a link, a field) has it again afterwards, so that keyboard
 * users are not thrown out every few seconds.
 */
export function remount(el, ...children) {
  const active = document.activeElement;
  const key = active && el.contains(active) && active !== el ? focusKey(active) : null;
  mount(el, ...children);
  if (key) {
    const again = el.querySelector(key);
    if (again) again.focus({ preventScroll: true });
  }
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

/** A rate in bytes/s → "132.2 MB/s" (decimal units, as the API's texts). */
export function fmtRate(bps) {
  if (bps === null || bps === undefined || Number.isNaN(bps)) return '—';
  if (bps >= 1e9) return `${(bps / 1e9).toFixed(2)} GB/s`;
  if (bps >= 1e6) return `${(bps / 1e6).toFixed(1)} MB/s`;
  if (bps >= 1e3) return `${(bps / 1e3).toFixed(1)} kB/s`;
  return `${Math.round(bps)} B/s`;
}

/** Seconds → "45 s", "3 min 20 s", "1 h 5 min". */
export function fmtSecs(secs) {
  if (secs === null || secs === undefined || Number.isNaN(secs)) return '—';
  const s = Math.max(0, Math.round(secs));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min${s % 60 ? ` ${s % 60} s` : ''}`;
  return `${Math.floor(s / 3600)} h${Math.floor((s % 3600) / 60) ? ` ${Math.floor((s % 3600) / 60)} min` : ''}`;
}

/** Milliseconds → "45 ms" or "1.3 s". */
export function fmtMs(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

// ------------------------------------------------------------------ pieces

const STATE_CLASS = {
  running: 'ok', booting: 'busy', stopping: 'busy', stopped: 'off', busy: 'busy',
  crashed: 'warn', critical: 'bad', dumping: 'busy', alert: 'warn',
  // PM states (SPEC U2) and the unit's power (U5).
  'running (in maintenance)': 'warn', evacuating: 'busy', 'off (in maintenance)': 'off',
  'imaging/recovering': 'busy', broken: 'bad', 'powered off (too many failures)': 'bad',
  shutting_down: 'busy', off: 'off', unreachable: 'bad',
};

/** A state badge (SPEC V4 colours). */
export function stateBadge(state, extra) {
  return h('span', { class: `badge ${STATE_CLASS[state] || 'off'}`, 'data-state': state },
    h('span', { class: 'dot', 'aria-hidden': 'true' }), state, extra ? ` · ${extra}` : null);
}

/** A volume's sync state (SPEC S2) as a badge. */
export function syncBadge(sync) {
  const s = sync || '—';
  let cls = 'off';
  if (s === 'in_sync') cls = 'ok';
  else if (s.startsWith('resyncing') || s === 'connecting' || s.startsWith('secondary (being')) cls = 'busy';
  else if (s.startsWith('secondary')) cls = 'ok';
  else if (s === 'degraded' || s === 'not open on this PM') cls = 'warn';
  else if (s === 'split_brain') cls = 'bad';
  const label = { in_sync: 'in sync', split_brain: 'split brain' }[s] || s;
  return h('span', { class: `badge ${cls}`, 'data-sync': s }, h('span', { class: 'dot', 'aria-hidden': 'true' }), label);
}

/** A progress bar (0..1) with a text label; `id` names the bar for tests. */
export function progressBar(ratio, label, { id, cls = 'busy' } = {}) {
  const r = Math.max(0, Math.min(1, Number.isFinite(ratio) ? ratio : 0));
  return h('div', { class: 'meter-wrap', id: id || null },
    h('div', { class: 'meter-label' }, label),
    h('div', { class: `meter progress ${cls}`, role: 'progressbar', 'aria-valuemin': 0, 'aria-valuemax': 100, 'aria-valuenow': Math.round(r * 100), 'aria-label': label },
      h('div', { class: 'fill', style: { width: `${(r * 100).toFixed(1)}%` } })));
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
export function table({ columns: cols, rows, empty, caption, rowAttrs }) {
  if (!rows.length) return empty;
  const columns = cols.filter(Boolean);
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

/**
 * A confirmation that loses data: the administrator types `expect` (a
 * name) again. Resolves to what was typed (the server checks it too), or
 * null when cancelled. The button stays disabled until the text matches.
 */
export async function typedConfirm({ title, text, expect, confirmLabel, id }) {
  const input = h('input', { type: 'text', id: id || 'typed-confirm', autocomplete: 'off', spellcheck: 'false' });
  const go = h('button', { type: 'submit', class: 'btn danger', disabled: true }, confirmLabel);
  input.addEventListener('input', () => { go.disabled = input.value !== expect; });
  const r = await dialog(title, (close) => h('form', {
    method: 'dialog',
    onsubmit: (e) => {
      e.preventDefault();
      if (input.value === expect) close(input.value);
    },
  },
  h('p', {}, text),
  field(`Type ${expect} to confirm`, input),
  h('div', { class: 'actions' },
    h('button', { type: 'button', class: 'btn', onclick: () => close(null) }, 'Cancel'),
    go)));
  return typeof r === 'string' ? r : null;
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
