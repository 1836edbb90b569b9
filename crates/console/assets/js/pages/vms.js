// Virtual Machines: the list (state, activity, health, current/preferred
// PM, vCPUs, memory), live.

import { h, mount, table, stateBadge, fmtMiB, emptyState, pageHeader } from '../ui.js';
import { store, can, roleNeeded, navigate } from '../app.js';
import { VM_STATES } from '../help.js';

export const help = 'vms';

export function guestHealth(vm) {
  const hl = vm.health || {};
  if (!['booting', 'running', 'stopping', 'dumping'].includes(vm.state)) return h('span', { class: 'muted' }, '—');
  if (!hl.system_ok) return h('span', { class: 'health bad' }, 'process not answering');
  if (hl.instance_ok === true) return h('span', { class: 'health ok' }, 'guest answers');
  if (hl.instance_ok === false) return h('span', { class: 'health bad' }, 'guest not answering');
  return h('span', { class: 'health unknown' }, vm.state === 'booting' ? 'waiting for guest' : 'not checked');
}

export async function render(main, ctx) {
  const filter = ctx.query.get('state') || '';
  const search = h('input', { type: 'search', placeholder: 'Filter by name', 'aria-label': 'Filter VMs by name', value: ctx.query.get('q') || '' });
  const stateSel = h('select', { 'aria-label': 'Filter VMs by state' },
    h('option', { value: '' }, 'All states'),
    VM_STATES.filter(([s]) => s !== 'alert').map(([s]) => h('option', { value: s, selected: s === filter }, s)));
  const create = can('administer')
    ? h('a', { class: 'btn primary', href: '#/vms/new', id: 'create-vm' }, 'Create VM')
    : h('button', { class: 'btn', 'aria-disabled': 'true', title: `Create VM: ${roleNeeded('administer')}` }, 'Create VM');
  const slot = h('div', { id: 'vm-table' });
  mount(main,
    pageHeader('Virtual Machines', 'Every VM, its state and where it runs. Open a VM for its details, console and operations.', create),
    h('div', { class: 'filters' }, search, stateSel),
    slot);

  const host = () => (store.pm ? store.pm.hostname : 'this PM');
  const draw = () => {
    const q = search.value.trim().toLowerCase();
    const st = stateSel.value;
    const rows = [...store.vms]
      .sort((a, b) => a.name.localeCompare(b.name))
      .filter((v) => (!q || v.name.toLowerCase().includes(q)) && (!st || v.state === st));
    const empty = store.vms.length
      ? emptyState('No VM matches', 'Change the filter to see more VMs.')
      : emptyState('No virtual machines yet', 'A VM runs on one PM of the unit, with its disks mirrored on both. Create the first one with the wizard.',
        can('administer') ? h('a', { class: 'btn primary', href: '#/vms/new' }, 'Create VM') : h('p', { class: 'muted' }, 'Ask an administrator to create one.'));
    mount(slot, table({
      caption: 'Virtual machines',
      columns: [
        { label: 'Name', value: (v) => h('a', { href: `#/vms/${encodeURIComponent(v.name)}`, class: 'strong' }, v.name) },
        { label: 'State', value: (v) => stateBadge(v.state) },
        { label: 'Activity', value: (v) => v.activity || h('span', { class: 'muted' }, '—') },
        { label: 'Guest', value: guestHealth },
        { label: 'Current PM', value: (v) => (['stopped', 'critical', 'busy'].includes(v.state) ? h('span', { class: 'muted' }, '—') : host()) },
        { label: 'Preferred PM', value: () => h('span', { class: 'muted', title: 'Placement (SPEC L2) comes with the two-PM unit' }, 'automatic') },
        { label: 'vCPUs', value: (v) => v.vcpus, class: 'num' },
        { label: 'Memory', value: (v) => fmtMiB(v.memory_mib), class: 'num' },
        { label: 'Volumes', value: (v) => 1 + v.data_volumes.length, class: 'num' },
      ],
      rows,
      empty,
      rowAttrs: (v) => ({ 'data-vm': v.name, 'data-state': v.state, ondblclick: () => navigate(`#/vms/${encodeURIComponent(v.name)}`) }),
    }));
  };
  search.addEventListener('input', draw);
  stateSel.addEventListener('change', draw);
  ctx.on('vms', draw);
  ctx.on('pm', draw);
  draw();
}
