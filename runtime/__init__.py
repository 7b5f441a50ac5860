"""The embeddable runtime: load a bundle, run it on ONNX Runtime or PyTorch, compare backends.

Depends on numpy, onnxruntime and tokenizers only; torch is imported only by the torch backend.

    import ferry.runtime
    model = ferry.runtime.load("bundle/", backend="onnxruntime")
    model.generate(["March 5, 2021"])  # → ["2021-03-05"]
"""

from ferry.runtime.bundle import Bundle
from ferry.runtime.model import Generator, load
from ferry.runtime.prompts import Prompt
from ferry.runtime.special_ids import SpecialIds
from ferry.runtime.task_model import TaskModel

Seq2SeqModel = Generator  # the name before 0.2, kept one release for code written against it

__all__ = ["Bundle", "Generator", "Prompt", "Seq2SeqModel", "SpecialIds", "TaskModel", "load"]
