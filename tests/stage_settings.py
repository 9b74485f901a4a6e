"""Settings values several stage tests build their Settings from (test scaffolding)."""

from pipeline.config import DistributedConfig

# common.distributed for a stage that runs as one process, as the shipped params.yaml has it
ONE_PROCESS = DistributedConfig(nproc_per_node=1, nnodes=1, rdzv_endpoint="", sync_batchnorm=True,
                                max_restarts=0, timeout_s=600)
