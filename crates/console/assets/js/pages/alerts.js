// Alerts (SPEC A1, V6, V7): what needs the administrator, each with the
// action it needs. Live. Operators and administrators may acknowledge.

import { api } from '../api.js';
import { h, mount, timeEl, emptyState, pageHeader, toast } from '../ui.js';
import { store, can, roleNeeded, refresh } from '../app.js';
import { opButtons } from '../vmops.js';

export const help = 'alerts';

const OPS_FOR = {
  vm_critical: ['reset device', 'console'],
  vm_crashed: ['console'],
  guest_unresponsive: ['console', 'dump', 'power off'],
};

/** The list of alerts with their actions (also used by the dashboard). */
export function alertList(alerts) {
  if (!alerts.length) {
    return emptyState('No active alerts', 'Crashed or critical VMs and guests that stop answering appear here, with the action each one needs.');
  }
  const reason = can('operate') ? null : roleNeeded('operate');
  return h('ul', { class: 'alert-list' }, alerts.map((a) => {
    const vmName = a.subject.startsWith('vm/') ? a.subject.slice(3) : null;
    const vm = vmName && store.vms.find((v) => v.name === vmName);
    return h('li', { class: `alert-item ${a.severity === 'critical' ? 'bad' : 'warn'}`, 'data-alert': a.id },
      h('div', { class: 'alert-head' },
        h('span', { class: `badge ${a.severity === 'critical' ? 'bad' : 'warn'}` }, a.severity),
        ' ', vm ? h('a', { href: `#/vms/${encodeURIComponent(vm.name)}` }, vm.name) : h('span', {}, a.subject),
        h('span', { class: 'small muted' }, ' · since ', timeEl(a.raised_at), a.count > 1 ? ` · ${a.count} times, last ` : null, a.count > 1 ? timeEl(a.updated_at) : null)),
      h('div', {}, a.message),
      h('div', { class: 'small' }, h('strong', {}, 'Action: '), a.action),
      h('div', { class: 'ops' },
        vm ? opButtons(vm, { only: OPS_FOR[a.kind] || ['console'] }) : null,
        h('button', {
          class: 'btn small', 'aria-disabled': reason ? 'true' : null, title: reason ? `Acknowledge: ${reason}` : 'Remove this alert; it comes back if the condition happens again',
          onclick: async () => {
            if (reason) {
              toast(`Acknowledge: ${reason}`, 'warn');
              return;
            }
            try {
              await api('DELETE', `/alerts/${encodeURIComponent(a.id)}`);
              refresh('alerts');
            } catch (e) {
              toast(e.message, 'error');
            }
          },
        }, 'Acknowledge')));
  }));
}

export async function render(main, ctx) {
  const slot = h('div', {});
  mount(main, pageHeader('Alerts', 'Conditions that need you, critical first, each with the action it needs.'), slot);
  const draw = () => mount(slot, alertList(store.alerts));
  ctx.on('alerts', draw);
  ctx.on('vms', draw);
  await refresh('alerts');
  draw();
}
