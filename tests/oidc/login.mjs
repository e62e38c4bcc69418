// Logs a user in through a Postern OAuth endpoint in headless Chromium
// (Debian's, driven by playwright-core): open START_URL, get sent to the
// test OpenID Provider, fill its real login form, accept the consent form,
// and land back on the endpoint. Prints one JSON line:
//   {"url", "body", "cookies", "elapsed_ms"}
//
// Env: CHROMIUM_BIN, START_URL, LOGIN_USER, SPKI_LIST (base64 SHA-256 of the
// edge certificates' public keys, comma-separated), PROFILE_DIR.
//
// Names under example.test are mapped to 127.0.0.1 with
// --host-resolver-rules; the edge's dev-CA certificates are trusted by
// their public keys (--ignore-certificate-errors-spki-list), so every other
// certificate error still fails the page load.
import { chromium } from 'playwright-core';

const start = process.env.START_URL;
const user = process.env.LOGIN_USER;
const target = new URL(start);

const context = await chromium.launchPersistentContext(process.env.PROFILE_DIR, {
  executablePath: process.env.CHROMIUM_BIN,
  headless: true,
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--no-first-run',
    '--host-resolver-rules=MAP *.example.test 127.0.0.1',
    `--ignore-certificate-errors-spki-list=${process.env.SPKI_LIST}`,
  ],
});
try {
  const page = await context.newPage();
  const began = performance.now();
  await page.goto(start);
  // The provider's login form (devInteractions).
  await page.waitForSelector('input[name=login]', { timeout: 20000 });
  await page.fill('input[name=login]', user);
  await page.fill('input[name=password]', 'any-password');
  await page.click('button[type=submit]');
  // Its consent form.
  await page.waitForSelector('input[name=prompt][value=consent]', { state: 'attached', timeout: 20000 });
  await page.click('button[type=submit]');
  // Through the auth host and the endpoint's /auth/callback, back to start.
  await page.waitForURL(
    (u) => u.host === target.host && !u.pathname.startsWith('/auth/') && u.pathname === target.pathname,
    { timeout: 20000 },
  );
  const elapsed = performance.now() - began;
  const body = await page.textContent('body');
  const cookies = (await context.cookies(`https://${target.host}/`));
  console.log(JSON.stringify({ url: page.url(), body, cookies, elapsed_ms: elapsed }));
} finally {
  await context.close();
}
