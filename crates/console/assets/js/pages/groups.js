// Storage groups: capacity, use, free space (warning under 5 GiB, SPEC S5).

import { api } from '../api.js';
import { h, mount, table, fmtBytes, emptyState, pageHeader, dialog, field, errorBox, meter, toast } from '../ui.js';
import { can, roleNeeded, refresh } from '../app.js';

export const help = 'groups';

export async function render(main) {
  const admin = can('administer');
  const slot = h('div', {});
  mount(main, pageHeader('Storage Groups', 'Where volumes are stored. Place new volumes in the group with the most free space and least load.',
    h('button', { class: 'btn primary', 'aria-disabled': admin ? null : 'true', title: admin ? null : `Create storage group: ${roleNeeded('administer')}`, onclick: () => (admin ? create() : toast(`Create storage group: ${roleNeeded('administer')}`, 'warn')) }, 'Create storage group')), slot);

  const load = async () => {
    const groups = await api('GET', '/storage-groups');
    mount(slot, table({
      caption: 'Storage groups',
      columns: [
        { label: 'Name', value: (g) => h('strong', {}, g.name) },
        { label: 'Directory', value: (g) => h('code', {}, g.path) },
        { label: 'Use', value: (g) => meter(g.used_bytes, g.capacity_bytes, `${fmtBytes(g.used_bytes)} of ${fmtBytes(g.capacity_bytes)}`) },
        { label: 'Free', value: (g) => fmtBytes(g.free_bytes), class: 'num' },
        { label: 'Volumes', value: (g) => String(g.volumes), class: 'num' },
        { label: 'Warnings', value: (g) => (g.warnings.length ? h('ul', { class: 'warn-list' }, g.warnings.map((w) => h('li', {}, w))) : h('span', { class: 'muted' }, 'none')) },
      ],
      rows: groups,
      empty: emptyState('No storage groups', 'Create a storage group to hold volumes.'),
    }), h('p', { class: 'hint' }, 'With the two-PM unit each group pairs one pool on each PM and every write is applied on both before it is acknowledged.'));
  };

  async function create() {
    const name = h('input', { required: true, autocomplete: 'off' });
    const path = h('input', { required: true, placeholder: '/srv/pairvisor/fast' });
    const cap = h('input', { type: 'number', min: 1, step: 'any', value: 100, class: 'num' });
    const err = h('div', {});
    await dialog('Create a storage group', (close) => h('form', {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          await api('POST', '/storage-groups', { name: name.value, path: path.value, capacity_bytes: Math.round(Number(cap.value) * 1024) * 1024 * 1024 });
          close(true);
          load();
          refresh('pm');
        } catch (ex) {
          mount(err, errorBox(ex));
        }
      },
    },
    field('Name', name),
    field('Directory on the PM', path, 'Absolute path; created if missing.'),
    field('Capacity (GiB)', cap),
    err,
    h('div', { class: 'actions' }, h('button', { type: 'button', class: 'btn', onclick: () => close(false) }, 'Cancel'), h('button', { class: 'btn primary' }, 'Create'))));
  }
  await load();
}
