// Config wizard (SPEC V5): re-provision a stopped VM — vCPUs, memory, guest
// type, volumes (create / attach existing / detach keeping data / delete),
// networks and MAC overrides. Changes are reviewed and confirmed before they
// are applied; the server's refusal is shown verbatim.

import { api } from '../api.js';
import { h, mount, field, dialog, errorBox, fmtBytes, toast } from '../ui.js';
import { store, refresh } from '../app.js';
import { admissionPanel, MAX_VCPUS } from '../admission.js';

const GUEST_TYPES = ['linux-64', 'linux-32', 'windows-64', 'windows-32', 'other'];

/** Opens the config wizard for `vm`; resolves when it is closed. */
export async function openConfig(vm) {
  const [groups, volumes] = await Promise.all([api('GET', '/storage-groups'), api('GET', '/volumes')]);
  const unattached = volumes.filter((v) => v.vm === 'none');
  const c = {
    vcpus: vm.vcpus,
    memory: vm.memory_mib,
    guestType: vm.guest_type,
    data: Object.fromEntries(vm.data_volumes.map((d) => [d, 'keep'])),
    add: [],
    macs: vm.nics.map((n) => n.mac),
    addNics: 0,
  };

  function request() {
    const r = {};
    if (Number(c.vcpus) !== vm.vcpus) r.vcpus = Number(c.vcpus);
    if (Number(c.memory) !== vm.memory_mib) r.memory_mib = Number(c.memory);
    if (c.guestType !== vm.guest_type) r.guest_type = c.guestType;
    const detach = Object.entries(c.data).filter(([, a]) => a === 'detach').map(([n]) => n);
    const del = Object.entries(c.data).filter(([, a]) => a === 'delete').map(([n]) => n);
    if (detach.length) r.detach_volumes = detach;
    if (del.length) r.delete_volumes = del;
    if (c.add.length) {
      r.add_volumes = c.add.map((a) => (a.existing ? { name: a.existing } : {
        name: a.name || undefined, size_bytes: Math.round(Number(a.sizeGiB) * 1024) * 1024 * 1024, group: a.group,
      }));
    }
    const macs = c.macs.map((m, i) => ({ nic: i, mac: m.trim() })).filter((m, i) => m.mac && m.mac !== vm.nics[i].mac);
    if (macs.length) r.macs = macs;
    if (c.addNics) r.add_nics = Array.from({ length: c.addNics }, () => ({ network: 'user' }));
    return r;
  }

  function describe(r) {
    const out = [];
    if (r.vcpus !== undefined) out.push(`vCPUs ${vm.vcpus} → ${r.vcpus}`);
    if (r.memory_mib !== undefined) out.push(`memory ${vm.memory_mib} → ${r.memory_mib} MiB`);
    if (r.guest_type) out.push(`guest type ${vm.guest_type} → ${r.guest_type}`);
    (r.detach_volumes || []).forEach((v) => out.push(`detach volume ${v} (data kept)`));
    (r.delete_volumes || []).forEach((v) => out.push(`DELETE volume ${v} and its data`));
    (r.add_volumes || []).forEach((v) => out.push(v.size_bytes ? `create volume ${v.name || '(auto name)'} of ${fmtBytes(v.size_bytes)} in ${v.group}` : `attach existing volume ${v.name}`));
    (r.macs || []).forEach((m) => out.push(`interface ${m.nic}: MAC → ${m.mac}`));
    if (r.add_nics) out.push(`add ${r.add_nics.length} interface(s) on network user`);
    return out;
  }

  return dialog(`Config ${vm.name}`, (close) => {
    const side = h('div', {});
    const errSlot = h('div', {});
    const content = h('div', {});
    let reviewing = false;
    const upd = () => mount(side, admissionPanel(store.pm, {
      vcpus: c.vcpus, memoryMib: c.memory, guestType: c.guestType, newVolumes: c.add.filter((a) => !a.existing).length,
    }, vm));
    const bind = (el, set) => {
      el.addEventListener('input', () => {
        set(el.value);
        upd();
      });
      return el;
    };
    const addList = h('div', { class: 'rows' });
    const drawAdd = () => mount(addList, c.add.map((a, i) => h('fieldset', { class: 'row' }, h('legend', {}, a.existing !== undefined ? 'Attach existing volume' : 'New volume'),
      a.existing !== undefined
        ? field('Volume', bind(h('select', {}, unattached.map((u) => h('option', { value: u.name, selected: u.name === a.existing }, `${u.name} (${fmtBytes(u.size_bytes)})`))), (v) => { a.existing = v; }))
        : [field('Name', bind(h('input', { value: a.name, placeholder: 'automatic' }), (v) => { a.name = v; })),
          field('Size (GiB)', bind(h('input', { type: 'number', min: 0.001, step: 'any', value: a.sizeGiB, class: 'num' }), (v) => { a.sizeGiB = v; })),
          field('Storage group', bind(h('select', {}, groups.map((g) => h('option', { value: g.name, selected: g.name === a.group }, `${g.name} — ${fmtBytes(g.free_bytes)} free`))), (v) => { a.group = v; }))],
      h('button', { type: 'button', class: 'btn small', onclick: () => { c.add.splice(i, 1); drawAdd(); upd(); } }, 'Remove'))));

    const editForm = () => [
      h('div', { class: 'grid3' },
        field('vCPUs', bind(h('input', { type: 'number', min: 1, max: MAX_VCPUS, value: c.vcpus, class: 'num', id: 'cfg-vcpus' }), (v) => { c.vcpus = v; })),
        field('Memory (MiB)', bind(h('input', { type: 'number', min: 1, value: c.memory, class: 'num', id: 'cfg-memory' }), (v) => { c.memory = v; })),
        field('Guest type', bind(h('select', {}, GUEST_TYPES.map((g) => h('option', { selected: g === c.guestType }, g))), (v) => { c.guestType = v; }))),
      h('h3', {}, 'Volumes'),
      h('p', { class: 'small' }, `Boot volume ${vm.boot_volume}: cannot be detached or deleted.`),
      vm.data_volumes.map((d) => field(`Data volume ${d}`, bind(h('select', {},
        h('option', { value: 'keep', selected: c.data[d] === 'keep' }, 'keep attached'),
        h('option', { value: 'detach', selected: c.data[d] === 'detach' }, 'detach (keep its data)'),
        h('option', { value: 'delete', selected: c.data[d] === 'delete' }, 'delete it and its data')), (v) => { c.data[d] = v; }))),
      addList,
      h('div', { class: 'inline' },
        h('button', { type: 'button', class: 'btn small', onclick: () => { c.add.push({ name: '', sizeGiB: 1, group: groups[0] ? groups[0].name : 'default' }); drawAdd(); upd(); } }, 'Create a volume'),
        unattached.length ? h('button', { type: 'button', class: 'btn small', onclick: () => { c.add.push({ existing: unattached[0].name }); drawAdd(); upd(); } }, 'Attach an existing volume') : null),
      h('h3', {}, 'Networks'),
      vm.nics.map((n, i) => field(`Interface ${i} (${n.network}) MAC`, bind(h('input', { value: c.macs[i] }), (v) => { c.macs[i] = v; }))),
      field('Interfaces to add (network user)', bind(h('input', { type: 'number', min: 0, max: 8, value: c.addNics, class: 'num' }), (v) => { c.addNics = Number(v) || 0; })),
    ];

    const submitBtn = h('button', { type: 'submit', class: 'btn primary' });
    const backBtn = h('button', { type: 'button', class: 'btn', onclick: () => { reviewing = false; draw(); } }, 'Back to editing');
    const draw = () => {
      submitBtn.textContent = reviewing ? 'Apply changes' : 'Review changes';
      backBtn.hidden = !reviewing;
      if (!reviewing) {
        mount(content, editForm());
        drawAdd();
      } else {
        const changes = describe(request());
        mount(content, h('h3', {}, 'Review the changes'),
          changes.length ? h('ul', { class: 'changes' }, changes.map((x) => h('li', { class: /DELETE/.test(x) ? 'danger-text' : '' }, x))) : h('p', {}, 'Nothing to change.'));
      }
      upd();
    };

    const form = h('form', {
      onsubmit: async (e) => {
        e.preventDefault();
        if (!reviewing) {
          reviewing = true;
          mount(errSlot);
          draw();
          return;
        }
        const r = request();
        if (!Object.keys(r).length) {
          close(false);
          return;
        }
        try {
          await api('POST', `/vms/${encodeURIComponent(vm.name)}/config`, r);
          toast(`VM ${vm.name} re-configured`);
          refresh('vms');
          refresh('pm');
          close(true);
        } catch (err) {
          mount(errSlot, errorBox(err));
        }
      },
    },
    h('p', { class: 'muted' }, 'The VM must be stopped. Nothing changes until you confirm on the next screen.'),
    errSlot,
    h('div', { class: 'wizard' }, h('div', { class: 'wizard-main' }, content), h('div', { class: 'wizard-side' }, side)),
    h('div', { class: 'actions' },
      h('button', { type: 'button', class: 'btn', onclick: () => close(false) }, 'Cancel'),
      backBtn,
      submitBtn));
    draw();
    return form;
  }, { wide: true });
}
