// A real OpenID Provider for pgiam's single sign-on tests: panva's `oidc-provider` with the
// Device Authorization Grant (RFC 8628), revocation and introspection (RFC 7009, 7662), a minimal
// password + TOTP login, and three test-only
// routes (key rotation, issuer-side revocation, a change of a person's groups).
//
// Usage: NODE_PATH=<prefix>/node_modules node provider.cjs CONFIG.json
//
// CONFIG.json (every field but `accounts` optional):
//   { "host": "127.0.0.1", "port": 0, "issuer": null,        // issuer defaults to http://host:port
//     "keys": "/path/jwks-private.json",                      // private JWKS; the first key signs.
//                                                             // Created with one RS256 key if absent.
//     "id_token_ttl": 300, "access_token_ttl": 300, "refresh_token_ttl": 86400,
//     "device_code_ttl": 600,
//     "device_poll_interval": 1,                              // `interval` sent; null: none
//     "rotate_refresh_tokens": true,                          // false: a refresh token is reusable
//     "clients": [{ "client_id": "pgiam" }],                  // public device-flow clients
//     "accounts": [{ "username": "alice", "password": "alice-pw", "sub": "alice",
//                    "email": "alice@example.com", "groups": ["dba"], "totp_secret": "BASE32" }] }
//
// Prints exactly one line on stdout, `listening <issuer>`, once it serves; everything else goes to
// stderr. Exits 0 on SIGTERM or SIGINT. See README.md beside this file.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const http = require('node:http');
const { pathToFileURL } = require('node:url');
const OTPAuth = require('otpauth');

// oidc-provider prints its notices with console.info, i.e. on stdout, which the harness reads for
// the single `listening` line: send all console output to stderr.
console.log = console.error;
console.info = console.error;

const log = (...args) => console.error('[idp]', ...args);

const DEVICE_CODE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';
const ACR_PWD = 'urn:pgiam:pwd';
const ACR_MFA = 'urn:pgiam:mfa';

// ---------------------------------------------------------------------------------------------
// Storage. One in-memory store for the whole process, shared by every Provider instance this
// process builds (key rotation builds a new one, see `rotate`), so grants, sessions, device codes,
// interactions and refresh tokens survive a rotation. Unlike oidc-provider's bundled memory
// adapter it never evicts (that one is an LRU of 1000 entries) and it can be searched by account,
// which /test/revoke needs.

const store = new Map(); // `${model}:${id}` -> { payload, exp (epoch ms or Infinity) }
const userCodes = new Map(); // userCode -> DeviceCode id
const sessionUids = new Map(); // session uid -> Session id

function live(entry) {
  return entry && entry.exp > Date.now() ? entry : undefined;
}

class TestAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const exp = expiresIn ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { payload, exp });
    if (this.model === 'Session') sessionUids.set(payload.uid, id);
    if (payload.userCode) userCodes.set(payload.userCode, id);
  }

  async find(id) {
    return live(store.get(this.key(id)))?.payload;
  }

  async findByUserCode(userCode) {
    const id = userCodes.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUid(uid) {
    const id = sessionUids.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const entry = live(store.get(this.key(id)));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.model}:`) && entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

// Test-only: everything issued to `sub`: its grants and all tokens and codes of those grants, and
// its sessions. A later refresh_token grant then fails with invalid_grant.
function revokeAccount(sub) {
  const grants = new Set();
  for (const [key, entry] of store) {
    if (key.startsWith('Grant:') && entry.payload.accountId === sub) grants.add(entry.payload.jti);
  }
  let removed = 0;
  for (const [key, entry] of store) {
    const { payload } = entry;
    const doomed = (key.startsWith('Grant:') && grants.has(payload.jti))
      || (payload.grantId !== undefined && grants.has(payload.grantId))
      || (key.startsWith('Session:') && payload.accountId === sub);
    if (doomed) {
      store.delete(key);
      removed += 1;
    }
  }
  return { grants: grants.size, removed };
}

// ---------------------------------------------------------------------------------------------
// Configuration and keys.

function readConfig(path) {
  const config = JSON.parse(fs.readFileSync(path, 'utf8'));
  if (!Array.isArray(config.accounts) || config.accounts.length === 0) {
    throw new Error(`${path}: "accounts" must be a non-empty array`);
  }
  return {
    host: '127.0.0.1',
    port: 0,
    issuer: null,
    keys: null,
    id_token_ttl: 300,
    access_token_ttl: 300,
    refresh_token_ttl: 86400,
    device_code_ttl: 600,
    device_poll_interval: 1,
    rotate_refresh_tokens: true,
    clients: [{ client_id: 'pgiam' }],
    ...config,
  };
}

function newSigningKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  return {
    ...privateKey.export({ format: 'jwk' }),
    kid: crypto.randomBytes(8).toString('hex'),
    alg: 'RS256',
    use: 'sig',
  };
}

function writeJwks(path, jwks) {
  fs.writeFileSync(path, `${JSON.stringify(jwks, null, 2)}\n`, { mode: 0o600 });
}

// Without a keys file every start would sign with a key nobody else knows about; with a path that
// does not exist yet, make one there so the harness can read it (or rotate it) afterwards.
function loadJwks(path) {
  if (!path) return { keys: [newSigningKey()] };
  if (!fs.existsSync(path)) {
    writeJwks(path, { keys: [newSigningKey()] });
    log(`generated a signing key in ${path}`);
  }
  const jwks = JSON.parse(fs.readFileSync(path, 'utf8'));
  if (!Array.isArray(jwks.keys) || jwks.keys.length === 0) {
    throw new Error(`${path}: expected a JWKS {"keys": [...]} with at least one private key`);
  }
  // oidc-provider picks the signing key by a score in which `alg` and `use` count; pinning both on
  // every RSA key makes its choice simply the first key of the file.
  return {
    keys: jwks.keys.map((k) => (k.kty === 'RSA' ? { alg: 'RS256', use: 'sig', ...k } : k)),
  };
}

// ---------------------------------------------------------------------------------------------
// Accounts and the interaction (login) pages.

const htmlEscape = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(title, body) {
  return `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${htmlEscape(title)}</title></head>
<body><h1>${htmlEscape(title)}</h1>
${body}
</body></html>
`;
}

const errorLine = (error) => (error ? `<p id="pgiam-error">${htmlEscape(error)}</p>\n` : '');

function loginPage(uid, error) {
  return page('Sign in', `${errorLine(error)}<form id="pgiam-login" method="post" action="/interaction/${uid}/login">
  <label>Username <input type="text" name="username" autofocus></label>
  <label>Password <input type="password" name="password"></label>
  <label><input type="checkbox" name="second_factor" value="skip"> Password only (skip the second factor)</label>
  <button type="submit">Sign in</button>
</form>`);
}

function otpPage(uid, error) {
  return page('Second factor', `${errorLine(error)}<form id="pgiam-otp" method="post" action="/interaction/${uid}/otp">
  <label>One-time code <input type="text" name="otp" inputmode="numeric" autocomplete="one-time-code" autofocus></label>
  <button type="submit">Verify</button>
</form>`);
}

function sendHtml(res, status, html) {
  res.writeHead(status, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
  });
  res.end(html);
}

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(`${JSON.stringify(body)}\n`);
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function totpValid(secret, token) {
  const totp = new OTPAuth.TOTP({
    secret: OTPAuth.Secret.fromBase32(secret), algorithm: 'SHA1', digits: 6, period: 30,
  });
  return /^\d{6}$/.test(token) && totp.validate({ token, window: 1 }) !== null;
}

// ---------------------------------------------------------------------------------------------

async function main() {
  const configPath = process.argv[2];
  if (!configPath) {
    console.error('usage: node provider.cjs CONFIG.json');
    process.exit(2);
  }
  const config = readConfig(configPath);
  const byUsername = new Map(config.accounts.map((a) => [a.username, a]));
  const bySub = new Map(config.accounts.map((a) => [a.sub ?? a.username, a]));

  // oidc-provider 8 is ESM only, and ESM import() ignores NODE_PATH: resolve it the CommonJS way
  // (which honours NODE_PATH) and import the file found.
  const { default: Provider } = await import(pathToFileURL(require.resolve('oidc-provider')).href);

  // Cookies are signed with these; every Provider instance of this process must share them so a
  // browser's session and interaction cookies stay valid across a key rotation.
  const cookieKeys = [crypto.randomBytes(32).toString('hex')];

  // Password the interaction has verified, per interaction uid, while the TOTP form is shown.
  const pendingOtp = new Map();

  const server = http.createServer();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(config.port, config.host, resolve);
  });
  const { port } = server.address();
  const hostForUrl = config.host.includes(':') ? `[${config.host}]` : config.host;
  const issuer = config.issuer || `http://${hostForUrl}:${port}`;

  function buildProvider(jwks) {
    const signingAlg = jwks.keys[0].alg || 'RS256';
    const clients = config.clients.map((c) => {
      // Only client metadata goes to oidc-provider (which rejects unknown properties); keys such
      // as a "..._note" in the harness's config are comments.
      const metadata = Object.fromEntries(Object.entries(c).filter(([k]) => !k.endsWith('_note')));
      return {
        token_endpoint_auth_method: 'none',
        grant_types: [DEVICE_CODE_GRANT, 'refresh_token'],
        response_types: [],
        redirect_uris: [],
        id_token_signed_response_alg: signingAlg,
        ...metadata,
      };
    });

    const provider = new Provider(issuer, {
      adapter: TestAdapter,
      clients,
      jwks,
      cookies: { keys: cookieKeys },
      acrValues: [ACR_PWD, ACR_MFA],
      claims: {
        // acr, amr and auth_time are listed under `openid` so that every ID token carries them;
        // by default they appear only when requested with the claims parameter.
        openid: ['sub', 'acr', 'amr', 'auth_time'],
        email: ['email', 'email_verified'],
        profile: ['preferred_username', 'name'],
        groups: ['groups'],
      },
      // By default (OIDC Core 5.4) claims requested by scope go to userinfo only, not into the ID
      // token, when an access token for userinfo is also issued. pgiam reads the ID token alone.
      conformIdTokenClaims: false,
      scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
      features: {
        devInteractions: { enabled: false }, // our own login pages below
        deviceFlow: {
          enabled: true,
          // The default pages work but import web fonts and print "you SHOULD change" notices.
          userCodeInputSource: async (ctx, form, out, err) => {
            ctx.body = page('Enter the code shown on your device',
              `${errorLine(err && (out?.error_description || err.message))}${form}\n<button type="submit" form="op.deviceInputForm">Continue</button>`);
          },
          userCodeConfirmSource: async (ctx, form, client, deviceInfo, userCode) => {
            ctx.body = page('Confirm device',
              `<p>Sign in to <strong>${htmlEscape(client.clientName || client.clientId)}</strong>; the device shows <code id="pgiam-user-code">${htmlEscape(userCode)}</code>.</p>\n${form}\n<button type="submit" form="op.deviceConfirmForm">Continue</button>\n<button type="submit" form="op.deviceConfirmForm" name="abort" value="yes">Abort</button>`);
          },
          successSource: async (ctx) => {
            ctx.body = page('Sign-in success', '<p id="pgiam-device-success">You can close this page and return to your device.</p>');
          },
        },
        revocation: { enabled: true },
        // RFC 7662: pgiam asks whether a login's refresh token is still active.
        introspection: { enabled: true },
      },
      renderError: async (ctx, out) => {
        ctx.type = 'html';
        ctx.body = page('Error', `<p id="pgiam-error">${htmlEscape(out.error)}: ${htmlEscape(out.error_description || '')}</p>`);
      },
      async findAccount(ctx, sub) {
        const account = bySub.get(sub);
        if (!account) return undefined;
        return {
          accountId: sub,
          async claims() {
            return {
              sub,
              email: account.email,
              email_verified: account.email_verified ?? true,
              preferred_username: account.username,
              name: account.name,
              groups: account.groups ?? [],
            };
          },
        };
      },
      // First-party client: consent is implied. Grant what the request asks for instead of
      // showing a consent page (the documented way to skip consent).
      async loadExistingGrant(ctx) {
        const { client, session, provider: op } = ctx.oidc;
        const grantId = ctx.oidc.result?.consent?.grantId || session.grantIdFor(client.clientId);
        let grant = grantId ? await op.Grant.find(grantId) : undefined;
        if (!grant) grant = new op.Grant({ clientId: client.clientId, accountId: session.accountId });
        grant.addOIDCScope([...ctx.oidc.requestParamOIDCScopes].join(' '));
        await grant.save();
        return grant;
      },
      // Rotation is the default for public clients; a harness that wants to reuse one refresh
      // token several times can turn it off.
      rotateRefreshToken: () => config.rotate_refresh_tokens,
      ttl: {
        AccessToken: config.access_token_ttl,
        IdToken: config.id_token_ttl,
        RefreshToken: config.refresh_token_ttl,
        DeviceCode: config.device_code_ttl,
        Grant: Math.max(config.refresh_token_ttl, config.access_token_ttl),
        Interaction: config.device_code_ttl,
        Session: config.refresh_token_ttl,
      },
    });

    // RFC 8628 lets the server set the polling interval (5 s when absent); oidc-provider sends
    // none, so add the configured one to the device authorization response.
    if (config.device_poll_interval != null) {
      provider.use(async (ctx, next) => {
        await next();
        if (ctx.oidc?.route === 'device_authorization' && ctx.status === 200 && ctx.body?.device_code) {
          ctx.body.interval = config.device_poll_interval;
        }
      });
    }

    for (const event of ['server_error', 'grant.error', 'authorization.error',
      'device_authorization.error', 'revocation.error']) {
      provider.on(event, (ctx, err) => {
        if (err.error === 'authorization_pending') return; // every poll before approval
        // error_detail is the reason oidc-provider keeps from the client ("device code already
        // consumed", "grant not found", ...), the useful part when a test fails.
        const why = [err.error_description, err.error_detail].filter(Boolean).join('; ');
        log(`${event}: ${err.name}: ${err.message}${why ? ` (${why})` : ''}`);
      });
    }
    return { provider, handler: provider.callback(), kid: jwks.keys[0].kid };
  }

  let current = buildProvider(loadJwks(config.keys));

  // Re-reads the keys file (after prepending a fresh key to it when `generate`) and replaces the
  // Provider: oidc-provider reads its keystore once, at construction. The old instance's state
  // is all in `store`, so nothing issued before is lost.
  function rotate({ generate }) {
    if (!config.keys) throw new Error('rotation needs "keys" (a file) in the configuration');
    if (generate) {
      const jwks = loadJwks(config.keys);
      writeJwks(config.keys, { keys: [newSigningKey(), ...jwks.keys] });
    }
    const jwks = loadJwks(config.keys);
    current = buildProvider(jwks);
    const kids = jwks.keys.map((k) => k.kid);
    log(`keys rotated: signing with ${current.kid}, publishing ${kids.join(', ')}`);
    return { signing_kid: current.kid, kids };
  }

  async function interaction(req, res, uid, action) {
    const { provider } = current;
    // Also checks the interaction cookie against the uid in the path.
    const details = await provider.interactionDetails(req, res);
    if (details.uid !== uid) return sendHtml(res, 400, page('Error', '<p id="pgiam-error">interaction mismatch</p>'));
    const finish = (result) => provider.interactionFinished(req, res, result, { mergeWithLastSubmission: false });

    if (details.prompt.name === 'consent') {
      // Not expected (loadExistingGrant grants everything), but never leave a person stuck here.
      const grant = details.grantId
        ? await provider.Grant.find(details.grantId)
        : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
      if (details.prompt.details.missingOIDCScope) grant.addOIDCScope(details.prompt.details.missingOIDCScope.join(' '));
      if (details.prompt.details.missingOIDCClaims) grant.addOIDCClaims(details.prompt.details.missingOIDCClaims);
      return finish({ consent: { grantId: await grant.save() } });
    }
    if (details.prompt.name !== 'login') {
      return sendHtml(res, 400, page('Error', `<p id="pgiam-error">unsupported prompt ${htmlEscape(details.prompt.name)}</p>`));
    }

    if (action === undefined && req.method === 'GET') return sendHtml(res, 200, loginPage(uid));

    if (action === 'login' && req.method === 'POST') {
      const form = await readForm(req);
      const account = byUsername.get(form.get('username'));
      if (!account || form.get('password') !== account.password) {
        log(`login ${JSON.stringify(form.get('username'))}: wrong username or password`);
        return sendHtml(res, 200, loginPage(uid, 'Wrong username or password.'));
      }
      const sub = account.sub ?? account.username;
      if (account.totp_secret && form.get('second_factor') !== 'skip') {
        pendingOtp.set(uid, sub);
        return sendHtml(res, 200, otpPage(uid));
      }
      log(`login ${sub}: password`);
      return finish({ login: { accountId: sub, acr: ACR_PWD, amr: ['pwd'], remember: false } });
    }

    if (action === 'otp' && req.method === 'POST') {
      const sub = pendingOtp.get(uid);
      if (sub === undefined) return sendHtml(res, 200, loginPage(uid, 'Sign in with your password first.'));
      const form = await readForm(req);
      if (!totpValid(bySub.get(sub).totp_secret, (form.get('otp') || '').trim())) {
        log(`login ${sub}: wrong one-time code`);
        return sendHtml(res, 200, otpPage(uid, 'Wrong one-time code.'));
      }
      pendingOtp.delete(uid);
      log(`login ${sub}: password + TOTP`);
      return finish({ login: { accountId: sub, acr: ACR_MFA, amr: ['pwd', 'otp'], remember: false } });
    }

    return sendHtml(res, 405, page('Error', '<p id="pgiam-error">method not allowed</p>'));
  }

  async function route(req, res) {
    const url = new URL(req.url, issuer);
    const m = /^\/interaction\/([^/]+)(?:\/(login|otp))?$/.exec(url.pathname);
    if (m) return interaction(req, res, m[1], m[2]);

    // ---- TEST-ONLY routes: a real issuer has neither. ----
    if (url.pathname === '/test/revoke' && req.method === 'POST') {
      const sub = url.searchParams.get('sub');
      if (!sub) return sendJson(res, 400, { error: 'sub is required' });
      const result = revokeAccount(sub);
      log(`test: revoked ${sub}: ${result.grants} grant(s), ${result.removed} record(s)`);
      return sendJson(res, 200, { sub, ...result });
    }
    // The directory changes a person's groups: the next token issued for them (a refresh's)
    // carries the new ones. `groups` is a comma-separated list; empty: none.
    if (url.pathname === '/test/groups' && req.method === 'POST') {
      const account = bySub.get(url.searchParams.get('sub') || '');
      if (!account) return sendJson(res, 404, { error: 'no such sub' });
      const groups = (url.searchParams.get('groups') || '').split(',').filter((g) => g !== '');
      account.groups = groups;
      log(`test: ${account.sub ?? account.username} is now in [${groups.join(', ')}]`);
      return sendJson(res, 200, { sub: account.sub ?? account.username, groups });
    }
    if (url.pathname === '/test/rotate' && req.method === 'POST') {
      try {
        return sendJson(res, 200, rotate({ generate: url.searchParams.get('generate') === '1' }));
      } catch (err) {
        log(`test: rotation failed, keeping the old keys: ${err.message}`);
        return sendJson(res, 500, { error: err.message });
      }
    }
    // ---- end of test-only routes ----

    return current.handler(req, res);
  }

  server.on('request', (req, res) => {
    route(req, res).catch((err) => {
      log(`${req.method} ${req.url}: ${err.stack || err}`);
      if (!res.headersSent) sendHtml(res, err.statusCode || 500, page('Error', `<p id="pgiam-error">${htmlEscape(err.message)}</p>`));
      else res.destroy();
    });
  });

  process.on('SIGHUP', () => {
    try {
      rotate({ generate: false });
    } catch (err) {
      log(`SIGHUP: rotation failed, keeping the old keys: ${err.message}`);
    }
  });
  for (const signal of ['SIGTERM', 'SIGINT']) {
    process.on(signal, () => {
      server.close();
      server.closeAllConnections();
      process.exit(0);
    });
  }

  process.stdout.write(`listening ${issuer}\n`);
}

main().catch((err) => {
  console.error(`provider: ${err.stack || err}`);
  process.exit(1);
});
