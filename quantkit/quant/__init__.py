"""Layer 2, the quantization primitives: affine qparams and bit widths (affine), bit packing (packing), the
affine linear module (linear), per-module records (record), module surgery (surgery), calibration observers
(observers). Imports layers 0-1 (errors, dtypes, io, model) only; knows no backend, format or run."""
