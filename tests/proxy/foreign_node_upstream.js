// The answer contract of tests/proxy/foreign_peers.py in Node: "raw" is node's own `http` module, "express" is
// Express 5 with its usual defaults (ETag, X-Powered-By, express.raw for bodies).
// Usage: node foreign_node_upstream.js <raw|express> <express node_modules dir> <fixtures dir>
// Prints "listening <port>" once it accepts connections.
"use strict";
const http = require("http");
const path = require("path");
const crypto = require("crypto");
const fs = require("fs");

const [mode, modules, fixtures] = process.argv.slice(2);
const GZ = fs.readFileSync(path.join(fixtures, "gzip.bin"));
const BIG = fs.readFileSync(path.join(fixtures, "big.bin"));
const PARTS = JSON.parse(fs.readFileSync(path.join(fixtures, "parts.json"), "utf8"));
const COOKIES = PARTS.cookies;
const OBS = Buffer.from(PARTS.obs_hex, "hex").toString("latin1");
const counts = {};

function count(req) {
  const cell = req.headers["x-cell"];
  if (cell && req.headers["x-forwarded-for"]) counts[cell] = (counts[cell] || 0) + 1;
}

function echoDoc(req, body) {
  const headers = [];
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    headers.push([req.rawHeaders[i].toLowerCase(), Buffer.from(req.rawHeaders[i + 1], "latin1").toString("hex")]);
  }
  const doc = {
    method: req.method,
    target: Buffer.from(req.url, "latin1").toString("hex"),
    headers,
    body_len: body.length,
    body_sha256: crypto.createHash("sha256").update(body).digest("hex"),
    usage: { total_tokens: 7 },
  };
  return Buffer.from(JSON.stringify(doc));
}

function stream(res, parts, done) {
  let i = 0;
  const next = () => {
    if (i === parts.length) return done();
    res.write(parts[i++]);
    setTimeout(next, 5);
  };
  next();
}

function bigParts() {
  const out = [];
  for (let i = 0; i < BIG.length; i += 256 * 1024) out.push(BIG.subarray(i, i + 256 * 1024));
  return out;
}

function counted(url) {
  const cell = new URL(url, "http://x").searchParams.get("cell");
  return Buffer.from(JSON.stringify({ count: counts[cell] || 0 }));
}

// ----------------------------------------------------------------------------------------------- node's http

function rawHandler(req, res) {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const body = Buffer.concat(chunks);
    const pathname = req.url.split("?")[0];
    if (pathname === "/_count") {
      res.writeHead(200, { "content-type": "application/json" });
      return res.end(counted(req.url));
    }
    count(req);
    res.setHeader("x-usage-cost", "250");
    switch (pathname.split("/").pop()) {
      case "echo": {
        const doc = echoDoc(req, body);
        res.writeHead(200, {
          "content-type": "application/json",
          "content-length": doc.length,
          "x-body-sha256": crypto.createHash("sha256").update(doc).digest("hex"),
        });
        return res.end(doc);
      }
      case "cookies":
        res.setHeader("set-cookie", COOKIES);
        res.setHeader("x-obs", OBS);
        res.setHeader("content-type", "text/plain");
        return res.end("cookies\n");
      case "nocontent":
        res.writeHead(204);
        return res.end();
      case "notmodified":
        res.writeHead(304, { etag: '"v1"' });
        return res.end();
      case "gzip":
        res.writeHead(200, {
          "content-type": "text/plain",
          "content-encoding": "gzip",
          vary: "Accept-Encoding",
          "content-length": GZ.length,
        });
        return res.end(GZ);
      case "sse":
        res.writeHead(200, { "content-type": "text/event-stream", "cache-control": "no-cache" });
        return stream(res, PARTS.sse, () => res.end());
      case "ndjson":
        res.writeHead(200, { "content-type": "application/x-ndjson" });
        return stream(res, PARTS.ndjson, () => res.end());
      case "big-cl":
        res.writeHead(200, { "content-type": "application/octet-stream", "content-length": BIG.length });
        return res.end(BIG);
      case "big-stream":
        res.writeHead(200, { "content-type": "application/octet-stream" });
        return stream(res, bigParts(), () => res.end());
      default:
        res.writeHead(404, { "content-type": "text/plain" });
        return res.end("not found\n");
    }
  });
}

// --------------------------------------------------------------------------------------------------- Express

function expressApp() {
  const express = require(path.join(modules, "express"));
  const app = express();
  app.use(express.raw({ type: () => true, limit: "20mb" }));
  app.get("/_count", (req, res) => res.type("application/json").send(counted(req.originalUrl)));
  app.use((req, res, next) => {
    count(req);
    res.set("x-usage-cost", "250");
    next();
  });
  app.all(/\/echo$/, (req, res) => {
    const doc = echoDoc(req, Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0));
    res.set("x-body-sha256", crypto.createHash("sha256").update(doc).digest("hex"));
    res.type("application/json").send(doc);
  });
  app.get(/\/cookies$/, (req, res) => {
    for (const c of COOKIES) res.append("Set-Cookie", c);
    res.set("x-obs", OBS);
    res.type("text/plain").send("cookies\n");
  });
  app.get(/\/nocontent$/, (req, res) => res.status(204).end());
  app.get(/\/notmodified$/, (req, res) => res.status(304).set("etag", '"v1"').end());
  app.get(/\/gzip$/, (req, res) => {
    res.set({ "content-type": "text/plain", "content-encoding": "gzip", vary: "Accept-Encoding" });
    res.send(GZ);
  });
  app.get(/\/sse$/, (req, res) => {
    res.set({ "content-type": "text/event-stream", "cache-control": "no-cache" });
    res.flushHeaders();
    stream(res, PARTS.sse, () => res.end());
  });
  app.get(/\/ndjson$/, (req, res) => {
    res.type("application/x-ndjson");
    stream(res, PARTS.ndjson, () => res.end());
  });
  app.get(/\/big-cl$/, (req, res) => res.type("application/octet-stream").send(BIG));
  app.get(/\/big-stream$/, (req, res) => {
    res.type("application/octet-stream");
    stream(res, bigParts(), () => res.end());
  });
  return app;
}

const server = mode === "express" ? http.createServer(expressApp()) : http.createServer(rawHandler);
server.listen(0, "127.0.0.1", () => process.stdout.write(`listening ${server.address().port}\n`));
process.on("SIGTERM", () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
});
