// The Pairvisor console: login, shell (header, navigation, help), hash
// router, shared data store and live updates (server-sent events).

import { api, setToken, token, onUnauthenticated, liveUrl, ApiError } from './api.js';
import { h, mount, setTimeZone, currentTimeZone, errorBox, toast } from './ui.js';
import { HELP } from './help.js';

// ------------------------------------------------------------------ store

/** Data shared by the pages, refreshed on live events. */
export const store = {
  user: null,
  role: null,
  settings: null,
  pm: null,
  vms: [],
  alerts: [],
  /** GET /unit: {name: null} outside a unit. */
  unit: null,
  /** GET /pms: both PMs of the unit (empty outside a unit). */
  pms: [],
  apiPaths: new Set(),
  live: 'connecting',
};

const subscribers = new Map();

/** Subscribes to changes of a store key; returns the unsubscribe function. */
export function on(key, fn) {
  if (!subscribers.has(key)) subscribers.set(key, new Set());
  subscribers.get(key).add(fn);
  return () => subscribers.get(key).delete(fn);
}

function emit(key) {
  (subscribers.get(key) || []).forEach((fn) => {
    try {
      fn(store[key]);
    } catch (e) {
      console.error(e);
    }
  });
}

const loaders = {
  vms: () => api('GET', '/vms'),
  pm: () => api('GET', '/pm'),
  settings: () => api('GET', '/settings'),
  alerts: () => (store.apiPaths.has('/api/v1/alerts') ? api('GET', '/alerts') : Promise.resolve([])),
  unit: () => (store.apiPaths.has('/api/v1/unit') ? api('GET', '/unit') : Promise.resolve(null)),
  pms: () => (inUnit() && store.apiPaths.has('/api/v1/pms') ? api('GET', '/pms') : Promise.resolve([])),
};

/** Whether this PM is a member of a two-PM unit (the unit APIs apply). */
export function inUnit() {
  return Boolean(store.unit && store.unit.name);
}

/** This PM's name in the unit (else the machine's host name). */
export function thisPm() {
  const me = store.pms.find((p) => p.this_pm);
  if (me) return me.name;
  if (store.unit && store.unit.node_id && store.unit.pms) {
    const rec = store.unit.pms.find((p) => p.node_id === store.unit.node_id);
    if (rec) return rec.name;
  }
  return store.pm ? store.pm.hostname : 'this PM';
}

/** The other PM of the unit, if any. */
export function partnerPm() {
  const p = store.pms.find((x) => !x.this_pm);
  return p ? p.name : null;
}

/** Reloads what the periodic refresh and the live events keep current. */
export function refreshAll() {
  refresh('vms');
  refresh('pm');
  refresh('alerts');
  refresh('unit').then(() => refresh('pms'));
}

/** Reloads a store key from the API and notifies its subscribers. */
export async function refresh(key) {
  try {
    store[key] = await loaders[key]();
    if (key === 'settings') setTimeZone(store.settings.timezone || 'UTC');
    emit(key);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 401)) console.warn(`refresh ${key}:`, e.message);
  }
  return store[key];
}

/** Access levels of the roles (SPEC A2). */
export function can(access) {
  const rank = { read_only: 0, operator: 1, administrator: 2 }[store.role] ?? -1;
  return rank >= { read: 0, operate: 1, administer: 2 }[access];
}

export function roleNeeded(access) {
  return access === 'administer' ? 'needs the administrator role' : 'needs the operator or administrator role';
}

// ------------------------------------------------------------------ pages

/**
 * Navigation in the order an Avance/everRun administrator expects. Entries
 * with `api` appear only when the API document has that path (the unit,
 * networks, repositories and alerts pages arrive with their APIs).
 */
const NAV = [
  { id: 'dashboard', label: 'Dashboard', key: 'd' },
  { id: 'unit', label: 'Unit', api: '/api/v1/unit', page: 'unit', key: 'n' },
  { id: 'pms', label: 'Physical Machines', key: 'p' },
  { id: 'vms', label: 'Virtual Machines', key: 'v' },
  { id: 'volumes', label: 'Volumes', key: 'o' },
  { id: 'storage-groups', label: 'Storage Groups', key: 's' },
  { id: 'networks', label: 'Networks', api: '/api/v1/networks' },
  { id: 'vcds', label: 'Virtual CDs', key: 'c' },
  { id: 'repositories', label: 'Repositories', api: '/api/v1/repositories' },
  { id: 'alerts', label: 'Alerts', api: '/api/v1/alerts', page: 'alerts' },
  { id: 'users', label: 'Users', access: 'administer', key: 'u' },
  { id: 'preferences', label: 'Preferences', key: 'r' },
  { id: 'audit', label: 'Audit Log', key: 'a' },
];

const PAGES = {
  dashboard: () => import('./pages/dashboard.js'),
  pms: () => import('./pages/pms.js'),
  vms: () => import('./pages/vms.js'),
  vm: () => import('./pages/vm.js'),
  unit: () => import('./pages/unit.js'),
  volume: () => import('./pages/volume.js'),
  'vm-new': () => import('./pages/wizard.js'),
  volumes: () => import('./pages/volumes.js'),
  'storage-groups': () => import('./pages/groups.js'),
  vcds: () => import('./pages/vcds.js'),
  users: () => import('./pages/users.js'),
  preferences: () => import('./pages/prefs.js'),
  audit: () => import('./pages/audit.js'),
  alerts: () => import('./pages/alerts.js'),
  generic: () => import('./pages/generic.js'),
};

function parseRoute() {
  const path = location.hash.replace(/^#\/?/, '').split('?')[0];
  const query = new URLSearchParams(location.hash.split('?')[1] || '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  if (!parts.length) return { page: 'dashboard', nav: 'dashboard', params: {}, query };
  if (parts[0] === 'vms' && parts[1] === 'new') return { page: 'vm-new', nav: 'vms', params: {}, query };
  if (parts[0] === 'vms' && parts[1]) return { page: 'vm', nav: 'vms', params: { name: parts[1], tab: parts[2] || 'summary' }, query };
  if (parts[0] === 'volumes' && parts[1]) return { page: 'volume', nav: 'volumes', params: { name: parts[1] }, query };
  const nav = NAV.find((n) => n.id === parts[0]);
  if (nav && nav.api) return { page: nav.page || 'generic', nav: nav.id, params: { nav }, query };
  if (PAGES[parts[0]]) return { page: parts[0], nav: parts[0], params: {}, query };
  return { page: 'notfound', nav: null, params: {}, query };
}

export function navigate(hash) {
  if (location.hash === hash) window.dispatchEvent(new HashChangeEvent('hashchange'));
  else location.hash = hash;
}

// ------------------------------------------------------------------ shell

const root = () => document.getElementById('app');
let cleanup = [];
let currentRoute = null;
let helpOpen = localStorage.getItem('pv_help') !== 'closed';

function visibleNav() {
  return NAV.filter((n) => (!n.api || store.apiPaths.has(n.api)) && (!n.access || can(n.access)));
}

function renderShell() {
  const tz = currentTimeZone();
  mount(root(),
    h('header', { class: 'topbar' },
      h('a', { class: 'brand', href: '#/dashboard', 'aria-label': 'Pairvisor dashboard' },
        h('img', { src: '/ui/icon.svg', alt: '', width: 24, height: 24 }), 'Pairvisor'),
      h('span', { class: 'unit-name', title: 'The unit and the physical machine this console talks to' }, unitLabel()),
      h('span', { class: 'spacer' }),
      h('span', { id: 'live', class: `live ${store.live}`, role: 'status', title: 'Live updates (server-sent events)' }, liveLabel()),
      h('span', { class: 'tz', title: 'Times are shown in the unit\'s time zone (Preferences)' },
        `Times: ${tz.timeZone}${tz.valid ? '' : ' (configured zone unknown to this browser)'}`),
      h('button', { class: 'btn ghost', id: 'help-toggle', 'aria-expanded': String(helpOpen), 'aria-controls': 'help', onclick: toggleHelp, title: 'Help (?)' }, 'Help'),
      h('span', { class: 'who' }, h('strong', {}, store.user), ` (${store.role})`),
      h('button', { class: 'btn ghost', onclick: logout }, 'Log out')),
    h('div', { class: 'body' },
      h('nav', { class: 'sidebar', 'aria-label': 'Main' },
        h('ul', {}, visibleNav().map((n) => h('li', {},
          h('a', { href: `#/${n.id}`, 'data-nav': n.id, title: n.key ? `g then ${n.key}` : null }, n.label,
            n.id === 'alerts' ? h('span', { class: 'nav-count', id: 'nav-alerts-count', hidden: !store.alerts.length }, String(store.alerts.length)) : null))))),
      h('main', { id: 'main', tabindex: '-1' }),
      h('aside', { id: 'help', class: 'help', hidden: !helpOpen, 'aria-label': 'Help' })));
}

function unitLabel() {
  if (inUnit()) return `Unit ${store.unit.name} · ${thisPm()}`;
  return store.pm ? store.pm.hostname : '';
}

function liveLabel() {
  return { connected: 'Live', connecting: 'Connecting…', reconnecting: 'Reconnecting…' }[store.live] || store.live;
}

function setLive(state) {
  store.live = state;
  const el = document.getElementById('live');
  if (el) {
    el.className = `live ${state}`;
    el.textContent = liveLabel();
  }
}

function toggleHelp() {
  helpOpen = !helpOpen;
  localStorage.setItem('pv_help', helpOpen ? 'open' : 'closed');
  const help = document.getElementById('help');
  help.hidden = !helpOpen;
  document.getElementById('help-toggle').setAttribute('aria-expanded', String(helpOpen));
}

/** Fills the help panel for a page (keys of HELP). */
export function setHelp(key) {
  const help = document.getElementById('help');
  if (!help) return;
  const entry = HELP[key] || HELP.generic;
  mount(help,
    h('h2', {}, 'About this page'),
    h('p', {}, entry.purpose),
    entry.items ? h('dl', {}, entry.items.map(([t, d]) => [h('dt', {}, t), h('dd', {}, d)])) : null,
    h('p', { class: 'small muted' }, 'Keys: ? help · g then d/n/p/v/o/s/c/u/r/a to go to a page · / search.'));
}

async function route() {
  cleanup.forEach((fn) => fn());
  cleanup = [];
  const r = parseRoute();
  currentRoute = r;
  document.querySelectorAll('.sidebar a').forEach((a) => {
    if (a.dataset.nav === r.nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  });
  const main = document.getElementById('main');
  if (r.page === 'notfound') {
    setHelp('generic');
    mount(main, h('h1', {}, 'Page not found'), h('p', {}, 'This address is not a page of the console. '), h('a', { href: '#/dashboard' }, 'Go to the dashboard'));
    return;
  }
  try {
    const mod = await PAGES[r.page]();
    if (currentRoute !== r) return;
    const ctx = {
      params: r.params,
      query: r.query,
      on: (key, fn) => cleanup.push(on(key, fn)),
      onLeave: (fn) => cleanup.push(fn),
    };
    mount(main);
    setHelp(mod.help || r.page);
    await mod.render(main, ctx);
    const title = main.querySelector('h1');
    document.title = `${title ? title.textContent : 'Pairvisor'} · Pairvisor`;
    if (!main.contains(document.activeElement) && title && !r.params.keepFocus) title.focus({ preventScroll: true });
  } catch (e) {
    console.error(e);
    mount(main, h('h1', {}, 'This page failed to load'), errorBox(e instanceof ApiError ? e : new ApiError(0, { message: String(e) })));
  }
}

// ------------------------------------------------------------------- live

let source = null;
let vmTimer = null;

function scheduleVmRefresh() {
  if (vmTimer) return;
  vmTimer = setTimeout(() => {
    vmTimer = null;
    refreshAll();
  }, 50);
}

function connectLive() {
  if (source) source.close();
  source = new EventSource(liveUrl('/events'));
  source.addEventListener('hello', () => {
    const was = store.live;
    setLive('connected');
    if (was === 'reconnecting') {
      // Events may have been missed while disconnected.
      refreshAll();
    }
  });
  source.addEventListener('vm', (e) => {
    const ev = JSON.parse(e.data);
    // Patch the state at once, then reload the full view.
    const vm = store.vms.find((v) => v.name === ev.vm);
    if (vm && vm.state !== ev.state) {
      vm.state = ev.state;
      emit('vms');
    }
    lastEvents.unshift(ev);
    lastEvents.length = Math.min(lastEvents.length, 50);
    emit('events');
    scheduleVmRefresh();
  });
  source.addEventListener('resync', () => refreshAll());
  source.onerror = () => {
    setLive('reconnecting');
    if (!token()) source.close();
  };
}

/** The latest life-cycle events received (newest first). */
export const lastEvents = [];

// ------------------------------------------------------------------ login

function renderLogin(message) {
  document.title = 'Log in · Pairvisor';
  let err = message ? new ApiError(401, { code: 'unauthenticated', message }) : null;
  const user = h('input', { id: 'login-user', name: 'user', autocomplete: 'username', required: true, autofocus: true });
  const pw = h('input', { id: 'login-password', name: 'password', type: 'password', autocomplete: 'current-password', required: true });
  const errSlot = h('div', {}, errorBox(err));
  const submit = h('button', { class: 'btn primary', type: 'submit' }, 'Log in');
  mount(root(), h('main', { class: 'login', id: 'main' },
    h('form', {
      class: 'login-card',
      onsubmit: async (e) => {
        e.preventDefault();
        submit.disabled = true;
        try {
          const r = await api('POST', '/auth/login', { user: user.value, password: pw.value }, { auth: false });
          setToken(r.token);
          await start();
        } catch (ex) {
          err = ex;
          mount(errSlot, errorBox(ex));
          pw.select();
        } finally {
          submit.disabled = false;
        }
      },
    },
    h('div', { class: 'brand big' }, h('img', { src: '/ui/icon.svg', alt: '', width: 40, height: 40 }), 'Pairvisor'),
    h('p', { class: 'muted' }, 'Two servers, one unit: VMs that keep running through hardware faults and maintenance.'),
    h('div', { class: 'field' }, h('label', { for: 'login-user' }, 'User'), user),
    h('div', { class: 'field' }, h('label', { for: 'login-password' }, 'Password'), pw),
    errSlot,
    submit,
    h('p', { class: 'small muted' }, HELP.login.purpose,
      ' The first administrator\'s password is in DATA_DIR/initial-admin-password unless one was given to the daemon.'))));
  user.focus();
}

async function logout() {
  try {
    await api('POST', '/auth/logout');
  } catch {
    // the token is dropped anyway
  }
  setToken(null);
  if (source) source.close();
  renderLogin();
}

// ------------------------------------------------------------------ start

let keyPrefix = false;

function onKey(e) {
  const t = e.target;
  const typing = t && (t.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(t.tagName) || t.closest('.vnc-screen'));
  if (typing || e.ctrlKey || e.metaKey || e.altKey || !store.user) return;
  if (keyPrefix) {
    keyPrefix = false;
    const n = visibleNav().find((x) => x.key === e.key);
    if (n) {
      e.preventDefault();
      navigate(`#/${n.id}`);
    }
    return;
  }
  if (e.key === '?') {
    e.preventDefault();
    toggleHelp();
  } else if (e.key === 'g') {
    keyPrefix = true;
    setTimeout(() => { keyPrefix = false; }, 1500);
  } else if (e.key === '/') {
    const s = document.querySelector('input[type=search]');
    if (s) {
      e.preventDefault();
      s.focus();
    }
  }
}

async function start() {
  let who;
  try {
    who = await api('GET', '/auth/whoami');
  } catch (e) {
    setToken(null);
    renderLogin(e.status === 401 ? null : e.message);
    return;
  }
  store.user = who.user;
  store.role = who.role;
  const [doc] = await Promise.all([
    api('GET', '/openapi.json', undefined, { auth: false }).catch(() => ({ paths: {} })),
    refresh('settings'),
    refresh('pm'),
    refresh('vms'),
  ]);
  store.apiPaths = new Set(Object.keys(doc.paths || {}));
  await Promise.all([refresh('alerts'), refresh('unit')]);
  await refresh('pms');
  renderShell();
  connectLive();
  await route();
}

onUnauthenticated(() => {
  if (!store.user) return;
  store.user = null;
  setToken(null);
  if (source) source.close();
  renderLogin('Your session has ended (logged out or expired); please log in again.');
});

window.addEventListener('hashchange', () => {
  if (store.user) route();
});
document.addEventListener('keydown', onKey);
// The skip link must not change the hash (the router owns it).
document.addEventListener('click', (e) => {
  const skip = e.target.closest && e.target.closest('a.skip');
  if (skip) {
    e.preventDefault();
    const main = document.getElementById('main');
    if (main) main.focus();
  }
});
on('alerts', () => {
  const el = document.getElementById('nav-alerts-count');
  if (el) {
    el.textContent = String(store.alerts.length);
    el.hidden = !store.alerts.length;
  }
});
const updateUnitLabel = () => {
  const el = document.querySelector('.topbar .unit-name');
  if (el) el.textContent = unitLabel();
};
on('pm', updateUnitLabel);
on('unit', updateUnitLabel);
on('pms', updateUnitLabel);
on('settings', () => {
  if (store.user && document.querySelector('.topbar')) {
    const tz = currentTimeZone();
    const el = document.querySelector('.topbar .tz');
    if (el) el.textContent = `Times: ${tz.timeZone}${tz.valid ? '' : ' (configured zone unknown to this browser)'}`;
  }
});
// Health (instance checks), resources, the PMs and VMs the partner runs
// change without events here: refresh the shared views now and then.
setInterval(() => {
  if (store.user && document.visibilityState === 'visible') refreshAll();
}, 10000);
window.addEventListener('unhandledrejection', (e) => {
  if (e.reason instanceof ApiError) toast(e.reason.message, 'error');
});

if (token()) start();
else renderLogin();
