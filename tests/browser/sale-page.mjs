// The buyer's sale page in a real browser: Debian's chromium, driven by playwright-core, against a
// dev cluster (scripts/browser starts one and sets the environment).
//
//   SECKILL_URL          the engine, e.g. http://127.0.0.1:18478
//   SECKILL_ADMIN_TOKEN  its admin token
//   CHROMIUM             the browser (default /usr/bin/chromium)
//   SCREENSHOTS          where the screenshots of each state go (default target/screenshots)
//
// Every scenario asserts what a buyer would see and what the engine recorded; the run exits 1 when
// any assertion fails.

import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';

const BASE = process.env.SECKILL_URL;
const ADMIN = process.env.SECKILL_ADMIN_TOKEN;
const SHOTS = process.env.SCREENSHOTS || 'target/screenshots';
const STATES = ['loading', 'waiting', 'open', 'pending', 'done', 'sold_out', 'ended', 'error'];
mkdirSync(SHOTS, { recursive: true });

const failures = [];
function check(ok, what) {
  if (!ok) {
    failures.push(what);
    console.log(`  FAIL ${what}`);
  } else {
    console.log(`  ok   ${what}`);
  }
}

async function api(method, path, { body, token } = {}) {
  const headers = { 'Content-Type': 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(BASE + path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const text = await r.text();
  let json = null;
  // Ids are 64-bit: integers of 16 digits or more are read as strings.
  try { json = JSON.parse(text.replace(/([:[,]\s*)(-?\d{16,})(?=\s*[,\]}])/g, '$1"$2"')); } catch (_) { /* HTML */ }
  return { status: r.status, json, text, headers: r.headers };
}

async function serverNow() {
  return (await api('GET', '/v1/time')).json.now_ms;
}

let nextItem = Math.floor(Math.random() * 1e12) + 1e9;
async function createSale({ startsInMs, durationMs = 3600e3, stock = 10, limit = 1, protection }) {
  const starts = (await serverNow()) + startsInMs;
  const item = nextItem++;
  const body = {
    name: 'Browser test sale',
    starts_at: new Date(starts).toISOString(),
    ends_at: new Date(starts + durationMs).toISOString(),
    items: [{ item_id: item, stock, price_cents: 1999, per_user_limit: limit }],
  };
  if (protection) body.protection = protection;
  const r = await api('POST', '/v1/admin/sales', { body, token: ADMIN });
  if (r.status !== 201) throw new Error(`create sale: ${r.status} ${r.text}`);
  return { sale: r.json.sale_id, item, starts };
}

let nextUser = Math.floor(Math.random() * 1e12) + 1e9;
async function newUser() {
  const user = nextUser++;
  const r = await api('POST', '/dev/token', { body: { user_id: user } });
  if (r.status !== 200) throw new Error(`dev token: ${r.status} ${r.text}`);
  return { user, token: r.json.token };
}

async function ordersOf(u, sale) {
  const r = await api('GET', `/v1/users/${u.user}/orders`, { token: u.token });
  return r.json.orders.filter((o) => String(o.sale_id) === String(sale));
}

// A page for `u` on `sale`, its clock skewed by `skewMs` (Date only: what a wrong system clock is).
async function openPage(context, sale, u, skewMs = 0) {
  const page = await context.newPage();
  if (skewMs) {
    await page.addInitScript((skew) => {
      const Real = Date;
      class Skewed extends Real {
        constructor(...a) { if (a.length === 0) super(Real.now() + skew); else super(...a); }
        static now() { return Real.now() + skew; }
      }
      globalThis.Date = Skewed;
    }, skewMs);
  }
  await page.goto(`${BASE}/sales/${sale}#token=${encodeURIComponent(u.token)}`);
  return page;
}

const state = (page) => page.evaluate(() => document.body.dataset.state);
async function waitState(page, wanted, timeout = 20000) {
  try {
    await page.waitForFunction((w) => document.body.dataset.state === w, wanted, { timeout, polling: 50 });
    return true;
  } catch (_) {
    return false;
  }
}

async function shot(page, name) {
  await page.screenshot({ path: `${SHOTS}/${name}.png` });
}

// ---------------------------------------------------------------------------------------------

async function countdownAndBuy(context) {
  console.log('a sale starting in a few seconds: waiting, the countdown, open, one click, one order');
  const { sale, starts } = await createSale({ startsInMs: 7000, stock: 5 });
  const u = await newUser();
  const page = await openPage(context, sale, u);
  check(await waitState(page, 'waiting', 5000), 'waiting before the start');
  check(await page.isDisabled('#buy'), 'the button is disabled while waiting');
  const [left, now] = await Promise.all([
    page.$eval('#countdown', (e) => Number(e.dataset.remainingMs)),
    serverNow(),
  ]);
  check(Math.abs(left - (starts - now)) < 1000, `countdown within 1 s of the server's (${left} vs ${starts - now} ms)`);
  check(/^\d\d:\d\d:\d\d$/.test(await page.textContent('#countdown')), 'the countdown reads hh:mm:ss');
  check((await page.textContent('#remaining')) === '5', 'the remaining stock is shown');
  await shot(page, 'waiting');
  check(await waitState(page, 'open', 12000), 'open at the start');
  check((await serverNow()) >= starts - 300, 'not open before the server says so');
  check(!(await page.isDisabled('#buy')), 'the button is enabled when open');
  await shot(page, 'open');
  // Hold the purchase for a moment so the pending state can be seen.
  await page.route('**/orders', async (route) => {
    await new Promise((r) => setTimeout(r, 700));
    await route.continue();
  });
  await page.click('#buy');
  await page.click('#buy', { force: true, timeout: 500 }).catch(() => {}); // a second click is ignored
  check(await waitState(page, 'pending', 2000), 'pending while the purchase is on its way');
  check(await page.isDisabled('#buy'), 'the button is disabled while pending');
  await shot(page, 'pending');
  check(await waitState(page, 'done', 10000), 'done after the click');
  await shot(page, 'done');
  const orders = await ordersOf(u, sale);
  check(orders.length === 1, `the user has exactly one order (${orders.length})`);
  await page.close();
}

async function skewedClocks(context) {
  console.log('a browser clock off by an hour either way still counts down to the server\'s start');
  for (const skew of [3600e3, -3600e3]) {
    const { sale, starts } = await createSale({ startsInMs: 7000, stock: 5 });
    const u = await newUser();
    const page = await openPage(context, sale, u, skew);
    check(await waitState(page, 'waiting', 5000), `skew ${skew / 3600e3} h: waiting`);
    const [left, now] = await Promise.all([
      page.$eval('#countdown', (e) => Number(e.dataset.remainingMs)),
      serverNow(),
    ]);
    check(Math.abs(left - (starts - now)) < 1000, `skew ${skew / 3600e3} h: countdown within 1 s (${left} vs ${starts - now} ms)`);
    // Watch until the start: the button stays disabled until the server's start time.
    let early = false;
    while ((await serverNow()) < starts - 250) {
      if (!(await page.isDisabled('#buy')) || (await state(page)) !== 'waiting') early = true;
      await new Promise((r) => setTimeout(r, 200));
    }
    check(!early, `skew ${skew / 3600e3} h: the button stays disabled until the start`);
    check(await waitState(page, 'open', 3000), `skew ${skew / 3600e3} h: open at the start`);
    await page.close();
  }
}

async function lastUnit(context) {
  console.log('stock 1, two buyers: one done, one sold out');
  const { sale } = await createSale({ startsInMs: -1000, stock: 1 });
  const [a, b] = [await newUser(), await newUser()];
  const pa = await openPage(context, sale, a);
  const pb = await openPage(context, sale, b);
  check((await waitState(pa, 'open', 5000)) && (await waitState(pb, 'open', 5000)), 'both open');
  // One buyer's purchase may land, and the other page learn of the sold-out from its poll, before
  // the other click: that button is then disabled, as it should be, and its page says sold out.
  const buy = (p) => p.click('#buy', { timeout: 10000 }).catch(async (e) => {
    if ((await state(p)) !== 'sold_out') throw e;
  });
  await Promise.all([buy(pa), buy(pb)]);
  await Promise.all([
    pa.waitForFunction(() => ['done', 'sold_out'].includes(document.body.dataset.state), null, { timeout: 10000 }),
    pb.waitForFunction(() => ['done', 'sold_out'].includes(document.body.dataset.state), null, { timeout: 10000 }),
  ]).catch(() => {});
  const states = [await state(pa), await state(pb)].sort();
  check(states[0] === 'done' && states[1] === 'sold_out', `one done, one sold_out (${states})`);
  const orders = (await ordersOf(a, sale)).length + (await ordersOf(b, sale)).length;
  check(orders === 1, `one order between them (${orders})`);
  await shot(states[1] === 'sold_out' && (await state(pa)) === 'sold_out' ? pa : pb, 'sold_out');
  await pa.close();
  await pb.close();
}

async function endedSale(context) {
  console.log('an ended sale');
  const { sale } = await createSale({ startsInMs: -7200e3, durationMs: 3600e3 });
  const page = await openPage(context, sale, await newUser());
  check(await waitState(page, 'ended', 5000), 'ended');
  check(await page.isDisabled('#buy'), 'the button is disabled');
  await shot(page, 'ended');
  await page.close();
}

async function protectedSale(context) {
  console.log('a protected sale: the proof of work solved during the countdown, the token after the start');
  const { sale, starts } = await createSale({
    startsInMs: 6000,
    stock: 5,
    protection: { order_token: true, challenge: 'pow', pow_difficulty: 20000, challenge_lead_secs: 60 },
  });
  const u = await newUser();
  // Listened for before the page opens: it may fetch the challenge before the load event.
  const asked = [];
  const record = (r) => asked.push([Date.now(), new URL(r.url()).pathname]);
  context.on('request', record);
  const page = await openPage(context, sale, u);
  check(await waitState(page, 'waiting', 5000), 'waiting');
  check(await waitState(page, 'open', 12000), 'open at the start');
  const challengeAt = asked.find(([, p]) => p.endsWith('/challenge'));
  check(challengeAt !== undefined, 'the challenge was fetched');
  await page.click('#buy');
  check(await waitState(page, 'done', 15000), 'done');
  const tokenAt = asked.find(([, p]) => p.endsWith('/order-token'));
  check(tokenAt !== undefined && challengeAt && challengeAt[0] < starts - 100, 'the challenge came during the countdown, the token after the start');
  context.off('request', record);
  check(asked.some(([, p]) => /\/orders\/v1\./.test(p)), 'the purchase went to the order URL');
  const orders = await ordersOf(u, sale);
  check(orders.length === 1, `the user has exactly one order (${orders.length})`);
  await shot(page, 'protected-done');
  await page.close();
}

async function unknownSale(context) {
  console.log('an unknown sale gets a friendly page');
  const page = await context.newPage();
  const resp = await page.goto(`${BASE}/sales/987654321987`);
  check(resp.status() === 404, `404 (${resp.status()})`);
  check((await state(page)) === 'error', 'the friendly page');
  check((await page.textContent('h1')).includes('no such sale'), 'it says so');
  await shot(page, 'error');
  await page.close();
}

async function caching() {
  console.log('caching: the page and its assets may be cached, the live data for a second at most');
  const { sale } = await createSale({ startsInMs: 60000 });
  const page = await api('GET', `/sales/${sale}`);
  check(page.status === 200 && /public, max-age=\d+/.test(page.headers.get('cache-control')), 'the page is public and cacheable');
  const etag = page.headers.get('etag');
  const again = await fetch(`${BASE}/sales/${sale}`, { headers: { 'If-None-Match': etag } });
  check(again.status === 304, 'If-None-Match: 304');
  const script = page.text.match(/\/assets\/(sale\.[0-9a-f]+\.js)/)[1];
  const asset = await api('GET', `/assets/${script}`);
  check(asset.status === 200 && asset.headers.get('cache-control').includes('immutable'), 'assets are immutable under hashed names');
  // The live data is cacheable for a second at most (a CDN may answer a crowd's polls), with an ETag.
  const live = await api('GET', `/v1/sales/${sale}`);
  check(live.headers.get('cache-control') === 'public, max-age=1' && live.headers.get('etag'), '/v1/sales/{id}: public for a second, with an ETag');
  check((await api('GET', '/v1/time')).headers.get('cache-control') === 'no-store', '/v1/time: no-store');
}

// ---------------------------------------------------------------------------------------------

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
const context = await browser.newContext({ viewport: { width: 520, height: 640 } });
try {
  for (const scenario of [caching, countdownAndBuy, skewedClocks, lastUnit, endedSale, protectedSale, unknownSale]) {
    try {
      await scenario(context);
    } catch (e) {
      check(false, `${scenario.name} threw: ${e.stack || e}`);
    }
  }
} finally {
  await browser.close();
}
console.log(`screenshots of ${STATES.filter((s) => s !== 'loading').join(', ')} in ${SHOTS}/`);
if (failures.length) {
  console.log(`${failures.length} failure(s)`);
  process.exit(1);
}
console.log('sale page: all good');
