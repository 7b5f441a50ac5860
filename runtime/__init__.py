"""The embeddable runtime: load a bundle, run it on ONNX Runtime or PyTorch, compare backends.

Depends on numpy, onnxruntime and tokenizers only; torch is imported only by the torch backend.

    import ferry.runtime
    model = ferry.runtime.load("bundle/", backend="onnxruntime")
    model.generate(["March 5, 2021"])  # → ["2021-03-05"]
"""

from ferry.runtime.bundle import Bundle
from ferry.runtime.model import Seq2SeqModel, load
from ferry.runtime.prompts import Prompt
from ferry.runtime.task_model import TaskModel

__all__ = ["Bundle", "Prompt", "Seq2SeqModel", "TaskModel", "load"]
