// A minimal custom-runtime loop for the Lambda Runtime API (2018-06-01), standing in for the
// Node.js managed runtime: load the handler (init), then forever take the next event, call the
// handler with a context whose clientContext is the parsed Lambda-Runtime-Client-Context, and
// post the result or the error. It does less than the managed runtime, so the baseline's cold
// start measured with it is, if anything, flattered.
'use strict';
const http = require('http');
const path = require('path');

const api = process.env.AWS_LAMBDA_RUNTIME_API;
const [host, port] = api.split(':');
const agent = new http.Agent({ keepAlive: true });
const handler = require(path.resolve(__dirname, 'handler.js')).hello;

function call(method, urlPath, body) {
  return new Promise((resolve, reject) => {
    const req = http.request({ host, port, method, path: urlPath, agent }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ headers: res.headers, body: Buffer.concat(chunks).toString() }));
    });
    req.on('error', reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

async function loop() {
  for (;;) {
    const next = await call('GET', '/2018-06-01/runtime/invocation/next');
    const id = next.headers['lambda-runtime-aws-request-id'];
    const clientContext = next.headers['lambda-runtime-client-context'];
    const deadline = Number(next.headers['lambda-runtime-deadline-ms']);
    const context = {
      awsRequestId: id,
      clientContext: clientContext ? JSON.parse(clientContext) : undefined,
      getRemainingTimeInMillis: () => deadline - Date.now(),
    };
    try {
      const result = await handler(JSON.parse(next.body || '{}'), context);
      await call('POST', `/2018-06-01/runtime/invocation/${id}/response`, JSON.stringify(result));
    } catch (e) {
      await call('POST', `/2018-06-01/runtime/invocation/${id}/error`,
        JSON.stringify({ errorType: e.name, errorMessage: e.message }));
    }
  }
}

loop().catch((e) => { console.error(e); process.exit(1); });
