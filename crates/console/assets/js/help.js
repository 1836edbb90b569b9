// Help text of every page: what the page is for and what each state means
// (taken from the product specification: A1, U2, V1-V8, S5, S6, I1).

export const VM_STATES = [
  ['busy', 'installing', 'The boot volume is being prepared. No operation is possible until it is done.'],
  ['stopped', '', 'No QEMU process. Allowed: start, config, boot from CD, remove, insert/eject CD (export and snapshot come later).'],
  ['booting', '', 'QEMU runs, the guest has not answered its instance check yet. Allowed: console, power off, dump.'],
  ['running', 'running', 'The guest answered its instance check. Allowed: console, shutdown, power off, dump (migrate needs a second PM).'],
  ['alert', 'running', 'Running but not fully redundant (partner down, mirror resyncing, or a network not redundant). Appears with the two-PM unit.'],
  ['stopping', '', 'Guest shutdown (ACPI) in progress; the VM is powered off if it has not stopped after the shutdown timeout. Allowed: power off, remove.'],
  ['crashed', 'restarting', 'The VM crashed (guest panic, QEMU died, watchdog) and is being restarted automatically; an alert is raised.'],
  ['critical', 'crashed', 'The VM crashed more often than its MTBF threshold allows (by default more than 3 times in an hour) and stays down until Reset Device.'],
  ['dumping', '', 'A memory dump is being written; the VM restarts afterwards. Allowed: power off.'],
];

const vmStateList = VM_STATES.map(([s, a, t]) => [a ? `${s} (${a})` : s, t]);

export const HELP = {
  login: {
    purpose: 'Log in with a Pairvisor user. Administrators may do everything; operators may operate VMs (start, shut down, power off, console, CDs) but not create, configure or remove them; read-only users may look.',
  },
  dashboard: {
    purpose: 'The unit at a glance: its physical machines, VMs by state, redundancy and storage synchronisation, the active alerts with the action each one needs, and warnings (VMs without paravirtual drivers, storage groups under 5 GiB free, vCPU over-provisioning). Everything updates live.',
    items: [
      ['Alerts', 'Conditions that need you: a critical VM (Reset Device), a VM whose guest does not answer its instance check, a VM restarting after a crash.'],
      ['Redundancy', 'A VM is redundant when its disks are mirrored on both PMs and both PMs run. With a single PM every volume is "simplex" (not mirrored yet).'],
      ['Memory', 'Memory is never over-provisioned: a VM can start only if its memory is free on the PM (physical memory minus the system reserve).'],
      ['vCPUs', 'One vCPU per hardware thread, 2 threads reserved for the system. Over-provisioning is allowed with a warning; CPU is then shared in proportion to vCPUs.'],
    ],
  },
  pms: {
    purpose: 'The physical machines of the unit and the operations allowed in each state. Today the unit has one PM (this one); the partner, the maintenance workflow (Work On, Finalize, Recover, Replace) and resync progress appear with the two-PM unit.',
    items: [
      ['booting', 'The PM is starting.'],
      ['running', 'The PM runs VMs and serves the unit.'],
      ['running (in maintenance)', 'Work On moved its VMs to the partner; it may be finalized, shut down, powered off, recovered or replaced.'],
      ['evacuating', 'Its VMs are being live-migrated to the partner.'],
      ['off (in maintenance)', 'Shut down for service.'],
      ['imaging/recovering', 'Being re-imaged or resynchronising after Recover.'],
      ['broken', 'A failure was predicted or occurred.'],
      ['powered off (too many failures)', 'It failed 3 or more times within an hour and stays off until Reset Device.'],
    ],
  },
  vms: {
    purpose: 'Every virtual machine with its state, activity, current and preferred PM, vCPUs and memory. Open a VM for its details and the operations allowed in its state; a greyed-out button says why it is not allowed now. States change live.',
    items: vmStateList,
  },
  vm: {
    purpose: 'One VM: its summary, volumes, networks, CD drive, statistics and audit, its console (graphical and serial), and the operations allowed in its current state and for your role.',
    items: [
      ['System check', 'The VM\'s QEMU process runs and answers (SPEC V7, first level).'],
      ['Instance check', 'The guest OS answers the guest agent\'s ping (second level). A VM can be running while its guest is unreachable — shown here and on the dashboard.'],
      ['Shutdown', 'Asks the guest to shut down (ACPI). If it has not stopped after the shutdown timeout it is powered off.'],
      ['Power off', 'Stops the VM immediately; the guest\'s memory state is discarded — the last resort.'],
      ['Dump', 'Writes the guest memory to a dump file, then restarts the VM — for hung guests.'],
      ['Reset device', 'Restarts a critical VM and clears its crash counter (MTBF).'],
      ['Boot from CD', 'Starts a stopped VM once from a chosen virtual CD.'],
      ['Config', 'Re-provisions a stopped VM: vCPUs, memory, volumes, networks, MAC addresses. The boot volume cannot be detached or deleted.'],
      ['Remove', 'Deletes the VM and its boot volume; data volumes are kept unless you choose to delete them.'],
      ...vmStateList,
    ],
  },
  wizard: {
    purpose: 'Creates a VM (stopped) step by step: name and guest type, vCPUs and memory, volumes, networks, install source. The admission rules are shown before you submit; if the server refuses, its message is shown as is.',
    items: [
      ['Name', '1–64 characters of A-Z a-z 0-9 . _ - , not starting with . or -; unique in the unit.'],
      ['vCPUs', 'At most 8 per VM. Running VMs beyond what the PM offers is allowed with a warning.'],
      ['Memory', 'At least 256 MiB (600 MiB for 64-bit guests) and at most what the PM offers VMs; it must be free when the VM starts.'],
      ['Volumes', 'A boot volume and optional data volumes, each in one storage group. At most 62 volumes and VCDs in the unit. Keep boot and data volumes apart when you can.'],
      ['Networks', 'One or more networks; MAC addresses are assigned automatically (52:54:00:…). Shared networks come with the two-PM unit; today "user" (NAT) is available.'],
      ['Install source', 'A virtual CD (ISO) in the CD drive, or direct kernel boot (kernel, initrd and command line on the PM).'],
    ],
  },
  volumes: {
    purpose: 'Every volume with its size, storage group, VM ("none" when unattached) and sync state. Unattached volumes can be removed after confirmation; data volumes of stopped VMs can be detached (data kept) or attached.',
    items: [
      ['simplex', 'Stored on this PM only: no partner to mirror to yet.'],
      ['synchronized', 'Mirrored on both PMs (two-PM unit).'],
      ['resyncing', 'The partner copy is being brought up to date; the VM is in alert until done.'],
      ['Allocated', 'Space actually used on disk (volumes are sparse files).'],
    ],
  },
  groups: {
    purpose: 'Storage groups: the storage pools that hold volumes (with the two-PM unit, one pool on each PM, mirrored). A volume lives in exactly one group. Keep at least 5 GiB free in a group for future VCDs; place new volumes in the least loaded group.',
  },
  vcds: {
    purpose: 'Virtual CDs: ISO images stored in the unit, to install guests or boot once from. Upload an ISO from your computer (with progress), add one from a file on the PM, and remove those not inserted in any VM. VCDs count toward the limit of 62 volumes and VCDs.',
  },
  users: {
    purpose: 'Local user accounts and their roles. Every change is recorded in the audit log. The last administrator cannot be deleted.',
    items: [
      ['administrator', 'Everything: create, configure and remove VMs, volumes, VCDs, users, preferences.'],
      ['operator', 'Operate VMs: start, shutdown, power off, dump, reset device, boot from CD, CDs, console.'],
      ['read_only', 'Look at everything except users; change nothing.'],
    ],
  },
  prefs: {
    purpose: 'Unit preferences: time zone of the console, memory reserved for the system, crash threshold (MTBF), timeouts and health checks. Only administrators may change them; every change is audited.',
    items: [
      ['Time zone', 'All times in this console are shown in this zone (an IANA name such as Europe/Paris).'],
      ['Memory reserve', 'Memory kept for the system on each PM (default 1 GiB, 2 GiB recommended).'],
      ['MTBF', 'A VM that crashes more than this many times within the window becomes critical.'],
    ],
  },
  audit: {
    purpose: 'Who did what, when, with what result: every request that changes something, including failed logins. Newest first; times in the unit\'s time zone.',
  },
  alerts: {
    purpose: 'Active alerts: conditions that need you, critical first, each with the action it needs. An alert disappears when its condition clears (e.g. a critical VM is reset) or when you acknowledge it; it comes back if the condition happens again. E-mail and SNMP notifications come later.',
    items: [
      ['critical', 'A VM is down and stays down: it crashed more often than its MTBF threshold, or could not be restarted. Action: fix the cause, then Reset Device.'],
      ['warning', 'A VM crashed and was restarted, or its guest stopped answering the instance check while QEMU runs.'],
    ],
  },
  generic: {
    purpose: 'A part of the unit that the API has just grown; this page lists what the API returns until a dedicated page is built.',
  },
};
