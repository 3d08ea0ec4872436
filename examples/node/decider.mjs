#!/usr/bin/env node
// A pmk decider in Node.js, written from protocol/SPEC.md alone (no pmk code).
//
// It blocks connections that use a listed port (on either side) or whose
// remote address is in a listed network, and accepts the rest, permanently,
// so each connection is asked about once:
//
//   node decider.mjs --block-port 23 --block-net 198.18.7.0/24 --block-net fd00:bad::/32
//
// Options: --pipe PATH (else $PMK_PIPE, else /run/pmk/pmk.sock), --name NAME,
// --verdict block|drop (what a listed connection gets), --payload (ask for
// the packet's bytes inline and log their length), --once (exit when pmk
// closes the connection instead of reconnecting).

import net from "node:net";
import process from "node:process";
import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";
import { decodeMultiStream, encode } from "@msgpack/msgpack";

const PROTOCOL = 1;
// SPEC 2: message kinds.
const REQUEST = 0;
const RESPONSE = 1;
const NOTIFICATION = 2;
// SPEC 2: each side numbers its own requests, uint32, wrapping.
const MSGID_LIMIT = 2 ** 32;
// Reconnect backoff after pmk restarts (seconds).
const BACKOFF_FIRST = 0.5;
const BACKOFF_MAX = 10;

function options() {
  const { values } = parseArgs({
    options: {
      pipe: { type: "string" },
      name: { type: "string", default: "node-decider" },
      verdict: { type: "string", default: "block" },
      "block-port": { type: "string", multiple: true, default: [] },
      "block-net": { type: "string", multiple: true, default: [] },
      payload: { type: "boolean", default: false },
      once: { type: "boolean", default: false },
    },
  });
  if (!["block", "drop"].includes(values.verdict)) {
    throw new Error(`--verdict must be block or drop, not ${values.verdict}`);
  }
  const ports = new Set();
  for (const text of values["block-port"]) {
    const port = Number(text);
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new Error(`bad port ${text}`);
    ports.add(port);
  }
  const nets = new net.BlockList();
  for (const text of values["block-net"]) {
    const [address, prefix] = text.split("/");
    const family = net.isIPv6(address) ? "ipv6" : net.isIPv4(address) ? "ipv4" : null;
    const bits = Number(prefix ?? (family === "ipv6" ? 128 : 32));
    if (family === null || !Number.isInteger(bits)) throw new Error(`bad network ${text}`);
    nets.addSubnet(address, bits, family);
  }
  const pipe = values.pipe ?? process.env.PMK_PIPE ?? "/run/pmk/pmk.sock";
  return { ...values, pipe, ports, nets };
}

function listed(info, opts) {
  // A listed port on either side: inbound to a local service or outbound to a remote one.
  if (opts.ports.has(info.remote_port) || opts.ports.has(info.local_port)) return true;
  const family = info.ip_version === 6 ? "ipv6" : "ipv4";
  return opts.nets.check(info.remote_ip, family);
}

function describe(info) {
  const arrow = info.direction === "outbound" ? "->" : "<-";
  const owner = info.pid == null ? "no owner" : `pid ${info.pid} ${info.process ?? "?"}`;
  return (
    `#${info.id} ${info.direction} proto ${info.protocol} ` +
    `${info.local_ip}:${info.local_port} ${arrow} ${info.remote_ip}:${info.remote_port} (${owner})`
  );
}

// One connection to pmk: frames out with encode(), frames in from
// decodeMultiStream() over the socket, which is an async iterable of chunks.
class Session {
  constructor(socket, opts) {
    this.socket = socket;
    this.opts = opts;
    this.nextMsgid = 0;
    this.pending = new Map(); // our msgid -> resolve function
  }

  send(message) {
    this.socket.write(encode(message));
  }

  call(method, params) {
    const msgid = this.nextMsgid;
    this.nextMsgid = (this.nextMsgid + 1) % MSGID_LIMIT;
    return new Promise((resolve) => {
      this.pending.set(msgid, resolve);
      this.send([REQUEST, msgid, method, params]);
    });
  }

  async run() {
    const hello = this.call("hello", [
      { protocol: PROTOCOL, name: this.opts.name, role: "decider", payload: this.opts.payload },
    ]);
    const reading = this.read();
    const [error, result] = await hello;
    if (error != null) throw new Error(`hello refused: ${error.code}: ${error.message}`);
    console.log(
      `connected to pmk ${result.version} (${result.backend}), ` +
        `timeout ${result.verdict_timeout}s, verdicts ${(result.verdicts ?? []).join(",")}`,
    );
    await reading;
  }

  async read() {
    for await (const message of decodeMultiStream(this.socket)) {
      if (!Array.isArray(message)) continue;
      const kind = message[0];
      if (kind === REQUEST) this.onRequest(message[1], message[2], message[3]);
      else if (kind === RESPONSE) this.onResponse(message[1], message[2], message[3]);
      else if (kind === NOTIFICATION) this.onNotification(message[1], message[2]);
    }
  }

  onRequest(msgid, method, params) {
    if (method !== "decide") {
      // SPEC 3: answer requests we do not know, never ignore them.
      this.send([RESPONSE, msgid, { code: "unknown_method", message: `no method ${method}` }, null]);
      return;
    }
    const info = params[0];
    const verdict = listed(info, this.opts) ? this.opts.verdict : "accept";
    // Answer first; logging is not on the packet's way.
    this.send([RESPONSE, msgid, null, { verdict, permanent: true }]);
    const extra = info.payload ? `, ${info.payload.length} payload bytes` : "";
    console.log(`${describe(info)} => ${verdict}${extra}`);
  }

  onResponse(msgid, error, result) {
    const resolve = this.pending.get(msgid);
    if (resolve === undefined) return;
    this.pending.delete(msgid);
    resolve([error, result]);
  }

  onNotification(method, params) {
    if (method === "withdrawn") console.log(`#${params[0]} withdrawn`);
    else if (method === "refused") throw new Refused(params[0].message);
    else if (method === "protocol_error") console.log(`pmk says: ${params[0].code}: ${params[0].message}`);
    else if (method === "connection_end") {
      const c = params[0];
      console.log(`ended ${c.local_ip}:${c.local_port} ${c.remote_ip}:${c.remote_port} (${c.reason})`);
    }
    // SPEC 8: any other notification is ignored.
  }
}

// pmk will not talk to this user: retrying cannot help.
class Refused extends Error {}

function connect(path) {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(path);
    socket.once("connect", () => resolve(socket));
    socket.once("error", reject);
  });
}

async function main() {
  const opts = options();
  let backoff = BACKOFF_FIRST;
  for (;;) {
    let socket;
    try {
      socket = await connect(opts.pipe);
    } catch (error) {
      if (opts.once) throw error;
      console.log(`cannot reach pmk at ${opts.pipe} (${error.code}); retrying in ${backoff}s`);
      await sleep(backoff * 1000);
      backoff = Math.min(backoff * 2, BACKOFF_MAX);
      continue;
    }
    backoff = BACKOFF_FIRST;
    socket.on("error", () => {}); // the read loop ends on close; the error says nothing more
    try {
      await new Session(socket, opts).run();
    } catch (error) {
      if (error instanceof Refused || opts.once) throw error;
      console.log(`connection to pmk failed: ${error.message}`);
    } finally {
      socket.destroy();
    }
    if (opts.once) return;
    console.log("pmk closed the connection; reconnecting");
  }
}

main().catch((error) => {
  console.error(`node-decider: ${error.message}`);
  process.exit(1);
});
