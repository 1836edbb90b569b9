// Volumes (SPEC S2, S6): every volume with size, group, VM ("none" when
// unattached), sync state, primary PM and resync progress with its ETA.
// Create, attach, detach, remove unattached. Polled (no volume events).

import { api } from '../api.js';
import { h, mount, remount, table, fmtBytes, fmtRate, fmtSecs, emptyState, pageHeader, dialog, field, errorBox, confirmAction, toast, syncBadge, progressBar } from '../ui.js';
import { can, roleNeeded, refresh, store, inUnit } from '../app.js';

export const help = 'volumes';
const enc = encodeURIComponent;

/** Resync progress of a volume (SPEC S2) with its ETA, or null. */
export function resyncProgress(v, { id } = {}) {
  const r = v.replica && v.replica.resync;
  if (!r) return null;
  const ratio = r.total_regions ? r.done_regions / r.total_regions : 0;
  const eta = r.eta_secs === null || r.eta_secs === undefined ? 'ETA unknown' : `about ${fmtSecs(r.eta_secs)} left`;
  return progressBar(ratio, `${Math.floor(ratio * 100)}% · ${fmtBytes(r.remaining_bytes)} to copy at ${fmtRate(r.bytes_per_sec)} · ${eta}`, { id });
}

/** What the sync words mean, for tooltips. */
export function syncHelp(sync) {
  if (sync === 'simplex') return 'Stored on one PM only: no partner to mirror to';
  if (sync === 'in_sync') return 'Mirrored: every write is on both PMs before it is acknowledged';
  if (sync === 'degraded') return 'The primary writes alone: the partner is not connected; a resync follows when it is back';
  if (sync === 'split_brain') return 'Both replicas were written independently: a decision is needed before replication resumes';
  if (sync && sync.startsWith('resyncing')) return 'The partner copy is being brought up to date';
  if (sync && sync.startsWith('secondary')) return 'This PM holds the secondary replica';
  return '';
}

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
  // Sync states and resync progress change without events: poll, faster
  // while a resync runs.
  let timer = null;
  let left = false;
  const poll = async () => {
    if (left) return;
    if (document.visibilityState === 'visible') {
      try {
        await load();
      } catch (e) {
        mount(errSlot, errorBox(e));
      }
    }
    if (!left) timer = setTimeout(poll, vols.some((v) => v.replica && v.replica.resync) ? 1000 : 3000);
  };
  ctx.onLeave(() => {
    left = true;
    clearTimeout(timer);
  });
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
    remount(slot, table({
      caption: 'Volumes',
      rowAttrs: (v) => ({ 'data-volume': v.name, 'data-sync': v.sync }),
      columns: [
        { label: 'Name', value: (v) => h('a', { href: `#/volumes/${enc(v.name)}`, class: 'strong', title: 'Details and statistics' }, v.name) },
        { label: 'Size', value: (v) => fmtBytes(v.size_bytes), class: 'num' },
        { label: 'Allocated', value: (v) => fmtBytes(v.allocated_bytes), class: 'num' },
        { label: 'Storage group', value: (v) => v.group },
        { label: 'VM', value: (v) => (v.vm === 'none' ? h('span', { class: 'muted' }, 'none') : h('a', { href: `#/vms/${enc(v.vm)}/volumes` }, v.vm)) },
        { label: 'Role', value: (v) => (v.vm === 'none' ? '—' : v.boot ? 'boot' : 'data') },
        { label: 'Sync', value: (v) => h('span', { title: syncHelp(v.sync) }, syncBadge(v.sync)) },
        inUnit() ? { label: 'Primary PM', value: (v) => v.primary || h('span', { class: 'muted' }, '—') } : null,
        inUnit() ? { label: 'Resync', value: (v) => resyncProgress(v) || h('span', { class: 'muted' }, '—') } : null,
        { label: 'Actions', value: actions },
      ],
      rows,
      empty: vols.length ? emptyState('No volume matches', 'Change the filter.') : emptyState('No volumes yet', 'Volumes are created with their VM (boot and data volumes) or here, unattached, to attach later.'),
    }));
  }
  search.addEventListener('input', draw);
  ctx.on('vms', draw);
  await load();
  timer = setTimeout(poll, 3000);
}
