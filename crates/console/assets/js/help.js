// Help text of every page: what the page is for and what each state means
// (taken from the product specification: A1, U2-U7, V1-V8, M1-M4, S2,
// S5, S6, S9, I1).

export const VM_STATES = [
  ['busy', 'installing', 'The boot volume is being prepared. No operation is possible until it is done.'],
  ['stopped', '', 'No QEMU process. Allowed: start, config, boot from CD, remove, insert/eject CD (export and snapshot come later).'],
  ['booting', '', 'QEMU runs, the guest has not answered its instance check yet. Allowed: console, power off, dump.'],
  ['running', 'running', 'The guest answered its instance check. Allowed: console, shutdown, power off, dump, migrate (in a two-PM unit).'],
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
  unit: {
    purpose: 'The unit: its two physical machines with their states and maintenance operations, the heartbeat links between them, quorum and this PM\'s lease, and the unit\'s power. Updated every 2 seconds. Every operation asks for confirmation first and shows the unit\'s reason when it is refused.',
    items: [
      ['Work On', 'Moves the PM\'s VMs to its partner by live migration, one at a time, then puts it in maintenance. If the partner cannot take them, the unit asks you to confirm shutting them down instead.'],
      ['Finalize', 'Returns a PM in maintenance to service; VMs that prefer it move back once their volumes are in sync.'],
      ['Shut down / Power off', 'Stops a PM in maintenance (Power off: at once, without an orderly shutdown). Refused while the partner resynchronises from it: that would lose data.'],
      ['Heartbeat links', 'The PMs ping each other on the private and the business link. A round trip above 10 ms is reported (U7): every mirrored write waits for one.'],
      ['Quorum and lease', 'A PM runs VMs and writes alone only while it holds its lease, granted by a majority of the voters (both PMs and the witness). A PM that loses its majority stops its VMs rather than risk both PMs running them.'],
      ['Force quorum', 'Shown when this PM has no quorum. After checking which PM holds the newest data (the preview lists this PM\'s replicas), it makes this PM the only voter: it takes over the partner\'s VMs. Only when the partner is really down.'],
      ['Shut down unit', 'Every VM is shut down, then both PMs stop. The VMs running at shutdown start again when the unit is started.'],
    ],
  },
  pms: {
    purpose: 'The physical machines of the unit, their states and the maintenance operations allowed in each (buttons not allowed now say why), with the resources of the PM this console talks to. Outside a unit there is one PM and no maintenance.',
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
    purpose: 'Every virtual machine with its state, activity, current and preferred PM, vCPUs and memory. Open a VM for its details and the operations allowed in its state; a greyed-out button says why it is not allowed now. States change live. In a unit, Migrate moves a running VM to the other PM without stopping it.',
    items: [
      ['Current PM', 'The PM whose QEMU runs the VM.'],
      ['Preferred PM', 'Where the VM should run (SPEC L2). When that PM is in service and the VM\'s volumes are in sync, the VM moves there by itself.'],
      ...vmStateList,
    ],
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
      ['Migrate', 'Live migration to the other PM (SPEC M1): memory is copied while the guest runs, then it pauses briefly (the downtime) and resumes there. "Estimate first" measures the guest\'s dirty rate and says whether it would finish.'],
      ['Migration panel', 'Follows a migration every second: RAM copied, bandwidth, the rate at which the guest dirties memory, and the verdict. A migration converges when the link sends memory faster than the guest dirties it.'],
      ['Remedies', 'When a migration does not converge: raise the maximum downtime, throttle the guest (auto-converge), switch to post-copy (always finishes; a link failure meanwhile kills the VM), or pause the VM and finish.'],
      ['Preferred PM', 'Set on the summary: the VM moves to it when it is in service and the VM\'s volumes are in sync.'],
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
    purpose: 'Every volume with its size, storage group, VM ("none" when unattached), sync state, primary PM and resync progress. Open a volume for its replica and statistics. Unattached volumes can be removed after confirmation; data volumes of stopped VMs can be detached (data kept) or attached.',
    items: [
      ['in sync', 'Mirrored: every write is on both PMs before the guest is told it is done.'],
      ['resyncing N%', 'The partner copy is being brought up to date (progress bar with the time left); the VM is not fully redundant until done.'],
      ['degraded', 'The primary writes alone (its partner is not connected); a resync follows when the partner is back.'],
      ['secondary', 'Seen from the PM holding the secondary replica: it receives the primary\'s writes.'],
      ['split brain', 'Both replicas were written independently; replication waits for a decision on which to keep.'],
      ['simplex', 'Stored on one PM only: no partner to mirror to.'],
      ['Primary PM', 'The PM whose replica serves the VM\'s reads and writes (where the VM runs).'],
      ['Allocated', 'Space actually used on disk (volumes are sparse files).'],
    ],
  },
  volume: {
    purpose: 'One volume: where it lives, its replica on this PM and the link to the partner, resync progress, and statistics (SPEC S9) with the advice on whether a faster sync link would help. Updated every 2 seconds.',
    items: [
      ['Dirty regions', 'Regions written since the partner last had them: what a resync copies.'],
      ['Replication latency', 'From sending a write to the partner until it is durable there: every mirrored write waits this long.'],
      ['Sync-link advice', 'From the write throughput (below 35 MB/s unlikely, above 50 MB/s likely) and the average write size (below 8 KiB unlikely, above 16 KiB likely); the overall advice is the less optimistic of the two.'],
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
