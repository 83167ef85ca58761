// quicksilver.js: a browser client for the quicksilver broker, protocol v1 over the
// `quicksilver.v1.json` subprotocol. No dependencies; an ES module.
//
//   import { Client } from "/static/quicksilver.js";
//   const client = new Client({ token: null });          // null: anonymous (public topics only)
//   client.connect();
//   client.subscribe("reports/new", (msg) => console.log(msg.data), { backfill: 20 });
//   for await (const msg of client.subscribe("summary/dist/Foo/1.0")) { ... }
//
// What it does for you:
// - sends the auth frame (token or anonymous) and waits for `welcome` before anything else;
// - reconnects by itself with exponential backoff and jitter (min 250 ms, max 15 s by
//   default), except after close code 4401 (the token was refused: state "unauthorized") and
//   1008 (policy); `close()` stops it;
// - remembers, for every exact topic, the epoch and offset of the last message (starting from
//   the `ok` of the subscribe) and resubscribes with `since` after a reconnect, so missed
//   messages are replayed in order. When the server cannot replay everything (`recovered:
//   false`) the subscription's `onGap` callback runs, so the page can reload its view over
//   HTTP; after a server restart (new epoch) it also replays everything of the new epoch that
//   the history still holds. Wildcard subscriptions cannot be resumed: `onGap` runs after every
//   reconnect;
// - drops duplicates: a message is delivered at most once per subscription and epoch;
// - pings the server every 25 s and treats a missing `pong` as a dead connection.
//
// Failure behaviour: `request()` rejects with a QuicksilverError carrying the server's error
// code (`forbidden`, `bad_request`, ...) or `unavailable` when the connection dropped or did not
// open in time. Exceptions thrown by your callbacks are reported on the console and never break
// the client. An async iterator keeps at most `queueLimit` (1000) undelivered messages; beyond
// that the oldest is dropped and `onGap` runs with reason "overflow".

export const SUBPROTOCOL = "quicksilver.v1.json";

const SEGMENT = /^[A-Za-z0-9\-_.:@+~]+$/;

export class QuicksilverError extends Error {
  constructor(code, message, frame = null) {
    super(message);
    this.name = "QuicksilverError";
    this.code = code;
    this.frame = frame;
  }
}

/** The WebSocket URL of the broker that served this page. */
export function defaultUrl(loc = globalThis.location) {
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

function segmentsOf(text) {
  if (typeof text !== "string" || text.length === 0 || text.length > 255) return null;
  return text.split("/");
}

/** True for a valid topic name without wildcards (`reports/dist/Foo`). */
export function isExactTopic(text) {
  const parts = segmentsOf(text);
  return parts !== null && parts.every((p) => SEGMENT.test(p));
}

/** True for a valid topic pattern: segments, `*` for one segment, `**` as the last one. */
export function isPattern(text) {
  const parts = segmentsOf(text);
  if (parts === null) return false;
  return parts.every(
    (p, i) => SEGMENT.test(p) || p === "*" || (p === "**" && i === parts.length - 1),
  );
}

/** Does `pattern` match the exact `topic`? (Section 8.3 of the protocol.) */
export function matches(pattern, topic) {
  const p = pattern.split("/");
  const t = topic.split("/");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === "**") return true;
    if (i >= t.length) return false;
    if (p[i] !== "*" && p[i] !== t[i]) return false;
  }
  return p.length === t.length;
}

// One server-side subscription, shared by every Subscription handle on the same pattern.
class Channel {
  constructor(pattern) {
    this.pattern = pattern;
    this.exact = isExactTopic(pattern);
    this.handles = new Set();
    this.pos = null; // {epoch, offset}: the last message delivered (exact topics only)
    this.backfill = null; // {next, to}: replayed offsets still to be delivered below pos
    this.subscribed = false; // the server acknowledged it on the current connection
    this.everSubscribed = false;
    this.wantBackfill = 0;
  }
}

/**
 * A subscription handle: `unsubscribe()`, `ready` (resolves with the first `ok`), `position`,
 * and an async iterator of messages when no callback was given.
 */
export class Subscription {
  constructor(client, channel, callback, options) {
    this.client = client;
    this.channel = channel;
    this.pattern = channel.pattern;
    this.callback = callback;
    this.onGap = options.onGap || null;
    this.onError = options.onError || null;
    this.active = true;
    this._queue = [];
    this._waiters = [];
    this._queueLimit = client.queueLimit;
    this.ready = new Promise((resolve, reject) => {
      this._ready = resolve;
      this._failed = reject;
    });
    this.ready.catch(() => {}); // a refused subscription is reported through onError too
  }

  /** The last {epoch, offset} delivered on an exact topic, or null. */
  get position() {
    const pos = this.channel.pos;
    return pos ? { ...pos } : null;
  }

  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.client._release(this);
    for (const w of this._waiters.splice(0)) w.resolve({ value: undefined, done: true });
  }

  _deliver(message) {
    if (!this.active) return;
    if (this.callback) {
      try {
        this.callback(message, this);
      } catch (err) {
        console.error("quicksilver: subscriber callback failed", err);
      }
      return;
    }
    const waiter = this._waiters.shift();
    if (waiter) {
      waiter.resolve({ value: message, done: false });
      return;
    }
    this._queue.push(message);
    if (this._queue.length > this._queueLimit) {
      this._queue.shift();
      this._gap({ reason: "overflow", topic: message.topic });
    }
  }

  _gap(info) {
    if (!this.active || !this.onGap) return;
    try {
      this.onGap({ pattern: this.pattern, ...info }, this);
    } catch (err) {
      console.error("quicksilver: onGap callback failed", err);
    }
  }

  _error(error) {
    this._failed(error);
    if (this.onError) {
      try {
        this.onError(error, this);
      } catch (err) {
        console.error("quicksilver: onError callback failed", err);
      }
    }
    if (!this.callback) this.unsubscribe();
  }

  next() {
    if (this._queue.length) return Promise.resolve({ value: this._queue.shift(), done: false });
    if (!this.active) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this._waiters.push({ resolve }));
  }

  return() {
    this.unsubscribe();
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator]() {
    return this;
  }
}

/**
 * A connection to the broker that survives disconnects.
 *
 * Options: url (default: this page's host, path /ws), token (a JWT, or null for anonymous),
 * minDelay / maxDelay (reconnect backoff bounds, ms), pingInterval / requestTimeout (ms),
 * queueLimit (per async iterator), WebSocket (an implementation, for tests).
 *
 * Events (EventTarget): "state" ({state, previous, attempt}), "welcome" (the frame),
 * "servererror" (an `error` frame without a pending request).
 * States: idle, connecting, open, reconnecting, unauthorized, closed.
 */
export class Client extends EventTarget {
  constructor(options = {}) {
    super();
    this.url = options.url || defaultUrl();
    this.token = options.token || null;
    this.minDelay = options.minDelay ?? 250;
    this.maxDelay = options.maxDelay ?? 15000;
    this.pingInterval = options.pingInterval ?? 25000;
    this.requestTimeout = options.requestTimeout ?? 10000;
    this.queueLimit = options.queueLimit ?? 1000;
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    this.state = "idle";
    this.welcome = null;
    this.attempt = 0; // failed connection attempts since the last welcome
    this.reconnects = 0; // welcomes after the first one
    this.lastClose = null; // {code, reason}
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer}
    this._channels = new Map(); // pattern -> Channel
    this._stopped = true;
    this._retryTimer = null;
    this._pingTimer = null;
    this._openWaiters = [];
  }

  /** Start connecting (and keep reconnecting) until `close()`. Safe to call twice. */
  connect() {
    if (!this._stopped) return this;
    this._stopped = false;
    this._open();
    return this;
  }

  /** Stop: close the socket with 1000 and do not reconnect. */
  close() {
    this._stopped = true;
    clearTimeout(this._retryTimer);
    const ws = this._ws;
    if (ws) {
      this._drop(ws, 1000, "client closed");
      try {
        ws.close(1000, "client closed");
      } catch (_) {
        // already closing
      }
    }
    this._setState("closed");
  }

  /** Use another token: sent with `refresh` when connected, and with `auth` on reconnects. */
  async setToken(token) {
    this.token = token || null;
    if (this.state === "open" && this.token) {
      return this.request({ type: "refresh", token: this.token });
    }
    if (this.state === "unauthorized") {
      this._stopped = true;
      this.connect();
    }
    return null;
  }

  /**
   * Subscribe to a topic or pattern. With a `callback(message, subscription)` messages go there;
   * without one, iterate the returned Subscription with `for await`.
   * Options: onGap(info) when messages may have been missed (reason "epoch", "history",
   * "reconnect" or "overflow"); onError(error) when the server refuses the subscription;
   * backfill: N to also receive up to the last N messages the server's history holds.
   * A message is {topic, offset, epoch, ts, data, replayed}. Throws TypeError for an invalid
   * pattern.
   */
  subscribe(pattern, callback = null, options = {}) {
    if (!isPattern(pattern)) throw new TypeError(`not a valid topic pattern: ${pattern}`);
    let channel = this._channels.get(pattern);
    const fresh = !channel;
    if (fresh) {
      channel = new Channel(pattern);
      this._channels.set(pattern, channel);
    }
    if (options.backfill && channel.exact) channel.wantBackfill = Math.max(channel.wantBackfill, options.backfill);
    const sub = new Subscription(this, channel, callback, options);
    channel.handles.add(sub);
    if (fresh) {
      if (this.state === "open") this._subscribe(channel);
    } else if (channel.subscribed) {
      sub._ready(null);
    }
    return sub;
  }

  /** Publish `data` on an exact topic; resolves with the offset. */
  async publish(topic, data) {
    const ok = await this.request({ type: "publish", topic, data });
    return ok.offset;
  }

  /** Round trip time to the broker in ms. */
  async ping() {
    const start = performance.now();
    await this.request({ type: "ping" });
    return performance.now() - start;
  }

  /**
   * Send a request frame (an `id` is added) and resolve with its `ok` (or `pong`); reject with a
   * QuicksilverError. Waits up to `requestTimeout` for the connection to open first.
   */
  async request(frame) {
    await this._whenOpen();
    return this._request(frame);
  }

  // --- internals ----------------------------------------------------------------------------

  _setState(state) {
    if (state === this.state) return;
    const previous = this.state;
    this.state = state;
    this.dispatchEvent(
      new CustomEvent("state", { detail: { state, previous, attempt: this.attempt } }),
    );
  }

  _whenOpen() {
    if (this.state === "open") return Promise.resolve();
    if (this._stopped) return Promise.reject(new QuicksilverError("unavailable", "not connected"));
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      waiter.timer = setTimeout(() => {
        this._openWaiters = this._openWaiters.filter((w) => w !== waiter);
        reject(new QuicksilverError("unavailable", "the connection did not open in time"));
      }, this.requestTimeout);
      this._openWaiters.push(waiter);
    });
  }

  _open() {
    if (this._stopped) return;
    this._setState(this.reconnects || this.attempt || this.welcome ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new this.WebSocket(this.url, SUBPROTOCOL);
    } catch (err) {
      console.error("quicksilver: cannot open a WebSocket", err);
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      const auth = { type: "auth" };
      if (this.token) auth.token = this.token;
      ws.send(JSON.stringify(auth));
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._onFrame(event.data);
    };
    ws.onclose = (event) => this._drop(ws, event.code, event.reason);
    ws.onerror = () => {}; // a close event always follows
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _request(frame) {
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new QuicksilverError("unavailable", `no answer to ${frame.type} in time`));
      }, this.requestTimeout);
      this._pending.set(id, { resolve, reject, timer, type: frame.type });
      if (!this._send({ ...frame, id })) {
        clearTimeout(timer);
        this._pending.delete(id);
        reject(new QuicksilverError("unavailable", "not connected"));
      }
    });
  }

  _onFrame(raw) {
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch (_) {
      console.error("quicksilver: undecodable frame from the server");
      return;
    }
    if (frame === null || typeof frame !== "object") return;
    switch (frame.type) {
      case "message":
        this._onMessage(frame);
        return;
      case "welcome":
        this._onWelcome(frame);
        return;
      case "ok":
      case "pong":
      case "error": {
        const pending = frame.id == null ? undefined : this._pending.get(frame.id);
        if (pending) {
          this._pending.delete(frame.id);
          clearTimeout(pending.timer);
          if (frame.type === "error") {
            pending.reject(new QuicksilverError(frame.code || "internal", frame.message || "", frame));
          } else {
            pending.resolve(frame);
          }
        } else if (frame.type === "error") {
          this.dispatchEvent(new CustomEvent("servererror", { detail: frame }));
        }
        return;
      }
      default:
        return; // frames of later protocol versions are ignored
    }
  }

  _onWelcome(frame) {
    if (this.welcome) this.reconnects += 1;
    this.welcome = frame;
    this.attempt = 0;
    this._setState("open");
    this.dispatchEvent(new CustomEvent("welcome", { detail: frame }));
    for (const waiter of this._openWaiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.resolve();
    }
    for (const channel of this._channels.values()) this._subscribe(channel);
    this._schedulePing();
  }

  _schedulePing() {
    clearTimeout(this._pingTimer);
    if (!this.pingInterval) return;
    const ws = this._ws;
    this._pingTimer = setTimeout(async () => {
      if (this._ws !== ws || this.state !== "open") return;
      try {
        await this._request({ type: "ping" });
        this._schedulePing();
      } catch (_) {
        // No pong in time: the connection is dead even if the socket does not know yet.
        if (this._ws === ws) {
          this._drop(ws, 4000, "ping timeout");
          try {
            ws.close(4000, "ping timeout");
          } catch (_) {
            // already closing
          }
        }
      }
    }, this.pingInterval);
  }

  _subscribe(channel, since = null, backfill = null) {
    const frame = { type: "subscribe", topic: channel.pattern };
    const resumed = since === null && channel.everSubscribed;
    if (since === null && resumed && channel.exact && channel.pos) since = channel.pos;
    if (since) frame.since = { offset: since.offset, epoch: since.epoch };
    this._request(frame).then(
      (ok) => this._onSubscribed(channel, ok, { resumed, since, backfill }),
      (error) => {
        if (error.code === "unavailable") return; // the connection dropped: resubscribed later
        this._channels.delete(channel.pattern);
        for (const sub of [...channel.handles]) sub._error(error);
      },
    );
  }

  _onSubscribed(channel, ok, { resumed, since, backfill }) {
    if (this._channels.get(channel.pattern) !== channel) return;
    const first = !channel.subscribed;
    channel.subscribed = true;
    channel.everSubscribed = true;
    if (first) for (const sub of channel.handles) sub._ready(ok);
    if (!channel.exact) {
      if (resumed) this._gapAll(channel, { reason: "reconnect" });
      return;
    }
    if (backfill) return; // the answer to our own backfill request; replay follows
    const epoch = ok.epoch;
    const offset = ok.offset ?? 0;
    if (since === null) {
      // First subscription on this connection's lifetime, or a resubscribe before any message.
      const had = channel.pos;
      if (epoch !== undefined && (!had || had.epoch !== epoch)) {
        channel.pos = { epoch, offset };
        const missed = resumed ? offset : Math.min(offset, channel.wantBackfill);
        if (missed > 0) this._backfill(channel, offset - missed, offset);
      }
      return;
    }
    if (ok.recovered) return; // the missed messages follow in order
    if (epoch !== since.epoch) {
      // The server lost the history we had (restart): everything of its new epoch is new to us.
      channel.pos = { epoch, offset };
      this._gapAll(channel, { reason: "epoch", topic: channel.pattern, epoch, offset });
      if (offset > 0) this._backfill(channel, 0, offset);
    } else {
      this._gapAll(channel, { reason: "history", topic: channel.pattern, epoch, offset });
    }
  }

  // Ask the server to replay offsets (from, to] that we know exist but have not delivered.
  _backfill(channel, from, to) {
    channel.backfill = { next: from + 1, to };
    this._subscribe(channel, { epoch: channel.pos.epoch, offset: from }, { from, to });
  }

  _gapAll(channel, info) {
    for (const sub of channel.handles) sub._gap(info);
  }

  _onMessage(frame) {
    if (typeof frame.topic !== "string") return;
    const message = {
      topic: frame.topic,
      offset: frame.offset,
      epoch: frame.epoch,
      ts: frame.ts,
      data: frame.data,
      replayed: false,
    };
    for (const channel of this._channels.values()) {
      if (!matches(channel.pattern, frame.topic)) continue;
      let replayed = false;
      if (channel.exact) {
        const pos = channel.pos;
        if (pos && pos.epoch === frame.epoch) {
          if (frame.offset <= pos.offset) {
            const bf = channel.backfill;
            if (!bf || frame.offset < bf.next || frame.offset > bf.to) continue; // duplicate
            bf.next = frame.offset + 1;
            if (bf.next > bf.to) channel.backfill = null;
            replayed = true;
          } else {
            pos.offset = frame.offset;
          }
        } else {
          channel.pos = { epoch: frame.epoch, offset: frame.offset };
          channel.backfill = null;
        }
      }
      const delivered = replayed ? { ...message, replayed } : message;
      for (const sub of channel.handles) sub._deliver(delivered);
    }
  }

  _release(sub) {
    const channel = sub.channel;
    channel.handles.delete(sub);
    if (channel.handles.size || this._channels.get(channel.pattern) !== channel) return;
    this._channels.delete(channel.pattern);
    if (this.state === "open") {
      this._request({ type: "unsubscribe", topic: channel.pattern }).catch(() => {});
    }
  }

  _drop(ws, code, reason) {
    if (this._ws !== ws) return;
    this._ws = null;
    ws.onopen = ws.onmessage = ws.onclose = null;
    clearTimeout(this._pingTimer);
    this.lastClose = { code, reason };
    for (const [id, pending] of this._pending) {
      clearTimeout(pending.timer);
      pending.reject(new QuicksilverError("unavailable", "the connection closed"));
      this._pending.delete(id);
    }
    for (const channel of this._channels.values()) {
      channel.subscribed = false;
      channel.backfill = null;
    }
    if (this._stopped) return;
    if (code === 4401 || code === 1008) {
      // A refused token or a policy close: retrying with the same credentials cannot help.
      this._stopped = true;
      for (const waiter of this._openWaiters.splice(0)) {
        clearTimeout(waiter.timer);
        waiter.reject(new QuicksilverError("unauthorized", reason || "the server refused us"));
      }
      this._setState(code === 4401 ? "unauthorized" : "closed");
      return;
    }
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    this.attempt += 1;
    const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** Math.min(this.attempt - 1, 16));
    // Jitter over the upper half: clients cut off together do not all come back together.
    const delay = ceiling / 2 + Math.random() * (ceiling / 2);
    this._setState("reconnecting");
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(), delay);
  }
}
