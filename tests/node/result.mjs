// What a node payer prints about the relay's final answer: status, JSON body (or text),
// the decoded PAYMENT-RESPONSE header (null without one) and the paying address.

import { decodePaymentResponseHeader } from "@x402/fetch";

export async function describeResponse(response, payer) {
  const text = await response.text();
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  const header = response.headers.get("PAYMENT-RESPONSE");
  return {
    status: response.status,
    body,
    paymentResponse: header ? decodePaymentResponseHeader(header) : null,
    payer,
  };
}
