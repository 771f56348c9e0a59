"""Layer 0, files: atomic writes and errors of the file system (files), the manifest of written files
(manifest), safetensors shards (shards). Imports only quantkit.errors and quantkit.dtypes."""
