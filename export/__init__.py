"""Export: torch checkpoints → ONNX bundles (graphs, tokenizer, weights, golden outputs, manifest).

    from ferry.export import export_bundle
    export_bundle("runs/dates/best", "bundles/dates")
"""

from ferry.export.bundle_writer import export_bundle

__all__ = ["export_bundle"]
