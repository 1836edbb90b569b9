// Live migration (SPEC M1–M4): the Migrate dialog (options and a pre-flight
// estimate), and the migration panel that follows GET /vms/{name}/migration
// every second: RAM copied, bandwidth, dirty rate, the verdict in plain
// words, the remedies that apply, cancel, and the downtime at the end.

import { api } from './api.js';
import {
  h, mount, remount, dialog, field, errorBox, confirmAction, toast, fmtBytes, fmtRate, fmtSecs, fmtMs, progressBar,
} from './ui.js';
import { store, can, roleNeeded, refresh, refreshAll, partnerPm } from './app.js';

const enc = encodeURIComponent;

const PHASES = {
  prepare: 'preparing the destination',
  ready: 'destination ready',
  copying: 'copying memory',
  switchover: 'switching over',
  done: 'done',
  failed: 'failed',
};

const ACTIVE = ['prepare', 'ready', 'copying', 'switchover'];

/** Whether a migration view is still running. */
export function migrationActive(m) {
  return Boolean(m && ACTIVE.includes(m.phase));
}

/** The PM a VM would migrate to: the other PM of the unit. */
export function destinationOf(vm) {
  const other = store.pms.find((p) => p.name !== vm.host);
  return other ? other.name : partnerPm() || 'the partner PM';
}

/**
 * Asks for the migration options (with a pre-flight estimate on request)
 * and starts the migration. Resolves to the MigrationView, or null if
 * cancelled. Throws the API's refusal.
 */
export async function openMigrate(vm) {
  const s = store.settings || {};
  const dest = destinationOf(vm);
  const downtime = h('input', { type: 'number', min: 1, max: 60000, step: 1, class: 'num', id: 'mig-downtime', value: s.migration_max_downtime_ms || 300 });
  const bandwidth = h('input', { type: 'number', min: 0, max: 100000, step: 1, class: 'num', id: 'mig-bandwidth', value: s.migration_bandwidth_mbps || 0 });
  const autoConv = h('input', { type: 'checkbox', id: 'mig-autoconverge' });
  const estSlot = h('div', { id: 'mig-estimate', role: 'status' });
  const errSlot = h('div', { id: 'mig-error' });
  const body = () => {
    const b = { max_downtime_ms: Number(downtime.value), bandwidth_mbps: Number(bandwidth.value) };
    if (autoConv.checked) b.auto_converge = true;
    return b;
  };
  const estimate = async (btn) => {
    btn.classList.add('working');
    mount(estSlot, h('p', { class: 'muted' }, 'Measuring the guest\'s dirty rate (one second)…'));
    try {
      const e = await api('POST', `/vms/${enc(vm.name)}/migration/estimate`, body());
      mount(estSlot, h('div', { class: `verdict ${e.verdict.verdict}` },
        h('strong', {}, verdictHeadline(e.verdict)), ' ', verdictText(e.verdict),
        h('div', { class: 'small' }, `Guest RAM ${fmtBytes(e.ram_bytes)}, dirtied at ${fmtRate(e.dirty_rate_bps)}; link assumed ${fmtRate(e.bandwidth_bps)}; first pass about ${fmtSecs(e.first_pass_secs)}.`)));
    } catch (ex) {
      mount(estSlot, errorBox(ex));
    } finally {
      btn.classList.remove('working');
    }
  };
  return dialog(`Migrate ${vm.name} to ${dest}`, (close) => h('form', {
    onsubmit: async (e) => {
      e.preventDefault();
      const submit = e.submitter || e.target.querySelector('button[type=submit]');
      if (submit) submit.disabled = true;
      try {
        const m = await api('POST', `/vms/${enc(vm.name)}/migrate`, body());
        close(m);
      } catch (ex) {
        mount(errSlot, errorBox(ex));
      } finally {
        if (submit) submit.disabled = false;
      }
    },
  },
  h('p', {}, `${vm.name} keeps running while its memory is copied to ${dest} (live migration, pre-copy); it pauses only for the final switch-over. Its disks are already mirrored on both PMs.`),
  h('div', { class: 'grid3' },
    field('Maximum downtime (ms)', downtime, 'The longest pause allowed at switch-over (unit default in Preferences).'),
    field('Bandwidth cap (MB/s)', bandwidth, '0 = unlimited.'),
    h('div', { class: 'field' }, h('label', { class: 'check' }, autoConv, ' Auto-converge'), h('div', { class: 'hint' }, 'Throttle the guest\'s vCPUs if it dirties memory faster than it can be sent.'))),
  estSlot,
  errSlot,
  h('div', { class: 'actions' },
    h('button', { type: 'button', class: 'btn', id: 'mig-estimate-btn', onclick: (e) => estimate(e.currentTarget) }, 'Estimate first'),
    h('span', { class: 'spacer' }),
    h('button', { type: 'button', class: 'btn', onclick: () => close(null) }, 'Cancel'),
    h('button', { type: 'submit', class: 'btn primary', id: 'mig-start' }, `Migrate to ${dest}`))), { wide: true });
}

function verdictHeadline(v) {
  if (!v) return 'Measuring:';
  return { converging: 'Converging:', not_converging: 'Not converging:', unknown: 'Measuring:' }[v.verdict] || `${v.verdict}:`;
}

/** The M2 verdict in plain words. */
function verdictText(v) {
  if (!v || v.verdict === 'unknown') return 'not enough figures yet (no bandwidth measured) to say whether it will finish.';
  if (v.verdict === 'converging') {
    const eta = v.eta_secs > 0.5 ? `in about ${fmtSecs(v.eta_secs)}` : 'now';
    const pause = v.expected_downtime_ms >= 1 ? `a pause of about ${fmtMs(v.expected_downtime_ms)}` : 'a pause well within the maximum downtime';
    return `memory is sent faster than the guest dirties it, so it will switch over ${eta}, with ${pause}.`;
  }
  if (v.verdict === 'not_converging') return v.explanation;
  return '';
}

const REMEDIES = {
  raise_downtime: { label: 'Raise the maximum downtime…', text: 'Allow a longer pause at switch-over so that what remains can be sent in it.' },
  auto_converge: { label: 'Throttle the guest (auto-converge)', text: 'Slow the guest\'s vCPUs until it dirties memory slower than the link sends it.' },
  post_copy: { label: 'Switch to post-copy…', text: 'Run the VM on the destination now and fetch its remaining memory on demand: it always finishes, the guest is slow until its pages arrive, and a link failure meanwhile kills the VM.' },
  pause_and_finish: { label: 'Pause and finish…', text: 'Pause the VM and finish as a non-live migration: the pause lasts until the remaining memory is copied.' },
};

async function applyRemedy(vmName, m, remedy) {
  const body = { remedy };
  if (remedy === 'raise_downtime') {
    const suggested = Math.ceil(((m.ram_remaining_bytes || 0) / Math.max(m.bandwidth_bps || 1, 1)) * 1000 * 1.2);
    const input = h('input', { type: 'number', min: 1, max: 60000, step: 1, class: 'num', id: 'remedy-downtime', value: Math.max(suggested, (m.max_downtime_ms || 300) + 1) });
    const v = await dialog('Raise the maximum downtime', (close) => h('form', { onsubmit: (e) => { e.preventDefault(); close(Number(input.value)); } },
      h('p', {}, `Now ${fmtMs(m.max_downtime_ms)}. With ${fmtBytes(m.ram_remaining_bytes)} left at ${fmtRate(m.bandwidth_bps)}, about ${fmtMs(suggested / 1.2)} is needed now (suggested: that plus 20 %). The guest pauses that long at switch-over.`),
      field('New maximum downtime (ms)', input),
      h('div', { class: 'actions' }, h('button', { type: 'button', class: 'btn', onclick: () => close(null) }, 'Cancel'), h('button', { class: 'btn primary' }, 'Raise downtime'))));
    if (!v) return null;
    body.downtime_ms = v;
  } else if (remedy === 'post_copy' || remedy === 'pause_and_finish') {
    const ok = await confirmAction({
      title: remedy === 'post_copy' ? `Switch ${vmName} to post-copy?` : `Pause ${vmName} and finish?`,
      text: REMEDIES[remedy].text,
      confirmLabel: remedy === 'post_copy' ? 'Switch to post-copy' : 'Pause and finish',
    });
    if (!ok) return null;
  }
  return api('POST', `/vms/${enc(vmName)}/migration/remedy`, body);
}

/**
 * The migration panel of a VM, following GET /vms/{name}/migration: every
 * second while one runs, every 5 s otherwise (a migration may be started
 * elsewhere: Work On, the CLI, the other PM's console). Returns
 * {el, start(view), stop()}. `onEnd(view)` is called when one finishes.
 */
export function migrationPanel(vmName, { onEnd, showId } = {}) {
  const el = h('section', { class: 'card migration', id: 'migration', 'aria-live': 'polite', hidden: true });
  let view = null;
  let timer = null;
  let stopped = false;
  let dismissedId = null;
  let seenActive = false;
  let err = null;

  const schedule = () => {
    clearTimeout(timer);
    if (stopped) return;
    timer = setTimeout(poll, migrationActive(view) ? 1000 : 5000);
  };

  async function poll() {
    try {
      const m = await api('GET', `/vms/${enc(vmName)}/migration`);
      const wasActive = migrationActive(view);
      view = m;
      err = null;
      if (migrationActive(m)) seenActive = true;
      if (wasActive && !migrationActive(m)) {
        refreshAll();
        if (onEnd) onEnd(m);
      }
    } catch (e) {
      if (e.status === 404) view = null;
      else err = e;
    }
    draw();
    schedule();
  }

  function act(fn) {
    return async (e) => {
      const btn = e.currentTarget;
      btn.classList.add('working');
      try {
        const r = await fn();
        if (r) {
          view = r;
          err = null;
        }
      } catch (ex) {
        err = ex;
      } finally {
        btn.classList.remove('working');
      }
      draw();
      schedule();
    };
  }

  function draw() {
    const m = view;
    // Past migrations show only once seen running here (or just started).
    if (!m || (!migrationActive(m) && !seenActive && m.id !== showId) || m.id === dismissedId) {
      el.hidden = !err;
      remount(el, err ? errorBox(err) : null);
      return;
    }
    el.hidden = false;
    const active = migrationActive(m);
    const operate = can('operate');
    const reason = operate ? null : roleNeeded('operate');
    const total = m.ram_total_bytes || 0;
    const copied = total ? (total - m.ram_remaining_bytes) / total : 0;
    const phaseCls = m.phase === 'done' ? 'ok' : m.phase === 'failed' ? 'bad' : 'busy';
    const v = m.verdict;
    remount(el,
      h('div', { class: 'card-head' },
        h('h2', {}, `Migration of ${m.vm}: ${m.source} → ${m.dest}`),
        h('span', { class: `badge ${phaseCls}`, id: 'migration-phase', 'data-phase': m.phase }, h('span', { class: 'dot', 'aria-hidden': 'true' }), PHASES[m.phase] || m.phase)),
      active || m.phase === 'done' ? progressBar(m.phase === 'done' ? 1 : copied,
        total
          ? `RAM: ${fmtBytes(total - m.ram_remaining_bytes)} of ${fmtBytes(total)} copied, ${fmtBytes(m.ram_remaining_bytes)} to go · ${fmtBytes(m.ram_transferred_bytes)} sent in ${m.passes} ${m.passes === 1 ? 'pass' : 'passes'}`
          : 'RAM: the copy has not started yet',
        { id: 'migration-progress', cls: m.phase === 'done' ? 'ok' : 'busy' }) : null,
      h('dl', { class: 'props migration-figures' },
        h('dt', {}, 'Bandwidth'), h('dd', { id: 'migration-bandwidth' }, fmtRate(m.bandwidth_bps)),
        h('dt', {}, 'Dirty rate'), h('dd', { id: 'migration-dirty' }, fmtRate(m.dirty_rate_bps),
          m.preflight_dirty_rate_bps ? h('span', { class: 'small muted' }, ` (pre-flight ${fmtRate(m.preflight_dirty_rate_bps)})`) : null),
        h('dt', {}, 'Maximum downtime'), h('dd', {}, fmtMs(m.max_downtime_ms),
          active && m.expected_downtime_ms !== null && m.expected_downtime_ms !== undefined ? h('span', { class: 'small muted' }, ` (QEMU expects ${fmtMs(m.expected_downtime_ms)} if it switched now)`) : null),
        m.cpu_throttle_percent ? [h('dt', {}, 'Guest throttled'), h('dd', {}, `${m.cpu_throttle_percent} % (auto-converge)`)] : null,
        h('dt', {}, 'Elapsed'), h('dd', {}, fmtSecs(m.elapsed_secs)),
        h('dt', {}, 'Stream'), h('dd', { id: 'migration-stream', 'data-encrypted': m.encrypted ? 'true' : 'false' },
          m.encrypted ? 'encrypted (TLS, unit certificates)' : 'not encrypted')),
      active ? h('div', { class: `verdict ${v ? v.verdict : 'unknown'}`, id: 'migration-verdict', 'data-verdict': v ? v.verdict : 'unknown' },
        h('strong', {}, verdictHeadline(v)), ' ', verdictText(v)) : null,
      active && m.remedies.length ? h('div', { class: 'remedies' },
        h('h3', {}, 'Remedies'),
        h('ul', { class: 'remedy-list' }, m.remedies.map((r) => h('li', {},
          h('button', {
            type: 'button', class: `btn small ${r === 'post_copy' || r === 'pause_and_finish' ? 'danger-outline' : ''}`, 'data-remedy': r,
            'aria-disabled': reason ? 'true' : null, title: reason || null,
            onclick: reason ? () => toast(`${(REMEDIES[r] || { label: r }).label}: ${reason}`, 'warn') : act(() => applyRemedy(m.vm, m, r)),
          }, (REMEDIES[r] || { label: r }).label),
          ' ', h('span', { class: 'small muted' }, (REMEDIES[r] || { text: '' }).text))))) : null,
      m.phase === 'done' ? h('p', { class: 'migration-result', id: 'migration-result' },
        h('strong', {}, 'Done. '), `${m.vm} runs on ${m.dest}. Downtime at switch-over (paused on ${m.source} until resumed on ${m.dest}): `,
        h('strong', { id: 'migration-downtime', 'data-ms': m.downtime_ms }, fmtMs(m.downtime_ms)),
        m.qemu_downtime_ms !== null && m.qemu_downtime_ms !== undefined ? ` (QEMU's own figure: ${fmtMs(m.qemu_downtime_ms)})` : '',
        `; the whole migration took `, h('strong', { id: 'migration-total', 'data-ms': m.total_ms }, fmtMs(m.total_ms)), '.') : null,
      m.phase === 'failed' ? h('div', { class: 'alert error', role: 'alert', id: 'migration-failed' },
        h('strong', {}, m.status === 'cancelled' ? 'The migration was cancelled: ' : 'The migration failed: '),
        h('span', { class: 'server-message' }, m.error || 'no reason given'), `. ${m.vm} stays on ${m.source}.`) : null,
      err ? errorBox(err) : null,
      h('div', { class: 'actions' },
        active && ['prepare', 'ready', 'copying'].includes(m.phase) ? h('button', {
          type: 'button', class: 'btn danger-outline', id: 'migration-cancel', 'aria-disabled': reason ? 'true' : null, title: reason || null,
          onclick: reason ? () => toast(`Cancel: ${reason}`, 'warn') : act(async () => {
            const ok = await confirmAction({ title: `Cancel the migration of ${m.vm}?`, text: `The copy stops and ${m.vm} keeps running on ${m.source}, unchanged.`, confirmLabel: 'Cancel migration', danger: false });
            return ok ? api('DELETE', `/vms/${enc(m.vm)}/migration`) : null;
          }),
        }, 'Cancel migration…') : null,
        !active ? h('button', {
          type: 'button', class: 'btn', id: 'migration-dismiss',
          onclick: () => {
            dismissedId = m.id;
            draw();
          },
        }, 'Dismiss') : null));
  }

  return {
    el,
    /** Shows a migration just started (the POST's answer) and follows it. */
    start(m) {
      view = m;
      seenActive = true;
      dismissedId = null;
      draw();
      schedule();
    },
    poll,
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}

/** Runs the Migrate operation from a list (opens the VM page after). */
export async function migrateFromList(vm, navigate) {
  const m = await openMigrate(vm);
  if (m) {
    toast(`Migration of ${vm.name} started`);
    refresh('vms');
    navigate(`#/vms/${enc(vm.name)}?migration=${enc(m.id)}`);
  }
  return m;
}
