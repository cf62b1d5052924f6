"""The stages, one module each with its plan: validation, resolution, rendering, delivery,
consent logging, and the sender-confirmation email."""
