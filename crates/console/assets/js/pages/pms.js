// Physical Machines: today the unit is this one PM. Its state, resources,
// admission capacity and warnings; the maintenance operations (SPEC U3)
// appear with the two-PM unit.

import { h, mount, stateBadge, fmtMiB, meter, emptyState, pageHeader, table } from '../ui.js';
import { store } from '../app.js';

export const help = 'pms';

const MAINTENANCE = ['Work On', 'Finalize', 'Shutdown', 'Power Off', 'Recover', 'Replace', 'Reset Device'];

export async function render(main, ctx) {
  const slot = h('div', {});
  mount(main, pageHeader('Physical Machines', 'The servers of the unit, their state and the operations allowed in it.'), slot);
  const draw = () => {
    const pm = store.pm;
    if (!pm) {
      mount(slot, emptyState('Loading…', ''));
      return;
    }
    const running = store.vms.filter((v) => ['booting', 'running', 'stopping', 'dumping'].includes(v.state));
    mount(slot,
      table({
        caption: 'Physical machines',
        columns: [
          { label: 'Name', value: () => h('strong', {}, pm.hostname) },
          { label: 'Role', value: () => 'primary (only PM)' },
          { label: 'State', value: () => stateBadge('running') },
          { label: 'VMs', value: () => String(running.length), class: 'num' },
          { label: 'Threads', value: () => String(pm.threads), class: 'num' },
          { label: 'Memory', value: () => fmtMiB(pm.memory_mib), class: 'num' },
        ],
        rows: [pm],
        empty: null,
      }),
      h('div', { class: 'cards two' },
        h('section', { class: 'card' }, h('h2', {}, `This PM: ${pm.hostname}`),
          h('dl', { class: 'props' },
            h('dt', {}, 'Hypervisor'), h('dd', {}, `QEMU ${pm.qemu_version || '(not found)'} with ${pm.accel.toUpperCase()}`),
            h('dt', {}, 'Threads'), h('dd', {}, `${pm.threads} (2 reserved for the system → ${pm.vcpu_capacity} vCPUs offered)`),
            h('dt', {}, 'Memory'), h('dd', {}, `${fmtMiB(pm.memory_mib)} physical − ${fmtMiB(pm.reserve_mib)} reserve = ${fmtMiB(pm.vm_memory_capacity_mib)} for VMs`),
            h('dt', {}, 'Running VMs'), h('dd', {}, running.length ? running.map((v) => v.name).join(', ') : 'none')),
          meter(pm.vm_memory_used_mib, pm.vm_memory_capacity_mib, `Memory for VMs: ${fmtMiB(pm.vm_memory_used_mib)} of ${fmtMiB(pm.vm_memory_capacity_mib)}`),
          meter(pm.vcpus_used, pm.vcpu_capacity, `vCPUs: ${pm.vcpus_used} of ${pm.vcpu_capacity}`, { warnAt: 1.01 })),
        h('section', { class: 'card' }, h('h2', {}, 'Maintenance'),
          h('p', {}, 'Work On moves this PM\'s VMs to the partner by live migration, then the PM is in maintenance, where it can be finalized, shut down, recovered or replaced. These need the partner PM; they appear here when the unit has two PMs.'),
          h('div', { class: 'ops' }, MAINTENANCE.map((m) => h('button', { class: 'btn', 'aria-disabled': 'true', title: `${m}: needs the two-PM unit` }, m))),
          pm.warnings.length ? [h('h3', {}, 'Warnings'), h('ul', { class: 'warn-list' }, pm.warnings.map((w) => h('li', {}, w)))] : null)));
  };
  ctx.on('pm', draw);
  ctx.on('vms', draw);
  draw();
}
