"""MLflow patch registry: tracking runs, registered versions, aliases/rollback, predict and serve.

Import the functions from `deltapatch.registry.registry` (MLflow is imported lazily).
"""
