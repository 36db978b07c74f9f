// node-postgres (`pg`) against PostgreSQL's own address, as an unmodified application would use it.
//
// Usage: node pg_check.js HOST PORT DBNAME USER SSLMODE CAFILE ROLE
// (the password, if any, from PGPASSWORD; `pg` is found through NODE_PATH). SSLMODE is disable,
// require or verify-full; CAFILE is the root certificate for verify-full; ROLE is the
// current_user the session must have. Prints one line per check and exits non-zero at the
// first failure.
'use strict';

const fs = require('fs');
const assert = require('assert');
const { Client } = require('pg');

const [HOST, PORT, DBNAME, USER, SSLMODE, CAFILE, ROLE] = process.argv.slice(2, 9);

function fail(msg) {
  console.log(`FAIL pg ${SSLMODE}: ${msg}`);
  process.exit(1);
}

function check(name, got, want) {
  try {
    assert.deepStrictEqual(got, want);
  } catch (e) {
    fail(`${name}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
  }
  const shown = JSON.stringify(got);
  console.log(`ok ${name}: ${shown.length <= 100 ? shown : shown.slice(0, 97) + '...'}`);
}

function ssl() {
  switch (SSLMODE) {
    case 'disable':
      return false;
    case 'require':
      return { rejectUnauthorized: false };
    case 'verify-full':
      return { ca: fs.readFileSync(CAFILE), rejectUnauthorized: true };
    default:
      fail(`unknown sslmode ${SSLMODE}`);
  }
}

async function connect() {
  const client = new Client({
    host: HOST,
    port: Number(PORT),
    database: DBNAME,
    user: USER,
    ssl: ssl(),
    connectionTimeoutMillis: 10000,
  });
  client.on('error', (e) => fail(`client error event: ${e.message}`));
  await client.connect();
  return client;
}

async function main() {
  const client = await connect();
  check('current_user', (await client.query('SELECT current_user AS u')).rows[0].u, ROLE);
  check('ssl in use', Boolean(client.connection.stream.encrypted), SSLMODE !== 'disable');
  check(
    'pg_backend_pid() === client.processID',
    (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid,
    client.processID,
  );

  const res = await client.query(
    'SELECT $1::int + $2::int AS sum, $3::text AS t, $4::jsonb AS j',
    [40, 2, 'é', { a: [1, 2] }],
  );
  check('parameterized query', res.rows[0], { sum: 42, t: 'é', j: { a: [1, 2] } });
  const many = await client.query({
    name: 'drivers_series',
    text: 'SELECT i FROM generate_series(1, $1::int) i',
    values: [1000],
  });
  check('named prepared query', many.rows.reduce((s, r) => s + r.i, 0), 500500);
  const again = await client.query({
    name: 'drivers_series',
    text: 'SELECT i FROM generate_series(1, $1::int) i',
    values: [10],
  });
  check('named prepared query reused', again.rowCount, 10);

  await client.query('CREATE TEMP TABLE tx (i int)');
  await client.query('BEGIN');
  await client.query('INSERT INTO tx SELECT generate_series(1, 10)');
  await client.query('COMMIT');
  await client.query('BEGIN');
  await client.query('INSERT INTO tx VALUES ($1)', [1000]);
  check(
    'inside the transaction',
    (await client.query('SELECT sum(i)::int AS s FROM tx')).rows[0].s,
    1055,
  );
  await client.query('ROLLBACK');
  check(
    'after rollback',
    (await client.query('SELECT sum(i)::int AS s FROM tx')).rows[0].s,
    55,
  );
  try {
    await client.query('BEGIN');
    await client.query('SELECT 1/0');
    fail('division by zero succeeded');
  } catch (e) {
    check('error inside a transaction', e.code, '22012');
  }
  await client.query('ROLLBACK');
  check('usable after the failed transaction', (await client.query('SELECT 7 AS n')).rows[0].n, 7);

  // LISTEN/NOTIFY: the sender pid is the pid each connection was told.
  const other = await connect();
  const notes = [];
  const twoNotes = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no notifications within 10 s')), 10000);
    client.on('notification', (msg) => {
      // A notification names its sender `processId` (BackendKeyData: `processID`).
      notes.push([msg.channel, msg.payload, msg.processId]);
      if (notes.length === 2) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  await client.query('LISTEN drivers_ch');
  await other.query("NOTIFY drivers_ch, 'from the other'");
  await client.query("NOTIFY drivers_ch, 'from myself'");
  await twoNotes.catch((e) => fail(e.message));
  check('notifications and sender pids', notes.sort(), [
    ['drivers_ch', 'from myself', client.processID],
    ['drivers_ch', 'from the other', other.processID],
  ].sort());

  await other.end();
  console.log('ok second client ended');
  await client.end();
  console.log('ok client ended');
  console.log(`pg ${require('pg/package.json').version} ${SSLMODE}: all checks passed`);
}

main().catch((e) => fail(`${e.code || ''} ${e.stack}`));
