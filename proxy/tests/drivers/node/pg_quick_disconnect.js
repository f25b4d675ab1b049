// node-postgres' quick-disconnect test (its issue #320): connect() and end() at once.
// pg writes its Terminate before the startup packet, which a server reads as a startup
// packet of an impossible length; PostgreSQL closes without a word, so the client sees
// no 'error' event. Prints the events in order, as JSON.
'use strict'
const { Client } = require('pg')

const events = []
const client = new Client({ connectionString: process.argv[2] })
client.on('error', (e) => events.push('error event: ' + e.message))
client.connect().then(
  () => events.push('connected'),
  (e) => events.push('connect failed: ' + e.message)
)
client.end().then(
  () => events.push('ended'),
  (e) => events.push('end failed: ' + e.message)
)
setTimeout(() => console.log(JSON.stringify(events)), 1000)
