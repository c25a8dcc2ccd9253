// Pay the relay's POST /api/send with the stock npm x402 client, as page JavaScript in a
// browser at ORIGIN would: through a fetch that applies the browser's CORS algorithm.
//
//   node tests/node/browser_pay.mjs URL BODY_JSON
//
// Environment: PAYER_PRIVATE_KEY (0x-hex, required), ORIGIN (the page's origin, e.g.
// https://agent.example; required), PAY_PASSWORD (sent as X-Pay-Password on both the
// unpaid and the paid request), RPC_URL (optional, as in pay.mjs).
//
// Node's fetch does no CORS at all, so `browserFetch` below wraps it with what the Fetch
// standard (https://fetch.spec.whatwg.org/#http-cors-protocol) makes a browser do for a
// cross-origin request in "cors" mode without credentials, and `wrapFetchWithPayment`
// (@x402/fetch, unmodified) is handed that instead of the real fetch:
//   - a request that is not "simple" (a method other than GET/HEAD/POST, or any header that
//     is not a CORS-safelisted request header: Content-Type application/json,
//     PAYMENT-SIGNATURE, X-PAYMENT and X-Pay-Password all are not) is preceded by an OPTIONS
//     preflight carrying Origin, Access-Control-Request-Method and
//     Access-Control-Request-Headers (the unsafe names lowercased, sorted, comma-joined);
//     the actual request is not sent unless the preflight answers 2xx with a matching
//     Access-Control-Allow-Origin, Access-Control-Allow-Methods covering the method and
//     Access-Control-Allow-Headers covering every requested header. No preflight cache:
//     every non-simple request is preflighted (a browser may reuse a cached preflight, but
//     only for methods and headers that preflight already allowed);
//   - the actual request carries Origin, and its response is refused unless its
//     Access-Control-Allow-Origin matches;
//   - the caller gets a response whose headers are only those page JavaScript can read:
//     the CORS-safelisted response headers plus those in Access-Control-Expose-Headers.
// A refusal throws TypeError("Failed to fetch"), as a browser does, and records why.
//
// Prints one JSON line to stdout:
//   {"status": 200, "body": {...}, "paymentResponse": {...} | null, "payer": "0x...",
//    "origin": "https://...", "cors": [{"phase": "preflight" | "actual", "method",
//    "url", "status", "requestHeaders", "allowed", "reason"?}, ...]}
// or, when the client threw (exit 1), {"error", "corsError" (the first CORS refusal, or
// null), "payer", "origin", "cors"}. Exits 0 whatever the HTTP status, 1 if the client
// threw, 2 on bad usage.

import { wrapFetchWithPayment, x402Client } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { privateKeyToAccount } from "viem/accounts";
import { describeResponse } from "./result.mjs";

const NETWORK = "eip155:84532";

const SIMPLE_METHODS = new Set(["GET", "HEAD", "POST"]);
// https://fetch.spec.whatwg.org/#cors-safelisted-response-header-name
const SAFELISTED_RESPONSE_HEADERS = new Set([
  "cache-control",
  "content-language",
  "content-length",
  "content-type",
  "expires",
  "last-modified",
  "pragma",
]);
// Never readable by page JavaScript, exposed or not.
const FORBIDDEN_RESPONSE_HEADERS = new Set(["set-cookie", "set-cookie2"]);
// Not covered by a "*" in Access-Control-Allow-Headers.
const NON_WILDCARD_REQUEST_HEADERS = new Set(["authorization"]);
const SIMPLE_CONTENT_TYPES = new Set([
  "application/x-www-form-urlencoded",
  "multipart/form-data",
  "text/plain",
]);
const NULL_BODY_STATUSES = new Set([101, 103, 204, 205, 304]);

function usage(message) {
  process.stderr.write(`${message}\nusage: node tests/node/browser_pay.mjs URL BODY_JSON\n`);
  process.exit(2);
}

// https://fetch.spec.whatwg.org/#cors-unsafe-request-header-byte
function hasUnsafeByte(value) {
  for (const ch of value) {
    const c = ch.codePointAt(0);
    if ((c < 0x20 && c !== 0x09) || c === 0x7f || '"():<>?@[\\]{}'.includes(ch)) return true;
  }
  return false;
}

// https://fetch.spec.whatwg.org/#cors-safelisted-request-header
function isSafelistedRequestHeader(name, value) {
  if (value.length > 128) return false;
  switch (name) {
    case "accept":
      return !hasUnsafeByte(value);
    case "accept-language":
    case "content-language":
      return /^[0-9A-Za-z *,\-.;=]*$/.test(value);
    case "content-type": {
      if (hasUnsafeByte(value)) return false;
      const essence = value.split(";")[0].trim().toLowerCase();
      return SIMPLE_CONTENT_TYPES.has(essence);
    }
    case "range":
      return /^bytes=(\d+-\d*|-\d+)$/.test(value);
    default:
      return false;
  }
}

// https://fetch.spec.whatwg.org/#cors-unsafe-request-header-names
function unsafeRequestHeaderNames(headers) {
  const unsafe = new Set();
  const safelisted = [];
  let safelistSize = 0;
  for (const [name, value] of headers) {
    // Headers iterates lowercased names, combined values.
    if (isSafelistedRequestHeader(name, value)) {
      safelisted.push(name);
      safelistSize += value.length;
    } else {
      unsafe.add(name);
    }
  }
  if (safelistSize > 1024) for (const name of safelisted) unsafe.add(name);
  return [...unsafe].sort();
}

function parseList(value) {
  if (value === null) return [];
  return value
    .split(",")
    .map((item) => item.trim())
    .filter((item) => item !== "");
}

function makeBrowserFetch(origin, realFetch = fetch) {
  const log = [];
  const refusals = [];

  function refuse(entry, reason) {
    entry.allowed = false;
    entry.reason = reason;
    refusals.push(`${entry.phase} ${entry.method} ${entry.url}: ${reason}`);
    // What page JavaScript sees; the reason only reaches the browser's console.
    throw new TypeError("Failed to fetch", { cause: reason });
  }

  // https://fetch.spec.whatwg.org/#cors-check (credentials mode is not "include")
  function corsCheck(response) {
    const allowOrigin = response.headers.get("Access-Control-Allow-Origin");
    if (allowOrigin === null) return "no Access-Control-Allow-Origin header";
    if (allowOrigin === "*" || allowOrigin === origin) return null;
    return `Access-Control-Allow-Origin ${JSON.stringify(allowOrigin)} does not match ${origin}`;
  }

  async function send(entry, url, init) {
    let response;
    try {
      response = await realFetch(url, { ...init, redirect: "manual" });
    } catch (error) {
      refuse(entry, `network error: ${error?.cause?.message ?? error?.message ?? error}`);
    }
    entry.status = response.status;
    if (response.status >= 300 && response.status < 400 && response.headers.has("Location")) {
      refuse(entry, "redirects are not emulated");
    }
    return response;
  }

  // https://fetch.spec.whatwg.org/#cors-preflight-fetch
  async function preflight(url, method, unsafeNames) {
    const headers = { Origin: origin, "Access-Control-Request-Method": method };
    if (unsafeNames.length) headers["Access-Control-Request-Headers"] = unsafeNames.join(",");
    const entry = {
      phase: "preflight",
      method: "OPTIONS",
      url,
      status: null,
      requestMethod: method,
      requestHeaders: unsafeNames,
      allowed: true,
    };
    log.push(entry);
    const response = await send(entry, url, { method: "OPTIONS", headers });
    await response.arrayBuffer(); // drain the connection
    const failed = corsCheck(response);
    if (failed) refuse(entry, failed);
    if (response.status < 200 || response.status > 299) {
      refuse(entry, `preflight answered ${response.status}, not an ok status`);
    }
    const methods = parseList(response.headers.get("Access-Control-Allow-Methods"));
    const names = parseList(response.headers.get("Access-Control-Allow-Headers")).map((n) =>
      n.toLowerCase(),
    );
    if (!SIMPLE_METHODS.has(method) && !methods.includes(method) && !methods.includes("*")) {
      refuse(entry, `method ${method} is not in Access-Control-Allow-Methods`);
    }
    for (const name of unsafeNames) {
      const wildcard = names.includes("*") && !NON_WILDCARD_REQUEST_HEADERS.has(name);
      if (!names.includes(name) && !wildcard) {
        refuse(
          entry,
          `request header field ${name} is not allowed by Access-Control-Allow-Headers ` +
            `in preflight response`,
        );
      }
    }
  }

  async function browserFetch(input, init) {
    const request = new Request(input, init);
    const method = request.method;
    const url = request.url;
    const unsafeNames = unsafeRequestHeaderNames(request.headers);
    if (!SIMPLE_METHODS.has(method) || unsafeNames.length) {
      await preflight(url, method, unsafeNames);
    }

    const headers = new Headers(request.headers);
    headers.set("Origin", origin);
    const body = method === "GET" || method === "HEAD" ? undefined : await request.arrayBuffer();
    const entry = {
      phase: "actual",
      method,
      url,
      status: null,
      requestHeaders: [...headers.keys()].sort(),
      allowed: true,
    };
    log.push(entry);
    const response = await send(entry, url, { method, headers, body });
    const failed = corsCheck(response);
    if (failed) {
      await response.arrayBuffer();
      refuse(entry, failed);
    }

    // https://fetch.spec.whatwg.org/#concept-filtered-response-cors
    const exposed = parseList(response.headers.get("Access-Control-Expose-Headers")).map((n) =>
      n.toLowerCase(),
    );
    const visible = new Headers();
    for (const [name, value] of response.headers) {
      if (FORBIDDEN_RESPONSE_HEADERS.has(name)) continue;
      if (SAFELISTED_RESPONSE_HEADERS.has(name) || exposed.includes(name) || exposed.includes("*")) {
        visible.append(name, value);
      }
    }
    entry.visibleHeaders = [...visible.keys()].sort();
    const filtered = new Response(NULL_BODY_STATUSES.has(response.status) ? null : response.body, {
      status: response.status,
      statusText: response.statusText,
      headers: visible,
    });
    Object.defineProperty(filtered, "url", { value: response.url || url });
    Object.defineProperty(filtered, "type", { value: "cors" });
    return filtered;
  }

  return { browserFetch, log, refusals };
}

async function main() {
  const [url, bodyJson] = process.argv.slice(2);
  if (!url || bodyJson === undefined) usage("missing arguments");
  const privateKey = process.env.PAYER_PRIVATE_KEY;
  if (!privateKey) usage("PAYER_PRIVATE_KEY is not set");
  const origin = process.env.ORIGIN;
  if (!origin) usage("ORIGIN is not set");
  if (new URL(origin).origin !== origin) usage(`ORIGIN ${origin} is not a serialized origin`);
  JSON.parse(bodyJson); // fail early on a malformed body

  const account = privateKeyToAccount(privateKey.startsWith("0x") ? privateKey : `0x${privateKey}`);
  const options = process.env.RPC_URL ? { rpcUrl: process.env.RPC_URL } : undefined;
  const client = new x402Client().register(NETWORK, new ExactEvmScheme(account, options));
  const { browserFetch, log, refusals } = makeBrowserFetch(origin);
  const fetchWithPayment = wrapFetchWithPayment(browserFetch, client);

  const headers = { "Content-Type": "application/json" };
  if (process.env.PAY_PASSWORD) headers["X-Pay-Password"] = process.env.PAY_PASSWORD;

  try {
    const response = await fetchWithPayment(url, { method: "POST", headers, body: bodyJson });
    const result = { ...(await describeResponse(response, account.address)), origin, cors: log };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } catch (error) {
    const result = {
      error: String(error?.message ?? error),
      corsError: refusals[0] ?? null,
      payer: account.address,
      origin,
      cors: log,
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
    process.stderr.write(`${error?.stack ?? error}\n`);
    process.exit(1);
  }
}

main().catch((error) => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exit(1);
});
