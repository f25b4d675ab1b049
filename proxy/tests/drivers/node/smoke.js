// Every pinned Node driver connects and reads the same rows: pg and knex (over pg).
// Prints JSON.
'use strict'
const { Client } = require('pg')
const knex = require('knex')

const url = process.argv[2]
const query = 'SELECT g, md5(g::text) FROM generate_series(1, 3) g ORDER BY g'

async function main() {
  const out = {}
  const client = new Client({ connectionString: url })
  await client.connect()
  out.pg = (await client.query({ text: query, rowMode: 'array' })).rows
  await client.end()

  const db = knex({ client: 'pg', connection: url })
  out.knex = (await db.raw(query)).rows.map((r) => [r.g, r.md5])
  await db.destroy()

  out.versions = {
    pg: require('pg/package.json').version,
    knex: require('knex/package.json').version,
  }
  console.log(JSON.stringify(out))
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
