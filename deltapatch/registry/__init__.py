"""MLflow patch registry: tracking runs, registered versions, aliases/rollback, predict and serve.

Import the functions from `deltapatch.registry.registry` (it imports MLflow; entry points call
`deltapatch.telemetry.disable_telemetry()` before importing it, as MLflow reads its opt-out on import).
"""
