// The README's TypeScript verification of a relay event, run as it is written there:
// reads {secret, body, headers} as JSON on stdin and prints the verified event's type.
import { Webhook } from "standardwebhooks";

const input = JSON.parse(await new Promise((done) => {
  let text = "";
  process.stdin.on("data", (chunk) => (text += chunk));
  process.stdin.on("end", () => done(text));
}));

// --- as in the README ---
const wh = new Webhook(input.secret);
const event = wh.verify(input.body, input.headers); // throws on a bad signature
// --- end ---

console.log(event.type);
