"""One exception family for the project, so callers can catch what the pipeline raises on purpose.

Messages say what happened and what was expected; stages turn them into a clean non-zero exit.
"""


class PipelineError(Exception):
    """Base class of every error the pipeline raises deliberately."""


class ConfigError(PipelineError):
    """params.yaml is malformed: an unknown or missing key, a wrong type, a value out of range."""


class DataError(PipelineError):
    """A dataset is missing, unreadable, or not in the expected layout."""


class CheckpointError(PipelineError):
    """A model file is missing, corrupt, or was written by an incompatible version."""


class ModelError(PipelineError):
    """A model spec names an unknown architecture or impossible settings."""


class ExportError(PipelineError):
    """Exporting or simplifying a model failed."""


class BuildError(PipelineError):
    """Building a runtime artifact (ONNX Runtime optimised model, TensorRT engine) failed."""


class ParityError(PipelineError):
    """Two representations of one model disagree beyond the allowed tolerance."""


class TargetUnavailable(PipelineError):
    """A runtime target cannot run on this machine (missing package, device or host)."""


class ArtifactIntegrityError(PipelineError):
    """A shipped artifact does not match its model card (hash, fields) or is not a valid file."""


class FeedError(PipelineError):
    """Inputs given to a runner do not match its input names, dtypes or shapes."""


class EngineMismatchError(ArtifactIntegrityError):
    """An engine cannot run here: another TensorRT version, GPU or platform built it."""


class PruneError(PipelineError):
    """A pruning method cannot make its keep decision (e.g. a MACs target below the smallest
    network it may build, or a sparsity that would change while weights must stay zero)."""
