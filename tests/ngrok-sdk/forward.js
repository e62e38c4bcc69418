// ngrok's Node SDK against a Postern edge, as the tests run it.
//
// `node forward.js http`: `ngrok.forward` to the test's HTTP server.
// `node forward.js tls`: seed 002's JavaScript TLS snippet ("Terminate at
// Edge"), unchanged but for its server address and CA (and the names and
// paths the test gives it). Configuration comes from the environment the
// test sets; the process prints the URL, then serves until it is killed.
const ngrok = require("@ngrok/ngrok");
const fs = require("fs");

// The two options that point the SDK at Postern.
const server_addr = process.env.POSTERN_SERVER_ADDR;
const session_ca_cert = fs.readFileSync(process.env.POSTERN_CA, "utf8");
const port = Number(process.env.UPSTREAM_PORT);
const domain = process.env.ENDPOINT_DOMAIN;

(async function () {
  let listener;
  if (process.argv[2] === "http") {
    listener = await ngrok.forward({
      addr: port,
      authtoken: process.env.NGROK_AUTHTOKEN,
      domain: domain,
      server_addr,
      session_ca_cert,
    });
  } else {
    listener = await ngrok.forward({
      addr: port,
      authtoken_from_env: true,
      proto: "tls",
      domain: domain,
      crt: fs.readFileSync(process.env.CRT_PATH, "utf8"),
      key: fs.readFileSync(process.env.KEY_PATH, "utf8"),
      server_addr,
      session_ca_cert,
    });
  }
  console.log(`Ingress established at: ${listener.url()}`);
  setInterval(() => {}, 1 << 30);
})().catch((e) => {
  console.error(`error: ${e.message} (code ${e.errorCode})`);
  process.exit(1);
});
