"""Effective weights of layers that adapters (PEFT LoRA) wrap, for SDTM forwards that use a
layer's weight directly instead of calling the layer (Flux single blocks split ``proj_out``
into its attention and MLP halves). No import of peft: duck-typed on ``base_layer`` /
``get_delta_weight`` (``peft.tuners.lora.Linear``)."""
import torch


def linear_weights(linear):
    """``(weight, bias)`` such that ``F.linear(x, weight, bias) == linear(x)`` (up to rounding) for
    a ``torch.nn.Linear`` or a PEFT LoRA ``Linear`` with unmerged active adapters (their
    ``scaling * B @ A`` added; merged, fused or disabled adapters: the base weights, as PEFT's
    forward). DoRA and other adapter kinds whose effect is not a weight delta raise
    ``NotImplementedError`` (fuse them first: ``transformer.fuse_lora()``)."""
    base = getattr(linear, "base_layer", None)
    if base is None or not hasattr(linear, "get_delta_weight"):
        return linear.weight, linear.bias
    if getattr(linear, "disable_adapters", False):
        if getattr(linear, "merged", False):
            linear.unmerge()  # what PEFT's forward does with disabled, merged adapters
        return base.weight, base.bias
    if getattr(linear, "merged", False):
        return base.weight, base.bias
    weight, bias = base.weight, base.bias
    lora_a = getattr(linear, "lora_A", {})
    for name in getattr(linear, "active_adapters", ()):
        if name not in lora_a:
            continue
        if getattr(linear, "use_dora", {}).get(name, False):
            raise NotImplementedError(
                f"SDTM: the DoRA adapter {name!r} on {type(base).__name__} is not a weight delta SDTM can split; "
                "fuse it first (transformer.fuse_lora()) or remove SDTM (sdtm_kernels.remove_sdtm)")
        weight = weight + linear.get_delta_weight(name).to(weight.dtype)
        if getattr(linear, "lora_bias", {}).get(name, False) and linear.lora_B[name].bias is not None:
            extra = linear.lora_B[name].bias * linear.scaling[name]
            bias = extra.to(weight.dtype) if bias is None else bias + extra.to(bias.dtype)
    if not torch.is_tensor(weight):
        raise NotImplementedError(f"SDTM cannot read the weights of {type(linear).__name__}")
    return weight, bias
