// Pay the relay's POST /api/send with the stock npm x402 client, unmodified.
//
//   node tests/node/pay.mjs URL BODY_JSON
//
// Environment: PAYER_PRIVATE_KEY (0x-hex, required), PAY_PASSWORD (sent as X-Pay-Password
// on both the unpaid and the paid request), RPC_URL (optional: handed to the exact EVM
// scheme for its on-chain helpers; plain EIP-3009 signing needs no RPC).
//
// `wrapFetchWithPayment` (@x402/fetch) makes the request, reads the 402's PAYMENT-REQUIRED
// header, signs an EIP-3009 authorization with the viem account through the exact EVM
// scheme (@x402/evm) registered for Base Sepolia (eip155:84532), and repeats the request
// with PAYMENT-SIGNATURE. Prints one JSON line to stdout:
//   {"status": 200, "body": {...}, "paymentResponse": {...} | null, "payer": "0x..."}
// Exits 0 whatever the HTTP status (the caller asserts on it), 1 if the client threw, 2 on
// bad usage.

import { wrapFetchWithPayment, x402Client } from "@x402/fetch";
import { ExactEvmScheme } from "@x402/evm/exact/client";
import { privateKeyToAccount } from "viem/accounts";
import { describeResponse } from "./result.mjs";

const NETWORK = "eip155:84532";

function usage(message) {
  process.stderr.write(`${message}\nusage: node tests/node/pay.mjs URL BODY_JSON\n`);
  process.exit(2);
}

async function main() {
  const [url, bodyJson] = process.argv.slice(2);
  if (!url || bodyJson === undefined) usage("missing arguments");
  const privateKey = process.env.PAYER_PRIVATE_KEY;
  if (!privateKey) usage("PAYER_PRIVATE_KEY is not set");
  JSON.parse(bodyJson); // fail early on a malformed body

  const account = privateKeyToAccount(privateKey.startsWith("0x") ? privateKey : `0x${privateKey}`);
  const options = process.env.RPC_URL ? { rpcUrl: process.env.RPC_URL } : undefined;
  const client = new x402Client().register(NETWORK, new ExactEvmScheme(account, options));
  const fetchWithPayment = wrapFetchWithPayment(fetch, client);

  const headers = { "Content-Type": "application/json" };
  if (process.env.PAY_PASSWORD) headers["X-Pay-Password"] = process.env.PAY_PASSWORD;

  const response = await fetchWithPayment(url, { method: "POST", headers, body: bodyJson });
  const result = await describeResponse(response, account.address);
  process.stdout.write(`${JSON.stringify(result)}\n`);
}

main().catch((error) => {
  process.stderr.write(`${error?.stack ?? error}\n`);
  process.exit(1);
});
