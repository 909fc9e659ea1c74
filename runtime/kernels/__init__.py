"""Hand-written GPU kernels (Triton). Import lazily: Triton is only present on GPU installs."""
