"""Export of a trained network in inference form: fuse, check on real inputs, write atomically.

By concern:

- ``task``: ``export_task``, a task's checkpoint exported with its declared hooks
  (``tasks.common.module.BaseTask``) and its data: what the ``export`` subcommand runs;
- ``fuse``: ``fuse_and_export``, the pipeline (fuse, check, convert, write the folder at once);
- ``options``: ``ExportOptions`` (the flags) and ``ExportContext`` (what the task says);
- ``conversions``: the float32 ONNX and CoreML files; ``deployment``: the INT8 ONNX and ExecuTorch
  files, run in their runtimes and compared with float32;
- ``checks``: errors, tolerances, agreement; ``validation``: the task's validation run on a file;
- ``files``: the names an export folder holds.
"""

from tasks.common.export.files import EXPORT_FILES, is_export_file
from tasks.common.export.fuse import fuse_and_export
from tasks.common.export.options import ExportContext, ExportOptions
from tasks.common.export.task import export_task
from tasks.common.export.validation import validation_metrics

__all__ = ["EXPORT_FILES", "ExportContext", "ExportOptions", "export_task", "fuse_and_export", "is_export_file", "validation_metrics"]
