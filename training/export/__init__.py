"""``atop export``: trained checkpoints -> a verified model-store version (command.py), through
the conversion (convert.py) and the manifest (manifest.py). ``run`` and ``ExportConfig`` are the
package's API: ``from training import export; export.run(export.ExportConfig(...))``."""

from training.export.command import ExportConfig, run

__all__ = ["ExportConfig", "run"]
