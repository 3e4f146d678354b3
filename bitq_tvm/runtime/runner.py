"""The runner base shared by host, deployed and remote models: input checks and dataset batching.

A compiled model (:class:`bitq_tvm.api.CompiledModel`, :class:`bitq_tvm.deploy.DeployedModel`)
and a model on an RPC device (:class:`bitq_tvm.runtime.remote.RemoteModel`) differ only in how
one batch runs (:meth:`Runner.run`); turning user data into the model's typed inputs and running
a dataset through the model's pinned batch size are the same for all and live here.
"""

from __future__ import annotations

import numpy as np

from ..errors import BitqError
from ..frontend.onnx_model import cast_input, input_dtypes

__all__ = ["Runner", "chunks", "stack_outputs"]


class Runner:
    """A runnable model: subclasses have a ``model`` (an ``OnnxModel``) and implement :meth:`run`."""

    model: object

    @property
    def input_names(self) -> list[str]:
        return list(self.model.input_shapes)

    def run(self, inputs) -> list[np.ndarray]:
        """Run once; ``inputs`` is a dict by input name or a list in input order."""
        raise NotImplementedError

    def input_arrays(self, inputs) -> list[np.ndarray]:
        """The model inputs as contiguous arrays of their declared ONNX element type, in input order, shapes checked.

        ``inputs`` is a dict by input name or a list in input order. Integer inputs (token ids)
        take integer data only: float data is an error, not a silent truncation.
        """
        if isinstance(inputs, dict):
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise BitqError(f"missing model input(s) {missing}")
            inputs = [inputs[n] for n in self.input_names]
        dtypes = input_dtypes(self.model)
        arrays = []
        for name, x in zip(self.input_names, inputs):
            expected = self.model.input_shapes[name]
            x = cast_input(name, x, dtypes[name])
            if tuple(x.shape) != tuple(expected):
                raise BitqError(f"input '{name}' has shape {tuple(x.shape)}, the compiled model takes {tuple(expected)}")
            arrays.append(x)
        return arrays

    def run_batched(self, inputs, data: np.ndarray | None = None):
        """Run a dataset through the model's pinned batch size, in chunks (the last zero-padded, then trimmed).

        ``run_batched({"ids": ids, "mask": mask})`` returns every output stacked over the samples,
        in output order; ``run_batched(name, array)`` (one input) returns the first output.
        """
        if not isinstance(inputs, dict):
            return self.run_batched({inputs: data})[0]
        names = list(self.model.input_shapes)
        missing = [n for n in names if n not in inputs]
        if missing:
            raise BitqError(f"no data for model input(s) {missing}")
        batches = {self.model.input_shapes[n][0] for n in names}
        if len(batches) != 1:
            raise BitqError(f"the model's inputs have different batch sizes "
                            f"{ {n: self.model.input_shapes[n][0] for n in names} }; run it with run()")
        batch = batches.pop()
        feeds = {}
        for name in names:
            x = np.asarray(inputs[name])
            if tuple(x.shape[1:]) != tuple(self.model.input_shapes[name][1:]):
                raise BitqError(f"data for input '{name}' has samples of shape {tuple(x.shape[1:])}, "
                                f"the model takes {tuple(self.model.input_shapes[name][1:])}")
            feeds[name] = x
        return stack_outputs([(self.run(chunk), valid) for chunk, valid in chunks(feeds, batch)], batch)


def chunks(feeds: dict[str, np.ndarray], batch: int):
    """``(chunk, valid)`` pairs cutting every input into ``batch`` samples; the last chunk zero-padded."""
    counts = {name: len(x) for name, x in feeds.items()}
    if len(set(counts.values())) != 1:
        raise BitqError(f"the input arrays hold different sample counts {counts}")
    total = next(iter(counts.values()))
    if total == 0:
        raise BitqError("no samples to run")
    for start in range(0, total, batch):
        chunk = {}
        for name, x in feeds.items():
            part = x[start:start + batch]
            if len(part) < batch:
                part = np.concatenate([part, np.zeros((batch - len(part), *part.shape[1:]), part.dtype)])
            chunk[name] = part
        yield chunk, min(batch, total - start)


def stack_outputs(per_chunk: list[tuple[list[np.ndarray], int]], batch: int) -> list[np.ndarray]:
    """Outputs of every chunk trimmed to its valid samples and stacked, per output."""
    first = per_chunk[0][0]
    for index, out in enumerate(first):
        if out.ndim == 0 or out.shape[0] != batch:
            raise BitqError(f"output {index} has shape {list(out.shape)}: no leading batch axis of {batch} "
                            "to run a dataset through")
    return [np.concatenate([outs[i][:valid] for outs, valid in per_chunk]) for i in range(len(first))]
