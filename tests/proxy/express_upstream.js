// The priced-API contract of tests/proxy/frameworks.py, in Express 5 with the method-override middleware
// (the way Express apps honour X-HTTP-Method-Override and ?_method=). Express routes on the raw path: an
// encoded slash stays inside its segment and the parameter is decoded ("a%2Fb" -> "a/b").
// Usage: node express_upstream.js <node_modules dir>; prints "listening <port>" once it accepts connections.
"use strict";
const path = require("path");
const modules = process.argv[2];
const express = require(path.join(modules, "express"));
const methodOverride = require(path.join(modules, "method-override"));

const app = express();
const hits = [];
const hit = (name, req, extra) => {
  hits.push({ handler: name, method: req.method, api_key: req.get("x-api-key") || null });
  return { handler: name, ...extra };
};

app.use(methodOverride("X-HTTP-Method-Override"));
app.use(methodOverride("X-Method-Override"));
app.use(methodOverride("X-HTTP-Method"));
app.use(methodOverride("_method"));

app.get("/_hits", (req, res) => res.json(hits));
app.post("/_hits/reset", (req, res) => { hits.length = 0; res.json([]); });
app.get("/item/:id", (req, res) => res.json(hit("item", req, { id: req.params.id })));
app.get("/files/:name", (req, res) => res.json(hit("files", req, { name: req.params.name })));
app.get("/report", (req, res) => res.json(hit("report-get", req)));
app.post("/report", (req, res) => res.json(hit("report-post", req)));
app.get("/moved", (req, res) => {
  hit("moved", req);
  res.redirect(302, `${req.protocol}://${req.get("host")}/item/1?from=moved`);
});
app.get("/free/whoami", (req, res) => res.json(hit("free", req)));
app.use((req, res) => res.status(404).json(hit("not-found", req)));

const server = app.listen(0, "127.0.0.1", () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});
process.on("SIGTERM", () => server.close(() => process.exit(0)));
