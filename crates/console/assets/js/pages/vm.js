// One VM: header with state and operations, and tabs: summary, console,
// volumes, networks, CD drives, statistics, audit. Live.

import { api } from '../api.js';
import { h, mount, stateBadge, syncBadge, fmtMiB, fmtBytes, timeEl, table, emptyState, errorBox, toast, dialog, field, typedConfirm } from '../ui.js';
import { store, can, roleNeeded, refresh, navigate, inUnit, thisPm } from '../app.js';
import { opButtons, errorSlot } from '../vmops.js';
import { migrationPanel } from '../migration.js';
import { guestHealth, hostedElsewhere } from './vms.js';

export const help = 'vm';

const TABS = [
  ['summary', 'Summary'],
  ['console', 'Console'],
  ['volumes', 'Volumes'],
  ['networks', 'Networks'],
  ['cd', 'CD Drives'],
  ['statistics', 'Statistics'],
  ['audit', 'Audit'],
];

let focusTab = false;
const enc = encodeURIComponent;

export async function render(main, ctx) {
  const name = ctx.params.name;
  const tab = TABS.some(([t]) => t === ctx.params.tab) ? ctx.params.tab : 'summary';
  let vm = store.vms.find((v) => v.name === name);
  if (!vm) {
    try {
      vm = await api('GET', `/vms/${enc(name)}`);
    } catch (e) {
      mount(main, h('a', { href: '#/vms', class: 'back' }, '← Virtual Machines'), h('h1', {}, name), errorBox(e));
      return;
    }
  }
  const header = h('div', { class: 'vm-header' });
  const errors = errorSlot();
  const tabs = h('div', { role: 'tablist', class: 'tabs', 'aria-label': `${name} details` },
    TABS.map(([t, label]) => h('a', {
      role: 'tab',
      id: `tab-${t}`,
      href: `#/vms/${enc(name)}/${t}`,
      'aria-selected': String(t === tab),
      'aria-controls': 'tabpanel',
      tabindex: t === tab ? '0' : '-1',
      onclick: () => { focusTab = true; },
    }, label)));
  tabs.addEventListener('keydown', (e) => {
    const i = TABS.findIndex(([t]) => t === tab);
    let j = null;
    if (e.key === 'ArrowRight') j = (i + 1) % TABS.length;
    else if (e.key === 'ArrowLeft') j = (i + TABS.length - 1) % TABS.length;
    else if (e.key === 'Home') j = 0;
    else if (e.key === 'End') j = TABS.length - 1;
    if (j !== null) {
      e.preventDefault();
      focusTab = true;
      navigate(`#/vms/${enc(name)}/${TABS[j][0]}`);
    }
  });
  const panel = h('section', { role: 'tabpanel', id: 'tabpanel', 'aria-labelledby': `tab-${tab}`, tabindex: '0' });
  // U6: a VM that failover refused to restart on a replica that may be
  // behind says why, and offers the administrator's "promote anyway".
  const stranded = h('div', { id: 'vm-stranded' });
  const drawStranded = () => {
    const a = (store.alerts || []).find((x) => x.kind === 'failover-refused' && x.subject === `vm/${name}`);
    if (!a) {
      mount(stranded);
      return;
    }
    const promote = async () => {
      const typed = await typedConfirm({
        title: `Promote ${name} anyway?`,
        text: `${name} restarts on this PM (${thisPm() || 'this PM'}) from replicas that miss writes its failed host acknowledged. Those writes are lost. Do this only if the failed PM is gone for good.`,
        expect: name,
        confirmLabel: 'Promote anyway and lose the writes',
        id: 'promote-confirm',
      });
      if (typed === null) return;
      try {
        const rep = await api('POST', `/vms/${enc(name)}/promote-anyway`, { confirm: typed });
        const lost = rep.volumes.map((l) => `${l.volume}: ${l.last_in_sync ? `writes after ${new Date(l.last_in_sync * 1000).toLocaleString()} on ${l.newer_data_on} are lost` : (l.refused_because || 'complete')}`).join('; ');
        toast(`${name} promoted on ${rep.host}. ${lost}`, 'error');
        refresh('vms');
        refresh('alerts');
      } catch (e) {
        errors.show(e);
      }
    };
    mount(stranded, h('section', { class: 'card danger-card', id: 'vm-stranded-card', role: 'alert' },
      h('h2', {}, 'This VM stays down: failover refused'),
      h('p', {}, a.message),
      h('p', { class: 'small' }, a.action),
      can('administer')
        ? h('button', { type: 'button', class: 'btn danger', id: 'promote-anyway', onclick: promote }, 'Promote anyway…')
        : h('p', { class: 'small muted' }, `Promote anyway ${roleNeeded('administer')}.`)));
  };
  drawStranded();
  ctx.on('alerts', drawStranded);
  // The migration panel (M2): follows a migration of this VM when one runs.
  const mig = inUnit() ? migrationPanel(name, { showId: ctx.query.get('migration') }) : null;
  mount(main, h('a', { href: '#/vms', class: 'back' }, '← Virtual Machines'), header, stranded, errors.el, mig ? mig.el : null, tabs, panel);
  if (mig) {
    mig.poll();
    ctx.onLeave(() => mig.stop());
    const started = (e) => {
      if (e.detail.vm !== name) return;
      e.preventDefault();
      mig.start(e.detail.view);
    };
    window.addEventListener('pv-migration-started', started);
    ctx.onLeave(() => window.removeEventListener('pv-migration-started', started));
  }

  const drawHeader = () => {
    mount(header,
      h('div', { class: 'vm-title' },
        h('h1', { tabindex: '-1' }, vm.name),
        h('span', { id: 'vm-state' }, stateBadge(vm.state, vm.activity && vm.activity !== vm.state ? vm.activity : null)),
        ['booting', 'running', 'stopping', 'dumping'].includes(vm.state) ? h('span', { class: 'vm-health' }, guestHealth(vm)) : null),
      opButtons(vm, { onError: errors.show }));
  };
  drawHeader();
  if (focusTab) {
    focusTab = false;
    tabs.querySelector('[aria-selected=true]').focus();
  }

  const tabRender = { summary, console: consoleTab, volumes, networks, cd, statistics, audit }[tab];
  const redrawTab = await tabRender(panel, () => vm, ctx, errors);
  // The state this page last drew. Not `vm.state`: a live event patches
  // the state into the very object `vm` refers to before emitting.
  let drawnState = vm.state;
  ctx.on('vms', () => {
    const next = store.vms.find((v) => v.name === name);
    if (!next) {
      mount(header, h('h1', { tabindex: '-1' }, name), h('p', {}, 'This VM no longer exists (it was removed).'));
      return;
    }
    const changed = next.state !== drawnState;
    drawnState = next.state;
    vm = next;
    drawHeader();
    if (changed) errors.clear();
    if (typeof redrawTab === 'function') redrawTab(changed);
  });
}

// ----------------------------------------------------------------- summary

function dl(rows) {
  return h('dl', { class: 'props' }, rows.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

/**
 * The preferred-PM selector (SPEC L2): PUT /vms/{name}/placement. A choice
 * not saved yet (`note.pending`) and the outcome (`note.node`) live in
 * `note`, so that the summary's redraws — live events, the periodic
 * refresh — neither undo the admin's choice nor hide the result.
 */
function placement(vm, note) {
  const admin = can('administer');
  const names = store.pms.map((p) => p.name).sort();
  if (note.pending === (vm.preferred_pm || '')) note.pending = undefined;
  const shown = note.pending ?? (vm.preferred_pm || '');
  const sel = h('select', {
    id: 'vm-preferred', 'aria-label': `Preferred PM of ${vm.name}`, disabled: !admin,
    onchange: () => { note.pending = sel.value; },
  },
  h('option', { value: '', selected: shown === '' }, 'none (automatic)'),
  names.map((n) => h('option', { value: n, selected: shown === n }, n)));
  const msg = h('span', { class: 'small', role: 'status' }, note.node);
  const show = (node) => {
    note.node = node;
    mount(msg, node);
  };
  const save = h('button', {
    type: 'button', class: 'btn small', id: 'vm-preferred-save',
    'aria-disabled': admin ? null : 'true', title: admin ? null : `Preferred PM: ${roleNeeded('administer')}`,
    onclick: async () => {
      if (!admin) {
        toast(`Preferred PM: ${roleNeeded('administer')}`, 'warn');
        return;
      }
      const want = sel.value || null;
      try {
        await api('PUT', `/vms/${enc(vm.name)}/placement`, { preferred_pm: want });
        note.pending = undefined;
        show(h('span', { class: 'health ok' }, want
          ? `Saved: ${vm.name} prefers ${want}${vm.host && vm.host !== want ? `; it moves there by live migration once ${want} runs and its volumes are in sync` : ''}.`
          : 'Saved: no preferred PM.'));
        refresh('vms');
      } catch (e) {
        show(errorBox(e));
      }
    },
  }, 'Set');
  return h('div', { class: 'inline placement' }, sel, save, msg);
}

function summary(panel, get) {
  const note = { node: null, pending: undefined };
  const draw = () => {
    const vm = get();
    // Keep a preferred PM being chosen (the view redraws on refresh).
    const chosen = panel.querySelector('#vm-preferred');
    if (chosen && chosen.value !== (vm.preferred_pm || '') && panel.contains(document.activeElement)) return;
    const hl = vm.health || {};
    const pv = hl.paravirtual || [];
    const running = ['booting', 'running', 'stopping', 'dumping'].includes(vm.state);
    mount(panel, h('div', { class: 'cards two' },
      h('section', { class: 'card' }, h('h2', {}, 'Virtual machine'), dl([
        ['State', stateBadge(vm.state)],
        ['Activity', vm.activity || '—'],
        ['Guest type', vm.guest_type],
        ['vCPUs', String(vm.vcpus)],
        ['Memory', fmtMiB(vm.memory_mib)],
        ['Running on', running ? h('span', { id: 'vm-host' }, vm.host || (store.pm ? store.pm.hostname : 'this PM')) : (vm.host ? h('span', { class: 'muted' }, `— (starts on ${vm.host})`) : '—')],
        inUnit() ? ['Preferred PM', placement(vm, note)] : null,
        ['Redundancy', !inUnit() ? 'simplex: single PM, volumes not mirrored yet'
          : vm.redundancy_alert ? h('span', { class: 'health bad' }, vm.redundancy_alert)
            : running ? h('span', { class: 'health ok' }, 'redundant: its volumes are in sync on both PMs') : 'volumes mirrored on both PMs'],
        ['Boot', vm.kernel ? `direct kernel ${vm.kernel.kernel}${vm.kernel.initrd ? ` + ${vm.kernel.initrd}` : ''} "${vm.kernel.cmdline}"` : vm.cdrom ? `boot volume, CD ${vm.cdrom} inserted` : 'boot volume'],
        ['Hardware id', h('code', {}, vm.id)],
      ])),
      hostedElsewhere(vm) ? h('section', { class: 'card' }, h('h2', {}, 'Health (SPEC V7)'),
        h('p', {}, `${vm.name} runs on ${vm.host}: its system and instance checks run there. This console talks to ${thisPm()}, whose API does not report them.`),
        h('p', { class: 'small muted' }, 'Open the console of the PM running the VM to see its checks; alerts about the VM are raised there.'))
        : h('section', { class: 'card' }, h('h2', {}, 'Health (SPEC V7)'), dl([
        ['System check', running ? (hl.system_ok ? h('span', { class: 'health ok' }, 'QEMU runs and answers') : h('span', { class: 'health bad' }, 'QEMU does not answer')) : '—'],
        ['Instance check', guestHealth(vm)],
        ['Guest last answered', timeEl(hl.last_answer)],
        ['QEMU run state', hl.run_state || '—'],
        ['Paravirtual drivers', pv.length ? pv.map((d) => `${d.kind} ${d.driver_ok ? 'active' : 'NOT active'}`).join(', ') : 'not checked yet'],
        ['Crashes', `${vm.recent_crashes} in the last ${Math.round(vm.mtbf_window_secs / 60)} min (critical after more than ${vm.mtbf_max_failures})`],
        ['Last crash', vm.last_crash || '—'],
        ['Last dump', vm.last_dump || '—'],
        ['QEMU pid', vm.pid ? String(vm.pid) : '—'],
      ]))));
  };
  draw();
  return draw;
}

// ----------------------------------------------------------------- console

async function consoleTab(panel, get, ctx) {
  const vm0 = get();
  const status = h('span', { class: 'vnc-status', role: 'status', id: 'vnc-status' }, '');
  const screen = h('div', { class: 'vnc-screen', id: 'vnc-screen', 'aria-label': `Graphical console of ${vm0.name}` });
  const serial = h('pre', { class: 'serial', id: 'serial-log', role: 'log', tabindex: '0', 'aria-label': 'Serial console output' });
  const follow = h('input', { type: 'checkbox', id: 'serial-follow', checked: true });
  let rfb = null;
  let retry = null;
  let left = false;
  const setStatus = (t, kind = '') => {
    status.textContent = t;
    status.className = `vnc-status ${kind}`;
  };
  const canConsole = can('operate');
  const live = () => ['booting', 'running'].includes(get().state);

  async function connect() {
    if (left || rfb || !canConsole) return;
    if (!live()) {
      setStatus(`The VM is ${get().state}: the graphical console is available while it is booting or running. It connects by itself when the VM starts.`, 'muted');
      return;
    }
    setStatus('Connecting…');
    const { default: RFB } = await import('/ui/novnc/core/rfb.js');
    const { liveUrl } = await import('../api.js');
    if (left || rfb) return;
    rfb = new RFB(screen, liveUrl(`/vms/${enc(get().name)}/vnc`, { ws: true }), { wsProtocols: ['binary'] });
    rfb.scaleViewport = true;
    rfb.background = '#0b0d10';
    rfb.addEventListener('connect', () => setStatus('Connected — click the screen (or Tab to it) to type into the VM.', 'ok'));
    rfb.addEventListener('disconnect', (e) => {
      rfb = null;
      if (left) return;
      setStatus(e.detail.clean ? 'Disconnected.' : 'The console connection was lost.', 'warn');
      clearTimeout(retry);
      retry = setTimeout(connect, 2000);
    });
    rfb.addEventListener('securityfailure', (e) => setStatus(`VNC security failure: ${e.detail.reason || e.detail.status}`, 'bad'));
  }

  // Serial log in follow mode.
  let abort = null;
  let text = '';
  const MAX = 200 * 1024;
  const show = () => {
    serial.textContent = text;
    if (follow.checked) serial.scrollTop = serial.scrollHeight;
  };
  async function stream() {
    if (left || abort) return;
    abort = new AbortController();
    text = '';
    try {
      await (await import('../api.js')).followConsole(get().name, (chunk) => {
        // Drop terminal escape sequences and carriage returns.
        text += chunk.replace(/\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r/g, ''); // eslint-disable-line no-control-regex
        if (text.length > MAX) text = text.slice(text.length - MAX);
        show();
      }, abort.signal);
    } catch (e) {
      if (e.name !== 'AbortError') serial.textContent = `${text}\n[the log stream failed: ${e.message}]`;
    }
    abort = null;
    if (!left && follow.checked) setTimeout(stream, 2000);
  }
  follow.addEventListener('change', () => {
    if (follow.checked) stream();
    else if (abort) abort.abort();
  });

  mount(panel,
    h('section', { class: 'card' },
      h('div', { class: 'card-head' }, h('h2', {}, 'Graphical console'),
        h('div', { class: 'toolbar' },
          h('button', { type: 'button', class: 'btn small', id: 'vnc-cad', onclick: () => rfb && rfb.sendCtrlAltDel(), disabled: !canConsole }, 'Send Ctrl-Alt-Del'),
          h('button', { type: 'button', class: 'btn small', onclick: () => { if (rfb) rfb.disconnect(); else connect(); }, disabled: !canConsole }, 'Reconnect'),
          h('button', { type: 'button', class: 'btn small', onclick: () => screen.requestFullscreen && screen.requestFullscreen(), disabled: !canConsole }, 'Full screen'))),
      canConsole ? [status, screen] : h('p', { class: 'muted' }, `The graphical console ${roleNeeded('operate')} (SPEC V4 "console" operation). The serial log below is readable by everyone.`)),
    h('section', { class: 'card' },
      h('div', { class: 'card-head' }, h('h2', {}, 'Serial console log'),
        h('div', { class: 'toolbar' },
          h('label', { class: 'check' }, follow, ' Follow (stream new output, keep scrolled to the end)'),
          h('button', { type: 'button', class: 'btn small', onclick: () => { text = ''; show(); } }, 'Clear view'))),
      serial));

  ctx.onLeave(() => {
    left = true;
    clearTimeout(retry);
    if (rfb) rfb.disconnect();
    if (abort) abort.abort();
  });
  connect();
  stream();
  return () => {
    if (!rfb) {
      clearTimeout(retry);
      connect();
    }
  };
}

// ----------------------------------------------------------------- volumes

async function volumes(panel, get, ctx, errors) {
  // The volume chosen to attach but not attached yet: the tab redraws (a
  // state change seen by a refresh, a detach), which must not switch the
  // selector back to the first volume and attach another one.
  const pick = { name: undefined };
  const draw = async () => {
    const vm = get();
    const [all] = await Promise.all([api('GET', '/volumes')]);
    const mine = all.filter((v) => v.vm === vm.name).sort((a, b) => Number(b.boot) - Number(a.boot));
    const unattached = all.filter((v) => v.vm === 'none');
    if (!unattached.some((u) => u.name === pick.name)) pick.name = undefined;
    const adminReason = !can('administer') ? roleNeeded('administer') : vm.state !== 'stopped' ? `the VM must be stopped (it is ${vm.state})` : null;
    const act = async (fn) => {
      try {
        await fn();
        await refresh('vms');
        draw();
      } catch (e) {
        errors.show(e);
      }
    };
    mount(panel,
      table({
        caption: 'Volumes of the VM',
        columns: [
          { label: 'Name', value: (v) => v.name },
          { label: 'Role', value: (v) => (v.boot ? 'boot' : 'data') },
          { label: 'Size', value: (v) => fmtBytes(v.size_bytes), class: 'num' },
          { label: 'Allocated', value: (v) => fmtBytes(v.allocated_bytes), class: 'num' },
          { label: 'Storage group', value: (v) => v.group },
          { label: 'Sync', value: (v) => syncBadge(v.sync) },
          inUnit() ? { label: 'Primary PM', value: (v) => v.primary || '—' } : null,
          {
            label: 'Actions',
            value: (v) => (v.boot ? h('span', { class: 'muted small' }, 'the boot volume cannot be detached') : h('button', {
              class: 'btn small', 'aria-disabled': adminReason ? 'true' : null, title: adminReason ? `Detach: ${adminReason}` : 'Detach (the data is kept)',
              onclick: () => (adminReason ? toast(`Detach: ${adminReason}`, 'warn') : act(() => api('POST', `/volumes/${enc(v.name)}/detach`))),
            }, 'Detach')),
          },
        ],
        rows: mine,
        empty: emptyState('No volumes', 'This VM has no volume.'),
      }),
      h('div', { class: 'inline' },
        unattached.length
          ? [h('label', { for: 'attach-vol' }, 'Attach an unattached volume: '),
            h('select', { id: 'attach-vol', onchange: (e) => { pick.name = e.target.value; } },
              unattached.map((u) => h('option', { value: u.name, selected: u.name === pick.name }, `${u.name} (${fmtBytes(u.size_bytes)})`))),
            h('button', {
              class: 'btn small', 'aria-disabled': adminReason ? 'true' : null, title: adminReason ? `Attach: ${adminReason}` : null,
              onclick: () => (adminReason ? toast(`Attach: ${adminReason}`, 'warn') : act(async () => {
                await api('POST', `/volumes/${enc(panel.querySelector('#attach-vol').value)}/attach`, { vm: vm.name });
                pick.name = undefined;
              })),
            }, 'Attach')]
          : h('p', { class: 'muted small' }, 'No unattached volume to attach. New volumes can be added with Config.')));
  };
  await draw();
  return (changed) => changed && draw();
}

// ---------------------------------------------------------------- networks

function networks(panel, get) {
  const draw = () => {
    const vm = get();
    mount(panel, table({
      caption: 'Network interfaces',
      columns: [
        { label: '#', value: (n) => String(vm.nics.indexOf(n)), class: 'num' },
        { label: 'Network', value: (n) => (n.network === 'user' ? 'user (NAT on this PM)' : n.network) },
        { label: 'MAC address', value: (n) => h('code', {}, n.mac) },
      ],
      rows: vm.nics,
      empty: emptyState('No network interface', 'This VM has no network. Add one with Config (the VM must be stopped).'),
    }), h('p', { class: 'hint' }, 'MAC addresses stay the same across restarts and migrations. Change them with Config.'));
  };
  draw();
  return draw;
}

// ---------------------------------------------------------------------- cd

function cd(panel, get, ctx, errors) {
  const draw = () => {
    const vm = get();
    const reason = !can('operate') ? roleNeeded('operate') : !vm.allowed_operations.includes('insert/eject CD') ? `not allowed while ${vm.state}` : null;
    const act = async (fn) => {
      try {
        await fn();
        await refresh('vms');
      } catch (e) {
        errors.show(e);
      }
    };
    const insert = async () => {
      const vcds = await api('GET', '/vcds');
      if (!vcds.length) {
        toast('There is no virtual CD yet: add one on the Virtual CDs page.', 'warn');
        return;
      }
      const sel = h('select', {}, vcds.map((v) => h('option', { value: v.name }, v.name)));
      const choice = await dialog('Insert a virtual CD', (close) => h('form', { onsubmit: (e) => { e.preventDefault(); close(sel.value); } },
        field('Virtual CD', sel),
        h('div', { class: 'actions' }, h('button', { type: 'button', class: 'btn', onclick: () => close(null) }, 'Cancel'), h('button', { class: 'btn primary' }, 'Insert'))));
      if (choice) act(() => api('PUT', `/vms/${enc(vm.name)}/cd`, { vcd: choice }));
    };
    const btn = (label, fn) => h('button', {
      class: 'btn', 'aria-disabled': reason ? 'true' : null, title: reason ? `${label}: ${reason}` : null,
      onclick: () => (reason ? toast(`${label}: ${reason}`, 'warn') : fn()),
    }, label);
    mount(panel, h('section', { class: 'card' },
      h('h2', {}, 'CD drive'),
      dl([['Inserted', vm.cdrom ? vm.cdrom : h('span', { class: 'muted' }, 'empty')]]),
      h('div', { class: 'inline' }, btn('Insert…', insert), vm.cdrom ? btn('Eject', () => act(() => api('DELETE', `/vms/${enc(vm.name)}/cd`))) : null),
      h('p', { class: 'hint' }, 'Like a real drive, a CD can be inserted or ejected whether or not the VM runs. To start once from a CD, use Boot from CD.')));
  };
  draw();
  return draw;
}

// -------------------------------------------------------------- statistics

function statistics(panel, get) {
  const draw = () => {
    const vm = get();
    mount(panel, h('section', { class: 'card' },
      h('h2', {}, 'Statistics'),
      dl([
        ['vCPUs', String(vm.vcpus)],
        ['Memory', fmtMiB(vm.memory_mib)],
        ['Crashes in window', `${vm.recent_crashes} of at most ${vm.mtbf_max_failures} per ${Math.round(vm.mtbf_window_secs / 60)} min`],
      ]),
      h('p', { class: 'muted' }, 'CPU, memory, disk and network throughput over selectable time spans (SPEC A8) appear here when the statistics service exists.')));
  };
  draw();
  return draw;
}

// ------------------------------------------------------------------- audit

async function audit(panel, get) {
  const vm = get();
  const rows = (await api('GET', '/audit?limit=2000')).filter((r) => r.target === `vms/${vm.name}` || r.target.startsWith(`vms/${vm.name}/`));
  mount(panel, table({
    caption: 'Audit of this VM',
    columns: [
      { label: 'Time', value: (r) => timeEl(r.time) },
      { label: 'User', value: (r) => r.user },
      { label: 'Action', value: (r) => h('code', {}, r.action) },
      { label: 'Result', value: (r) => h('span', { class: r.result === 'ok' ? 'health ok' : 'health bad' }, r.result) },
    ],
    rows,
    empty: emptyState('Nothing recorded yet', 'Every change requested on this VM (who, what, when, result) appears here.'),
  }));
}
