// node-postgres through pgiam's transaction pooling, as an unmodified application would use it.
//
// Usage: node pg_transactions.js HOST PORT DBNAME USER
// Its own pool of six connections (more than pgiam's backends) serving twelve workers: named
// prepared statements (node-postgres prepares a query that has a name), transaction blocks.
// Exits non-zero at the first wrong answer.
const { Pool } = require('pg');

const [host, port, database, user] = process.argv.slice(2);
const WORKERS = 12;
const ROUNDS = 30;

(async () => {
  const pool = new Pool({ host, port: Number(port), database, user, max: 6, ssl: false });
  await pool.query('CREATE TABLE IF NOT EXISTS tx_node (x int)');
  const work = async (i) => {
    for (let j = 0; j < ROUNDS; j++) {
      const c = await pool.connect();
      try {
        const add = await c.query({
          name: `add${i % 3}`,
          text: `SELECT $1::int + ${i % 3} AS v`,
          values: [j],
        });
        if (add.rows[0].v !== j + (i % 3)) throw new Error(`worker ${i}: add got ${add.rows[0].v}`);
        await c.query('BEGIN');
        await c.query('INSERT INTO tx_node VALUES ($1)', [i * 1000 + j]);
        const n = await c.query({
          name: 'count',
          text: 'SELECT count(*)::int AS n FROM tx_node WHERE x = $1',
          values: [i * 1000 + j],
        });
        if (n.rows[0].n !== 1) throw new Error(`worker ${i}: count ${n.rows[0].n}`);
        await c.query('COMMIT');
      } finally {
        c.release();
      }
    }
  };
  await Promise.all([...Array(WORKERS).keys()].map(work));
  const total = await pool.query('SELECT count(*)::int AS n FROM tx_node');
  if (total.rows[0].n !== WORKERS * ROUNDS) throw new Error(`total ${total.rows[0].n}`);
  await pool.end();
  console.log('all checks passed');
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
