"""The pipeline runtime: the broker, the six thin actors, their middleware, sending after the
commit (dispatch, handoff), the reconciler, dead letters, and wiring a process (app, runtime)."""
