// Virtual CDs (SPEC I1): upload an ISO with a progress bar, add one from a
// file on the PM, remove those not inserted anywhere.

import { api, upload } from '../api.js';
import { h, mount, table, fmtBytes, emptyState, pageHeader, field, errorBox, confirmAction, toast } from '../ui.js';
import { can, roleNeeded, refresh } from '../app.js';

export const help = 'vcds';
const enc = encodeURIComponent;

export async function render(main, ctx) {
  const admin = can('administer');
  const slot = h('div', {});
  const errSlot = h('div', {});
  const uploadCard = h('section', { class: 'card', 'aria-labelledby': 'upload-h' });
  mount(main, pageHeader('Virtual CDs', 'ISO images stored in the unit, to install guests from or boot once from.'), errSlot, uploadCard, slot);

  const load = async () => {
    const vcds = await api('GET', '/vcds');
    mount(slot, table({
      caption: 'Virtual CDs',
      columns: [
        { label: 'Name', value: (v) => h('strong', {}, v.name) },
        { label: 'Size', value: (v) => fmtBytes(v.size_bytes), class: 'num' },
        { label: 'Source', value: (v) => v.source },
        { label: 'Inserted in', value: (v) => (v.inserted_in.length ? v.inserted_in.map((n, i) => [i ? ', ' : '', h('a', { href: `#/vms/${enc(n)}/cd` }, n)]) : h('span', { class: 'muted' }, 'no VM')) },
        { label: 'Can remove', value: (v) => (v.can_remove ? 'yes' : 'no — eject it first') },
        {
          label: 'Actions',
          value: (v) => {
            const reason = !admin ? roleNeeded('administer') : !v.can_remove ? `inserted in ${v.inserted_in.join(', ')}; eject it first` : null;
            return h('button', {
              class: 'btn small', 'aria-disabled': reason ? 'true' : null, title: reason ? `Remove: ${reason}` : null,
              onclick: async () => {
                if (reason) {
                  toast(`Remove: ${reason}`, 'warn');
                  return;
                }
                if (!(await confirmAction({ title: `Remove VCD ${v.name}?`, text: `The ISO image (${fmtBytes(v.size_bytes)}) is deleted from the unit.`, confirmLabel: 'Remove VCD' }))) return;
                try {
                  await api('DELETE', `/vcds/${enc(v.name)}`);
                  mount(errSlot);
                  load();
                  refresh('pm');
                } catch (e) {
                  mount(errSlot, errorBox(e));
                }
              },
            }, 'Remove…');
          },
        },
      ],
      rows: vcds,
      empty: emptyState('No virtual CDs yet', admin ? 'Upload an ISO image above; it can then be inserted in a VM\'s CD drive or booted from once.' : 'An administrator can upload ISO images here.'),
    }));
  };

  if (!admin) {
    mount(uploadCard, h('h2', { id: 'upload-h' }, 'Add a virtual CD'), h('p', { class: 'muted' }, `Adding VCDs ${roleNeeded('administer')}.`));
  } else {
    const file = h('input', { type: 'file', id: 'vcd-file', accept: '.iso,application/x-iso9660-image' });
    const name = h('input', { id: 'vcd-name', autocomplete: 'off' });
    const progress = h('progress', { id: 'vcd-progress', max: 100, value: 0, hidden: true });
    const progText = h('span', { class: 'small', 'aria-live': 'polite' });
    const cancel = h('button', { type: 'button', class: 'btn small', hidden: true }, 'Cancel upload');
    const start = h('button', { type: 'submit', class: 'btn primary', id: 'vcd-upload' }, 'Upload');
    const upErr = h('div', {});
    file.addEventListener('change', () => {
      if (file.files[0] && !name.value) name.value = file.files[0].name.replace(/\.iso$/i, '').replace(/[^A-Za-z0-9._-]/g, '-').replace(/^[.-]+/, '').slice(0, 64);
    });
    const pathName = h('input', { autocomplete: 'off' });
    const pathPath = h('input', { placeholder: '/var/lib/isos/debian.iso' });
    const pathErr = h('div', {});
    mount(uploadCard,
      h('h2', { id: 'upload-h' }, 'Add a virtual CD'),
      h('div', { class: 'cards two flat' },
        h('form', {
          onsubmit: async (e) => {
            e.preventDefault();
            mount(upErr);
            const f = file.files[0];
            if (!f) {
              mount(upErr, errorBox({ code: 'input', message: 'Choose an ISO file first.' }));
              return;
            }
            progress.hidden = false;
            cancel.hidden = false;
            start.disabled = true;
            const up = upload(`/vcds/${enc(name.value)}`, f, (sent, total) => {
              const pct = total ? Math.floor((sent / total) * 100) : 0;
              progress.value = pct;
              progText.textContent = `${pct}% — ${fmtBytes(sent)} of ${fmtBytes(total)}`;
            });
            cancel.onclick = () => up.cancel();
            try {
              await up.done;
              progText.textContent = `Uploaded ${f.name} as ${name.value}.`;
              toast(`VCD ${name.value} added`);
              file.value = '';
              name.value = '';
              load();
              refresh('pm');
            } catch (ex) {
              mount(upErr, errorBox(ex));
              progText.textContent = '';
            } finally {
              progress.hidden = true;
              cancel.hidden = true;
              start.disabled = false;
            }
          },
        },
        h('h3', {}, 'Upload an ISO from this computer'),
        field('ISO file', file),
        field('Name', name, 'Letters, digits, . _ - ; proposed from the file name.'),
        upErr,
        h('div', { class: 'inline' }, start, cancel),
        h('div', { class: 'progress-row' }, progress, progText)),
        h('form', {
          onsubmit: async (e) => {
            e.preventDefault();
            mount(pathErr);
            try {
              await api('POST', '/vcds', { name: pathName.value, path: pathPath.value });
              toast(`VCD ${pathName.value} added`);
              load();
              refresh('pm');
            } catch (ex) {
              mount(pathErr, errorBox(ex));
            }
          },
        },
        h('h3', {}, 'Add an ISO file that is on the PM'),
        field('Name', pathName),
        field('Path on the PM', pathPath, 'Absolute path of an ISO image; it is copied into the unit.'),
        pathErr,
        h('button', { type: 'submit', class: 'btn' }, 'Add'))));
  }
  ctx.on('vms', () => load().catch(() => {}));
  await load();
}
