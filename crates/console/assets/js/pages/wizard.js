// Create-VM wizard (SPEC V1): name and guest type, vCPUs and memory,
// volumes, networks, install source, review. The admission rules stay in
// view on every step; the server's refusal is shown verbatim.

import { api } from '../api.js';
import { h, mount, field, errorBox, pageHeader, fmtBytes, toast } from '../ui.js';
import { store, refresh, navigate, can, roleNeeded } from '../app.js';
import { admissionPanel, MAX_VCPUS, minMemory } from '../admission.js';

export const help = 'wizard';

const GUEST_TYPES = [
  ['linux-64', 'Linux, 64-bit'],
  ['linux-32', 'Linux, 32-bit'],
  ['windows-64', 'Windows, 64-bit'],
  ['windows-32', 'Windows, 32-bit'],
  ['other', 'Other (appliances, small guests)'],
];

const STEPS = ['Name', 'CPU & memory', 'Volumes', 'Networks', 'Install source', 'Review'];

function toBytes(size, unit) {
  const n = Number(size);
  return Math.round(n * (unit === 'GiB' ? 1024 : 1)) * 1024 * 1024;
}

export async function render(main, ctx) {
  if (!can('administer')) {
    mount(main, pageHeader('Create a VM'), errorBox({ code: 'forbidden', status: 403, message: `Creating VMs ${roleNeeded('administer')}.` }));
    return;
  }
  const [groups, vcds, volumes] = await Promise.all([
    api('GET', '/storage-groups'),
    api('GET', '/vcds'),
    api('GET', '/volumes'),
  ]);
  refresh('pm');
  const w = {
    name: '',
    guestType: 'linux-64',
    vcpus: 1,
    memory: 1024,
    instanceCheck: 'agent',
    boot: { name: '', size: 8, unit: 'GiB', group: groups[0] ? groups[0].name : 'default' },
    data: [],
    nics: [{ network: 'user', mac: '' }],
    source: vcds.length ? 'vcd' : 'none',
    vcd: vcds[0] ? vcds[0].name : '',
    kernel: '',
    initrd: '',
    cmdline: 'console=ttyS0',
  };
  let step = 0;
  let error = null;

  const stepNav = h('ol', { class: 'steps', 'aria-label': 'Wizard steps' });
  const body = h('div', { class: 'wizard-body' });
  const side = h('div', { class: 'wizard-side' });
  const errSlot = h('div', { id: 'wizard-error' });
  mount(main,
    pageHeader('Create a VM', 'The VM is created stopped; start it from its page.'),
    h('div', { class: 'wizard' },
      h('div', { class: 'wizard-main' }, stepNav, errSlot, body),
      side));

  const newVolumeCount = () => 1 + w.data.filter((d) => !d.existing).length;
  const updateSide = () => mount(side, admissionPanel(store.pm, {
    vcpus: w.vcpus, memoryMib: w.memory, guestType: w.guestType, newVolumes: newVolumeCount(),
  }));
  ctx.on('pm', updateSide);

  const bind = (input, set) => {
    input.addEventListener('input', () => {
      set(input.type === 'checkbox' ? input.checked : input.value);
      updateSide();
      if (error) {
        // The refusal was about the previous entries.
        error = null;
        mount(errSlot);
      }
    });
    return input;
  };

  const groupSelect = (value, set) => bind(h('select', {},
    groups.map((g) => h('option', { value: g.name, selected: g.name === value }, `${g.name} — ${fmtBytes(g.free_bytes)} free`))), set);

  function request() {
    const vol = (v) => (v.existing
      ? { name: v.existing }
      : { name: v.name || undefined, size_bytes: toBytes(v.size, v.unit), group: v.group });
    const req = {
      name: w.name,
      guest_type: w.guestType,
      vcpus: Number(w.vcpus),
      memory_mib: Number(w.memory),
      boot_volume: vol(w.boot),
      data_volumes: w.data.map(vol),
      nics: w.nics.map((n) => (n.mac ? { network: n.network, mac: n.mac } : { network: n.network })),
      instance_check: w.instanceCheck,
    };
    if (w.source === 'vcd' && w.vcd) req.cdrom = w.vcd;
    if (w.source === 'kernel') req.kernel = { kernel: w.kernel, initrd: w.initrd || undefined, cmdline: w.cmdline };
    return req;
  }

  const sizeInputs = (v) => h('div', { class: 'inline' },
    bind(h('input', { type: 'number', min: 1, step: 'any', value: v.size, class: 'num', 'aria-label': 'Size' }), (x) => { v.size = x; }),
    bind(h('select', { 'aria-label': 'Unit' }, ['MiB', 'GiB'].map((u) => h('option', { selected: u === v.unit }, u))), (x) => { v.unit = x; }));

  const steps = [
    () => [
      field('Name', bind(h('input', { id: 'vm-name', value: w.name, autocomplete: 'off', required: true, autofocus: true }), (v) => { w.name = v; }),
        '1–64 characters: letters, digits, . _ - (not starting with . or -). Unique in the unit.'),
      field('Guest type', bind(h('select', { id: 'vm-guest-type' }, GUEST_TYPES.map(([v, l]) => h('option', { value: v, selected: v === w.guestType }, l))), (v) => { w.guestType = v; }),
        'Decides the memory minimum: 600 MiB for 64-bit guests, 256 MiB otherwise.'),
    ],
    () => [
      field('vCPUs', bind(h('input', { id: 'vm-vcpus', type: 'number', min: 1, max: MAX_VCPUS, value: w.vcpus, class: 'num' }), (v) => { w.vcpus = v; }),
        `1 to ${MAX_VCPUS}. One vCPU per hardware thread; 2 threads are reserved for the system.`),
      field('Memory (MiB)', bind(h('input', { id: 'vm-memory', type: 'number', min: 1, step: 1, value: w.memory, class: 'num' }), (v) => { w.memory = v; }),
        `At least ${minMemory(w.guestType)} MiB for this guest type. Never over-provisioned: it must be free when the VM starts.`),
      field('Instance check', bind(h('select', { id: 'vm-instance-check' },
        h('option', { value: 'agent', selected: w.instanceCheck === 'agent' }, 'Guest agent (qemu-ga answers pings)'),
        h('option', { value: 'none', selected: w.instanceCheck === 'none' }, 'None (running after the boot grace period)')), (v) => { w.instanceCheck = v; }),
      'How the unit knows the guest OS is up (SPEC V7). The VM is "booting" until the first answer.'),
    ],
    () => {
      const unattached = volumes.filter((v) => v.vm === 'none');
      const dataList = h('div', { class: 'rows' });
      const drawData = () => mount(dataList, w.data.length ? w.data.map((d, i) => h('fieldset', { class: 'row' },
        h('legend', {}, `Data volume ${i + 1}`),
        d.existing !== undefined
          ? field('Existing volume', bind(h('select', {}, unattached.map((u) => h('option', { value: u.name, selected: u.name === d.existing }, `${u.name} (${fmtBytes(u.size_bytes)}, ${u.group})`))), (x) => { d.existing = x; }))
          : [field('Name', bind(h('input', { value: d.name, placeholder: `${w.name || 'vm'}-data${i + 1}` }), (x) => { d.name = x; })),
            field('Size', sizeInputs(d)),
            field('Storage group', groupSelect(d.group, (x) => { d.group = x; }))],
        h('button', { type: 'button', class: 'btn small', onclick: () => { w.data.splice(i, 1); drawData(); updateSide(); } }, 'Remove this volume')))
        : h('p', { class: 'muted' }, 'No data volumes.'));
      drawData();
      return [
        h('fieldset', {}, h('legend', {}, 'Boot volume'),
          field('Name', bind(h('input', { id: 'vm-boot-name', value: w.boot.name, placeholder: `${w.name || 'vm'}-boot` }), (v) => { w.boot.name = v; }), 'Default: <VM name>-boot.'),
          field('Size', sizeInputs(w.boot), 'A positive multiple of 1 MiB. Volumes are sparse: space is used as the guest writes.', 'vm-boot-size'),
          field('Storage group', groupSelect(w.boot.group, (v) => { w.boot.group = v; }), 'A volume lives in exactly one storage group.')),
        h('h3', {}, 'Data volumes'),
        dataList,
        h('div', { class: 'inline' },
          h('button', { type: 'button', class: 'btn', onclick: () => { w.data.push({ name: '', size: 1, unit: 'GiB', group: w.boot.group }); drawData(); updateSide(); } }, 'Add a new data volume'),
          unattached.length ? h('button', { type: 'button', class: 'btn', onclick: () => { w.data.push({ existing: unattached[0].name }); drawData(); updateSide(); } }, 'Attach an existing volume') : null),
        h('p', { class: 'hint' }, 'Advice: keep boot and data volumes in different storage groups when you can.'),
      ];
    },
    () => {
      const list = h('div', { class: 'rows' });
      const draw = () => mount(list, w.nics.length ? w.nics.map((n, i) => h('fieldset', { class: 'row' },
        h('legend', {}, `Interface ${i + 1}`),
        field('Network', bind(h('select', {}, h('option', { value: 'user', selected: n.network === 'user' }, 'user — NAT on this PM')), (x) => { n.network = x; })),
        field('MAC address', bind(h('input', { value: n.mac, placeholder: 'automatic (52:54:00:…)' }), (x) => { n.mac = x; }), 'Leave empty to assign one automatically.'),
        h('button', { type: 'button', class: 'btn small', onclick: () => { w.nics.splice(i, 1); draw(); } }, 'Remove this interface')))
        : h('p', { class: 'muted' }, 'No network interface: the VM will have no network.'));
      draw();
      return [list,
        h('button', { type: 'button', class: 'btn', onclick: () => { w.nics.push({ network: 'user', mac: '' }); draw(); } }, 'Add an interface'),
        h('p', { class: 'hint' }, 'Shared networks (one port on each PM, same L2 segment) arrive with the two-PM unit.')];
    },
    () => {
      const detail = h('div', {});
      const draw = () => {
        if (w.source === 'vcd') {
          mount(detail, vcds.length
            ? field('Virtual CD', bind(h('select', { id: 'vm-vcd' }, vcds.map((v) => h('option', { value: v.name, selected: v.name === w.vcd }, `${v.name} (${fmtBytes(v.size_bytes)})`))), (x) => { w.vcd = x; }), 'Inserted in the VM\'s CD drive; the VM boots from it while the boot volume is empty.')
            : h('p', { class: 'muted' }, 'There is no virtual CD yet: upload one on the Virtual CDs page.'));
        } else if (w.source === 'kernel') {
          mount(detail,
            field('Kernel', bind(h('input', { id: 'vm-kernel', value: w.kernel, placeholder: '/var/lib/images/vmlinuz' }), (x) => { w.kernel = x; }), 'Absolute path of the kernel image on the PM.'),
            field('Initrd', bind(h('input', { id: 'vm-initrd', value: w.initrd, placeholder: '/var/lib/images/initrd.img' }), (x) => { w.initrd = x; }), 'Absolute path on the PM (optional).'),
            field('Command line', bind(h('input', { id: 'vm-cmdline', value: w.cmdline }), (x) => { w.cmdline = x; }), 'Kernel parameters, e.g. console=tty0 console=ttyS0.'));
        } else {
          mount(detail, h('p', { class: 'muted' }, 'The VM boots from its boot volume (use Boot from CD later to install from a virtual CD).'));
        }
      };
      const radio = (value, label) => h('label', { class: 'check' },
        h('input', { type: 'radio', name: 'source', value, checked: w.source === value, onchange: () => { w.source = value; draw(); } }), ` ${label}`);
      draw();
      return [h('fieldset', {}, h('legend', {}, 'Install source'),
        radio('vcd', 'A virtual CD (ISO)'),
        radio('kernel', 'Direct kernel boot (kernel + initrd + command line)'),
        radio('none', 'None: boot from the boot volume')), detail];
    },
    () => {
      const r = request();
      const rows = [
        ['Name', r.name || '(empty)'],
        ['Guest type', r.guest_type],
        ['vCPUs', r.vcpus],
        ['Memory', `${r.memory_mib} MiB`],
        ['Boot volume', `${w.boot.name || `${r.name}-boot`}: ${w.boot.size} ${w.boot.unit} in ${w.boot.group}`],
        ['Data volumes', w.data.length ? w.data.map((d) => (d.existing ? `${d.existing} (existing)` : `${d.name || '(auto)'}: ${d.size} ${d.unit} in ${d.group}`)).join('; ') : 'none'],
        ['Networks', r.nics.length ? r.nics.map((n) => `${n.network}${n.mac ? ` (${n.mac})` : ''}`).join(', ') : 'none'],
        ['Install source', w.source === 'vcd' ? `VCD ${w.vcd}` : w.source === 'kernel' ? `kernel ${w.kernel} ${w.initrd} "${w.cmdline}"` : 'boot volume'],
        ['Instance check', r.instance_check],
      ];
      return [h('dl', { class: 'review' }, rows.map(([k, v]) => [h('dt', {}, k), h('dd', {}, String(v))]))];
    },
  ];

  // Which step a refusal most likely concerns.
  const stepOf = (err) => {
    const m = `${err.code} ${err.message}`.toLowerCase();
    if (/name|already/.test(err.code) && !/volume|vcd/.test(m)) return 0;
    if (/memory|vcpu/.test(m)) return 1;
    if (/volume|storage group|size/.test(m)) return 2;
    if (/mac|network|nic/.test(m)) return 3;
    if (/kernel|initrd|vcd|cd/.test(m)) return 4;
    return 0;
  };

  const form = h('form', { class: 'wizard-form', novalidate: true });
  const draw = () => {
    mount(stepNav, STEPS.map((s, i) => h('li', {},
      h('button', { type: 'button', class: 'step', 'aria-current': i === step ? 'step' : null, onclick: () => { step = i; draw(); } },
        h('span', { class: 'step-n' }, i + 1), s))));
    mount(errSlot, error ? [errorBox(error), h('button', { type: 'button', class: 'btn small fix', onclick: () => { step = stepOf(error); draw(); } }, `Fix it in step ${stepOf(error) + 1}: ${STEPS[stepOf(error)]}`)] : null);
    const last = step === STEPS.length - 1;
    mount(form,
      h('h2', {}, `Step ${step + 1} of ${STEPS.length}: ${STEPS[step]}`),
      steps[step](),
      h('div', { class: 'actions' },
        h('button', { type: 'button', class: 'btn', onclick: () => navigate('#/vms') }, 'Cancel'),
        step > 0 ? h('button', { type: 'button', class: 'btn', onclick: () => { step -= 1; draw(); } }, 'Back') : null,
        h('button', { type: 'submit', class: 'btn primary', id: last ? 'wizard-create' : 'wizard-next' }, last ? 'Create VM' : 'Next')));
    mount(body, form);
    updateSide();
    const first = form.querySelector('input, select');
    if (first) first.focus();
  };
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    if (step < STEPS.length - 1) {
      step += 1;
      draw();
      return;
    }
    const btn = form.querySelector('#wizard-create');
    btn.disabled = true;
    try {
      const vm = await api('POST', '/vms', request());
      toast(`VM ${vm.name} created (stopped)`);
      await refresh('vms');
      refresh('pm');
      navigate(`#/vms/${encodeURIComponent(vm.name)}`);
    } catch (err) {
      error = err;
      draw();
    } finally {
      btn.disabled = false;
    }
  });
  draw();
}
