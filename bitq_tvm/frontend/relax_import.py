"""ONNX -> Relax: the ONNX frontend as one producer of Relax modules for :func:`bitq_tvm.pipeline`.

The imported ``main`` keeps the layer weights as named parameters (bound later with the
pipeline's ``params``) and carries the ``bitq.layer_names`` attribute, weight parameter name ->
ONNX node name, so :class:`~bitq_tvm.passes.AnnotateBFPLayers` names layers as plans do.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import tvm
from tvm import relax

from ..errors import BitqError
from . import LAYER_NAMES_ATTR
from .onnx_model import OnnxModel


def import_relax(model: OnnxModel) -> tuple[tvm.IRModule, dict[str, np.ndarray]]:
    """Import a normalised ONNX model into Relax with the layer weights as named parameters.

    Returns
    -------
    mod : IRModule
        ``main`` takes the model inputs, then one parameter per weight; its ``bitq.layer_names``
        attribute maps layer weight parameters to ONNX layer names.
    params : dict
        Weight parameter name -> array, for ``bitq_tvm.pipeline(..., params=params)``.
    """
    from tvm.relax.frontend.onnx import from_onnx

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as out:
            warnings.simplefilter("ignore")
            mod = from_onnx(model.proto, shape_dict=dict(model.input_shapes), keep_params_in_input=True)
    except Exception as err:  # noqa: BLE001 - the importer raises bare Exceptions for user input
        detail = str(err).strip().splitlines()
        where = out.getvalue().strip().splitlines()[-1:] if out.getvalue().strip() else []
        raise BitqError(f"{model.path}: TVM's ONNX importer cannot convert this model: "
                        f"{(detail or [type(err).__name__])[0]}{' (' + where[0] + ')' if where else ''}") from None
    mod, params = relax.frontend.detach_params(mod)
    names = [p.name for p in mod["main"].params[len(model.input_shapes):]]
    arrays = params.get("main", [])
    mod.update_func(mod.get_global_var("main"),
                    mod["main"].with_attr(LAYER_NAMES_ATTR, {layer.weight: layer.name for layer in model.layers}))
    return mod, {name: np.asarray(a.numpy()) for name, a in zip(names, arrays)}
