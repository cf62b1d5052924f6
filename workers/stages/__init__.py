"""The stages, one module each with its plan: validation, resolution, rendering, delivery,
consent logging, the sender-confirmation email; and after a letter is sent, acting on what came
back (inbound), emails to supporters about their letters (notices) and the survey."""
