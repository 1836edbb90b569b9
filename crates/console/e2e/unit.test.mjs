// End-to-end test of the console against a two-PM unit: real headless
// Chromium (Debian's chromium, driven by playwright-core) against a
// `pairvisor lab` (two PM daemons and a witness in their own network
// namespaces, QEMU under TCG, the demo VM on pm-a). Run by
// crates/pairvisor/tests/browser_unit.rs; by hand, with a lab up:
//
//   PV_CA_FILE=DATA/tls/api-ca.pem NODE_EXTRA_CA_CERTS=DATA/tls/api-ca.pem PV_URL=https://10.199.2.1:7480 PV_ADMIN_PASSWORD=pairvisor-lab \
//   PV_LAB_DIR=target/lab node crates/console/e2e/unit.test.mjs
//
// It logs in on pm-a, sees both PMs running on the Unit page (links, lease,
// quorum), cancels a unit shutdown at its confirmation, puts pm-b in
// maintenance and back (Work On, Finalize), sees the demo volume in sync
// with its statistics, migrates the demo VM to pm-b from the console and
// sees the panel reach "done" with a downtime figure, then makes the guest
// dirty memory faster than a capped link: the panel says "not converging"
// with the numbers and offers remedies; cancel works, and "pause and
// finish" brings the VM back to pm-a. Finally it sets the VM's preferred
// PM. Then the double fault (issue 12): the sync link is cut, pm-a writes
// alone (the volume page says pm-b's replica is outdated), pm-a dies; on
// pm-b's console the VM page says why it stays down, and "Promote anyway"
// needs the VM's name typed; when pm-a returns the volume page shows the
// split brain side by side and "Keep this copy" (typed) resolves it.
// Screenshots go to PV_SCREENSHOTS (default target/screenshots).
//
// Environment: PV_URL (pm-a's API), PV_ADMIN_USER (admin),
// PV_ADMIN_PASSWORD, PV_LAB_DIR (the lab directory: lab.json and the PMs'
// data, for the guest's console sockets), PV_VM (demo), PV_SCREENSHOTS,
// PV_CHROMIUM (default /usr/bin/chromium).

import { chromium } from 'playwright-core';
import { chromiumTrustArgs, checkHttps } from './trust.mjs';
import { mkdtempSync, mkdirSync, rmSync, readFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`environment variable ${k} is required`);
  return v;
};
const URL = env('PV_URL').replace(/\/$/, '');
// The CA(s) that vouch for the API's HTTPS (see trust.mjs).
const CA_FILE = env('PV_CA_FILE');
const ADMIN = env('PV_ADMIN_USER', 'admin');
const ADMIN_PW = env('PV_ADMIN_PASSWORD');
const LAB = env('PV_LAB_DIR');
const VM = env('PV_VM', 'demo');
const SHOTS = env('PV_SCREENSHOTS', 'target/screenshots');
const CHROMIUM = env('PV_CHROMIUM', '/usr/bin/chromium');
// pm-b's API and the pairvisor binary (for `lab cut/kill/start/heal`).
const URL_B = env('PV_URL_B').replace(/\/$/, '');
const PV_BIN = env('PV_BIN');

function labCmd(...args) {
  execFileSync(PV_BIN, ['lab', '--dir', LAB, ...args], { stdio: 'pipe' });
  log(`lab ${args.join(' ')}`);
}

const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}

let token = null;
async function apiCall(method, path, body, base = URL) {
  if (!token) {
    const r = await fetch(`${URL}/api/v1/auth/login`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ user: ADMIN, password: ADMIN_PW }),
    });
    token = (await r.json()).token;
  }
  const r = await fetch(`${base}/api/v1${path}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  let data = text;
  try {
    data = JSON.parse(text);
  } catch { /* text */ }
  return { status: r.status, data };
}

async function until(what, secs, fn) {
  const deadline = Date.now() + secs * 1000;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${secs} s: ${what}`);
    await sleep(250);
  }
}

// ------------------------------------------------- the guest, by its console

function member(name) {
  const st = JSON.parse(readFileSync(join(LAB, 'lab.json'), 'utf8'));
  return st.members.find((m) => m.name === name);
}

function runDir(pm, vmId) {
  return join(member(pm).data, 'run', vmId);
}

/** Types a line on the guest's serial console (on the PM running it). */
function typeLine(pm, vmId, line) {
  return new Promise((resolve, reject) => {
    const c = createConnection(join(runDir(pm, vmId), 'console.sock'), () => {
      c.write(`${line}\n`);
      // QEMU reads the line before we hang up.
      setTimeout(() => {
        c.end();
        resolve();
      }, 300);
    });
    c.on('error', reject);
  });
}

function consoleLog(pm, vmId) {
  try {
    return readFileSync(join(runDir(pm, vmId), 'console.log'), 'utf8');
  } catch {
    return '';
  }
}

async function guest(pm, vmId, line, expect, secs = 60) {
  const before = consoleLog(pm, vmId).length;
  await typeLine(pm, vmId, line);
  await until(`'${expect}' on ${pm}'s console after '${line}'`, secs, () => consoleLog(pm, vmId).slice(before).includes(expect));
  log(`guest on ${pm}: ${line} → ${expect}`);
}

// ---------------------------------------------------------------- browser

async function shot(page, name, fullPage = false) {
  const path = join(SHOTS, `${name}.png`);
  // Toasts of earlier steps would hide part of the page.
  await page.evaluate(() => document.getElementById('toasts')?.replaceChildren());
  await page.screenshot({ path, fullPage });
  log(`screenshot ${path}`);
}

/** Clicks the submit button of the open confirmation dialog. */
async function confirm(page, title) {
  await page.waitForSelector(`dialog[open] >> text=${title}`);
  await page.click('dialog[open] button[type=submit]');
  await page.waitForSelector('dialog[open]', { state: 'detached' });
}

async function startMigration(page, bandwidth) {
  await page.click('.vm-header [data-op=migrate]');
  await page.waitForSelector('dialog[open] #mig-start');
  if (bandwidth !== undefined) await page.fill('#mig-bandwidth', String(bandwidth));
  await page.click('#mig-start');
  await page.waitForSelector('dialog[open]', { state: 'detached' });
  await page.waitForSelector('#migration:not([hidden]) #migration-phase');
}

async function main() {
  mkdirSync(SHOTS, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), 'pv-chromium-'));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
      ...chromiumTrustArgs(CA_FILE)],
    viewport: { width: 1440, height: 900 },
    timezoneId: 'UTC',
  });
  const page = ctx.pages()[0] || (await ctx.newPage());
  const consoleErrors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') consoleErrors.push(m.text());
  });
  page.on('pageerror', (e) => consoleErrors.push(`pageerror: ${e.message}`));
  page.setDefaultTimeout(20000);
  try {
    const vm0 = (await apiCall('GET', `/vms/${VM}`)).data;
    assert(vm0.host === 'pm-a' && vm0.state === 'running', `the demo VM runs on pm-a: ${JSON.stringify(vm0)}`);
    const vmId = vm0.id;

    await checkHttps(page, URL, assert, log);

    // ---------------------------------------------------------- login
    await page.goto(`${URL}/`);
    await page.fill('#login-user', ADMIN);
    await page.fill('#login-password', ADMIN_PW);
    await page.click('button[type=submit]');
    await page.waitForSelector('.topbar .who');
    await page.waitForSelector('#live.connected', { timeout: 10000 });
    await page.waitForFunction(() => document.querySelector('.topbar .unit-name').textContent.includes('pm-a'));
    log('logged in on pm-a:', await page.textContent('.topbar .unit-name'));

    // ------------------------------------------------------ unit page
    await page.keyboard.press('g');
    await page.keyboard.press('n');
    await page.waitForSelector('h1:has-text("Unit")');
    await page.waitForSelector('#help:not([hidden]) >> text=heartbeat links');
    await page.waitForSelector('[data-pm=pm-a][data-state=running]');
    await page.waitForSelector('[data-pm=pm-b][data-state=running]');
    await page.waitForSelector('#unit-lease[data-lease=true]');
    await page.waitForSelector('#unit-quorum[data-quorum=true]');
    await page.waitForSelector('#unit-power[data-power=running]');
    for (const link of ['private', 'business']) {
      await page.waitForSelector(`tr[data-link=${link}] [data-link-up=true]`);
      const rtt = await page.textContent(`tr[data-link=${link}] td:nth-child(3)`);
      assert(/\d ms$/.test(rtt.trim()), `link ${link} shows its round trip: ${rtt}`);
    }
    assert(!(await page.isVisible('#force-quorum')), 'no force-quorum panel while the unit has quorum');
    assert((await page.textContent('[data-pm=pm-a]')).includes(VM), 'pm-a lists the demo VM');
    log('unit page: both PMs running, links up with RTT, lease held, quorum');
    await shot(page, 'unit-page');

    // An operation not allowed now explains why (button kept reachable).
    const fin = page.locator('[data-pm=pm-a] [data-pm-op=finalize]');
    assert((await fin.getAttribute('aria-disabled')) === 'true', 'Finalize is disabled on a running PM');
    await fin.focus();
    await page.keyboard.press('Enter');
    await page.waitForSelector('.toast >> text=not allowed while running');

    // Unit shutdown asks first; cancelling changes nothing.
    await page.click('#unit-shutdown');
    await page.waitForSelector('dialog[open] >> text=Shut down unit lab?');
    assert((await page.textContent('dialog[open]')).includes(VM), 'the shutdown confirmation names the VMs that will restart');
    await page.click('dialog[open] button:has-text("Cancel")');
    await page.waitForSelector('dialog[open]', { state: 'detached' });
    assert((await apiCall('GET', '/unit')).data.power.power === 'running', 'the unit still runs');
    log('unit shutdown: confirmation shown, cancelled');

    // Work On pm-b (no VM on it: straight into maintenance), then Finalize.
    await page.click('[data-pm=pm-b] [data-pm-op="work on"]');
    await confirm(page, 'Work On pm-b?');
    await page.waitForSelector('[data-pm="pm-b"][data-state="running (in maintenance)"]', { timeout: 60000 });
    assert((await page.getAttribute('[data-pm=pm-b] [data-pm-op=finalize]', 'aria-disabled')) === null, 'Finalize is allowed in maintenance');
    await shot(page, 'unit-pm-maintenance');
    await page.click('[data-pm=pm-b] [data-pm-op=finalize]');
    await page.waitForSelector('[data-pm=pm-b][data-state=running]', { timeout: 30000 });
    log('pm-b: Work On → in maintenance → Finalize → running');

    // ----------------------------------------------------- VMs, volumes
    await page.keyboard.press('g');
    await page.keyboard.press('v');
    await page.waitForSelector(`tr[data-vm=${VM}] [data-host=pm-a]`);
    await shot(page, 'unit-vm-list');

    // Some writes, so that the statistics have something to show.
    await guest('pm-a', vmId, 'pv write 10 64', 'pv-guest: write done 10 64');
    await page.keyboard.press('g');
    await page.keyboard.press('o');
    await page.waitForSelector('tr[data-volume=demo-boot][data-sync=in_sync]', { timeout: 60000 });
    assert((await page.textContent('tr[data-volume=demo-boot]')).includes('pm-a'), 'the primary PM is shown');
    await shot(page, 'unit-volumes');
    await page.click('tr[data-volume=demo-boot] a[href="#/volumes/demo-boot"]');
    await page.waitForSelector('#volume-primary:has-text("pm-a")');
    await page.waitForSelector('#volume-advice [data-advice]');
    await page.waitForFunction(() => /Writes\s*[1-9]/.test(document.querySelector('#volume-stats').textContent));
    await shot(page, 'unit-volume-detail', true);
    log('volume demo-boot: in sync, primary pm-a, statistics shown');

    // ------------------------------------------------ migrate to pm-b
    await page.goto(`${URL}/#/vms/${VM}`);
    await page.waitForSelector('#vm-host:has-text("pm-a")');
    await page.click('.vm-header [data-op=migrate]');
    await page.waitForSelector('dialog[open] >> text=Migrate demo to pm-b');
    await page.click('#mig-estimate-btn');
    await page.waitForSelector('#mig-estimate .verdict', { timeout: 30000 });
    await shot(page, 'unit-migrate-dialog');
    await page.click('#mig-start');
    await page.waitForSelector('dialog[open]', { state: 'detached' });
    await page.waitForSelector('#migration-phase[data-phase=done]', { timeout: 120000 });
    const shownMs = Number(await page.getAttribute('#migration-downtime', 'data-ms'));
    const m1 = (await apiCall('GET', `/vms/${VM}/migration`)).data;
    assert(m1.phase === 'done' && m1.dest === 'pm-b', `the API agrees: ${JSON.stringify(m1)}`);
    assert(m1.encrypted === true && (await page.getAttribute('#migration-stream', 'data-encrypted')) === 'true',
      'the panel says the memory stream was encrypted');
    assert(shownMs === m1.downtime_ms && shownMs > 0, `the panel shows the measured downtime (${shownMs} ms; API ${m1.downtime_ms} ms)`);
    assert((await page.textContent('#migration-result')).includes('runs on pm-b'), 'the panel says where the VM runs now');
    await page.waitForSelector('#vm-host:has-text("pm-b")', { timeout: 30000 });
    log(`migrated to pm-b from the console: downtime ${shownMs} ms, total ${m1.total_ms} ms`);
    await shot(page, 'unit-migration-done');

    // --------------------------- a guest that dirties memory too fast
    await guest('pm-b', vmId, 'pv dirty 64', 'pv-guest: dirty started', 30);
    await page.click('#migration-dismiss');
    await startMigration(page, 4);
    await page.waitForSelector('#migration-verdict[data-verdict=not_converging]', { timeout: 120000 });
    const why = await page.textContent('#migration-verdict');
    assert(why.includes('Not converging') && why.includes('MB/s'), `the verdict explains with the numbers: ${why}`);
    assert(await page.isVisible('[data-remedy=pause_and_finish]'), 'remedies are offered');
    assert(await page.isVisible('[data-remedy=raise_downtime]'), 'raising the downtime is offered');
    log('not converging:', why.trim());
    await shot(page, 'unit-migration-not-converging');
    // Cancel: the VM stays on pm-b.
    await page.click('#migration-cancel');
    await confirm(page, `Cancel the migration of ${VM}?`);
    await page.waitForSelector('#migration-phase[data-phase=failed]', { timeout: 30000 });
    await page.waitForSelector('#migration-failed >> text=cancelled');
    assert((await apiCall('GET', `/vms/${VM}`)).data.host === 'pm-b', 'after cancelling, the VM is still on pm-b');
    log('cancelled: the VM stays on pm-b');
    // Again, finished by pausing the VM.
    await page.click('#migration-dismiss');
    await startMigration(page, 10);
    await page.waitForSelector('[data-remedy=pause_and_finish]', { timeout: 120000 });
    await page.click('[data-remedy=pause_and_finish]');
    await confirm(page, `Pause ${VM} and finish?`);
    await page.waitForSelector('#migration-phase[data-phase=done]', { timeout: 300000 });
    await page.waitForSelector('#vm-host:has-text("pm-a")', { timeout: 30000 });
    log('pause and finish: back on pm-a');
    await guest('pm-a', vmId, 'pv stop', 'pv-guest: stopped', 30);

    // ----------------------------------------------------- placement
    await page.selectOption('#vm-preferred', 'pm-a');
    // The summary redraws on live events and every 10 s: a choice not yet
    // saved must survive a redraw even when the selector lost focus.
    const before = await page.$('#vm-preferred');
    await before.evaluate((el) => el.blur());
    await before.waitForElementState('hidden', { timeout: 30000 }); // detached by a redraw
    assert(await page.$eval('#vm-preferred', (el) => el.value) === 'pm-a',
      'a redraw keeps the preferred PM chosen but not saved yet');
    await page.click('#vm-preferred-save');
    await page.waitForSelector(`.placement >> text=Saved: ${VM} prefers pm-a`);
    assert((await apiCall('GET', `/vms/${VM}`)).data.preferred_pm === 'pm-a', 'the preferred PM is set');
    await page.keyboard.press('g');
    await page.keyboard.press('v');
    await page.waitForSelector(`tr[data-vm=${VM}] [data-preferred=pm-a]`);
    log('preferred PM set to pm-a');

    // The volume is in sync again after the hand-overs.
    await page.keyboard.press('g');
    await page.keyboard.press('o');
    await page.waitForSelector('tr[data-volume=demo-boot][data-sync=in_sync]', { timeout: 60000 });
    await page.keyboard.press('g');
    await page.keyboard.press('d');
    await page.waitForSelector('#dash-unit [data-pm=pm-b]');
    await shot(page, 'unit-dashboard');

    // ------------------------------------------- the double fault (#12)
    await guest('pm-a', vmId, 'pv write 21 100000', 'pv-guest: acked 21 20', 120);
    labCmd('cut', 'private');
    await until('pm-b outdated', 60, async () => (await apiCall('GET', '/volumes/demo-boot')).data.outdated?.pm === 'pm-b');
    await page.goto(`${URL}/#/volumes/demo-boot`);
    await page.waitForSelector('#volume-outdated >> text=outdated', { timeout: 30000 });
    await shot(page, 'unit-volume-outdated');
    await until('writes acknowledged alone', 120, () => consoleLog('pm-a', vmId).includes('pv-guest: acked 21 60'));
    // The rest happens on pm-b's console (pm-a is about to die).
    await page.goto(`${URL_B}/`);
    await page.fill('#login-user', ADMIN);
    await page.fill('#login-password', ADMIN_PW);
    await page.click('button[type=submit]');
    await page.waitForSelector('.topbar .who');
    labCmd('kill', 'pm-a');
    await page.goto(`${URL_B}/#/vms/${VM}`);
    await page.waitForSelector('#vm-stranded-card >> text=failover refused', { timeout: 90000 });
    await shot(page, 'unit-failover-refused');
    await page.click('#promote-anyway');
    await page.waitForSelector('dialog[open] #promote-confirm');
    assert(await page.$eval('dialog[open] button[type=submit]', (b) => b.disabled), 'promote needs the name typed');
    await page.fill('#promote-confirm', VM);
    await page.click('dialog[open] button[type=submit]');
    await page.waitForSelector('dialog[open]', { state: 'detached' });
    await until('demo running on pm-b', 120, async () => {
      const v = (await apiCall('GET', `/vms/${VM}`, null, URL_B)).data;
      return v.host === 'pm-b' && v.state === 'running';
    });
    log('promoted anyway on pm-b');
    // The guest writes on pm-b too: the copies diverge.
    await until('the guest is up on pm-b', 120, () => consoleLog('pm-b', vmId).includes('pv-guest: ready'));
    await guest('pm-b', vmId, 'pv write 22 20 5000', 'pv-guest: write done 22', 120);
    labCmd('heal');
    labCmd('start', 'pm-a');
    await page.goto(`${URL_B}/#/volumes/demo-boot`);
    await page.waitForSelector('#volume-split-brain [data-keep=pm-a]', { timeout: 120000 });
    await page.waitForSelector('#volume-split-brain [data-keep=pm-b]');
    await shot(page, 'unit-split-brain');
    await page.click('#volume-split-brain [data-keep=pm-b]');
    await page.waitForSelector('dialog[open] #resolve-confirm');
    await page.fill('#resolve-confirm', 'demo-boot');
    await page.click('dialog[open] button[type=submit]');
    await page.waitForSelector('dialog[open]', { state: 'detached' });
    await until('resolved and in sync', 180, async () => {
      const v = (await apiCall('GET', '/volumes/demo-boot/split-brain', null, URL_B)).data;
      return v.split_brain === false && !v.resolving_keep && v.sync === 'in_sync';
    });
    await page.waitForSelector('.volume-sync >> text=in sync', { timeout: 30000 }).catch(() => {});
    log('split brain resolved from the console, keeping pm-b\'s copy');

    assert(consoleErrors.filter((e) => !/Failed to load resource|status of 40[349]|status of 50[23]/.test(e)).length === 0,
      `no JavaScript errors: ${consoleErrors.join('\n')}`);
    log('ALL UNIT BROWSER CHECKS PASSED');
  } catch (e) {
    try {
      await shot(page, 'unit-failure', true);
    } catch { /* ignore */ }
    console.error('browser console errors:', consoleErrors.join('\n'));
    throw e;
  } finally {
    await ctx.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

const deadline = setTimeout(() => {
  console.error('timed out after 12 minutes');
  process.exit(2);
}, 12 * 60 * 1000);
main().then(() => {
  clearTimeout(deadline);
  process.exit(0);
}, (e) => {
  console.error(e.stack || e);
  process.exit(1);
});
