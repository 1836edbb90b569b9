// The admission rules (SPEC V2, V3, S5), shown before the server is asked:
// remaining memory, vCPU budget, volume count. The numbers come from
// GET /api/v1/pm; the server checks them again.

import { h, fmtMiB } from './ui.js';

export const MAX_VCPUS = 8;
export const MAX_VOLUMES_AND_VCDS = 62;

export function minMemory(guestType) {
  return guestType === 'linux-64' || guestType === 'windows-64' ? 600 : 256;
}

function line(kind, text) {
  return h('li', { class: `rule ${kind}` }, h('span', { class: 'rule-icon', 'aria-hidden': 'true' }, { ok: '✓', warn: '!', bad: '✗', info: 'i' }[kind]), h('span', {}, text));
}

/**
 * The admission panel for a VM of `vcpus`, `memoryMib`, `guestType`, adding
 * `newVolumes` volumes. `current` is the VM being re-configured (its own
 * resources do not count against it), if any.
 */
export function admissionPanel(pm, { vcpus, memoryMib, guestType, newVolumes = 0 }, current) {
  if (!pm) return h('section', { class: 'admission' }, 'Loading the PM\'s resources…');
  const cap = pm.vm_memory_capacity_mib;
  const holdsNow = current && ['booting', 'running', 'stopping', 'dumping'].includes(current.state);
  const used = pm.vm_memory_used_mib - (holdsNow ? current.memory_mib : 0);
  const free = Math.max(cap - used, 0);
  const min = minMemory(guestType);
  const mem = Number(memoryMib) || 0;
  const n = Number(vcpus) || 0;
  const rules = [];

  if (mem < min) rules.push(line('bad', `Memory: ${fmtMiB(mem)} is below the minimum of ${min} MiB for ${guestType} guests.`));
  else if (mem > cap) rules.push(line('bad', `Memory: ${fmtMiB(mem)} is more than this PM offers VMs (${fmtMiB(cap)} = ${fmtMiB(pm.memory_mib)} physical − ${fmtMiB(pm.reserve_mib)} system reserve).`));
  else if (mem > free) rules.push(line('warn', `Memory: ${fmtMiB(free)} free now of ${fmtMiB(cap)} for VMs; this VM needs ${fmtMiB(mem)}, so it could not start now (${fmtMiB(mem - free)} missing). Memory is never over-provisioned.`));
  else rules.push(line('ok', `Memory: ${fmtMiB(free)} free of ${fmtMiB(cap)} for VMs; this VM needs ${fmtMiB(mem)} — ${fmtMiB(free - mem)} would remain when it runs.`));

  const vcpuUsed = pm.vcpus_used - (holdsNow ? current.vcpus : 0);
  if (n < 1 || n > MAX_VCPUS) rules.push(line('bad', `vCPUs: ${n} is outside 1–${MAX_VCPUS} per VM.`));
  else if (vcpuUsed + n > pm.vcpu_capacity) rules.push(line('warn', `vCPUs: running VMs use ${vcpuUsed} of ${pm.vcpu_capacity} offered (${pm.threads} threads − 2 reserved); with this VM's ${n} they would be over-provisioned — allowed, CPU is then shared in proportion to vCPUs.`));
  else rules.push(line('ok', `vCPUs: ${vcpuUsed} of ${pm.vcpu_capacity} in use by running VMs; this VM's ${n} fit (${pm.vcpu_capacity - vcpuUsed - n} left).`));

  const count = pm.volumes_and_vcds + newVolumes;
  if (count > MAX_VOLUMES_AND_VCDS) rules.push(line('bad', `Volumes: ${pm.volumes_and_vcds} volumes and VCDs exist; ${newVolumes} more would exceed the limit of ${MAX_VOLUMES_AND_VCDS}.`));
  else rules.push(line(count > MAX_VOLUMES_AND_VCDS - 4 ? 'warn' : 'ok', `Volumes: ${pm.volumes_and_vcds} of ${MAX_VOLUMES_AND_VCDS} volumes and VCDs in use; this adds ${newVolumes} → ${count}.`));

  return h('section', { class: 'admission', 'aria-label': 'Admission rules', 'aria-live': 'polite' },
    h('h3', {}, 'Admission rules'),
    h('ul', {}, rules),
    h('p', { class: 'small muted' }, 'Checked again by the server when you submit; its answer is shown as is.'));
}
