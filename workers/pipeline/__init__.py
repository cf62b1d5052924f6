"""The pipeline runtime: the broker, the thin stage actors, their middleware, sending after the
commit (dispatch, handoff), the reconciler, dead letters, and wiring a process (app, runtime)."""
