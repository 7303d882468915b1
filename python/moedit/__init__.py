"""moedit: locate and edit facts inside Mixture-of-Experts language models (C++ engine, nanobind binding).

    import moedit
    model = moedit.Model("models/moedit-demo")
    logits, cache = model.run_with_cache("The mother tongue of Danielle Darrieux is",
                                         names_filter=lambda n: n.endswith("hook_expert_ids"))
    report = moedit.trace(model, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux")
"""
from ._moedit import HookInfo, InputError, Model, ResourceError, evaluate, trace, trace_many

__all__ = ["Model", "HookInfo", "InputError", "ResourceError", "trace", "trace_many", "evaluate", "to_torch"]
__version__ = "0.1.0"


def to_torch(array):
    """A PyTorch tensor sharing the NumPy array's memory (DLPack); needs torch installed."""
    import torch

    return torch.from_dlpack(array)
