"""The database, the source of truth: models, the engine, guarded transitions, migrations."""
