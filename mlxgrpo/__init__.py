# Load a system OpenBLAS before anything in the package imports mlx (mlx[cpu] on Linux otherwise
# binds its slow bundled reference BLAS for the life of the process).
from mlxgrpo.backend import preload_blas as _preload_blas

_preload_blas()

__version__ = "0.1.0"
