"""mlxgrpo: GRPO reinforcement fine-tuning for language models on Apple MLX.

Public API (imported lazily, so `import mlxgrpo` stays light): `resolve_config`, `train`,
`evaluate`, `load_model`, `generate`.
"""

# Load a system OpenBLAS before anything in the package imports mlx (mlx[cpu] on Linux otherwise
# binds its slow bundled reference BLAS for the life of the process).
from mlxgrpo.backend import preload_blas as _preload_blas
from mlxgrpo.version import __version__

_preload_blas()

_LAZY = {
    "resolve_config": "mlxgrpo.config",
    "train": "mlxgrpo.engine.loop.trainer",
    "evaluate": "mlxgrpo.evaluation",
    "load_model": "mlxgrpo.models.loading",
    "generate": "mlxgrpo.inference",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mlxgrpo' has no attribute {name!r}")
