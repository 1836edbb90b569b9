// Virtual Machines: the list (state, activity, health, current/preferred
// PM, vCPUs, memory), live.

import { h, mount, remount, table, stateBadge, fmtMiB, emptyState, pageHeader, toast } from '../ui.js';
import { store, can, roleNeeded, navigate, inUnit, refreshAll, thisPm } from '../app.js';
import { VM_STATES } from '../help.js';
import { whyNot, OPS } from '../vmops.js';

export const help = 'vms';

/**
 * Whether the VM runs on the other PM of the unit: this PM's API does not
 * have its health checks (they run where QEMU runs).
 */
export function hostedElsewhere(vm) {
  return inUnit() && Boolean(vm.host) && vm.host !== thisPm();
}

export function guestHealth(vm) {
  const hl = vm.health || {};
  if (!['booting', 'running', 'stopping', 'dumping'].includes(vm.state)) return h('span', { class: 'muted' }, '—');
  if (hostedElsewhere(vm)) return h('span', { class: 'health unknown', title: `The health checks run on ${vm.host}, which runs the VM; this PM's API does not report them` }, `checked on ${vm.host}`);
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

  const localHost = () => (store.pm ? store.pm.hostname : 'this PM');
  const migrateOp = OPS.find((o) => o.op === 'migrate');
  const migrateButton = (v) => {
    const reason = whyNot(v, migrateOp);
    return h('button', {
      type: 'button', class: 'btn small', 'data-op': 'migrate',
      'aria-disabled': reason ? 'true' : null, title: reason ? `Migrate: ${reason}` : `Live-migrate ${v.name} to the other PM`,
      onclick: async () => {
        if (reason) {
          toast(`Migrate: ${reason}`, 'warn');
          return;
        }
        try {
          const { migrateFromList } = await import('../migration.js');
          await migrateFromList(v, navigate);
        } catch (e) {
          toast(e.message, 'error');
        }
      },
    }, 'Migrate…');
  };
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
    remount(slot, table({
      caption: 'Virtual machines',
      columns: [
        { label: 'Name', value: (v) => h('a', { href: `#/vms/${encodeURIComponent(v.name)}`, class: 'strong' }, v.name) },
        { label: 'State', value: (v) => stateBadge(v.state) },
        { label: 'Activity', value: (v) => v.activity || h('span', { class: 'muted' }, '—') },
        { label: 'Guest', value: guestHealth },
        {
          label: 'Current PM',
          value: (v) => (['stopped', 'critical', 'busy'].includes(v.state)
            ? h('span', { class: 'muted', title: v.host ? `starts on ${v.host}` : null }, '—')
            : h('span', { 'data-host': v.host || localHost() }, v.host || localHost())),
        },
        {
          label: 'Preferred PM',
          value: (v) => (!inUnit()
            ? h('span', { class: 'muted', title: 'Placement (SPEC L2) needs the two-PM unit' }, 'automatic')
            : v.preferred_pm ? h('span', { 'data-preferred': v.preferred_pm }, v.preferred_pm) : h('span', { class: 'muted' }, 'none')),
        },
        { label: 'vCPUs', value: (v) => v.vcpus, class: 'num' },
        { label: 'Memory', value: (v) => fmtMiB(v.memory_mib), class: 'num' },
        { label: 'Volumes', value: (v) => 1 + v.data_volumes.length, class: 'num' },
        inUnit() ? { label: 'Actions', value: (v) => (v.redundancy_alert ? [migrateButton(v), h('div', { class: 'small health bad', title: v.redundancy_alert }, 'not redundant')] : migrateButton(v)) } : null,
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
  ctx.on('pms', draw);
  // Where VMs run changes on the partner too (no event here): poll.
  const timer = setInterval(() => {
    if (inUnit() && document.visibilityState === 'visible') refreshAll();
  }, 5000);
  ctx.onLeave(() => clearInterval(timer));
  draw();
}
