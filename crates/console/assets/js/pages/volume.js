// One volume (SPEC S2, S6, S9): where it lives, its replica and link
// state, resync progress with ETA, and its statistics with the sync-link
// advice. Polled every 2 s (every second while a resync runs).

import { api } from '../api.js';
import { h, mount, remount, fmtBytes, fmtRate, fmtSecs, errorBox, syncBadge, emptyState, typedConfirm, toast, table, plural } from '../ui.js';
import { inUnit, can, roleNeeded } from '../app.js';
import { resyncProgress, syncHelp } from './volumes.js';

export const help = 'volume';
const enc = encodeURIComponent;

function dl(rows) {
  return h('dl', { class: 'props' }, rows.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
}

function linkText(link) {
  if (!link) return '—';
  switch (link.state) {
    case 'standalone': return 'standalone: no partner configured';
    case 'connecting': return `connecting to the partner${link.last_error ? ` (last error: ${link.last_error})` : ''}`;
    case 'resyncing': return 'connected, copying the regions the partner lacks';
    case 'in_sync': return 'connected and in sync: every write goes to both replicas';
    case 'split_brain': return `split brain (${(link.relation && link.relation.relation ? link.relation.relation : link.relation) || 'diverged'}): replication refused until a decision names the replica to keep`;
    case 'waiting': return 'secondary, waiting for the primary';
    case 'replicating': return `secondary, receiving from ${link.primary} (epoch ${link.epoch})`;
    default: return link.state;
  }
}

const ADVICE = {
  unlikely: 'A faster sync link is unlikely to help',
  maybe: 'A faster sync link may help',
  likely: 'A faster sync link is likely to help (about 2× with 10 Gb/s instead of 1 Gb/s)',
};

function likelihood(l) {
  const cls = { unlikely: 'off', maybe: 'warn', likely: 'ok' }[l] || 'off';
  return h('span', { class: `badge ${cls}`, 'data-advice': l }, l);
}

function latency(us) {
  if (!us) return '—';
  return us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${Math.round(us)} µs`;
}

function statsCard(v) {
  const st = v.replica && v.replica.stats;
  if (!st) {
    return h('section', { class: 'card', id: 'volume-stats' }, h('h2', {}, 'Statistics (S9)'),
      emptyState('No statistics', inUnit() ? 'This PM has no open replica of the volume.' : 'Statistics are kept by the mirror of a unit\'s volumes.'));
  }
  const a = st.sync_link_advice || {};
  return h('section', { class: 'card', id: 'volume-stats' }, h('h2', {}, 'Statistics (S9)'),
    dl([
      ['Reads', `${st.read_ops.toLocaleString('en')} requests, ${fmtBytes(st.read_bytes)}`],
      ['Writes', `${st.write_ops.toLocaleString('en')} requests, ${fmtBytes(st.write_bytes)}`],
      ['Average write', st.write_ops ? fmtBytes(Math.round(st.avg_write_bytes)) : '—'],
      ['Write throughput', h('span', { id: 'volume-write-rate' }, fmtRate(st.write_bytes_per_sec), h('span', { class: 'small muted' }, ' (recent)'))],
      ['Flushes', st.flush_ops.toLocaleString('en')],
      ['Replicated', `${st.replicated_ops.toLocaleString('en')} requests`],
      ['Replication latency', st.replicated_ops ? `${latency(st.replication_latency_avg_us)} average, ${latency(st.replication_latency_max_us)} at most` : '—'],
      v.replica.streams ? ['Link streams', `${v.replica.streams} TCP streams`] : null,
    ]),
    h('h3', {}, 'Would a faster sync link help?'),
    h('p', { id: 'volume-advice' }, likelihood(a.overall), ' ', ADVICE[a.overall] || ''),
    h('ul', { class: 'small advice' },
      h('li', {}, 'By write throughput: ', likelihood(a.by_throughput), ` — ${fmtRate(st.write_bytes_per_sec)} (below 35 MB/s unlikely, 35–50 MB/s maybe, above likely).`),
      h('li', {}, 'By average write size: ', likelihood(a.by_write_size), ` — ${st.write_ops ? fmtBytes(Math.round(st.avg_write_bytes)) : 'no writes yet'} (below 8 KiB unlikely, 8–16 KiB maybe, above likely).`)),
    h('p', { class: 'hint' }, 'Every write waits for one round trip on the sync link. A faster link helps only workloads that both move a lot of data and do so in large writes; reads never cross the link.'));
}

/**
 * S4: a split-brain volume's two copies side by side, with "Keep this
 * copy" (typed confirmation). The view comes from the volume's primary PM.
 */
function splitBrainCard(name, sb, onDone) {
  if (!sb) return null;
  if (!sb.split_brain) {
    return sb.resolving_keep
      ? h('section', { class: 'card', id: 'volume-split-brain' }, h('h2', {}, 'Split brain'),
        h('p', {}, `Resolving: keeping ${sb.resolving_keep}'s copy; the other is being resynced from it, then both are verified.`))
      : null;
  }
  const keep = async (pm) => {
    const typed = await typedConfirm({
      title: `Keep ${pm}'s copy of ${name}?`,
      text: `The other copy's independent writes are discarded: it is overwritten from ${pm}'s copy, then both are verified.`,
      expect: name,
      confirmLabel: `Keep ${pm}'s copy`,
      id: 'resolve-confirm',
    });
    if (typed === null) return;
    try {
      await api('POST', `/volumes/${enc(name)}/resolve`, { keep: pm, confirm: typed });
      toast(`Keeping ${pm}'s copy of ${name}: resyncing the other copy from it.`);
      onDone();
    } catch (e) {
      toast(e.message, 'error');
    }
  };
  return h('section', { class: 'card danger-card', id: 'volume-split-brain', role: 'alert' },
    h('h2', {}, 'Split brain: both copies were written independently'),
    table({
      caption: 'The two copies',
      columns: [
        { label: 'PM', value: (s) => s.pm },
        { label: 'Role', value: (s) => s.role },
        { label: 'Generation', value: (s) => h('code', {}, s.generation) },
        { label: 'Complete', value: (s) => (s.consistent ? 'yes' : 'no (interrupted resync)') },
        { label: 'Written alone', value: (s) => `${plural(s.dirty_regions, 'region')} (${fmtBytes(s.dirty_bytes)})` },
        { label: 'Last write', value: (s) => s.last_write || 'unknown' },
        {
          label: 'Decision',
          value: (s) => (can('administer')
            ? h('button', { type: 'button', class: 'btn danger', 'data-keep': s.pm, onclick: () => keep(s.pm) }, 'Keep this copy…')
            : h('span', { class: 'small muted' }, roleNeeded('administer'))),
        },
      ],
      rows: sb.sides,
      empty: h('p', {}, 'The partner has not described its copy yet.'),
    }),
    h('p', { class: 'small' }, sb.choices));
}

export async function render(main, ctx) {
  const name = ctx.params.name;
  const body = h('div', {});
  const title = h('h1', { tabindex: '-1' }, name);
  mount(main, h('a', { href: '#/volumes', class: 'back' }, '← Volumes'), title, body);
  let left = false;
  let timer = null;
  ctx.onLeave(() => {
    left = true;
    clearTimeout(timer);
  });

  const draw = (v, sb) => {
    const r = v.replica;
    const running = r && r.resync;
    remount(body,
      h('p', { class: 'subtitle volume-sync' }, syncBadge(v.sync), ' ', syncHelp(v.sync)),
      v.outdated ? h('p', { class: 'health bad', id: 'volume-outdated' },
        `The replica on ${v.outdated.pm} is outdated: ${v.outdated.by} acknowledged writes without it after ${new Date(v.outdated.since).toLocaleString()}. It is never promoted automatically; it catches up when the pair is in sync again.`) : null,
      splitBrainCard(name, sb, () => load()),
      h('div', { class: 'cards two' },
        h('section', { class: 'card' }, h('h2', {}, 'Volume'), dl([
          ['Size', fmtBytes(v.size_bytes)],
          ['Allocated', `${fmtBytes(v.allocated_bytes)} (sparse)`],
          ['Storage group', v.group],
          ['VM', v.vm === 'none' ? h('span', { class: 'muted' }, 'none (unattached)') : [h('a', { href: `#/vms/${enc(v.vm)}` }, v.vm), v.boot ? ' (boot volume)' : ' (data volume)']],
          inUnit() ? ['Primary PM', h('span', { id: 'volume-primary' }, v.primary || '—')] : null,
          inUnit() && v.epoch !== undefined ? ['Epoch', String(v.epoch)] : null,
        ])),
        h('section', { class: 'card' }, h('h2', {}, 'Replica'), r ? dl([
          ['Role', r.role],
          ['Link', linkText(r.link)],
          ['Partner', r.partner || '—'],
          ['Consistent', r.consistent ? 'yes: a complete image' : h('span', { class: 'health bad' }, 'no: a resync into it has not finished')],
          ['Writing alone', r.degraded ? h('span', { class: 'health bad' }, 'yes (degraded): the partner misses these writes until it resyncs') : 'no'],
          r.writes_held ? ['Writes held', h('span', { class: 'health bad' }, `${r.writes_held} (waiting for the lease)`)] : null,
          ['Dirty regions', `${r.dirty_regions} of ${Math.ceil(r.size / r.region_size)} (${fmtBytes(r.dirty_regions * r.region_size)} to resync)`],
          r.last_verify ? ['Last verify', `${r.last_verify.regions_checked} regions compared, ${r.last_verify.differing_count} differ`] : null,
        ]) : emptyState('No replica here', inUnit() ? 'This PM has no open replica of the volume.' : 'Outside a unit volumes are not mirrored (simplex).'))),
      r ? h('section', { class: 'card', id: 'volume-resync' }, h('h2', {}, 'Resync'),
        running ? [resyncProgress(v, { id: 'resync-progress' }), dl([
          ['Regions', `${r.resync.done_regions} of ${r.resync.total_regions} copied`],
          ['Copied', fmtBytes(r.resync.done_bytes)],
          ['Rate', fmtRate(r.resync.bytes_per_sec)],
          ['Elapsed', fmtSecs(r.resync.elapsed_secs)],
          ['ETA', r.resync.eta_secs === null || r.resync.eta_secs === undefined ? 'unknown' : fmtSecs(r.resync.eta_secs)],
        ])] : [
          h('p', {}, 'No resync is running.'),
          r.last_resync && r.last_resync.total_regions ? h('p', { class: 'small muted' }, `Last resync (as source): ${r.last_resync.total_regions} regions, ${fmtBytes(r.last_resync.done_bytes)} in ${fmtSecs(r.last_resync.elapsed_secs)} (${fmtRate(r.last_resync.bytes_per_sec)}).`) : null,
        ]) : null,
      statsCard(v));
  };

  const load = async () => {
    if (left) return;
    let v = null;
    try {
      v = await api('GET', `/volumes/${enc(name)}`);
      let sb = null;
      if (v.sync === 'split_brain' || (v.replica && v.replica.link && v.replica.link.state === 'split_brain')) {
        sb = await api('GET', `/volumes/${enc(name)}/split-brain`).catch(() => null);
      }
      draw(v, sb);
    } catch (e) {
      remount(body, errorBox(e));
      if (e.status === 404) return;
    }
    if (!left) timer = setTimeout(load, v && v.replica && v.replica.resync ? 1000 : 2000);
  };
  await load();
}
