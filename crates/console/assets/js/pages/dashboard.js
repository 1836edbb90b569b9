// Dashboard: unit health at a glance, alerts with the action each needs,
// warnings, recent life-cycle events. Live.

import { api } from '../api.js';
import { h, mount, stateBadge, meter, fmtMiB, fmtBytes, timeEl, emptyState, plural, pageHeader } from '../ui.js';
import { store, lastEvents, inUnit } from '../app.js';
import { opButtons } from '../vmops.js';
import { VM_STATES } from '../help.js';
import { alertList } from './alerts.js';

export const help = 'dashboard';

/**
 * Alerts derived from the VMs' states and health, each with its action: used
 * only when the daemon has no alerts API (GET /api/v1/alerts).
 */
function alerts() {
  const out = [];
  for (const vm of store.vms) {
    const link = h('a', { href: `#/vms/${encodeURIComponent(vm.name)}` }, vm.name);
    if (vm.state === 'critical') {
      out.push({ sev: 'bad', vm, text: [link, ` crashed more than ${vm.mtbf_max_failures} times in ${Math.round(vm.mtbf_window_secs / 60)} min and stays down${vm.last_crash ? ` (last: ${vm.last_crash})` : ''}.`], action: 'Reset device restarts it and clears its crash counter.', ops: ['reset device'] });
    } else if (vm.state === 'crashed') {
      out.push({ sev: 'warn', vm, text: [link, ` crashed${vm.last_crash ? ` (${vm.last_crash})` : ''} and is being restarted automatically.`], action: 'No action needed unless it keeps crashing; open its console to see why.', ops: ['console'] });
    } else if (vm.state === 'running' && vm.health && vm.health.instance_ok === false) {
      out.push({ sev: 'warn', vm, text: [link, ' is running but its guest does not answer the instance check.'], action: 'Open its console; if the guest hangs, Dump (for analysis) or Power off and start it.', ops: ['console', 'dump'] });
    }
  }
  return out;
}

export async function render(main, ctx) {
  const grid = h('div', { class: 'cards' });
  const alertSlot = h('section', { class: 'card', 'aria-labelledby': 'alerts-h' });
  const warnSlot = h('section', { class: 'card', 'aria-labelledby': 'warn-h' });
  const eventSlot = h('section', { class: 'card wide', 'aria-labelledby': 'events-h' });
  mount(main, pageHeader('Dashboard', 'The unit at a glance. Everything on this page updates live.'), grid,
    h('div', { class: 'cards two' }, alertSlot, warnSlot), eventSlot);
  let groups = [];
  let volumes = [];
  const loadStorage = async () => {
    [groups, volumes] = await Promise.all([api('GET', '/storage-groups'), api('GET', '/volumes')]);
  };
  await loadStorage();

  const draw = () => {
    const pm = store.pm;
    const counts = {};
    store.vms.forEach((v) => { counts[v.state] = (counts[v.state] || 0) + 1; });
    const simplex = volumes.filter((v) => v.sync === 'simplex').length;
    const bySync = {};
    volumes.forEach((v) => {
      const k = v.sync.startsWith('resyncing') ? 'resyncing' : v.sync;
      bySync[k] = (bySync[k] || 0) + 1;
    });
    const unit = store.unit;
    const notRedundant = store.vms.filter((v) => v.redundancy_alert);
    const unitCard = inUnit()
      ? h('section', { class: 'card', id: 'dash-unit' }, h('h2', {}, `Unit ${unit.name}`),
        h('ul', { class: 'state-counts' }, store.pms.map((p) => h('li', { 'data-pm': p.name }, h('a', { href: '#/unit' }, p.name), ' ', stateBadge(p.reachable ? p.state : 'unreachable', p.reachable ? null : 'not heard')))),
        h('p', { class: 'small' },
          unit.power && unit.power.power !== 'running' ? h('strong', {}, `Unit ${unit.power.power.replace('_', ' ')}${unit.power.progress ? `: ${unit.power.progress}` : ''}. `) : null,
          unit.metrics && unit.metrics.leader ? 'Quorum: yes. ' : h('span', { class: 'health bad' }, 'No quorum on this PM. '),
          ((unit.health && unit.health.links) || []).filter((l) => l.warning).map((l) => h('a', { href: '#/unit', class: 'health bad', title: l.warning }, `Link ${l.name}: round trip ${Math.round(l.rtt_ms)} ms (over 10 ms). `))),
        h('p', { class: 'small muted' }, notRedundant.length
          ? `Redundancy: ${notRedundant.map((v) => v.name).join(', ')} not fully redundant.`
          : 'Redundancy: every running VM has its volumes in sync on both PMs.'),
        h('a', { href: '#/unit' }, 'Unit and physical machines →'))
      : h('section', { class: 'card' }, h('h2', {}, 'Unit'),
        h('p', { class: 'big-status' }, stateBadge('running'), ' ', pm ? pm.hostname : '…'),
        h('p', {}, '1 physical machine running; no partner yet (single-PM unit).'),
        h('p', { class: 'small muted' }, 'Redundancy: not redundant — VMs restart nowhere if this PM fails until the partner joins.'),
        h('a', { href: '#/pms' }, 'Physical machines →'));
    mount(grid,
      unitCard,
      h('section', { class: 'card' }, h('h2', {}, 'Virtual machines'),
        store.vms.length
          ? [h('p', { class: 'big-number' }, String(store.vms.length), h('span', { class: 'small muted' }, ` ${store.vms.length === 1 ? 'VM' : 'VMs'}`)),
            h('ul', { class: 'state-counts' }, VM_STATES.filter(([s]) => counts[s]).map(([s]) => h('li', {}, h('a', { href: `#/vms?state=${s}`, 'data-count-state': s }, stateBadge(s), ` ${counts[s]}`))))]
          : emptyState('No VMs yet', 'Create one on the Virtual Machines page.', h('a', { href: '#/vms' }, 'Virtual machines →'))),
      h('section', { class: 'card' }, h('h2', {}, 'Resources (this PM)'),
        pm ? [
          meter(pm.vm_memory_used_mib, pm.vm_memory_capacity_mib, `Memory for VMs: ${fmtMiB(pm.vm_memory_used_mib)} of ${fmtMiB(pm.vm_memory_capacity_mib)} in use`),
          meter(pm.vcpus_used, pm.vcpu_capacity, `vCPUs: ${pm.vcpus_used} of ${pm.vcpu_capacity} in use${pm.vcpus_used > pm.vcpu_capacity ? ' (over-provisioned)' : ''}`, { warnAt: 1.01 }),
          meter(pm.volumes_and_vcds, 62, `Volumes and VCDs: ${pm.volumes_and_vcds} of 62`),
        ] : '…'),
      h('section', { class: 'card' }, h('h2', {}, 'Storage'),
        groups.map((g) => meter(g.used_bytes, g.capacity_bytes, `${g.name}: ${fmtBytes(g.free_bytes)} free of ${fmtBytes(g.capacity_bytes)}`)),
        h('p', { class: 'small' }, !volumes.length ? 'No volumes yet.'
          : !inUnit() ? `Sync: ${plural(simplex, 'volume')} simplex (single PM, nothing to resync); no resync running.`
            : `Sync: ${Object.entries(bySync).map(([k, n]) => `${n} ${k.replace('_', ' ')}`).join(', ')}.`),
        inUnit() ? h('a', { href: '#/volumes' }, 'Volumes →') : null, ' ',
        h('a', { href: '#/storage-groups' }, 'Storage groups →')));

    const served = store.apiPaths.has('/api/v1/alerts');
    const al = served ? store.alerts : alerts();
    mount(alertSlot, h('h2', { id: 'alerts-h' }, 'Alerts', al.length ? h('span', { class: 'count bad' }, String(al.length)) : null),
      served ? alertList(al) : al.length
        ? h('ul', { class: 'alert-list' }, al.map((a) => h('li', { class: `alert-item ${a.sev}` },
          h('div', {}, h('strong', {}, a.text)), h('div', { class: 'small' }, 'Action: ', a.action), opButtons(a.vm, { only: a.ops }))))
        : emptyState('No active alerts', 'Crashed or critical VMs and guests that stop answering appear here, with the action each one needs.'));

    const warnings = pm ? pm.warnings : [];
    mount(warnSlot, h('h2', { id: 'warn-h' }, 'Warnings', warnings.length ? h('span', { class: 'count warn' }, String(warnings.length)) : null),
      warnings.length
        ? h('ul', { class: 'warn-list' }, warnings.map((w) => h('li', {}, w)))
        : emptyState('No warnings', 'VMs without paravirtual drivers, storage groups under 5 GiB free and vCPU over-provisioning are reported here.'));

    mount(eventSlot, h('h2', { id: 'events-h' }, 'Recent events'),
      lastEvents.length
        ? h('ul', { class: 'events' }, lastEvents.slice(0, 10).map((e) => h('li', {}, timeEl(e.time), ' ', h('a', { href: `#/vms/${encodeURIComponent(e.vm)}` }, e.vm), ' ', stateBadge(e.state), ' ', e.message)))
        : emptyState('No events since you opened the console', 'VM life-cycle changes (started, running, crashed, stopped…) appear here as they happen.'));
  };
  ctx.on('vms', draw);
  ctx.on('pm', async () => {
    await loadStorage().catch(() => {});
    draw();
  });
  ctx.on('events', draw);
  ctx.on('alerts', draw);
  ctx.on('pms', draw);
  draw();
}
