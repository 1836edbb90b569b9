// VM operations (SPEC V5): which are allowed in the VM's state (the server's
// allowed_operations) and for the user's role, with confirmations for the
// destructive ones. The server enforces both again.

import { api } from './api.js';
import { h, confirmAction, dialog, field, toast, errorBox, mount } from './ui.js';
import { can, roleNeeded, navigate, refresh, inUnit } from './app.js';

const enc = encodeURIComponent;

/** The operation buttons, in the order of SPEC V5. */
export const OPS = [
  { op: 'start', label: 'Start', access: 'operate', primary: true },
  { op: 'shutdown', label: 'Shut down', access: 'operate' },
  { op: 'power off', label: 'Power off', access: 'operate', danger: true },
  { op: 'console', label: 'Console', access: 'operate' },
  { op: 'boot from CD', label: 'Boot from CD…', access: 'operate' },
  { op: 'reset device', label: 'Reset device', access: 'operate' },
  { op: 'dump', label: 'Dump', access: 'operate' },
  { op: 'migrate', label: 'Migrate…', access: 'operate', unavailable: () => (inUnit() ? null : 'live migration needs the partner PM (two-PM unit)') },
  { op: 'config', label: 'Config…', access: 'administer' },
  { op: 'remove', label: 'Remove…', access: 'administer', danger: true },
];

/** Why `op` cannot be done on `vm` now, or null when it can. */
export function whyNot(vm, o) {
  const unavailable = typeof o.unavailable === 'function' ? o.unavailable(vm) : o.unavailable;
  if (unavailable) return unavailable;
  if (!can(o.access)) return roleNeeded(o.access);
  if (!vm.allowed_operations.includes(o.op)) {
    const allowed = vm.allowed_operations.length ? vm.allowed_operations.join(', ') : 'nothing';
    return `not allowed while ${vm.state}; allowed now: ${allowed}`;
  }
  return null;
}

async function post(vm, path, body) {
  const r = await api('POST', `/vms/${enc(vm.name)}/${path}`, body);
  if (r && r.warnings && r.warnings.length) r.warnings.forEach((w) => toast(w, 'warn'));
  refresh('vms');
  refresh('pm');
  return r;
}

async function chooseVcd(title, label) {
  const vcds = await api('GET', '/vcds');
  if (!vcds.length) {
    toast('There is no virtual CD yet: add one on the Virtual CDs page.', 'warn');
    return null;
  }
  const sel = h('select', {}, vcds.map((v) => h('option', { value: v.name }, v.name)));
  return dialog(title, (close) => h('form', {
    onsubmit: (e) => {
      e.preventDefault();
      close(sel.value);
    },
  }, field('Virtual CD', sel),
  h('div', { class: 'actions' },
    h('button', { type: 'button', class: 'btn', onclick: () => close(null) }, 'Cancel'),
    h('button', { type: 'submit', class: 'btn primary' }, label))));
}

/** Runs an operation (after confirmation when it is destructive). */
export async function runOp(vm, o) {
  switch (o.op) {
    case 'start':
      return post(vm, 'start');
    case 'shutdown':
      if (!(await confirmAction({
        title: `Shut down ${vm.name}?`,
        text: `The guest is asked to shut down (ACPI power button). If it has not stopped after the shutdown timeout, it is powered off.`,
        confirmLabel: 'Shut down',
        danger: false,
      }))) return null;
      return post(vm, 'shutdown');
    case 'power off':
      if (!(await confirmAction({
        title: `Power off ${vm.name}?`,
        text: 'The VM stops immediately, like pulling the plug: its memory state is discarded and unsaved data in the guest is lost. Use it when shutdown does not work.',
        confirmLabel: 'Power off',
      }))) return null;
      return post(vm, 'poweroff');
    case 'dump':
      if (!(await confirmAction({
        title: `Dump the memory of ${vm.name}?`,
        text: 'The guest memory is written to a dump file on the PM, then the VM restarts. Use it for a hung guest whose memory you want to analyse.',
        confirmLabel: 'Dump and restart',
      }))) return null;
      return post(vm, 'dump');
    case 'reset device':
      return post(vm, 'reset-device');
    case 'boot from CD': {
      const vcd = await chooseVcd(`Boot ${vm.name} once from a CD`, 'Boot from CD');
      return vcd ? post(vm, 'boot-from-cd', { vcd }) : null;
    }
    case 'console':
      return navigate(`#/vms/${enc(vm.name)}/console`);
    case 'migrate': {
      const { openMigrate } = await import('./migration.js');
      const m = await openMigrate(vm);
      if (m) {
        toast(`Migration of ${vm.name} started`);
        // The VM page shows it in its migration panel; elsewhere, go there.
        const ev = new CustomEvent('pv-migration-started', { detail: { vm: vm.name, view: m }, cancelable: true });
        if (window.dispatchEvent(ev)) navigate(`#/vms/${enc(vm.name)}?migration=${enc(m.id)}`);
      }
      return m;
    }
    case 'config': {
      const { openConfig } = await import('./pages/config.js');
      return openConfig(vm);
    }
    case 'remove': {
      const dataBox = h('input', { type: 'checkbox', id: 'rm-data' });
      const extra = vm.data_volumes.length
        ? h('label', { class: 'check' }, dataBox, ` Also delete its data volumes (${vm.data_volumes.join(', ')}); otherwise they are detached and kept.`)
        : null;
      if (!(await confirmAction({
        title: `Remove ${vm.name}?`,
        text: `The VM and its boot volume ${vm.boot_volume} are deleted. This cannot be undone.`,
        confirmLabel: 'Remove VM',
        extra,
      }))) return null;
      await api('DELETE', `/vms/${enc(vm.name)}${dataBox.checked ? '?delete_data_volumes=true' : ''}`);
      toast(`VM ${vm.name} removed`);
      await refresh('vms');
      refresh('pm');
      return navigate('#/vms');
    }
    default:
      return null;
  }
}

/**
 * The operation buttons of a VM. Buttons not allowed now stay visible but
 * are marked aria-disabled, with the reason as tooltip (and as a message
 * when activated), so keyboard users can find out why.
 */
export function opButtons(vm, { only, onError } = {}) {
  const list = only ? OPS.filter((o) => only.includes(o.op)) : OPS;
  return h('div', { class: 'ops', role: 'toolbar', 'aria-label': `Operations on ${vm.name}` },
    list.map((o) => {
      const reason = whyNot(vm, o);
      return h('button', {
        type: 'button',
        class: `btn ${o.danger ? 'danger-outline' : o.primary ? 'primary' : ''}`,
        'data-op': o.op,
        'aria-disabled': reason ? 'true' : null,
        title: reason ? `${o.label.replace('…', '')}: ${reason}` : null,
        onclick: async (e) => {
          if (reason) {
            toast(`${o.label.replace('…', '')}: ${reason}`, 'warn');
            return;
          }
          const btn = e.currentTarget;
          btn.classList.add('working');
          try {
            await runOp(vm, o);
          } catch (err) {
            if (onError) onError(err);
            else toast(err.message, 'error');
          } finally {
            btn.classList.remove('working');
          }
        },
      }, o.label);
    }));
}

/** An error slot for operations: shows the server's message verbatim. */
export function errorSlot() {
  const el = h('div', { class: 'op-error' });
  return { el, show: (err) => mount(el, errorBox(err)), clear: () => mount(el) };
}
