// The RabbitMQ request/reply ceiling with Node's amqplib on both ends (as NestJS callers
// use it): a server process that answers at once and a client with 64 requests in flight.
// Needs the packages of tests/nestjs (`npm ci` there). Run: node benchmarks/rpc_ceiling_node.js
const path = require('path');
const { fork } = require('child_process');
const amqp = require(path.join(__dirname, '..', 'tests', 'nestjs', 'node_modules', 'amqplib'));

const URL = process.env.BATCH_SERVICE_RMQ_URL || 'amqp://guest:guest@127.0.0.1:5672/';
const QUEUE = process.env.CEILING_QUEUE || `streamsvc-ceiling-node-${process.pid}`;
const TOTAL = 6400;
const IN_FLIGHT = 64;

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
  await new Promise((resolve) => child.once('message', resolve));
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
  const started = Date.now();
  await Promise.all(Array.from({ length: IN_FLIGHT }, caller));
  const perSecond = TOTAL / ((Date.now() - started) / 1000);
  console.log(`request/reply ceiling (node amqplib both ends): ${perSecond.toFixed(0)} req/s (${IN_FLIGHT} in flight)`);
  await ch.deleteQueue(QUEUE);
  await conn.close();
  child.kill();
}

(process.argv[2] === 'server' ? server() : client()).catch((err) => { console.error(err); process.exit(1); });
