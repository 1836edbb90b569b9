// Volumes (SPEC S6): every volume with size, group, VM ("none" when
// unattached) and sync state. Create, attach, detach, remove unattached.

import { api } from '../api.js';
import { h, mount, table, fmtBytes, emptyState, pageHeader, dialog, field, errorBox, confirmAction, toast } from '../ui.js';
import { can, roleNeeded, refresh, store } from '../app.js';

export const help = 'volumes';
const enc = encodeURIComponent;

export async function render(main, ctx) {
  const admin = can('administer');
  const slot = h('div', {});
  const errSlot = h('div', {});
  const search = h('input', { type: 'search', placeholder: 'Filter by name, group or VM', 'aria-label': 'Filter volumes' });
  mount(main,
    pageHeader('Volumes', 'Every volume of the unit. Unattached volumes can be removed after confirmation.',
      h('button', { class: 'btn primary', id: 'create-volume', 'aria-disabled': admin ? null : 'true', title: admin ? null : `Create volume: ${roleNeeded('administer')}`, onclick: () => (admin ? create() : toast(`Create volume: ${roleNeeded('administer')}`, 'warn')) }, 'Create volume')),
    h('div', { class: 'filters' }, search), errSlot, slot);

  let vols = [];
  const load = async () => {
    vols = await api('GET', '/volumes');
    draw();
  };
  const act = async (fn) => {
    mount(errSlot);
    try {
      await fn();
      await load();
      refresh('vms');
      refresh('pm');
    } catch (e) {
      mount(errSlot, errorBox(e));
    }
  };
  const vmState = (name) => (store.vms.find((v) => v.name === name) || {}).state;
  const btn = (label, reason, fn) => h('button', {
    class: 'btn small', 'aria-disabled': reason ? 'true' : null, title: reason ? `${label}: ${reason}` : null,
    onclick: () => (reason ? toast(`${label}: ${reason}`, 'warn') : fn()),
  }, label);

  function actions(v) {
    if (!admin) return h('span', { class: 'muted small' }, roleNeeded('administer'));
    if (v.vm === 'none') {
      return h('div', { class: 'inline' },
        btn('Attach…', store.vms.some((x) => x.state === 'stopped') ? null : 'no stopped VM to attach to', () => attach(v)),
        btn('Remove…', null, async () => {
          if (await confirmAction({ title: `Remove volume ${v.name}?`, text: `The volume and its ${fmtBytes(v.size_bytes)} of data are deleted. This cannot be undone.`, confirmLabel: 'Remove volume' })) {
            act(() => api('DELETE', `/volumes/${enc(v.name)}`));
          }
        }));
    }
    if (v.boot) return h('span', { class: 'muted small' }, 'boot volume: removed with its VM');
    const st = vmState(v.vm);
    return btn('Detach', st === 'stopped' ? null : `its VM must be stopped (it is ${st})`, () => act(() => api('POST', `/volumes/${enc(v.name)}/detach`)));
  }

  async function attach(v) {
    const stopped = store.vms.filter((x) => x.state === 'stopped');
    const sel = h('select', {}, stopped.map((x) => h('option', { value: x.name }, x.name)));
    const vm = await dialog(`Attach ${v.name}`, (close) => h('form', { onsubmit: (e) => { e.preventDefault(); close(sel.value); } },
      field('VM (stopped)', sel, 'Attached as a data volume.'),
      h('div', { class: 'actions' }, h('button', { type: 'button', class: 'btn', onclick: () => close(null) }, 'Cancel'), h('button', { class: 'btn primary' }, 'Attach'))));
    if (vm) act(() => api('POST', `/volumes/${enc(v.name)}/attach`, { vm }));
  }

  async function create() {
    const groups = await api('GET', '/storage-groups');
    const name = h('input', { required: true, autocomplete: 'off' });
    const size = h('input', { type: 'number', min: 0.001, step: 'any', value: 1, class: 'num' });
    const group = h('select', {}, groups.map((g) => h('option', { value: g.name }, `${g.name} — ${fmtBytes(g.free_bytes)} free`)));
    const err = h('div', {});
    await dialog('Create a volume', (close) => h('form', {
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          await api('POST', '/volumes', { name: name.value, size_bytes: Math.round(Number(size.value) * 1024) * 1024 * 1024, group: group.value });
          close(true);
          load();
          refresh('pm');
        } catch (ex) {
          mount(err, errorBox(ex));
        }
      },
    },
    field('Name', name, 'Letters, digits, . _ - ; unique.'),
    field('Size (GiB)', size, 'Sparse: space is used as data is written.'),
    field('Storage group', group),
    err,
    h('div', { class: 'actions' }, h('button', { type: 'button', class: 'btn', onclick: () => close(false) }, 'Cancel'), h('button', { class: 'btn primary' }, 'Create volume'))));
  }

  function draw() {
    const q = search.value.trim().toLowerCase();
    const rows = vols.filter((v) => !q || [v.name, v.group, v.vm].some((x) => x.toLowerCase().includes(q)));
    mount(slot, table({
      caption: 'Volumes',
      columns: [
        { label: 'Name', value: (v) => h('strong', {}, v.name) },
        { label: 'Size', value: (v) => fmtBytes(v.size_bytes), class: 'num' },
        { label: 'Allocated', value: (v) => fmtBytes(v.allocated_bytes), class: 'num' },
        { label: 'Storage group', value: (v) => v.group },
        { label: 'VM', value: (v) => (v.vm === 'none' ? h('span', { class: 'muted' }, 'none') : h('a', { href: `#/vms/${enc(v.vm)}/volumes` }, v.vm)) },
        { label: 'Role', value: (v) => (v.vm === 'none' ? '—' : v.boot ? 'boot' : 'data') },
        { label: 'Sync', value: (v) => h('span', { title: v.sync === 'simplex' ? 'Stored on this PM only: no partner to mirror to yet' : '' }, v.sync) },
        { label: 'Actions', value: actions },
      ],
      rows,
      empty: vols.length ? emptyState('No volume matches', 'Change the filter.') : emptyState('No volumes yet', 'Volumes are created with their VM (boot and data volumes) or here, unattached, to attach later.'),
    }));
  }
  search.addEventListener('input', draw);
  ctx.on('vms', draw);
  await load();
}
