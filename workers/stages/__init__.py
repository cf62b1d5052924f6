"""The stages, one module each with its plan: validation, resolution, rendering, delivery,
consent logging, the sender confirmation; and after a letter is sent, acting on what came back
(inbound) and the survey. Every email to a supporter is sent by the outbox (workers.outbox)."""
