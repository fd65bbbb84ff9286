// The RabbitMQ request/reply ceiling with Node's amqplib on both ends (as NestJS callers
// use it): a server process that answers at once and a client with 64 requests in flight.
// Needs the packages of tests/nestjs (`npm ci` there).
// Run: node benchmarks/rpc_ceiling_node.js [--requests 6400] [--in-flight 64]
// Prints one JSON line: {"ops_per_s": ..., "requests": ..., "in_flight": ..., "seconds": ...}
const path = require('path');
const { fork } = require('child_process');
const amqp = require(path.join(__dirname, '..', 'tests', 'nestjs', 'node_modules', 'amqplib'));

const URL = process.env.BATCH_SERVICE_RMQ_URL || 'amqp://guest:guest@127.0.0.1:5672/';
const QUEUE = process.env.CEILING_QUEUE || `streamsvc-ceiling-node-${process.pid}`;

function flag(name, fallback) {
  const at = process.argv.indexOf(name);
  if (at < 0) return fallback;
  const value = Number.parseInt(process.argv[at + 1], 10);
  if (!(value > 0)) throw new Error(`${name}: expected a positive integer, got ${process.argv[at + 1]}`);
  return value;
}

const TOTAL = flag('--requests', 6400);
const IN_FLIGHT = flag('--in-flight', 64);

async function server() {
  const conn = await amqp.connect(URL);
  const ch = await conn.createChannel();
  await ch.prefetch(256);
  await ch.assertQueue(QUEUE, { durable: true });
  await ch.consume(QUEUE, (m) => {
    if (m === null) return; // the consumer was cancelled: the client deleted the queue
    ch.sendToQueue(m.properties.replyTo, Buffer.from('{"response":null,"isDisposed":true}'),
      { correlationId: m.properties.correlationId });
    ch.ack(m);
  });
  process.send('ready');
}

async function client() {
  const child = fork(__filename, ['server'], { env: { ...process.env, CEILING_QUEUE: QUEUE } });
  try {
    await new Promise((resolve, reject) => {
      child.once('message', resolve);
      child.once('exit', (code) => reject(new Error(`the server exited ${code}`)));
    });
    const conn = await amqp.connect(URL);
    const ch = await conn.createChannel();
    const waiting = new Map();
    await ch.consume('amq.rabbitmq.reply-to', (m) => {
      const done = waiting.get(m.properties.correlationId);
      if (done) { waiting.delete(m.properties.correlationId); done(); }
    }, { noAck: true });
    let sent = 0;
    const caller = async () => {
      while (sent < TOTAL) {
        const id = `${process.pid}-${++sent}`;
        await new Promise((resolve) => {
          waiting.set(id, resolve);
          ch.sendToQueue(QUEUE, Buffer.from('{}'), { correlationId: id, replyTo: 'amq.rabbitmq.reply-to' });
        });
      }
    };
    const started = process.hrtime.bigint();
    await Promise.all(Array.from({ length: IN_FLIGHT }, caller));
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    await ch.deleteQueue(QUEUE);
    await conn.close();
    console.log(JSON.stringify({
      ops_per_s: Math.round(TOTAL / seconds), requests: TOTAL, in_flight: IN_FLIGHT,
      seconds: Number(seconds.toFixed(3)),
    }));
  } finally {
    child.kill();
  }
}

(process.argv[2] === 'server' ? server() : client()).catch((err) => { console.error(err); process.exit(1); });
