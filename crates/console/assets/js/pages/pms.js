// Physical Machines (SPEC U2, U3): in a unit, both PMs with their states,
// progress and the maintenance operations allowed in each (shared with the
// Unit page); always, the resources and admission capacity of the PM this
// console talks to, and its warnings.

import { h, mount, remount, stateBadge, fmtMiB, meter, emptyState, pageHeader, table, errorBox } from '../ui.js';
import { store, refresh, inUnit, thisPm } from '../app.js';
import { pmCards } from './unit.js';

export const help = 'pms';

function resources(pm, running) {
  return h('section', { class: 'card' }, h('h2', {}, `Resources of ${thisPm()}`),
    h('dl', { class: 'props' },
      h('dt', {}, 'Host name'), h('dd', {}, pm.hostname),
      h('dt', {}, 'Hypervisor'), h('dd', {}, `QEMU ${pm.qemu_version || '(not found)'} with ${pm.accel.toUpperCase()}`),
      h('dt', {}, 'Threads'), h('dd', {}, `${pm.threads} (2 reserved for the system → ${pm.vcpu_capacity} vCPUs offered)`),
      h('dt', {}, 'Memory'), h('dd', {}, `${fmtMiB(pm.memory_mib)} physical − ${fmtMiB(pm.reserve_mib)} reserve = ${fmtMiB(pm.vm_memory_capacity_mib)} for VMs`),
      h('dt', {}, 'Running VMs'), h('dd', {}, running.length ? running.map((v) => v.name).join(', ') : 'none')),
    meter(pm.vm_memory_used_mib, pm.vm_memory_capacity_mib, `Memory for VMs: ${fmtMiB(pm.vm_memory_used_mib)} of ${fmtMiB(pm.vm_memory_capacity_mib)}`),
    meter(pm.vcpus_used, pm.vcpu_capacity, `vCPUs: ${pm.vcpus_used} of ${pm.vcpu_capacity}`, { warnAt: 1.01 }));
}

function warnings(pm) {
  return h('section', { class: 'card' }, h('h2', {}, 'Warnings'),
    pm.warnings.length
      ? h('ul', { class: 'warn-list' }, pm.warnings.map((w) => h('li', {}, w)))
      : emptyState('No warnings', 'vCPU over-provisioning and low storage show here.'));
}

export async function render(main, ctx) {
  const errSlot = h('div', { id: 'pms-error' });
  const slot = h('div', {});
  mount(main, pageHeader('Physical Machines', 'The servers of the unit, their state and the maintenance operations allowed in it.'), errSlot, slot);
  const showError = (e) => mount(errSlot, errorBox(e));
  const reload = async () => {
    await refresh('unit');
    await refresh('pms');
  };
  const draw = () => {
    const pm = store.pm;
    if (!pm) {
      mount(slot, emptyState('Loading…', ''));
      return;
    }
    const local = (v) => !inUnit() || !v.host || v.host === thisPm();
    const running = store.vms.filter((v) => ['booting', 'running', 'stopping', 'dumping'].includes(v.state) && local(v));
    if (inUnit()) {
      remount(slot,
        pmCards({ onError: showError, onDone: () => { mount(errSlot); reload(); } }),
        h('div', { class: 'cards two' }, resources(pm, running), warnings(pm)),
        h('p', { class: 'small muted' }, 'Heartbeat links, quorum and unit shutdown: ', h('a', { href: '#/unit' }, 'Unit'), '.'));
      return;
    }
    remount(slot,
      table({
        caption: 'Physical machines',
        columns: [
          { label: 'Name', value: () => h('strong', {}, pm.hostname) },
          { label: 'Role', value: () => 'only PM (not in a unit)' },
          { label: 'State', value: () => stateBadge('running') },
          { label: 'VMs', value: () => String(running.length), class: 'num' },
          { label: 'Threads', value: () => String(pm.threads), class: 'num' },
          { label: 'Memory', value: () => fmtMiB(pm.memory_mib), class: 'num' },
        ],
        rows: [pm],
        empty: null,
      }),
      h('div', { class: 'cards two' },
        resources(pm, running),
        h('section', { class: 'card' }, h('h2', {}, 'Maintenance'),
          h('p', {}, 'Work On moves a PM\'s VMs to the partner by live migration, then the PM is in maintenance, where it can be finalized, shut down or powered off. These need a partner: form a unit (see the ', h('a', { href: '#/unit' }, 'Unit'), ' page) and they appear here.'),
          pm.warnings.length ? [h('h3', {}, 'Warnings'), h('ul', { class: 'warn-list' }, pm.warnings.map((w) => h('li', {}, w)))] : null)));
  };
  ctx.on('pm', draw);
  ctx.on('vms', draw);
  ctx.on('pms', draw);
  const timer = setInterval(() => {
    if (inUnit() && document.visibilityState === 'visible') reload();
  }, 3000);
  ctx.onLeave(() => clearInterval(timer));
  draw();
}
