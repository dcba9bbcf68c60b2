// The demo page in headless Chromium (Debian's /usr/bin/chromium, driven by
// playwright-core): two pages chat through one development node, one of them forced onto
// long-polling. Started by tests/browser.rs with SHARDGATE_URL (a node on the built-in
// development secret, which serves /demo/token).
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const URL = process.env.SHARDGATE_URL;
// The same node under another origin (it lists URL's origin in its CORS origins), and a
// node that allows no other origin.
const CROSS = process.env.SHARDGATE_CROSS_URL;
const CLOSED = process.env.SHARDGATE_CLOSED_URL;
assert.ok(URL && CROSS && CLOSED, "SHARDGATE_URL, SHARDGATE_CROSS_URL and SHARDGATE_CLOSED_URL must be set");

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
after(() => browser.close());

async function signIn(user, transport, server = "") {
  const page = await (await browser.newContext()).newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  const target = server ? `&server=${encodeURIComponent(server)}` : "";
  await page.goto(`${URL}/demo?user=${user}&transport=${transport}${target}`);
  await page.click("#connect");
  await page.waitForSelector("#status.on", { timeout: 5000 });
  page.errors = errors;
  return page;
}

const lastLine = (page, kind) => page.locator(`#log li.${kind}`).last();

test("two browser pages chat: rooms, 1:1, presence and typing, one on long-polling", async () => {
  const alice = await signIn("alice", "default");
  const bob = await signIn("bob", "polling");
  assert.match(await bob.textContent("#via"), /polling/);
  // Alice's page upgrades from polling to WebSocket.
  await alice.waitForFunction(() => document.getElementById("via").textContent.includes("websocket"), null, { timeout: 5000 });

  for (const p of [alice, bob]) {
    await p.fill("#room", "lobby");
    await p.click("#join");
    await p.waitForSelector("#rooms li", { timeout: 5000 });
  }
  await alice.fill("#text", "hello from alice");
  await alice.click("#send");
  await bob.waitForSelector("#log li.chat:has-text('[lobby] alice: hello from alice')", { timeout: 5000 });

  await bob.fill("#to", "alice");
  await bob.fill("#dm", "psst, bob here");
  await bob.click("#senddm");
  await alice.waitForSelector("#log li.direct:has-text('bob → you: psst, bob here')", { timeout: 5000 });
  assert.match(await lastLine(bob, "direct").textContent(), /me → alice: psst, bob here \(delivered\)/);

  // Typing: Bob starts typing, Alice sees it.
  await bob.type("#text", "typ");
  await alice.waitForSelector("#typing:has-text('bob typing')", { timeout: 5000 });

  // Presence: Alice watches Bob; Bob leaves, Alice sees him go offline.
  await alice.fill("#watch", "bob");
  await alice.click("#subscribe");
  await alice.waitForSelector("#presence li[data-user='bob'][data-status='online']", { timeout: 5000 });
  await bob.click("#disconnect");
  await alice.waitForSelector("#presence li[data-user='bob'][data-status='offline']", { timeout: 5000 });

  assert.deepEqual([alice.errors, bob.errors], [[], []]);
});

test("the page states plainly when no token can be had", async () => {
  const page = await (await browser.newContext()).newPage();
  await page.goto(`${URL}/demo?user=${"x".repeat(300)}`);
  await page.click("#connect");
  await page.waitForSelector("#log li.system:has-text('no token')", { timeout: 5000 });
});

test("a page of an allowed origin uses long-polling across origins; others are refused", async () => {
  const carol = await signIn("carol", "polling", CROSS);
  const dave = await signIn("dave", "websocket");
  await dave.fill("#to", "carol");
  await dave.fill("#dm", "across origins");
  await dave.click("#senddm");
  await carol.waitForSelector("#log li.direct:has-text('dave → you: across origins')", { timeout: 5000 });

  const page = await (await browser.newContext()).newPage();
  await page.goto(`${URL}/demo?user=erin&transport=polling&server=${encodeURIComponent(CLOSED)}`);
  await page.click("#connect");
  await page.waitForSelector("#log li.system:has-text('connect error')", { timeout: 10000 });
  assert.equal(await page.textContent("#status"), "refused");
});
