"""Layer 4, a quantize run: the layer calibrator and its options (calibrator), the export writer and its options
(export), the work directory that makes a run resumable (workdir), output and work-directory sizes (sizing),
the streaming pipeline (pipeline). Imports layers 0-3 and quantkit.calibrate; never the planner, eval or the CLI."""
