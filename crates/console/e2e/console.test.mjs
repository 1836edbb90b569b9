// End-to-end test of the browser console: real headless Chromium (Debian's
// chromium, driven by playwright-core) against a real Pairvisor daemon
// booting the test guest under QEMU. Run by crates/pairvisor/tests/browser.rs;
// by hand:
//
//   PV_CA_FILE=DATA/tls/api-ca.pem NODE_EXTRA_CA_CERTS=DATA/tls/api-ca.pem PV_URL=https://127.0.0.1:7480 PV_ADMIN_PASSWORD=... PV_OPERATOR_PASSWORD=... \
//   PV_KERNEL=target/guest/vmlinuz PV_INITRD=target/guest/initrd.img \
//   node crates/console/e2e/console.test.mjs
//
// Environment: PV_URL, PV_ADMIN_USER (admin), PV_ADMIN_PASSWORD,
// PV_OPERATOR_USER (op), PV_OPERATOR_PASSWORD, PV_KERNEL, PV_INITRD,
// PV_ISO (optional: an ISO to upload as a VCD), PV_SCREENSHOTS (directory,
// default target/screenshots), PV_CHROMIUM (default /usr/bin/chromium).

import { chromium } from 'playwright-core';
import { chromiumTrustArgs, checkHttps } from './trust.mjs';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
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
const OP = env('PV_OPERATOR_USER', 'op');
const OP_PW = env('PV_OPERATOR_PASSWORD');
const KERNEL = env('PV_KERNEL');
const INITRD = env('PV_INITRD');
const ISO = process.env.PV_ISO;
const SHOTS = env('PV_SCREENSHOTS', 'target/screenshots');
const CHROMIUM = env('PV_CHROMIUM', '/usr/bin/chromium');
const VM = 'web1';

const t0 = Date.now();
const log = (...a) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1)}s]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}

async function apiCall(token, method, path, body) {
  const r = await fetch(`${URL}/api/v1${path}`, {
    method,
    headers: { ...(token ? { Authorization: `Bearer ${token}` } : {}), ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await r.text();
  let data = text;
  try {
    data = JSON.parse(text);
  } catch { /* text */ }
  return { status: r.status, data };
}

async function login(page, user, password) {
  await page.goto(`${URL}/`);
  await page.fill('#login-user', user);
  await page.fill('#login-password', password);
  await page.click('button[type=submit]');
  await page.waitForSelector('.topbar .who', { timeout: 15000 });
  log(`logged in as ${user}`);
}

async function shot(page, name, fullPage = false) {
  const path = join(SHOTS, `${name}.png`);
  await page.screenshot({ path, fullPage });
  log(`screenshot ${path}`);
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
    const adminToken = (await apiCall(null, 'POST', '/auth/login', { user: ADMIN, password: ADMIN_PW })).data.token;
    assert(adminToken, 'admin can log in through the API');
    // Times are shown in the unit's zone: set one different from the browser's.
    assert((await apiCall(adminToken, 'PATCH', '/settings', { timezone: 'Asia/Tokyo' })).status === 200, 'set time zone');

    // ---------------------------------------------------------- HTTPS
    await checkHttps(page, URL, assert, log);

    // ---------------------------------------------------------- login
    await page.goto(`${URL}/`);
    await page.waitForSelector('#login-user');
    await page.fill('#login-user', ADMIN);
    await page.fill('#login-password', 'wrong password');
    await page.click('button[type=submit]');
    await page.waitForSelector('.alert.error .server-message');
    const badLogin = await page.textContent('.alert.error .server-message');
    assert(badLogin === 'user name or password is wrong', `bad login shows the server's message, got ${badLogin}`);
    await login(page, ADMIN, ADMIN_PW);
    await page.waitForSelector('h1:has-text("Dashboard")');
    await page.waitForSelector('#live.connected', { timeout: 10000 });
    assert((await page.textContent('.topbar .tz')).includes('Asia/Tokyo'), 'times are in the unit time zone');
    await page.waitForSelector('text=No active alerts');
    await shot(page, 'dashboard-empty');

    // ------------------------------------------------ keyboard navigation
    await page.keyboard.press('g');
    await page.keyboard.press('v');
    await page.waitForSelector('h1:has-text("Virtual Machines")');
    await page.waitForSelector('text=No virtual machines yet');
    assert((await page.getAttribute('.sidebar a[data-nav=vms]', 'aria-current')) === 'page', 'nav marks the current page');
    await page.keyboard.press('?');
    assert(await page.isHidden('#help') !== await page.evaluate(() => localStorage.getItem('pv_help') !== 'closed'), 'help toggles');
    await page.keyboard.press('?');
    await page.waitForSelector('#help:not([hidden]) >> text=Every virtual machine');

    // ---------------------------------------- wizard: an invalid entry
    await page.click('#create-vm');
    await page.waitForSelector('h1:has-text("Create a VM")');
    await page.fill('#vm-name', 'bad name!');
    await page.selectOption('#vm-guest-type', 'other');
    for (let i = 0; i < 5; i++) await page.click('#wizard-next');
    await page.click('#wizard-create');
    await page.waitForSelector('#wizard-error .server-message');
    const shown = await page.textContent('#wizard-error .server-message');
    const expected = await apiCall(adminToken, 'POST', '/vms', {
      name: 'bad name!', vcpus: 1, memory_mib: 256, boot_volume: { size_bytes: 1 << 30 },
    });
    assert(expected.status === 400, `the API refuses the name: ${JSON.stringify(expected)}`);
    assert(shown === expected.data.message, `the wizard shows the server's message verbatim:\n  shown:    ${shown}\n  expected: ${expected.data.message}`);
    log('invalid wizard entry shows:', shown);

    // ---------------------------------------------- wizard: a real VM
    await page.click('text=Fix it in step 1');
    await page.fill('#vm-name', VM);
    await page.click('#wizard-next');
    await page.fill('#vm-vcpus', '1');
    await page.fill('#vm-memory', '256');
    const rules = await page.textContent('.admission');
    const pm = (await apiCall(adminToken, 'GET', '/pm')).data;
    assert(rules.includes('Memory:') && rules.includes('free of') && rules.includes('vCPUs:')
      && rules.includes(`of ${pm.vcpu_capacity} `) && rules.includes('of 62 volumes and VCDs'),
      `admission rules (memory, vCPU budget, volume count) shown before submit: ${rules}`);
    await page.click('#wizard-next');
    await page.fill('#vm-boot-size input[type=number]', '64');
    await page.selectOption('#vm-boot-size select', 'MiB');
    await page.click('#wizard-next');
    await page.click('#wizard-next'); // networks: one NIC on "user"
    await page.check('input[name=source][value=kernel]');
    await page.fill('#vm-kernel', KERNEL);
    await page.fill('#vm-initrd', INITRD);
    // console=tty0 first: kernel messages appear on the VGA (VNC) screen too;
    // /dev/console (the guest's own output) stays on ttyS0.
    await page.fill('#vm-cmdline', 'console=tty0 console=ttyS0 panic=0');
    await page.click('#wizard-next');
    await page.waitForSelector('h2:has-text("Review")');
    await shot(page, 'wizard');
    await page.click('#wizard-create');
    await page.waitForSelector(`h1:has-text("${VM}")`);
    await page.waitForSelector('#vm-state [data-state=stopped]');
    log('VM created in the wizard');

    // ---------------------------------------- start, running via SSE
    await page.evaluate(() => { window.__noReload = true; });
    let apiRunningAt = 0;
    let polling = true;
    const poller = (async () => {
      while (polling && !apiRunningAt) {
        const r = await apiCall(adminToken, 'GET', `/vms/${VM}`);
        if (r.data.state === 'running') apiRunningAt = Date.now();
        await sleep(100);
      }
    })();
    await page.click('[data-op=start]');
    await page.waitForSelector('#vm-state [data-state=booting], #vm-state [data-state=running]', { timeout: 15000 });
    log('booting');
    await page.waitForSelector('#vm-state [data-state=running]', { timeout: 180000 });
    const uiRunningAt = Date.now();
    await sleep(300);
    polling = false;
    await poller;
    assert(apiRunningAt > 0, 'the API saw running');
    const lag = uiRunningAt - apiRunningAt;
    log(`running shown ${lag} ms after the API first reported it (polled every 100 ms)`);
    assert(lag < 1000, `the UI shows running within a second of the API (lag ${lag} ms)`);
    assert(await page.evaluate(() => window.__noReload === true), 'no page reload');
    assert(await page.isVisible('#live.connected'), 'live updates connected');

    // -------------------------------------------------------- VM list
    await page.click('.sidebar a[data-nav=vms]');
    await page.waitForSelector(`tr[data-vm=${VM}][data-state=running]`);
    await shot(page, 'vm-list');
    await page.click('.sidebar a[data-nav=dashboard]');
    await page.waitForSelector('[data-count-state=running]');
    await shot(page, 'dashboard');

    // -------------------------------------------------------- console
    await page.goto(`${URL}/#/vms/${VM}/console`);
    await page.waitForSelector('#vnc-status.ok', { timeout: 30000 });
    log('VNC connected');
    await page.waitForSelector('#serial-follow:checked');
    await page.waitForFunction(() => document.querySelector('#serial-log').textContent.includes('pv-guest: ready'), null, { timeout: 60000 });
    log('serial log shows pv-guest: ready');
    const len0 = await page.evaluate(() => document.querySelector('#serial-log').textContent.length);
    await page.waitForFunction((n) => document.querySelector('#serial-log').textContent.length > n
      && /pv-guest: heartbeat \d+/.test(document.querySelector('#serial-log').textContent), len0, { timeout: 20000 });
    log('follow mode streams new output (heartbeats)');
    const nonBlank = async () => page.evaluate(() => {
      const c = document.querySelector('#vnc-screen canvas');
      if (!c || !c.width || !c.height) return 0;
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let lit = 0;
      for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 60) lit += 1;
      return lit;
    });
    let lit = 0;
    for (let i = 0; i < 60 && lit < 5000; i++) {
      lit = await nonBlank();
      if (lit < 5000) await sleep(500);
    }
    log(`VNC canvas: ${lit} lit pixels`);
    assert(lit >= 5000, 'the VNC canvas shows the guest screen (non-blank)');
    await page.evaluate(() => {
      const s = document.querySelector('#serial-log');
      s.scrollTop = s.scrollHeight;
    });
    await shot(page, 'console', true);

    // ------------------------------------------------------ shut down
    await page.click('[data-op=shutdown]');
    await page.waitForSelector('dialog[open] >> text=Shut down web1?');
    await page.click('dialog[open] button[type=submit]');
    await page.waitForSelector('#vm-state [data-state=stopping], #vm-state [data-state=stopped]');
    await page.waitForSelector('#vm-state [data-state=stopped]', { timeout: 90000 });
    log('shut down: stopped');
    await page.waitForSelector('#vnc-status:has-text("connects by itself")', { timeout: 15000 });

    // ------------------------------------- volumes tab: attach a volume
    // The volume chosen in the attach selector survives the tab's redraws
    // (here the one after a detach): the one attached is the one chosen.
    for (const n of ['spare-a', 'spare-b', 'spare-c']) {
      const r = await apiCall(adminToken, 'POST', '/volumes', { name: n, size_bytes: 64 << 20 });
      assert(r.status === 201, `create volume ${n}: ${JSON.stringify(r)}`);
    }
    assert((await apiCall(adminToken, 'POST', '/volumes/spare-c/attach', { vm: VM })).status === 200, 'attach spare-c');
    await page.click('#tab-volumes');
    await page.waitForSelector('#attach-vol');
    const first = await page.$eval('#attach-vol', (el) => el.options[0].value);
    const chosen = first === 'spare-b' ? 'spare-a' : 'spare-b';
    await page.selectOption('#attach-vol', chosen);
    const sel = await page.$('#attach-vol');
    await sel.evaluate((el) => el.blur());
    await page.click('#tabpanel tr:has-text("spare-c") button:has-text("Detach")');
    await sel.waitForElementState('hidden', { timeout: 30000 }); // detached by the redraw
    await page.waitForSelector('#attach-vol option[value=spare-c]', { state: 'attached' });
    assert(await page.$eval('#attach-vol', (el) => el.value) === chosen, `a redraw keeps the volume chosen to attach (${chosen})`);
    await page.click('#tabpanel button:has-text("Attach")');
    await page.waitForSelector(`#tabpanel td:text-is("${chosen}")`);
    assert((await apiCall(adminToken, 'GET', `/volumes/${chosen}`)).data.vm === VM, `${chosen} is attached to ${VM}`);
    log(`volumes tab: ${chosen} chosen, kept through a redraw, attached`);
    // The tab follows the VM's state without being reopened: while the VM
    // runs, attaching and detaching are refused with the reason.
    const started = await apiCall(adminToken, 'POST', `/vms/${VM}/start`);
    assert(started.status < 300, `start ${VM}: ${JSON.stringify(started)}`);
    await page.waitForSelector('#tabpanel button:has-text("Detach")[aria-disabled=true]', { timeout: 30000 });
    assert((await page.getAttribute('#tabpanel button:has-text("Detach")', 'title')).includes('must be stopped'),
      'the refusal says why');
    const off = await apiCall(adminToken, 'POST', `/vms/${VM}/poweroff`);
    assert(off.status < 300, `power off ${VM}: ${JSON.stringify(off)}`);
    await page.waitForSelector('#vm-state [data-state=stopped]', { timeout: 60000 });
    await page.waitForSelector('#tabpanel button:has-text("Detach"):not([aria-disabled])', { timeout: 30000 });
    log('volumes tab: follows the VM started and powered off without reopening');

    // ------------------------------------------------------ VCD upload
    if (ISO) {
      await page.click('.sidebar a[data-nav=vcds]');
      await page.waitForSelector('text=No virtual CDs yet');
      await page.setInputFiles('#vcd-file', ISO);
      await page.fill('#vcd-name', 'guest-iso');
      await page.click('#vcd-upload');
      await page.waitForSelector('td >> text=guest-iso', { timeout: 60000 });
      assert((await page.textContent('.progress-row')).includes('Uploaded'), 'upload progress reached the end');
      log('VCD uploaded with progress');
    }

    // ---------------------------------- operator cannot remove a VM
    await page.click('text=Log out');
    await page.waitForSelector('#login-user');
    await login(page, OP, OP_PW);
    await page.goto(`${URL}/#/vms/${VM}`);
    await page.waitForSelector('#vm-state [data-state=stopped]');
    const rm = page.locator('[data-op=remove]');
    assert((await rm.getAttribute('aria-disabled')) === 'true', 'Remove is disabled for an operator');
    assert((await rm.getAttribute('title')).includes('administrator'), 'Remove says it needs the administrator role');
    assert((await page.getAttribute('[data-op=start]', 'aria-disabled')) === null, 'an operator may start');
    assert(!(await page.isVisible('.sidebar a[data-nav=users]')), 'Users page hidden from operators');
    await rm.focus(); // still reachable by keyboard: Enter only explains why
    await page.keyboard.press('Enter');
    await page.waitForSelector('.toast >> text=needs the administrator role');
    const refused = await page.evaluate(async (vm) => {
      const r = await fetch(`/api/v1/vms/${vm}`, { method: 'DELETE', headers: { Authorization: `Bearer ${sessionStorage.getItem('pv_token')}` } });
      return { status: r.status, body: await r.json() };
    }, VM);
    assert(refused.status === 403 && refused.body.code === 'forbidden', `the server refuses the operator: ${JSON.stringify(refused)}`);
    assert((await apiCall(adminToken, 'GET', `/vms/${VM}`)).status === 200, 'the VM still exists');
    log('operator: Remove disabled, server refuses (403)');

    assert(consoleErrors.filter((e) => !/Failed to load resource|status of 40[349]/.test(e)).length === 0,
      `no JavaScript errors: ${consoleErrors.join('\n')}`);
    log('ALL BROWSER CHECKS PASSED');
  } catch (e) {
    try {
      await shot(page, 'failure');
    } catch { /* ignore */ }
    console.error('browser console errors:', consoleErrors.join('\n'));
    throw e;
  } finally {
    await ctx.close();
    rmSync(profile, { recursive: true, force: true });
  }
}

const deadline = setTimeout(() => {
  console.error('timed out after 10 minutes');
  process.exit(2);
}, 10 * 60 * 1000);
main().then(() => {
  clearTimeout(deadline);
  process.exit(0);
}, (e) => {
  console.error(e.stack || e);
  process.exit(1);
});
