"""Faults injected into real parts for the tests: CUDA out of memory at chosen batch sizes, a cut-short weights file."""

import contextlib
import shutil

import torch


@contextlib.contextmanager
def out_of_memory(above_rows: int = 10**9, adapter_rank: int | None = None, eval_above_rows: int = 10**9):
    """Raise CUDA's out-of-memory error in training forwards of more than ``above_rows`` rows, in every
    training forward of a LoRA adapter of rank ``adapter_rank`` (a configuration that fits at no micro-batch),
    and in evaluation forwards of more than ``eval_above_rows`` rows.

    A global forward hook of torch: the Trainer, transformers and peft run unchanged.
    """

    def hook(module, inputs):
        if not module.training:
            if isinstance(module, torch.nn.Embedding) and inputs[0].shape[0] > eval_above_rows:
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {inputs[0].shape[0]} eval rows)")
            return
        if isinstance(module, torch.nn.Embedding) and inputs[0].shape[0] > above_rows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected at {inputs[0].shape[0]} rows)")
        if isinstance(module, torch.nn.Linear) and module.out_features == adapter_rank:
            raise torch.OutOfMemoryError("CUDA out of memory (injected: adapter)")

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def broken_weights(tiny_model, folder):
    """The tiny model with its weights file cut short, as a failed download leaves it: validation reads the
    config and tokenizer, so only the trials that load the weights fail."""
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder
