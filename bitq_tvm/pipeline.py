"""``bitq_tvm.pipeline``: the one compile path, a ``relax_pipeline`` for ``tvm.compile``.

::

    mod, params = import_relax(load_onnx("model.onnx", {"input": (1, 3, 224, 224)}))
    ex = tvm.compile(mod, target, relax_pipeline=bitq_tvm.pipeline(plan, target, params=params))
    y = relax.VirtualMachine(ex, tvm.cpu())["main"](x)

Works on any Relax module whose layers are conv2d/matmul ops with constant or parameter weights
(ONNX through :func:`~bitq_tvm.frontend.relax_import.import_relax`, ``relax.frontend.nn``, ...).
Imports are deferred so that ``import bitq_tvm`` stays cheap.
"""

from __future__ import annotations


def resolve_target(target):
    """(TargetPreset or None, tvm.target.Target) of a preset name, a TargetPreset or a Target."""
    import tvm

    from .errors import BitqError
    from .targets.presets import TargetPreset, get_target, target_names

    if isinstance(target, str):
        target = get_target(target)
    if isinstance(target, TargetPreset):
        return target, target.tvm_target()
    if not isinstance(target, tvm.target.Target):
        raise BitqError(f"target must be a preset name, a TargetPreset or a tvm.target.Target, not {type(target)}")
    # A Target that is one of the presets keeps the preset's kernel variant and tuning database.
    for name in target_names():
        preset = get_target(name)
        if str(preset.tvm_target()) == str(target):
            return preset, target
    return None, target


def pipeline(plan, target, *, deploy: bool = False, tuning_db: str | None = None, params=None,
             max_padding_ratio: float | None = None, fuse_epilogues: bool = True):
    """A ``relax_pipeline`` for ``tvm.compile`` that compiles a Relax module under a BFP plan.

    Parameters
    ----------
    plan : Plan, dict or None
        Formats by layer name (``None``: FP32): a :class:`~bitq_tvm.plan.Plan`, or layer name ->
        LayerFormats (every planned layer must be found). Layer names are the producer's
        (``bitq.layer_names``: ONNX node names) or derived from the weights.
    target : str, TargetPreset or tvm.target.Target
        A preset name (:func:`bitq_tvm.targets.presets.get_target`) or a target.
    deploy : bool
        Lower planned layers to integer BFP kernels (fallbacks simulated and reported in
        ``bitq.deployment`` and the ``bitq_report`` function); else simulate BFP in float.
    tuning_db : str, optional
        A ``bitq-tvm tune`` work dir; its verified kernels replace the default schedules (deploy).
    params : dict, optional
        Parameter name -> array, bound into every Relax function with such parameters.
    max_padding_ratio : float, optional
        Largest padded/real in-group channel ratio of a conv lowered to integer kernels
        (default: the kernel contract's ``DEFAULT_MAX_PADDING_RATIO``).
    fuse_epilogues : bool
        Deploy: fuse bias, activation and the next layer's activation quantization into the
        integer matmuls (:class:`~bitq_tvm.passes.FuseBFPEpilogue`; the numbers are the same).

    Returns
    -------
    tvm.transform.Pass
        :func:`bfp_passes`, then TVM's CPU pipeline with the default schedules.
    """
    import tvm

    from .kernels.cpu import cpu_pipeline

    _, tvm_target = resolve_target(target)
    passes = bfp_passes(plan, target, deploy=deploy, tuning_db=tuning_db, params=params,
                        max_padding_ratio=max_padding_ratio, fuse_epilogues=fuse_epilogues)
    return tvm.transform.Sequential([*passes, cpu_pipeline(tvm_target)], name="bitq_pipeline")


def bfp_passes(plan, target, *, deploy: bool = False, tuning_db: str | None = None, params=None,
               max_padding_ratio: float | None = None, fuse_epilogues: bool = True) -> list:
    """The bitq part of :func:`pipeline` (same parameters), for reading the IR before TVM lowers it.

    Annotate layers (before binding: parameter names name layers), bind ``params``, lower to
    integer kernels and fuse their epilogues with the next layer's quantizer (deploy), simulate BFP (deploy: the fallbacks), fold constants, eliminate dead
    code, embed the report (deploy).
    """
    from tvm import relax

    from .errors import BitqError
    from .passes import AnnotateBFPLayers, EmbedBFPReport, FuseBFPEpilogue, InsertBFPSimulation, LowerBFPInteger
    from .plan import Plan

    plan = plan if plan is not None else Plan()
    preset, tvm_target = resolve_target(target)
    passes = [AnnotateBFPLayers()]
    if params:
        passes.append(_bind_params(params))
    if deploy:
        from .kernels.bfp_matmul_variants import kernel_variant
        from .kernels.contract import DEFAULT_MAX_PADDING_RATIO

        if tuning_db and preset is None:
            # a work dir belongs to one preset (its records were measured there)
            raise BitqError(f"a tuning database needs one of the target presets (bitq-tvm targets), not {tvm_target}")
        kernels = _tuned_kernels(tuning_db, preset) if tuning_db else None
        ratio = DEFAULT_MAX_PADDING_RATIO if max_padding_ratio is None else max_padding_ratio
        passes.append(LowerBFPInteger(plan, kernel_variant(tvm_target), ratio, kernels))
        if fuse_epilogues:
            passes.append(FuseBFPEpilogue())
    elif tuning_db:
        raise BitqError("a tuning database holds integer kernels: it needs deploy=True")
    passes += [InsertBFPSimulation(plan), relax.transform.FoldConstant(), relax.transform.DeadCodeElimination()]
    if deploy:
        passes.append(EmbedBFPReport())
    return passes


def _bind_params(params):
    """``relax.transform.BindParams`` into every Relax function that has parameters of these names."""
    import tvm
    from tvm import relax

    from .errors import BitqError

    @tvm.transform.module_pass(opt_level=0, name="BindBFPParams")
    def bind(mod, _ctx):
        used = False
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and any(p.name in params for p in func.params):
                mod = relax.transform.BindParams(gv.name_hint, params)(mod)
                used = True
        if not used:
            raise BitqError(f"params {sorted(params)[:4]}... name no parameter of the module's Relax functions")
        return mod

    return bind


def _tuned_kernels(work_dir: str, preset):
    """``kernels(rows, n, k, fmt_a, fmt_w, variant)`` for LowerBFPInteger: verified tuned kernels,
    carrying their record's decisions (``TUNED_CONFIG_ATTR``) where the record has them."""
    import dataclasses

    from .passes.lower_bfp_integer import TUNED_CONFIG_ATTR
    from .errors import BitqError
    from .tuning.session import open_work_dir
    from .tuning.tasks import BfpTask, tuned_config
    from .tuning.verify import schedule_from_record, trusted_records

    open_work_dir(work_dir, preset, create=False)  # a bad work dir is an error before compiling
    found: dict = {}

    def lookup(rows, n, k, fmt_a, fmt_w, variant):
        try:
            task = BfpTask(rows, n, k, fmt_a, fmt_w, variant)
        except BitqError:
            return None  # not a shape or variant tuning makes tasks of
        if task.name not in found:
            record = trusted_records(work_dir, [task], preset).get(task.name)
            func = None if record is None else schedule_from_record(task, record).mod["main"]
            config = None if record is None else tuned_config(record.trace)
            if config is not None:
                # FuseBFPEpilogue rebuilds the fused kernel with the record's decisions
                func = func.with_attr(TUNED_CONFIG_ATTR, dataclasses.asdict(config))
            found[task.name] = func
        return found[task.name]

    return lookup
