'use strict';
/*
 * The real NestJS RMQ transport against streamsvc (driven by tests/e2e/test_nestjs_interop.py).
 *
 * - a NestJS RMQ server (ServerRMQ) consumes EVENT_QUEUE and records EVENT_PATTERN events;
 * - a NestJS RMQ client, built as a NestJS app builds it (ClientProxyFactory), sends
 *   createOperation, polls getOperation until SUCCESS, then emits create_operation.
 *
 * Prints one JSON line on stdout: {"created": ..., "got": ..., "event": ...}; exits 0.
 * On any failure the error goes to stderr and the exit code is 1. Nest's own log lines
 * go to stderr, so stdout carries only the result.
 *
 * @nestjs/* 12 are ES modules: they are loaded with import() from this CommonJS script.
 */

const TIMEOUT_MS = 15000;

function env(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function within(ms, what, step) {
  const deadline = Date.now() + ms;
  for (;;) {
    const result = await step();
    if (result !== undefined) {
      return result;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${ms} ms: ${what}`);
    }
    await sleep(100);
  }
}

/** Every Nest log line to stderr, so stdout holds only the result line. */
const stderrLogger = {};
for (const level of ['log', 'error', 'warn', 'debug', 'verbose', 'fatal']) {
  stderrLogger[level] = (message, ...rest) => {
    const text = message instanceof Error ? message.stack : String(message);
    process.stderr.write(`[nest ${level}] ${text} ${rest.map(String).join(' ')}\n`);
  };
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

async function main() {
  const rmqUrl = env('RMQ_URL');
  const rpcQueue = env('RPC_QUEUE');
  const eventQueue = env('EVENT_QUEUE');
  const eventPattern = env('EVENT_PATTERN');
  const opId = env('OP_ID');

  await import('reflect-metadata');
  const { Logger } = await import('@nestjs/common');
  const { ClientProxyFactory, ServerRMQ, Transport } = await import('@nestjs/microservices');
  const { lastValueFrom } = await import('rxjs');
  Logger.overrideLogger(stderrLogger);

  let server;
  let client;
  try {
    // -- the event server, as `createMicroservice(..., {transport: Transport.RMQ, ...})` runs it
    const events = [];
    server = new ServerRMQ({ urls: [rmqUrl], queue: eventQueue, queueOptions: { durable: true } });
    server.addHandler(
      eventPattern,
      async (data) => {
        events.push(data);
      },
      true,
    );
    await withTimeout(
      new Promise((resolve, reject) => {
        server.listen((err) => (err ? reject(err) : resolve()));
      }),
      TIMEOUT_MS,
      'the NestJS RMQ server listening',
    );

    // -- the client, exactly as a NestJS app builds it
    client = ClientProxyFactory.create({
      transport: Transport.RMQ,
      options: { urls: [rmqUrl], queue: rpcQueue, queueOptions: { durable: true } },
    });
    await withTimeout(client.connect(), TIMEOUT_MS, 'the NestJS RMQ client connecting');

    const send = (pattern, data) =>
      withTimeout(lastValueFrom(client.send(pattern, data)), TIMEOUT_MS, `reply to ${pattern}`);

    const created = await send('createOperation', {
      operationType: 'ORDER_CREATED',
      userOperationId: opId,
      table: 'orders',
      action: 'insert',
      values: { id: 1, customer: 'nest', amount: 3 },
    });

    const got = await within(TIMEOUT_MS, `operation ${opId} reaching SUCCESS`, async () => {
      const reply = await send('getOperation', { id: opId });
      return reply && reply.data && reply.data.status === 'SUCCESS' ? reply : undefined;
    });

    await withTimeout(
      lastValueFrom(
        client.emit('create_operation', {
          operationType: 'ORDER_CREATED',
          table: 'orders',
          action: 'insert',
          values: { id: 2, customer: 'nest', amount: 4 },
        }),
        { defaultValue: undefined },
      ),
      TIMEOUT_MS,
      'emit create_operation',
    );

    const event = await within(TIMEOUT_MS, `an ${eventPattern} event naming ${opId}`, async () =>
      events.find((data) => JSON.stringify(data).includes(opId)),
    );

    process.stdout.write(`${JSON.stringify({ created, got, event })}\n`);
  } finally {
    const closing = [];
    if (client) closing.push(client.close());
    if (server) closing.push(server.close());
    await withTimeout(Promise.allSettled(closing), 5000, 'closing').catch((err) =>
      process.stderr.write(`${err.message}\n`),
    );
  }
}

main().then(
  () => process.stdout.write('', () => process.exit(0)),
  (err) => {
    process.stderr.write(`interop failed: ${err && err.stack ? err.stack : String(err)}\n`);
    process.exit(1);
  },
);
