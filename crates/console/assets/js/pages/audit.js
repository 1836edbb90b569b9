// Audit log (SPEC A2): who did what, when, with what result.

import { api } from '../api.js';
import { h, mount, table, emptyState, pageHeader, timeEl } from '../ui.js';

export const help = 'audit';

export async function render(main) {
  const search = h('input', { type: 'search', placeholder: 'Filter by user, action, target or result', 'aria-label': 'Filter the audit log' });
  const limit = h('select', { 'aria-label': 'Number of records' }, [100, 500, 2000].map((n) => h('option', { value: n }, `newest ${n}`)));
  const failed = h('input', { type: 'checkbox', id: 'audit-failed' });
  const slot = h('div', {});
  mount(main, pageHeader('Audit Log', 'Every request that changed something or tried to, newest first.'),
    h('div', { class: 'filters' }, search, limit, h('label', { class: 'check', for: 'audit-failed' }, failed, ' failures only')), slot);
  let rows = [];
  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const shown = rows.filter((r) => (!failed.checked || r.result !== 'ok') && (!q || [r.user, r.action, r.target, r.result].some((x) => x.toLowerCase().includes(q))));
    mount(slot, table({
      caption: 'Audit log',
      columns: [
        { label: 'Time', value: (r) => timeEl(r.time) },
        { label: 'User', value: (r) => r.user },
        { label: 'Action', value: (r) => h('code', {}, r.action) },
        { label: 'Target', value: (r) => r.target },
        { label: 'Result', value: (r) => h('span', { class: r.result === 'ok' ? 'health ok' : 'health bad' }, r.result) },
      ],
      rows: shown,
      empty: rows.length ? emptyState('No record matches', 'Change the filter.') : emptyState('The audit log is empty', 'Changes and login attempts are recorded here.'),
    }));
  };
  const load = async () => {
    rows = await api('GET', `/audit?limit=${limit.value}`);
    draw();
  };
  search.addEventListener('input', draw);
  failed.addEventListener('change', draw);
  limit.addEventListener('change', load);
  await load();
}
