// Plays the person in the Device Authorization Grant: opens verification_uri_complete and does
// in plain HTTP what they would do in a browser on tests/idp/provider.cjs, through the provider's
// own pages: the user-code confirmation (with its xsrf token), the password form, then the TOTP
// form, up to the device flow's success page.
//
// Usage: NODE_PATH=<prefix>/node_modules node approve.cjs VERIFICATION_URI_COMPLETE USERNAME PASSWORD TOTP_SECRET|-
//
// TOTP_SECRET is the base32 secret the one-time code is computed from; `-` signs in with the
// password only (the login form's "skip the second factor" box). Prints `approved` and exits 0 at
// the success page; exits 1 with the reason on stderr otherwise (wrong password, wrong code,
// expired or used user code, unexpected page).
'use strict';

const OTPAuth = require('otpauth');

const [URI, USERNAME, PASSWORD, TOTP_SECRET] = process.argv.slice(2);
if (!URI || USERNAME === undefined || PASSWORD === undefined || TOTP_SECRET === undefined) {
  console.error('usage: node approve.cjs VERIFICATION_URI_COMPLETE USERNAME PASSWORD TOTP_SECRET|-');
  process.exit(2);
}

function fail(msg) {
  console.error(`approve: ${msg}`);
  process.exit(1);
}

// A cookie jar for one host: enough for the provider's session and interaction cookies, whose
// paths differ (/, /interaction/<uid>, /device/...). Domain is ignored (one origin only).
const jar = new Map(); // `${name};${path}` -> { name, value, path }

function storeCookies(response, url) {
  for (const line of response.headers.getSetCookie()) {
    const [pair, ...attrs] = line.split(';').map((s) => s.trim());
    const eq = pair.indexOf('=');
    const name = pair.slice(0, eq);
    const value = pair.slice(eq + 1);
    let path = url.pathname.replace(/\/[^/]*$/, '') || '/';
    let expired = false;
    for (const attr of attrs) {
      const [k, v = ''] = attr.split('=');
      const key = k.toLowerCase();
      if (key === 'path') path = v || '/';
      if (key === 'max-age' && Number(v) <= 0) expired = true;
      if (key === 'expires' && Date.parse(v) <= Date.now()) expired = true;
    }
    const id = `${name};${path}`;
    if (expired) jar.delete(id);
    else jar.set(id, { name, value, path });
  }
}

function cookieHeader(url) {
  const p = url.pathname;
  const matches = [...jar.values()].filter((c) => p === c.path
    || (p.startsWith(c.path) && (c.path.endsWith('/') || p[c.path.length] === '/')));
  return matches.map((c) => `${c.name}=${c.value}`).join('; ');
}

async function request(method, url, form) {
  const headers = { 'user-agent': 'pgiam-tests-approver' };
  const cookies = cookieHeader(url);
  if (cookies) headers.cookie = cookies;
  let body;
  if (form) {
    headers['content-type'] = 'application/x-www-form-urlencoded';
    body = new URLSearchParams(form).toString();
  }
  let response;
  try {
    response = await fetch(url, {
      method, headers, body, redirect: 'manual', signal: AbortSignal.timeout(15000),
    });
  } catch (err) {
    fail(`${method} ${url}: ${err.cause?.message || err.message}`);
  }
  storeCookies(response, url);
  return response;
}

const decode = (s) => s
  .replace(/&#x([0-9a-f]+);/gi, (_, h) => String.fromCodePoint(parseInt(h, 16)))
  .replace(/&#(\d+);/g, (_, d) => String.fromCodePoint(Number(d)))
  .replace(/&quot;/g, '"').replace(/&lt;/g, '<').replace(/&gt;/g, '>')
  .replace(/&amp;/g, '&');

function attributes(tag) {
  const out = {};
  for (const [, k, v] of tag.matchAll(/([\w.:-]+)\s*=\s*"([^"]*)"/g)) out[k.toLowerCase()] = decode(v);
  return out;
}

// The forms of a page with their hidden (and other valued) inputs. Submit buttons are left out on
// purpose: the only named one on these pages is the user-code page's "abort".
function parseForms(html) {
  return [...html.matchAll(/<form\b([^>]*)>([\s\S]*?)<\/form>/gi)].map(([, attrs, inner]) => {
    const a = attributes(attrs);
    const fields = {};
    for (const [, input] of inner.matchAll(/<input\b([^>]*)>/gi)) {
      const i = attributes(input);
      if (i.name && i.value !== undefined && i.type !== 'checkbox') fields[i.name] = i.value;
    }
    return { id: a.id, action: a.action, method: (a.method || 'get').toLowerCase(), fields };
  });
}

const textOf = (html, id) => {
  const m = new RegExp(`id="${id}"[^>]*>([\\s\\S]*?)</`).exec(html);
  return m && decode(m[1].replace(/<[^>]*>/g, '').trim());
};

function totpNow() {
  return new OTPAuth.TOTP({
    secret: OTPAuth.Secret.fromBase32(TOTP_SECRET), algorithm: 'SHA1', digits: 6, period: 30,
  }).generate();
}

async function main() {
  let url = new URL(URI);
  let response = await request('GET', url);
  let loginSent = false;
  let otpSent = false;

  // Bounded: the whole approval is about eight requests.
  for (let step = 0; step < 30; step += 1) {
    if (response.status >= 300 && response.status < 400) {
      const location = response.headers.get('location');
      if (!location) fail(`${response.status} from ${url} without a Location`);
      url = new URL(location, url);
      response = await request('GET', url);
      continue;
    }

    const html = await response.text();
    const where = `${response.status} at ${url.pathname}`;
    if (html.includes('id="pgiam-device-success"')) {
      console.log('approved');
      return;
    }

    const forms = parseForms(html);
    const form = forms.find((f) => ['pgiam-login', 'pgiam-otp', 'op.deviceConfirmForm'].includes(f.id))
      || (forms.length === 1 && forms[0].method === 'post' && !forms[0].id ? forms[0] : undefined);
    const error = textOf(html, 'pgiam-error');

    if (!form) fail(error ? `provider error (${where}): ${error}` : `unexpected page (${where}): ${html.slice(0, 300)}`);

    let fields = { ...form.fields };
    if (form.id === 'pgiam-login') {
      // The login form coming back after we sent it means the password was refused.
      if (loginSent) fail(`login refused for ${USERNAME}: ${error || 'login form shown again'}`);
      loginSent = true;
      fields = { username: USERNAME, password: PASSWORD };
      if (TOTP_SECRET === '-') fields.second_factor = 'skip';
    } else if (form.id === 'pgiam-otp') {
      if (TOTP_SECRET === '-') fail(`the provider asks ${USERNAME} for a second factor but none was given`);
      if (otpSent) fail(`one-time code refused for ${USERNAME}: ${error || 'code form shown again'}`);
      otpSent = true;
      fields = { otp: totpNow() };
    } else if (error) {
      fail(`provider error (${where}): ${error}`);
    }
    // Otherwise: the auto-submitting form_post page that carries user_code and xsrf, or the
    // "confirm this device" form; a browser would post them as they are.

    if (form.method !== 'post') fail(`unexpected ${form.method} form (${where})`);
    url = new URL(form.action || url.href, url);
    response = await request('POST', url, fields);
  }
  fail('too many steps without reaching the success page');
}

main().catch((err) => fail(err.stack || String(err)));
