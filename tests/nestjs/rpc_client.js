'use strict';
/*
 * The callers' own RPC client for the bench (benchmarks/scenarios.py, rpc-single): a NestJS
 * ClientRMQ, built as a NestJS app builds it (ClientProxyFactory), sending createOperation.
 *
 * Reads one request a line on stdin, {"n": <number>, "op": {...}}, sends it at once (as many
 * in flight as lines come), and answers a line on stdout per reply, {"n": ..., "ok": bool}:
 * ok is false when the service refused it ({"status": false}) or the request failed. Prints
 * {"ready": true} once connected. Exits 0 when stdin closes and every reply is written.
 *
 * Env: RMQ_URL, RPC_QUEUE. Nest's own log lines go to stderr.
 */

const readline = require('readline');

function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

async function main() {
  await import('reflect-metadata');
  const { Logger } = await import('@nestjs/common');
  const { ClientProxyFactory, Transport } = await import('@nestjs/microservices');
  const { lastValueFrom } = await import('rxjs');
  Logger.overrideLogger(['error', 'warn']);

  const client = ClientProxyFactory.create({
    transport: Transport.RMQ,
    options: { urls: [env('RMQ_URL')], queue: env('RPC_QUEUE'), queueOptions: { durable: true } },
  });
  await client.connect();
  process.stdout.write('{"ready":true}\n');

  const answer = (n, ok) => process.stdout.write(`{"n":${n},"ok":${ok}}\n`);
  const pending = new Set();
  const lines = readline.createInterface({ input: process.stdin });
  lines.on('line', (line) => {
    const { n, op } = JSON.parse(line);
    const reply = lastValueFrom(client.send('createOperation', op)).then(
      (response) => answer(n, !(response && response.status === false)),
      (err) => {
        process.stderr.write(`request ${n}: ${err && err.message ? err.message : err}\n`);
        answer(n, false);
      },
    );
    pending.add(reply);
    reply.finally(() => pending.delete(reply));
  });
  await new Promise((resolve) => lines.once('close', resolve));
  await Promise.allSettled([...pending]);
  await client.close();
}

main().then(
  () => process.exit(0),
  (err) => {
    process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  },
);
