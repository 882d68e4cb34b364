"""Prefect orchestration of deltapatch (the flows only call into the `deltapatch` library).

- ``flows.patch_task``: the `patch-task`, `train-patch` and `rollback-patch` flows.
- ``flows.deployments``: the deployments (event trigger on ``deltapatch.task.arrived``, training on
  the ``gpu`` work pool).
- ``flows.serve``: the process `deltapatch stack up` starts to serve them.
"""
