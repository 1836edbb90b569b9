// Preferences (SPEC A6, U9, V6, V9): unit settings. Administrators edit;
// everyone sees them.

import { api } from '../api.js';
import { h, mount, field, errorBox, pageHeader, toast } from '../ui.js';
import { can, roleNeeded, refresh, store } from '../app.js';

export const help = 'prefs';

const FIELDS = [
  ['timezone', 'Time zone', 'text', 'IANA zone name, e.g. Europe/Paris or UTC. Every time in the console is shown in it.'],
  ['memory_reserve_mib', 'Memory reserved for the system (MiB)', 'number', 'Per PM; 256–65536. Default 1024, recommended 2048.'],
  ['vm_mtbf_max_failures', 'Crashes tolerated before a VM is critical', 'number', '1–100. A VM that crashes more often than this within the window becomes critical.'],
  ['vm_mtbf_window_secs', 'Crash window (seconds)', 'number', '1–604800 (one week). Default 3600.'],
  ['shutdown_timeout_secs', 'Shutdown timeout (seconds)', 'number', 'After an ACPI shutdown, the VM is powered off if still running after this long. 1–3600.'],
  ['boot_grace_secs', 'Boot grace (seconds)', 'number', 'VMs without an instance check count as running after this long. 1–3600.'],
  ['instance_check_interval_secs', 'Instance check interval (seconds)', 'number', 'How often a running guest is pinged. 1–300.'],
  ['unresponsive_restart_secs', 'Restart unresponsive guests after (seconds)', 'number', 'SPEC V7 policy: restart a running guest whose instance check has failed this long; 0 = never (the alert is raised either way).'],
  ['resync_rate_mbps', 'Resync rate cap (MB/s)', 'number', 'SPEC S2: how fast a returning PM is brought back in sync; 0 = unlimited. Applied at once to running resyncs, so that a resync does not starve the VMs\' own disk traffic. 0–100000.'],
  ['console_log_max_mib', 'Console log cap per VM (MiB)', 'number', 'A VM\'s serial console log is rotated above this size, one older part kept: a guest printing without pause cannot fill the disk. 1–1024; default 8.'],
  ['audit_max_records', 'Audit records kept per PM', 'number', 'The oldest go first. 1000–10000000; default 100000.'],
  ['audit_max_days', 'Audit records kept for (days)', 'number', 'Older records are dropped. 1–3650; default 365.'],
  ['accel', 'Accelerator', 'select', 'kvm (hardware) or tcg (software emulation, slow; for tests and nested set-ups).'],
  ['qemu_binary', 'QEMU binary', 'text', 'Program name on PATH or absolute path.'],
];

export async function render(main) {
  const admin = can('administer');
  const s = await refresh('settings');
  // Settings this page does not know yet still show (and save) as is.
  const known = new Set(FIELDS.map(([k]) => k));
  const fields = [...FIELDS, ...Object.keys(s).filter((k) => !known.has(k))
    .map((k) => [k, k.replace(/_/g, ' '), typeof s[k] === 'number' ? 'number' : 'text', ''])];
  const inputs = {};
  const err = h('div', {});
  const zones = typeof Intl.supportedValuesOf === 'function' ? Intl.supportedValuesOf('timeZone') : [];
  const list = h('datalist', { id: 'tz-list' }, ['UTC', ...zones].map((z) => h('option', { value: z })));
  const form = h('form', {
    class: 'prefs',
    onsubmit: async (e) => {
      e.preventDefault();
      mount(err);
      const patch = {};
      for (const [k, , type] of fields) {
        const v = inputs[k].value;
        const cur = store.settings[k];
        const val = type === 'number' ? Number(v) : v;
        if (val !== cur) patch[k] = val;
      }
      if (!Object.keys(patch).length) {
        toast('Nothing changed');
        return;
      }
      try {
        await api('PATCH', '/settings', patch);
        await refresh('settings');
        toast('Preferences saved');
        render(main);
      } catch (ex) {
        mount(err, errorBox(ex));
      }
    },
  },
  h('fieldset', { disabled: !admin },
    h('legend', {}, admin ? 'Unit preferences' : `Unit preferences (read only: changing them ${roleNeeded('administer')})`),
    fields.map(([k, label, type, hint]) => {
      let el;
      if (type === 'select') el = h('select', {}, ['kvm', 'tcg'].map((a) => h('option', { selected: s[k] === a }, a)));
      else el = h('input', { type, value: s[k] ?? '', list: k === 'timezone' ? 'tz-list' : null, class: type === 'number' ? 'num' : null });
      el.id = `pref-${k}`;
      inputs[k] = el;
      return field(label, el, hint);
    })),
  err,
  admin ? h('div', { class: 'actions' }, h('button', { class: 'btn primary', type: 'submit' }, 'Save preferences')) : null);
  mount(main, pageHeader('Preferences', 'Settings of the unit. Every change is audited.'), list, form,
    h('section', { class: 'card' }, h('h2', {}, 'Coming with the unit'),
      h('p', { class: 'muted' }, 'Owner information, management address, NTP, e-mail and SNMP alerts, proxy, power monitoring and HA load balancing appear here when the unit offers them.')));
}
