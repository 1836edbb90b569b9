// A page for an API resource that has no dedicated page yet (networks,
// alerts, repositories, the unit): lists what GET returns, so that the
// console shows new parts of the system as soon as the API has them.

import { api } from '../api.js';
import { h, mount, table, emptyState, pageHeader } from '../ui.js';

export const help = 'generic';

function cell(v) {
  if (v === null || v === undefined) return '—';
  if (typeof v === 'object') return h('code', {}, JSON.stringify(v));
  return String(v);
}

export async function render(main, ctx) {
  const nav = ctx.params.nav;
  const data = await api('GET', nav.api.replace('/api/v1', ''));
  const rows = Array.isArray(data) ? data : [data];
  const keys = [...new Set(rows.flatMap((r) => (r && typeof r === 'object' ? Object.keys(r) : [])))];
  mount(main, pageHeader(nav.label, `What ${nav.api} returns.`), table({
    caption: nav.label,
    columns: keys.map((k) => ({ label: k, value: (r) => cell(r[k]) })),
    rows,
    empty: emptyState(`No ${nav.label.toLowerCase()}`, 'Nothing to show yet.'),
  }));
}
