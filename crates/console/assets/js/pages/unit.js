// The unit (SPEC U1, U2, U3, U5, U6, U7): both PMs with their states and
// the maintenance operations allowed in each, the heartbeat links with
// their round-trip times, quorum and lease, unit shutdown, and forcing
// quorum when this PM has lost its majority. Polled every 2 s (the unit
// has no events on the event stream).

import { api } from '../api.js';
import {
  h, mount, remount, stateBadge, emptyState, pageHeader, table, errorBox, confirmAction, toast, plural, fmtMs,
} from '../ui.js';
import { store, can, roleNeeded, refresh, inUnit, thisPm } from '../app.js';

export const help = 'unit';
const enc = encodeURIComponent;

/**
 * The maintenance operations (U3, U4) in the order of the SPEC. `always`
 * ones are shown in every state (disabled with the reason when not
 * allowed); the others only when the PM's state allows them.
 */
const PM_OPS = [
  { op: 'work on', label: 'Work On…', always: true },
  { op: 'finalize', label: 'Finalize', always: true },
  { op: 'shutdown', label: 'Shut down…', always: true },
  { op: 'power off', label: 'Power off…', always: true, danger: true },
  { op: 'reset device', label: 'Reset device' },
  { op: 'power on', label: 'Power on', unavailable: 'the machine is off: power it on (power button or BMC); its daemon rejoins the unit in maintenance' },
  { op: 'recover', label: 'Recover…', unavailable: 'recovery (re-imaging a PM) is not offered by this version\'s API yet' },
  { op: 'replace', label: 'Replace…', unavailable: 'replacing a PM is not offered by this version\'s API yet' },
];

function pmWhyNot(pm, o) {
  if (!can('administer')) return roleNeeded('administer');
  if (!pm.allowed_operations.includes(o.op)) {
    const allowed = pm.allowed_operations.length ? pm.allowed_operations.join(', ') : 'nothing';
    return `not allowed while ${pm.state}; allowed now: ${allowed}`;
  }
  if (o.unavailable) return o.unavailable;
  return null;
}

const partnerOf = (name) => (store.pms.find((p) => p.name !== name) || {}).name || 'the partner';

/** Runs a PM operation after the confirmations it needs; throws ApiError. */
async function runPmOp(pm, o) {
  const path = `/pms/${enc(pm.name)}`;
  switch (o.op) {
    case 'work on': {
      const partner = partnerOf(pm.name);
      const text = pm.vms.length
        ? `Its ${plural(pm.vms.length, 'VM')} (${pm.vms.join(', ')}) move to ${partner} by live migration, one at a time; then ${pm.name} is in maintenance: it runs no VM and may be shut down, serviced and finalized. Progress shows on this page.`
        : `${pm.name} runs no VM: it goes into maintenance at once. In maintenance it runs no VM and may be shut down, serviced and finalized.`;
      if (!(await confirmAction({ title: `Work On ${pm.name}?`, text, confirmLabel: 'Work On', danger: false }))) return false;
      try {
        await api('POST', `${path}/work-on`, { confirm: false });
      } catch (e) {
        // U3: with the partner unable to take the VMs, the unit asks to
        // confirm shutting them down instead.
        if (!(e.status === 409 && (e.code === 'confirmation_required' || /\bconfirm\b/i.test(e.message)))) throw e;
        const ok = await confirmAction({
          title: `Shut down the VMs of ${pm.name}?`,
          text: e.message,
          extra: h('p', { class: 'danger-text' }, 'The VMs are shut down (guest shutdown, then power off after the timeout) instead of moved: they stop running until you start them again.'),
          confirmLabel: 'Shut down the VMs and Work On',
        });
        if (!ok) return false;
        await api('POST', `${path}/work-on`, { confirm: true });
      }
      toast(`Work On ${pm.name} started`);
      return true;
    }
    case 'finalize':
      await api('POST', `${path}/finalize`);
      toast(`${pm.name} is back in service; VMs that prefer it move back once in sync`);
      return true;
    case 'shutdown':
      if (!(await confirmAction({
        title: `Shut down ${pm.name}?`,
        text: `${pm.name} stops (its daemon and, on real hardware, the machine). It is refused while ${partnerOf(pm.name)} resynchronises from it. The unit runs on ${partnerOf(pm.name)} alone, without redundancy, until ${pm.name} is back.`,
        confirmLabel: 'Shut down PM',
      }))) return false;
      await api('POST', `${path}/shutdown`);
      toast(`${pm.name} is shutting down`);
      return true;
    case 'power off':
      if (!(await confirmAction({
        title: `Power off ${pm.name}?`,
        text: `${pm.name} is switched off at once, without an orderly shutdown — use it when Shut down does not work. It is refused while ${partnerOf(pm.name)} resynchronises from it.`,
        confirmLabel: 'Power off PM',
      }))) return false;
      await api('POST', `${path}/poweroff`);
      toast(`${pm.name} is powered off`);
      return true;
    case 'reset device':
      await api('POST', `${path}/reset-device`);
      toast(`${pm.name}: failure counter cleared, back in service`);
      return true;
    default:
      return false;
  }
}

/**
 * The PMs of the unit as cards: state, reachability, VMs, progress and the
 * operation buttons. `onError(err)` shows a refusal; `onDone()` reloads.
 */
export function pmCards({ onError, onDone }) {
  if (!store.pms.length) return emptyState('Loading the PMs…', '');
  return h('div', { class: 'cards two', id: 'pm-cards' }, [...store.pms].sort((a, b) => a.name.localeCompare(b.name)).map((pm) => {
    const state = pm.reachable ? pm.state : 'unreachable';
    return h('section', { class: 'card pm-card', 'data-pm': pm.name, 'data-state': pm.state, 'aria-labelledby': `pm-h-${pm.name}` },
      h('div', { class: 'card-head' },
        h('h2', { id: `pm-h-${pm.name}` }, pm.name, pm.this_pm ? h('span', { class: 'tag', title: 'This console talks to this PM' }, 'this PM') : null),
        h('span', { class: 'pm-state' }, stateBadge(pm.state)),
      ),
      h('dl', { class: 'props' },
        h('dt', {}, 'Heartbeats'), h('dd', {}, pm.this_pm ? 'this PM' : pm.reachable
          ? h('span', { class: 'health ok' }, 'heard on at least one link')
          : h('span', { class: 'health bad' }, stateBadge(state), ' not heard on any link: the state shown is the last one recorded')),
        h('dt', {}, 'VMs'), h('dd', {}, pm.vms.length ? pm.vms.map((v, i) => [i ? ', ' : '', h('a', { href: `#/vms/${enc(v)}` }, v)]) : h('span', { class: 'muted' }, 'none')),
        h('dt', {}, 'Progress'), h('dd', { class: 'pm-progress' }, pm.progress || h('span', { class: 'muted' }, pm.state === 'evacuating' ? 'starting…' : '—'))),
      h('div', { class: 'ops', role: 'toolbar', 'aria-label': `Operations on ${pm.name}` },
        PM_OPS.filter((o) => o.always || pm.allowed_operations.includes(o.op)).map((o) => {
          const reason = pmWhyNot(pm, o);
          return h('button', {
            type: 'button',
            class: `btn ${o.danger ? 'danger-outline' : ''}`,
            'data-pm-op': o.op,
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
                if (await runPmOp(pm, o)) onDone();
              } catch (err) {
                onError(err);
              } finally {
                btn.classList.remove('working');
              }
            },
          }, o.label);
        })));
  }));
}

// ------------------------------------------------------------------ pieces

function nodeName(unit, id) {
  const pm = (unit.pms || []).find((p) => p.node_id === id);
  if (pm) return pm.name;
  const m = ((unit.metrics && unit.metrics.members) || []).find((x) => x.id === id);
  if (m && m.info && m.info.role === 'witness') return 'witness';
  return `node ${id}`;
}

/**
 * Whether this PM has a majority. The Raft view names a leader even on an
 * isolated leader, so a leader that has not heard a majority for 5 s (the
 * unit's lease is shorter) counts as none.
 */
export function hasQuorum(unit) {
  const m = unit && unit.metrics;
  if (!m || !m.leader) return false;
  if (m.leader === m.node_id && m.millis_since_quorum_ack !== null && m.millis_since_quorum_ack !== undefined && m.millis_since_quorum_ack > 5000) return false;
  return true;
}

function quorumCard(unit) {
  const m = unit.metrics || {};
  const members = m.members || [];
  const power = unit.power || { power: 'running' };
  const powerText = { running: 'running', shutting_down: 'shutting down', off: 'off' }[power.power] || power.power;
  return h('section', { class: 'card', 'aria-labelledby': 'unit-h' },
    h('h2', { id: 'unit-h' }, `Unit ${unit.name}`),
    h('dl', { class: 'props' },
      h('dt', {}, 'Power'), h('dd', { id: 'unit-power', 'data-power': power.power }, stateBadge(power.power === 'running' ? 'running' : power.power, powerText !== power.power ? powerText : null),
        power.progress ? h('span', { class: 'small' }, ` ${power.progress}`) : null,
        power.restart_vms && power.restart_vms.length ? h('div', { class: 'small muted' }, `Started again at unit start: ${power.restart_vms.join(', ')}`) : null),
      h('dt', {}, 'Quorum'), h('dd', { id: 'unit-quorum', 'data-quorum': String(hasQuorum(unit)) }, hasQuorum(unit)
        ? [h('span', { class: 'health ok' }, 'yes'), ` — leader ${nodeName(unit, m.leader)}, term ${m.term}`]
        : [h('span', { class: 'health bad' }, 'no: this PM cannot reach a majority of the voters'),
          m.leader && m.leader === m.node_id ? h('span', { class: 'small muted' }, ` (it was the leader; a majority last answered ${fmtMs(m.millis_since_quorum_ack)} ago)`) : null]),
      h('dt', {}, 'Lease'), h('dd', { id: 'unit-lease', 'data-lease': String(Boolean(unit.holds_lease)) }, unit.holds_lease
        ? h('span', { class: 'health ok' }, `${thisPm()} holds its lease: it may run VMs and write alone if the partner fails`)
        : h('span', { class: 'health bad' }, `${thisPm()} does not hold its lease: it stops its VMs rather than risk running them twice`)),
      h('dt', {}, 'Voters'), h('dd', {}, members.length
        ? members.map((x, i) => [i ? ', ' : '', `${nodeName(unit, x.id)}${x.voter ? '' : ' (learner)'}${x.id === unit.node_id ? ' (this PM)' : ''}`])
        : '—')));
}

function linksCard(unit) {
  const hl = unit.health;
  const links = hl ? hl.links : [];
  const warnings = links.filter((l) => l.warning);
  return h('section', { class: 'card', 'aria-labelledby': 'hb-h' },
    h('h2', { id: 'hb-h' }, 'Heartbeat links', warnings.length ? h('span', { class: 'count warn' }, String(warnings.length)) : null),
    hl ? [
      table({
        caption: 'Heartbeat links to the partner',
        columns: [
          { label: 'Link', value: (l) => h('strong', {}, l.name) },
          { label: 'State', value: (l) => h('span', { class: `badge ${l.up ? 'ok' : 'bad'}`, 'data-link-up': String(l.up) }, h('span', { class: 'dot', 'aria-hidden': 'true' }), l.up ? 'up' : 'down') },
          { label: 'Round trip', value: (l) => (l.rtt_ms === null || l.rtt_ms === undefined ? '—' : `${l.rtt_ms < 10 ? l.rtt_ms.toFixed(2) : l.rtt_ms.toFixed(0)} ms`), class: 'num' },
          { label: 'Last heard', value: (l) => (l.last_heard_ms === null || l.last_heard_ms === undefined ? 'never' : `${fmtMs(l.last_heard_ms)} ago`), class: 'num' },
          {
            label: 'Notes',
            value: (l) => [
              l.warning ? h('div', { class: 'health bad link-warning' }, l.warning) : null,
              l.faults && (l.faults.cut || l.faults.delay_ms) ? h('div', { class: 'small muted' }, `fault injected: ${l.faults.cut ? 'cut' : ''}${l.faults.delay_ms ? ` delay ${l.faults.delay_ms} ms` : ''}`) : null,
              !l.warning && !(l.faults && (l.faults.cut || l.faults.delay_ms)) ? h('span', { class: 'muted' }, '—') : null,
            ],
          },
        ],
        rows: links,
        empty: emptyState('No links', 'No heartbeat link is configured.'),
        rowAttrs: (l) => ({ 'data-link': l.name }),
      }),
      h('p', { class: 'small' }, hl.partner_lost
        ? h('span', { class: 'health bad' }, `The partner is lost: not heard on any link${hl.partner_silent_ms !== null && hl.partner_silent_ms !== undefined ? ` for ${fmtMs(hl.partner_silent_ms)}` : ''}.`)
        : `Partner last heard ${fmtMs(hl.partner_silent_ms)} ago. A round trip above 10 ms is reported (U7): it slows every mirrored write.`),
    ] : emptyState('No partner yet', 'Heartbeats start when the second PM has joined.'));
}

/** The U6 panel: preview of forcing quorum here, then a confirmation. */
function forceQuorumPanel(preview, previewErr, onForce, ticked) {
  const admin = can('administer');
  const confirmBox = h('input', { type: 'checkbox', id: 'fq-checked', checked: ticked.value, onchange: (e) => { ticked.value = e.target.checked; } });
  return h('section', { class: 'card danger-card', id: 'force-quorum', 'aria-labelledby': 'fq-h' },
    h('h2', { id: 'fq-h' }, `No quorum: ${thisPm()} cannot reach a majority`),
    h('p', {}, 'This PM cannot reach a majority of the unit\'s voters (both PMs and the witness), so it decides nothing alone: it does not start the partner\'s VMs by itself. If the partner really is down (not merely cut off from this PM), you can force quorum here so that this PM takes over.'),
    !admin ? h('p', { class: 'muted' }, `Forcing quorum ${roleNeeded('administer')}.`)
      : previewErr ? errorBox(previewErr)
        : !preview ? h('p', { class: 'muted' }, 'Loading what forcing would mean…')
          : [
            h('p', {}, h('strong', {}, 'Effect: '), preview.effect),
            h('p', { class: 'small' }, `Partner last heard: ${preview.partner_silent_ms === null || preview.partner_silent_ms === undefined ? 'never' : `${fmtMs(preview.partner_silent_ms)} ago`} · ${preview.pm} ${preview.holds_lease ? 'holds' : 'does not hold'} its lease.`),
            h('h3', {}, 'What this PM\'s replicas hold'),
            table({
              caption: 'Replicas on this PM',
              columns: [
                { label: 'Volume', value: (r) => h('strong', {}, r.volume) },
                { label: 'Recorded primary', value: (r) => `${r.recorded_primary} (epoch ${r.recorded_epoch})` },
                { label: 'Here', value: (r) => `${r.role}, ${r.sync}${r.consistent ? '' : ', INCOMPLETE'}` },
                { label: 'Verdict', value: (r) => h('span', { class: /INCOMPLETE|behind|no replica/.test(r.verdict) ? 'health bad' : '' }, r.verdict) },
              ],
              rows: preview.replicas,
              empty: emptyState('No mirrored volume', 'This PM holds no replica.'),
              rowAttrs: (r) => ({ 'data-replica': r.volume }),
            }),
            h('label', { class: 'check' }, confirmBox, ` I have checked the replicas above (and the partner's, if it still answers): ${preview.pm} holds the data to keep.`),
            h('div', { class: 'actions' },
              h('button', {
                type: 'button', class: 'btn danger', id: 'force-quorum-btn',
                onclick: () => {
                  if (!confirmBox.checked) {
                    toast('Tick the box first: forcing quorum can discard the partner\'s latest writes.', 'warn');
                    confirmBox.focus();
                    return;
                  }
                  onForce(preview);
                },
              }, `Force quorum on ${preview.pm}…`)),
          ]);
}

// -------------------------------------------------------------------- page

export async function render(main, ctx) {
  const errSlot = h('div', { id: 'unit-error' });
  const body = h('div', {});
  const shutdownBtn = h('button', { type: 'button', class: 'btn danger-outline', id: 'unit-shutdown' }, 'Shut down unit…');
  mount(main, pageHeader('Unit', 'Both physical machines, the links between them, quorum and the unit\'s power.', shutdownBtn), errSlot, body);
  const showError = (e) => mount(errSlot, errorBox(e));

  let preview = null;
  let previewErr = null;
  let previewAt = 0;
  let noQuorumPolls = 0;
  const ticked = { value: false };

  const reload = async () => {
    await refresh('unit');
    await refresh('pms');
  };
  const loadPreview = async () => {
    if (!can('administer')) return;
    previewAt = Date.now();
    try {
      preview = await api('GET', '/unit/force-quorum');
      previewErr = null;
    } catch (e) {
      previewErr = e;
    }
    draw();
  };

  async function force(p) {
    const ok = await confirmAction({
      title: `Force quorum on ${p.pm}?`,
      text: p.effect,
      extra: h('p', { class: 'danger-text' }, 'Do this only when the partner is really down. If it is still running cut off from this PM, both could run the same VMs.'),
      confirmLabel: 'Force quorum',
    });
    if (!ok) return;
    try {
      await api('POST', '/unit/force-quorum', { confirm: true });
      mount(errSlot);
      toast(`Quorum forced on ${p.pm}: it takes over the partner's VMs once the partner's lease has expired`);
      preview = null;
      await reload();
    } catch (e) {
      showError(e);
    }
  }

  shutdownBtn.addEventListener('click', async () => {
    const unit = store.unit;
    const reason = !can('administer') ? roleNeeded('administer')
      : !inUnit() ? 'this PM is not in a unit'
        : unit.power && unit.power.power !== 'running' ? `the unit is ${unit.power.power.replace('_', ' ')}` : null;
    if (reason) {
      toast(`Shut down unit: ${reason}`, 'warn');
      return;
    }
    const running = store.vms.filter((v) => ['booting', 'running'].includes(v.state)).map((v) => v.name);
    const ok = await confirmAction({
      title: `Shut down unit ${unit.name}?`,
      text: `Every VM is shut down (guest shutdown, then power off after its shutdown timeout), then both PMs stop. ${running.length ? `The ${plural(running.length, 'VM')} running now (${running.join(', ')}) start again when the unit is started.` : 'No VM is running.'}`,
      extra: h('p', { class: 'danger-text' }, 'The console stops answering when the PMs are down. Start the unit by powering both machines on.'),
      confirmLabel: 'Shut down unit',
    });
    if (!ok) return;
    try {
      await api('POST', '/unit/shutdown');
      mount(errSlot);
      toast('Unit shutdown started: VMs first, then both PMs');
      await reload();
    } catch (e) {
      showError(e);
    }
  });

  function draw() {
    const unit = store.unit;
    if (!unit) {
      mount(body, emptyState('Loading…', ''));
      return;
    }
    if (!inUnit()) {
      shutdownBtn.hidden = true;
      remount(body, h('section', { class: 'card', id: 'no-unit' },
        h('h2', {}, 'This PM is not in a unit yet'),
        h('p', {}, 'A unit is two PMs and a witness: VMs run on one PM with their disks mirrored on both, and move or restart on the partner through maintenance and failures.'),
        h('p', {}, 'Found the unit on one PM with ', h('code', {}, 'pairvisor unit init NAME'), ', issue join tokens with ', h('code', {}, 'pairvisor unit join-token'), ' (and ', h('code', {}, '--witness'), '), and join with ', h('code', {}, 'pairvisor unit join TOKEN'), ' on the partner and the witness. This daemon must run with ', h('code', {}, '--unit-listen'), '.'),
        h('p', { class: 'muted small' }, unit.enabled === false ? 'This daemon runs without a unit listener.' : '')));
      return;
    }
    const power = unit.power || { power: 'running' };
    const sdReason = !can('administer') ? roleNeeded('administer') : power.power !== 'running' ? `the unit is ${power.power.replace('_', ' ')}` : null;
    shutdownBtn.hidden = false;
    shutdownBtn.setAttribute('aria-disabled', sdReason ? 'true' : 'false');
    shutdownBtn.title = sdReason ? `Shut down unit: ${sdReason}` : 'Shut down every VM, then both PMs (U5)';
    const noQuorum = noQuorumPolls >= 2;
    if (noQuorum && can('administer') && Date.now() - previewAt > 5000) loadPreview();
    if (!noQuorum) ticked.value = false;
    remount(body,
      noQuorum ? forceQuorumPanel(preview, previewErr, force, ticked) : null,
      h('div', { class: 'cards two' }, quorumCard(unit), linksCard(unit)),
      h('h2', { class: 'section-title' }, 'Physical machines'),
      pmCards({ onError: showError, onDone: () => { mount(errSlot); reload(); } }),
      h('p', { class: 'small muted' }, 'Work On moves a PM\'s VMs to its partner by live migration and puts it in maintenance; Finalize returns it to service (VMs that prefer it move back once their volumes are in sync). A PM in maintenance may be shut down or powered off, except while its partner resynchronises from it. Resources of this PM: ', h('a', { href: '#/pms' }, 'Physical Machines'), '.'));
  }

  const tick = async () => {
    await reload();
    noQuorumPolls = inUnit() && !hasQuorum(store.unit) ? noQuorumPolls + 1 : 0;
    draw();
  };
  const timer = setInterval(() => {
    if (document.visibilityState === 'visible') tick();
  }, 2000);
  ctx.onLeave(() => clearInterval(timer));
  ctx.on('vms', draw);
  await tick();
}
