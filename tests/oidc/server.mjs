// The OpenID Provider of Postern's OAuth tests: panva's oidc-provider with
// its built-in login and consent forms (devInteractions: the password is
// not checked, the login name is the account id), a few test users, and a
// small extra route to change a user while the provider runs.
//
//   OIDC_PORT=0 OIDC_REDIRECT_URIS=https://auth.example.test:8443/oauth2/callback node server.mjs
//
// Env: OIDC_PORT (0 or unset: any free port), OIDC_REDIRECT_URIS (comma-
// separated callback URLs of the client), OIDC_CLIENT_ID / OIDC_CLIENT_SECRET
// (default edge-console / edge-console-secret).
// Prints `oidc issuer <url> ready` on stdout once it serves.
//
// Extra routes (test only):
//   POST /test/users/<id>  JSON {email?, email_verified?, name?}: create or change a user
//   GET  /test/health
import http from 'node:http';
import Provider from 'oidc-provider';

const users = {
  alice: { name: 'Alice Liddell', email: 'alice@example.test', email_verified: true },
  bob: { name: 'Bob', email: 'bob@other.test', email_verified: true },
  carol: { name: 'Carol', email: 'carol@example.test', email_verified: false },
  mallory: { name: 'Mallory', email: 'mallory@example.test@evil.test', email_verified: true },
  dave: { name: 'Dave', email: 'Dave@EXAMPLE.TEST', email_verified: true },
  erin: { name: 'Erin', email: 'erin@example.test.', email_verified: true },
};

function readJson(req) {
  return new Promise((resolve, reject) => {
    let body = '';
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      try { resolve(body ? JSON.parse(body) : {}); } catch (e) { reject(e); }
    });
    req.on('error', reject);
  });
}

let provider;
const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname === '/test/health') {
    res.writeHead(200).end('ok');
    return;
  }
  const user = url.pathname.match(/^\/test\/users\/([A-Za-z0-9_-]+)$/);
  if (user && req.method === 'POST') {
    try {
      const change = await readJson(req);
      users[user[1]] = { ...(users[user[1]] || {}), ...change };
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(users[user[1]]));
    } catch (e) {
      res.writeHead(400).end(String(e));
    }
    return;
  }
  provider.callback()(req, res);
});

server.listen(Number(process.env.OIDC_PORT || 0), '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const redirectUris = (process.env.OIDC_REDIRECT_URIS || 'https://auth.example.test/oauth2/callback')
    .split(',').map((u) => u.trim()).filter(Boolean);
  provider = new Provider(issuer, {
    clients: [{
      client_id: process.env.OIDC_CLIENT_ID || 'edge-console',
      client_secret: process.env.OIDC_CLIENT_SECRET || 'edge-console-secret',
      redirect_uris: redirectUris,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
    }],
    async findAccount(ctx, id) {
      if (!users[id]) return undefined;
      return {
        accountId: id,
        async claims() {
          const u = users[id];
          return { sub: id, name: u.name, email: u.email, email_verified: u.email_verified };
        },
      };
    },
    claims: { openid: ['sub'], email: ['email', 'email_verified'], profile: ['name'] },
    scopes: ['openid', 'email', 'profile', 'offline_access'],
    features: { devInteractions: { enabled: true } },
    cookies: { keys: ['test-only-cookie-key'] },
    ttl: { Session: 3600, Interaction: 600, Grant: 3600, AccessToken: 600, AuthorizationCode: 60, IdToken: 600 },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  console.log(`oidc issuer ${issuer} ready`);
});
