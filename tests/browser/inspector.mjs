// Drives the agent's inspector page in headless Chromium: the captured
// request is listed, its JSON body is shown pretty-printed, and Replay sends
// it again (a second row appears). Run by tests/tests/agent_api.rs with:
//   CHROMIUM_BIN   path of Debian's chromium
//   INSPECTOR_URL  the agent API's root, e.g. http://127.0.0.1:4040/
//   EXPECT_PATH    the captured request's path and query
//   SCREENSHOT     optional: where to save a PNG of the page
// Prints one JSON line with what it saw; exits non-zero on any failure.
import { chromium } from "playwright-core";

const { CHROMIUM_BIN, INSPECTOR_URL, EXPECT_PATH, SCREENSHOT } = process.env;
if (!CHROMIUM_BIN || !INSPECTOR_URL || !EXPECT_PATH) {
  console.error("set CHROMIUM_BIN, INSPECTOR_URL and EXPECT_PATH");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: CHROMIUM_BIN,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 760 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(INSPECTOR_URL);

  // The request made through the tunnel is listed.
  const row = page.locator("#requests li.req", { hasText: EXPECT_PATH });
  await row.first().waitFor({ timeout: 15000 });
  const rowsBefore = await page.locator("#requests li.req").count();

  // Its detail shows the JSON body pretty-printed.
  await row.first().click();
  const body = page.locator("#req-body");
  await body.waitFor({ timeout: 5000 });
  await page.waitForFunction(() => document.querySelector("#resp-body") !== null, null, { timeout: 5000 });
  const requestBody = await body.textContent();
  const status = await page.locator("#detail-status").textContent();
  if (SCREENSHOT) await page.screenshot({ path: SCREENSHOT });

  // Replay it: the replay is captured as a new row.
  await page.locator("#replay").click();
  await page.waitForFunction((n) => document.querySelectorAll("#requests li.req").length > n,
    rowsBefore, { timeout: 15000 });
  const rowsAfter = await page.locator("#requests li.req").count();
  const replayLabel = await page.locator("#requests li.req").first().textContent();
  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  console.log(JSON.stringify({ rowsBefore, rowsAfter, requestBody, status, replayLabel }));
} finally {
  await browser.close();
}
