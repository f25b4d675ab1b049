// node-postgres LISTEN/NOTIFY through transaction pooling: one client LISTENs (simple
// protocol), another NOTIFYs with a parameter (extended protocol); the listener's
// 'notification' events are collected. Prints JSON.
const { Client } = require('pg');

async function main(url) {
  const listener = new Client({ connectionString: url });
  const sender = new Client({ connectionString: url });
  await listener.connect();
  await sender.connect();
  const got = [];
  const done = new Promise((resolve) => {
    listener.on('notification', (n) => {
      got.push({ channel: n.channel, payload: n.payload, pid: n.processId });
      if (got.length === 2) resolve();
    });
  });
  await listener.query('LISTEN node_chan');
  await sender.query('SELECT pg_notify($1, $2)', ['node_chan', 'first']);
  await sender.query("NOTIFY node_chan, 'second'");
  await Promise.race([
    done,
    new Promise((_, reject) => setTimeout(() => reject(new Error('timeout')), 5000)),
  ]);
  await listener.query('UNLISTEN node_chan');
  await listener.end();
  await sender.end();
  console.log(JSON.stringify({ got }));
}

main(process.argv[2]).catch((e) => {
  console.error(e);
  process.exit(1);
});
