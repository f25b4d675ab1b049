// The shop of shop_sqlalchemy.py on knex 3 over node-postgres: users, products with a
// version column, orders and lines, counters (upserts), sessions with jsonb and
// timestamps, bulk inserts and deletes. Run once through spillway and once directly;
// prints the final contents as the client reads them (JSON): server-made timestamps
// replaced by their rank in their column (checked to lie within the run), keys made by
// identity columns by the application's name for the row. Usage: shop_knex.js URL.
'use strict'
const knex = require('knex')
const { types } = require('pg')

// Values as PostgreSQL's text, so the comparison is exact (no JS Date rounding).
for (const oid of [1082, 1083, 1114, 1184, 1186, 1700, 20]) types.setTypeParser(oid, (v) => v)

const url = process.argv[2]
const BASE = '2024-03-30T23:15:00.250Z'
const started = Date.now()

let seed = 13
function rand() {
  seed = (seed * 1103515245 + 12345) % 2147483648
  return seed / 2147483648
}
function uuid() {
  const h = []
  for (let i = 0; i < 32; i++) h.push(Math.floor(rand() * 16).toString(16))
  h[12] = '4'
  h[16] = '8'
  const s = h.join('')
  return `${s.slice(0, 8)}-${s.slice(8, 12)}-${s.slice(12, 16)}-${s.slice(16, 20)}-${s.slice(20)}`
}
function plusDays(iso, days) {
  return new Date(Date.parse(iso) + days * 86400000).toISOString()
}

async function main() {
  const db = knex({ client: 'pg', connection: url, pool: { min: 1, max: 1 } })
  const names = { products: {}, orders: {}, order_lines: {} }

  const users = []
  for (let i = 0; i < 12; i++) users.push({ id: uuid(), email: `user${i}@example.com`, name: `User ${i}` })
  await db('users').insert(users.slice(0, 6))
  for (const u of users.slice(6)) await db('users').insert(u)

  const products = await db('products')
    .insert(
      Array.from({ length: 10 }, (_, i) => ({
        sku: `SKU-${String(i).padStart(3, '0')}`,
        name: `Product ${i}`,
        price: (100 + Math.floor(rand() * 9900)) / 100,
        stock: 100,
        version: 1,
        weight: [0.1, 1.5, 2.25, null][i % 4],
        rating: i * 0.5,
        tags: i % 2 ? ['tag', `t${i % 3}`] : [],
        added_on: plusDays(BASE, i).slice(0, 10),
      }))
    )
    .returning(['id', 'price'])
  products.forEach((p, i) => (names.products[p.id] = `p${i}`))
  const pids = products.map((p) => p.id)

  const orderIds = []
  for (let i = 0; i < 16; i++) {
    await db.transaction(async (trx) => {
      const [order] = await trx('orders')
        .insert({
          user_id: users[i % users.length].id,
          note: i % 3 ? null : `gift ${i}`,
          ship_by: plusDays(BASE, 3 + i).slice(0, 10),
          slot: `${9 + (i % 8)}:30`,
        })
        .returning('id')
      names.orders[order.id] = `o${i}`
      orderIds.push(order.id)
      let total = 0
      for (let j = 0; j < 1 + (i % 3); j++) {
        const p = products[(i + j) % products.length]
        const [line] = await trx('order_lines')
          .insert({ order_id: order.id, product_id: p.id, qty: 1 + j, unit_price: p.price })
          .returning('id')
        names.order_lines[line.id] = `o${i}.${j}`
        total += Number(p.price) * (1 + j)
      }
      await trx('orders').where({ id: order.id }).update({ total: total.toFixed(2) })
    })
    if (i % 4 === 0) {
      await db.transaction(async (trx) => {
        const p = await trx('products').where({ id: pids[i % pids.length] }).first()
        await trx('products')
          .where({ id: p.id, version: p.version })
          .update({ stock: p.stock - 1, version: p.version + 1 })
      })
    }
  }

  for (let i = 0; i < 24; i++) {
    const name = ['page_views', 'orders', 'signups'][i % 3]
    await db('counters')
      .insert({ name, value: 1 + (i % 2) })
      .onConflict('name')
      .merge({ value: db.raw('counters.value + excluded.value') })
  }

  await db('sessions').insert(
    Array.from({ length: 10 }, (_, i) => ({
      key: `s${String(i).padStart(3, '0')}`,
      data: JSON.stringify({ cart: [i, i + 1], theme: i % 2 ? 'dark' : 'light', n: 1.5 }),
      user_id: i % 4 ? users[i % users.length].id : null,
      created_at: new Date(Date.parse(BASE) + i * 60000).toISOString(),
      expires_at: plusDays(BASE, 1),
      ttl: `1 day ${i * 61} seconds`,
      token: i % 3 ? Buffer.from([i, 255 - i, 0]) : null,
    }))
  )
  for (let i = 0; i < 10; i += 2) {
    await db('sessions')
      .where({ key: `s${String(i).padStart(3, '0')}` })
      .update({ data: JSON.stringify({ cart: [], seen: i }), expires_at: plusDays(BASE, 2) })
  }
  await db('sessions').whereIn('key', ['s001', 's003', 's005']).del()
  for (const u of users.slice(0, 4)) await db('users').where({ id: u.id }).update({ last_login: db.fn.now() })
  await db('orders').whereIn('id', orderIds.filter((_, k) => k % 2 === 0)).update({ status: 'paid' })
  const doomed = (await db('order_lines').where({ order_id: orderIds[1] }).select('id')).map((r) => r.id)
  for (const id of doomed) await db('order_lines').where({ id }).del()
  await db('orders').where({ id: orderIds[1] }).update({ status: 'cancelled', total: 0 })

  const out = {}
  const keys = { users: 'id', products: 'id', orders: 'id', order_lines: 'id', counters: 'name', sessions: 'key' }
  for (const [t, k] of Object.entries(keys)) out[t] = await db(t).orderBy(k)
  const ended = Date.now()
  const serverTimes = { users: ['created_at', 'last_login'], orders: ['placed_at'], counters: ['updated_at'] }
  for (const [t, cols] of Object.entries(serverTimes)) {
    for (const c of cols) {
      const values = [...new Set(out[t].map((r) => r[c]).filter((v) => v !== null))].sort()
      for (const r of out[t]) {
        if (r[c] === null) continue
        const at = Date.parse(r[c].replace(' ', 'T').replace(/\+00$/, 'Z'))
        if (!(at >= started - 5000 && at <= ended + 5000)) throw new Error(`${t}.${c} ${r[c]} outside the run`)
        r[c] = `now#${values.indexOf(r[c])}`
      }
    }
  }
  for (const r of out.products) r.id = names.products[r.id]
  for (const r of out.orders) r.id = names.orders[r.id]
  for (const r of out.order_lines) {
    r.id = names.order_lines[r.id]
    r.order_id = names.orders[r.order_id]
    r.product_id = names.products[r.product_id]
  }
  for (const t of ['products', 'orders', 'order_lines']) out[t].sort((a, b) => (a.id < b.id ? -1 : 1))
  for (const r of out.sessions) if (r.token) r.token = r.token.toString('hex')
  await db.destroy()
  console.log(JSON.stringify(out))
}

main().catch((e) => {
  console.error(e)
  process.exit(1)
})
