"""The order of steps of each operation; the only place it is written.

quoting      normalise, count, moderate, price and sign a message (SPEC §2 step 1)
sending      a paid /api/send: challenge, or claim the payment and drive it (§2, §9)
settling     the payment's settlement on the chain, judged by the chain (§9, §11)
dispatching  the paid SMS handed to the provider, never twice (§10)
refunding    the payer's money sent back when the provider refuses (§11)
reconciling  every unfinished payment finished from the chain's truth (§11)
status       what became of a message: status reads, delivery reports, STOP replies
answers      the HTTP answers those steps give, and the stored final answer
leases       who may act on a payment now
"""
