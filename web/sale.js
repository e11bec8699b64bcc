// The buyer's sale page: the engine's reference client.
//
// The page is the same for every sale and every buyer (a CDN may cache it); everything per sale,
// per user and per moment comes from the API:
//   - the clock: several GET /v1/time samples, the one with the smallest round trip kept, offset =
//     server time - the sample's midpoint (Cristian's algorithm); resynced when the tab becomes
//     visible, every minute, and when the engine says not_started. The countdown is recomputed from
//     starts_at - serverNow() on every tick, never decremented, so it does not drift;
//   - the sale: GET /v1/sales/{id}, also polled every 2 s for the remaining stock;
//   - the buyer: #token= in the link's fragment (the embedding shop supplies it; a fragment never
//     reaches a server, a proxy's log or a cache key), kept in this tab's sessionStorage and taken
//     off the address bar at once; in the dev cluster a small form mints one;
//   - a fair start: a purchase in the sale's fair window is an entry in a draw; the page says so and
//     when the results come;
//   - a protected sale: during the lead window the challenge is fetched and a proof of work solved
//     in a Web Worker (or the question shown); after the start the order token is fetched and the
//     purchase goes to its order URL.
// One click is one purchase: one request_id, reused on every retry (429 and 503 wait Retry-After).
// State for tests and styles: <body data-state> is loading, waiting, open, pending, done, sold_out,
// ended or error.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const fragment = new URLSearchParams(location.hash.slice(1));
  const saleId = location.pathname.split('/').filter(Boolean).pop();
  const workerUrl = document.currentScript.dataset.worker;
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  // Ids are 64-bit integers, beyond what a JavaScript number holds exactly: read every integer of
  // 16 digits or more as a string.
  const parse = (text) => JSON.parse(text.replace(/([:[,]\s*)(-?\d{16,})(?=\s*[,\]}])/g, '$1"$2"'));
  const json = async (r) => parse(await r.text());

  const s = {
    token: fragment.get('token') || sessionStorage.getItem('seckill-token') || '',
    offset: 0,
    rtt: Infinity,
    sale: null,
    item: null,
    state: 'loading',
    challenge: null, // {kind, ..., fetchedAt}
    solution: null, // a solved proof of work, ready to send
    solving: false,
  };

  // ---------- state ----------
  function setState(state, message) {
    s.state = state;
    document.body.dataset.state = state;
    if (message !== undefined) $('status').textContent = message;
    $('buy').disabled = state !== 'open' || !s.token;
  }

  // ---------- the clock ----------
  async function sample() {
    const wall = Date.now();
    const t0 = performance.now();
    const r = await fetch('/v1/time', { cache: 'no-store' });
    const body = await json(r);
    const rtt = performance.now() - t0;
    return { rtt, offset: body.now_ms - (wall + rtt / 2) };
  }

  async function syncClock() {
    let best = null;
    for (let i = 0; i < 5; i++) {
      try {
        const x = await sample();
        if (!best || x.rtt < best.rtt) best = x;
      } catch (_) { /* a lost sample: the others decide */ }
    }
    if (best) {
      s.offset = best.offset;
      s.rtt = best.rtt;
    }
  }
  const serverNow = () => Date.now() + s.offset;

  // ---------- the API ----------
  function headers() {
    const h = { 'Content-Type': 'application/json' };
    if (s.token) h.Authorization = `Bearer ${s.token}`;
    return h;
  }

  function retryAfterMs(r) {
    const secs = parseInt(r.headers.get('Retry-After') || '1', 10);
    return Math.max(1, Number.isFinite(secs) ? secs : 1) * 1000;
  }

  // A refusal the page reacts to, thrown out of the buying steps.
  class Problem extends Error {
    constructor(status, body) {
      super(body.detail || `HTTP ${status}`);
      this.status = status;
      this.code = body.code || '';
    }
  }

  // POST, waiting out 429 and 503 as Retry-After says.
  async function post(url, body) {
    for (;;) {
      const r = await fetch(url, { method: 'POST', headers: headers(), body: JSON.stringify(body) });
      if (r.status === 429 || r.status === 503) {
        $('status').textContent = 'Busy; retrying…';
        await sleep(retryAfterMs(r));
        continue;
      }
      const answer = await json(r).catch(() => ({}));
      if (r.ok) return answer;
      throw new Problem(r.status, answer);
    }
  }

  const base = () => `/v1/sales/${saleId}/items/${s.item.item_id}`;

  // ---------- the sale ----------
  async function loadSale() {
    const r = await fetch(`/v1/sales/${saleId}`, { cache: 'no-cache' });
    if (r.status === 404) {
      setState('error', 'There is no such sale. Check the link, or go back to the shop.');
      return false;
    }
    if (!r.ok) {
      setState('error', 'The sale cannot be shown right now; reload in a moment.');
      return false;
    }
    s.sale = await json(r);
    const wanted = params.get('item');
    s.item = s.sale.items.find((i) => String(i.item_id) === wanted) || s.sale.items[0];
    $('name').textContent = s.sale.name;
    document.title = s.sale.name;
    $('price').textContent = (s.item.price_cents / 100).toFixed(2);
    $('stock').textContent = s.item.stock;
    showRemaining(s.item.remaining);
    $('item').hidden = false;
    return true;
  }

  function showRemaining(n) {
    $('remaining').textContent = n;
    if (n <= 0 && (s.state === 'waiting' || s.state === 'open')) setState('sold_out', 'Sold out.');
  }

  async function refreshRemaining() {
    try {
      const r = await fetch(`/v1/sales/${saleId}`, { cache: 'no-cache' });
      if (!r.ok) return;
      const sale = await json(r);
      const item = sale.items.find((i) => String(i.item_id) === String(s.item.item_id));
      if (item) showRemaining(item.remaining);
    } catch (_) { /* the next poll */ }
  }

  // ---------- the countdown ----------
  function pad(n) {
    return String(n).padStart(2, '0');
  }

  function tick() {
    if (!s.sale) return;
    const now = serverNow();
    const starts = Date.parse(s.sale.starts_at);
    const ends = Date.parse(s.sale.ends_at);
    const left = Math.max(0, starts - now);
    const secs = Math.ceil(left / 1000);
    $('countdown').dataset.remainingMs = String(Math.round(left));
    $('countdown').textContent = `${pad(Math.floor(secs / 3600))}:${pad(Math.floor(secs / 60) % 60)}:${pad(secs % 60)}`;
    if (now >= ends) {
      $('countdown-label').textContent = 'Ended';
      if (s.state === 'waiting' || s.state === 'open') setState('ended', 'This sale has ended.');
      return;
    }
    $('countdown-label').textContent = left > 0 ? 'Starts in' : 'On sale now';
    if (left > 0 && s.state === 'open') setState('waiting', '');
    if (left === 0 && s.state === 'waiting') setState('open', '');
    prepareChallenge(now, starts);
  }

  // ---------- protected sales ----------
  const protection = () => s.sale && s.sale.protection;

  function prepareChallenge(now, starts) {
    const p = protection();
    if (!p || p.challenge === 'none' || !s.token || s.challenge || s.solving) return;
    if (s.state !== 'waiting' && s.state !== 'open') return;
    if (now < starts - p.challenge_lead_secs * 1000) return;
    fetchChallenge().catch(() => { s.challenge = null; });
  }

  async function fetchChallenge() {
    s.solving = true;
    s.solution = null;
    try {
      const r = await fetch(`${base()}/challenge`, { headers: headers(), cache: 'no-store' });
      if (!r.ok) {
        if (r.status === 429) await sleep(retryAfterMs(r));
        return;
      }
      const c = await json(r);
      s.challenge = c;
      if (c.kind === 'question') {
        $('question').textContent = c.question;
        $('question-box').hidden = false;
      } else {
        s.solution = await solvePow(c);
      }
    } finally {
      s.solving = false;
    }
  }

  function solvePow(c) {
    return new Promise((resolve, reject) => {
      const worker = new Worker(workerUrl);
      worker.onmessage = (e) => {
        worker.terminate();
        if (e.data.number === null) reject(new Error('no solution'));
        else resolve({ algorithm: c.algorithm, challenge: c.challenge, number: e.data.number, salt: c.salt, signature: c.signature });
      };
      worker.onerror = (e) => {
        worker.terminate();
        reject(e);
      };
      worker.postMessage({ challenge: c.challenge, salt: c.salt, max: c.maxnumber });
    });
  }

  async function currentSolution() {
    const p = protection();
    if (p.challenge === 'none') return undefined;
    while (!s.challenge || (p.challenge === 'pow' && !s.solution)) {
      if (!s.solving) await fetchChallenge();
      else await sleep(50);
    }
    if (s.challenge.kind === 'question') {
      return { answer: $('answer').value.trim(), salt: s.challenge.salt, signature: s.challenge.signature };
    }
    return s.solution;
  }

  // The order URL of a protected sale: solve, then exchange the solution for a token (twice at
  // most: a failed challenge is fetched and solved again once).
  async function orderUrl() {
    for (let attempt = 0; ; attempt++) {
      const solution = await currentSolution();
      try {
        const t = await post(`${base()}/order-token`, solution ? { solution } : {});
        s.challenge = null;
        s.solution = null;
        return t.order_url;
      } catch (e) {
        if (e.code !== 'challenge_failed' || attempt > 0) throw e;
        s.challenge = null;
        s.solution = null;
      }
    }
  }

  // A fair start (the sale's fair_draw): a purchase in the window is an entry in a draw, answered
  // when the window closes.
  function drawMessage() {
    const d = s.sale && s.sale.fair_draw;
    if (!d || !d.window_ms) return '';
    const closes = Date.parse(s.sale.starts_at) + d.window_ms;
    if (serverNow() >= closes) return '';
    const at = new Date(closes).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
    return `You are in the draw; results at ${at}`;
  }

  // ---------- buying ----------
  async function buy() {
    if (s.state !== 'open') return;
    const requestId = crypto.randomUUID ? crypto.randomUUID() : randomId();
    setState('pending', drawMessage() || 'Placing your order…');
    try {
      const p = protection();
      let url = p && p.order_token ? await orderUrl() : `${base()}/orders`;
      let order;
      for (let attempt = 0; ; attempt++) {
        try {
          order = await post(url, { quantity: 1, request_id: requestId });
          break;
        } catch (e) {
          if ((e.code === 'token_expired' || e.code === 'invalid_token') && attempt === 0 && p) {
            url = await orderUrl();
            continue;
          }
          throw e;
        }
      }
      setState('done', `Your order ${order.order_id} is placed: pay before ${new Date(order.expires_at).toLocaleTimeString()}.`);
      refreshRemaining();
    } catch (e) {
      await refused(e);
    }
  }

  async function refused(e) {
    switch (e.code) {
      case 'not_started':
        // This clock was off: sync again and count down.
        await syncClock();
        setState('waiting', 'Not yet: the sale has not started.');
        break;
      case 'sold_out':
        setState('sold_out', 'Sold out.');
        break;
      case 'ended':
        setState('ended', 'This sale has ended.');
        break;
      case 'limit_exceeded':
        setState('error', 'You already have as many as one buyer may buy.');
        break;
      case 'challenge_failed':
        s.challenge = null;
        setState('open', 'That answer was not accepted; try again.');
        break;
      case 'unauthorized':
        setState('error', 'Your sign-in has expired: reload the page from the shop.');
        break;
      default:
        setState('error', e.message || 'Something went wrong; reload the page.');
    }
  }

  function randomId() {
    const b = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
  }

  // ---------- signing in (dev cluster only) ----------
  function showLogin() {
    $('login').hidden = false;
    $('login-form').addEventListener('submit', async (ev) => {
      ev.preventDefault();
      const user = $('login-user').value.trim();
      const r = await fetch('/dev/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ user_id: Number(user) }),
      });
      if (r.status === 404) {
        $('login-hint').textContent = 'Open this page from the shop: it adds your sign-in to the link (#token=…).';
        return;
      }
      if (!r.ok) {
        $('login-hint').textContent = 'That is not a user id.';
        return;
      }
      s.token = (await json(r)).token;
      sessionStorage.setItem('seckill-token', s.token);
      $('login').hidden = true;
      setState(s.state);
    });
  }

  // ---------- start ----------
  async function start() {
    await syncClock();
    if (!(await loadSale())) return;
    setState('waiting', '');
    showRemaining(s.item.remaining);
    tick();
    setInterval(tick, 100);
    setInterval(refreshRemaining, 2000);
    setInterval(syncClock, 60000);
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') syncClock();
    });
    $('buy').addEventListener('click', buy);
  }

  if (fragment.get('token')) {
    sessionStorage.setItem('seckill-token', s.token);
    // Off the address bar (and out of bookmarks and shared links).
    history.replaceState(null, '', location.pathname + location.search);
  }
  if (!s.token) showLogin();
  start();
})();
