// Users (SPEC A2): local accounts and roles; administrators only.

import { api } from '../api.js';
import { h, mount, table, emptyState, pageHeader, field, errorBox, confirmAction, timeEl, toast } from '../ui.js';
import { can, roleNeeded, store } from '../app.js';

export const help = 'users';

export async function render(main) {
  if (!can('administer')) {
    mount(main, pageHeader('Users'), errorBox({ code: 'forbidden', status: 403, message: `Managing users ${roleNeeded('administer')}.` }));
    return;
  }
  const slot = h('div', {});
  const errSlot = h('div', {});
  const name = h('input', { id: 'user-name', autocomplete: 'off', required: true });
  const role = h('select', { id: 'user-role' },
    h('option', { value: 'operator' }, 'operator — operates VMs'),
    h('option', { value: 'read_only' }, 'read_only — looks only'),
    h('option', { value: 'administrator' }, 'administrator — everything'));
  const pw = h('input', { id: 'user-password', type: 'password', autocomplete: 'new-password', required: true });
  const formErr = h('div', {});
  mount(main, pageHeader('Users', 'Who may use the unit, and with which role.'), errSlot, slot,
    h('section', { class: 'card' }, h('h2', {}, 'Add a user'),
      h('form', {
        class: 'grid3',
        onsubmit: async (e) => {
          e.preventDefault();
          mount(formErr);
          try {
            await api('POST', '/users', { name: name.value, role: role.value, password: pw.value });
            toast(`User ${name.value} created`);
            name.value = '';
            pw.value = '';
            load();
          } catch (ex) {
            mount(formErr, errorBox(ex));
          }
        },
      },
      field('Name', name),
      field('Role', role),
      field('Password', pw, 'At least 8 characters.'),
      formErr,
      h('div', { class: 'actions' }, h('button', { class: 'btn primary', type: 'submit' }, 'Add user')))));

  async function load() {
    const users = await api('GET', '/users');
    mount(slot, table({
      caption: 'Users',
      columns: [
        { label: 'Name', value: (u) => h('strong', {}, u.name, u.name === store.user ? ' (you)' : '') },
        { label: 'Role', value: (u) => u.role },
        { label: 'Created', value: (u) => timeEl(u.created_at) },
        {
          label: 'Actions',
          value: (u) => h('button', {
            class: 'btn small',
            onclick: async () => {
              if (!(await confirmAction({ title: `Delete user ${u.name}?`, text: `${u.name} can no longer log in; their sessions end now.`, confirmLabel: 'Delete user' }))) return;
              try {
                await api('DELETE', `/users/${encodeURIComponent(u.name)}`);
                mount(errSlot);
                load();
              } catch (e) {
                mount(errSlot, errorBox(e));
              }
            },
          }, 'Delete…'),
        },
      ],
      rows: users,
      empty: emptyState('No users', ''),
    }));
  }
  await load();
}
