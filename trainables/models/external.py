"""Models from outside the project: any callable that returns an ``nn.Module``, or a torchvision builder.

    model: {factory: "package.module:function", <its keyword arguments>, taps: [...], connections: [...]}
    model: {torchvision: resnet18, <its keyword arguments>}

Keyword arguments are sweepable like any model setting (an axis ``width`` sets ``model.width``).
``num_classes`` (and ``image_size``, where the callable takes one) come from the data; torchvision
builders get ``weights=None`` (random initialisation, nothing downloaded).

Taps are dotted ``named_modules`` paths read with forward hooks: a 4-D output is a map of filters
(``conv``), a (B, N, D) output a token sequence of nodes (``token``), and a (B, D) output is shaped
(B, D, 1, 1) so its nodes are filters of a 1x1 map (as VGG's FC layers). A tap on an
``nn.MultiheadAttention`` reads its heads: the module applies ``out_proj`` inside one functional
call, so no hook sees the per-head outputs; ``attention_heads`` recomputes them from the module's
own weights and inputs (head-major, before ``out_proj``). Connections name a parameter and the taps
whose units it joins; their pruning method is ``afcc`` between filters and ``andc`` between nodes.

Models that declare neither get the shipped declarations where one fits (``shipped``): torchvision's
ResNets with basic blocks (ResNet-18/34) and its Vision Transformers.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import SpecError, TapInfo
from .taps import TappedModel

OWN_KEYS = ("family", "factory", "torchvision", "taps", "connections", "num_classes", "image_size", "in_channels")


def is_external(spec: Any) -> bool:
    """Whether a model spec names an outside model."""
    return isinstance(spec, dict) and ("factory" in spec or "torchvision" in spec or spec.get("family") == "external")


def resolve_external(spec: dict[str, Any]) -> dict[str, Any]:
    """The complete spec of an outside model; checks what can be checked without building it."""
    sources = [key for key in ("factory", "torchvision") if key in spec]
    if len(sources) != 1:
        raise SpecError("model.factory: give exactly one of model.factory and model.torchvision")
    if spec.get("family", "external") != "external":
        raise SpecError(f"model.family: {spec['family']!r} cannot be combined with model.{sources[0]}")
    out = {"family": "external", "taps": None, "connections": None, "in_channels": 3, **spec}
    for key in ("num_classes", "image_size", "in_channels"):
        value = out.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"model.{key}: must be a positive integer, got {value!r}")
    fn = builder(out)
    kwargs = keyword_arguments(out)
    signature = _signature(fn) if "factory" in out else None
    if signature is not None:
        try:
            signature.bind_partial(**kwargs)
        except TypeError:
            bad = next((k for k in kwargs if k not in signature.parameters), next(iter(kwargs), "factory"))
            raise SpecError(f"model.{bad}: not an argument of {out['factory']}") from None
    out["taps"] = _names(out["taps"], "model.taps")
    out["connections"] = _connections(out["connections"])
    return out


def builder(spec: dict[str, Any]) -> Callable[..., nn.Module]:
    """The callable a spec names: ``package.module:function`` or a torchvision model name."""
    if "torchvision" in spec:
        import torchvision.models as tvm  # here: torchvision.models costs 1.5 s to import

        name = spec["torchvision"]
        known = tvm.list_models(module=tvm)
        if name not in known:
            near = difflib.get_close_matches(str(name), known, n=3)
            raise SpecError(
                f"model.torchvision: unknown model {name!r}" + (f" (nearest: {', '.join(near)})" if near else "")
            )
        return partial(tvm.get_model, name, weights=None)
    target = spec["factory"]
    module_name, sep, attr = str(target).partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"model.factory: expected 'package.module:function', got {target!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"model.factory: cannot import {module_name!r} ({exc})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise SpecError(f"model.factory: {module_name!r} has no callable {attr!r}")
    return fn


def keyword_arguments(spec: dict[str, Any]) -> dict[str, Any]:
    """The callable's own arguments: every key of the spec that is not the project's."""
    return {k: v for k, v in spec.items() if k not in OWN_KEYS}


def _names(value: Any, field: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(f"{field}: expected a list of module paths, got {value!r}")
    return list(value)


def _connections(value: Any) -> list[dict[str, str | None]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise SpecError(f"model.connections: expected a list of {{param, inputs, outputs}}, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or set(item) - {"param", "inputs", "outputs"}
            or not {"param", "inputs"} <= set(item)
        ):
            raise SpecError(f"model.connections[{i}]: expected {{param, inputs, outputs}}, got {item!r}")
        out.append({"param": item["param"], "inputs": item["inputs"], "outputs": item.get("outputs")})
    return out


# ---------------------------------------------------------------- the model


class External(TappedModel):
    """An outside ``nn.Module`` (``self.net``) with taps and prunable connections named by module path."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        fn, kwargs = builder(spec), keyword_arguments(spec)
        if "num_classes" not in kwargs and _accepts(fn, "num_classes"):
            kwargs["num_classes"] = spec["num_classes"]
        if "image_size" not in kwargs and _names_size(fn, spec):
            kwargs["image_size"] = spec["image_size"]
        try:
            self.net = fn(**kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's builder: one line naming it
            raise SpecError(
                f"model.{'torchvision' if 'torchvision' in spec else 'factory'}: building failed ({exc})"
            ) from None
        if not isinstance(self.net, nn.Module):
            raise SpecError(f"model.factory: {spec['factory']} returned a {type(self.net).__name__}, not an nn.Module")
        shipped_taps, shipped_connections = shipped(self.net)
        taps = spec["taps"] if spec["taps"] is not None else shipped_taps
        connections = spec["connections"] if spec["connections"] is not None else shipped_connections
        paths = dict.fromkeys(taps + [c[k] for c in connections for k in ("inputs", "outputs") if c[k]])
        modules = dict(self.net.named_modules())
        for path in paths:
            if path not in modules or not path:
                near = difflib.get_close_matches(path, [m for m in modules if m], n=4, cutoff=0.5)
                raise SpecError(f"model.taps: no module {path!r}" + (f" (nearest: {', '.join(near)})" if near else ""))
        shapes = self._probe(list(paths))
        unused = [p for p in paths if p not in shapes]
        if unused:
            raise SpecError(f"model.taps: module {unused[0]!r} is not called by the model's forward pass")
        for path, shape in shapes.items():  # depth order: the order in which the outputs were computed
            self._declare(path, modules[path], shape)
        params = dict(self.net.named_parameters())
        for i, c in enumerate(connections):
            if c["param"] not in params:
                near = difflib.get_close_matches(c["param"], list(params), n=3, cutoff=0.5)
                raise SpecError(
                    f"model.connections[{i}].param: no parameter {c['param']!r}"
                    + (f" (nearest: {', '.join(near)})" if near else "")
                )
            method = "afcc" if self.taps[c["inputs"]].kind == "conv" else "andc"
            self.add_connection(method, f"net.{c['param']}", c["inputs"], c["outputs"])

    def _probe(self, paths: list[str]) -> dict[str, tuple[int, ...]]:
        """Output shapes of ``paths`` in the order the forward pass computes them (for a batch of two
        blank images, in eval mode); checks the logits' shape."""
        shapes: dict[str, tuple[int, ...]] = {}
        handles = [self.net.get_submodule(p).register_forward_hook(partial(_shape_of, shapes, p)) for p in paths]
        was_training = self.net.training
        try:
            self.net.eval()
            with torch.no_grad():
                logits = self.net(torch.zeros(2, self.in_channels, self.image_size, self.image_size))
        except Exception as exc:  # noqa: BLE001 - the user's model: say which input it refused
            raise SpecError(
                f"model.image_size: the model fails on {self.image_size} px images with {self.in_channels} "
                f"channels ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        finally:
            self.net.train(was_training)
            for handle in handles:
                handle.remove()
        if not isinstance(logits, Tensor) or logits.shape != (2, self.num_classes):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise SpecError(
                f"model.num_classes: the model gives {got} for 2 images, the data has {self.num_classes} classes"
            )
        return shapes

    def _declare(self, path: str, module: nn.Module, shape: tuple[int, ...]) -> None:
        if isinstance(module, nn.MultiheadAttention):
            info = TapInfo("token", module.num_heads, module.head_dim)
            self.add_tap(path, f"net.{path}", info, capture=attention_heads)
        elif len(shape) == 4:
            self.add_tap(path, f"net.{path}", TapInfo("conv"))
        elif len(shape) == 3:
            self.add_tap(path, f"net.{path}", TapInfo("token"))
        elif len(shape) == 2:
            self.add_tap(path, f"net.{path}", TapInfo("conv"), capture=_as_1x1_map)
        else:
            raise SpecError(
                f"model.taps: {path!r} gives a {len(shape)}-D output {shape}; taps need 2, 3 or 4 dimensions"
            )

    def forward_logits(self, x: Tensor) -> Tensor:
        return self.net(x)


def _signature(fn: Callable) -> inspect.Signature | None:
    """The callable's signature, None where Python cannot tell (some builtins)."""
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _names_size(fn: Callable, spec: dict[str, Any]) -> bool:
    """Whether to pass the data's ``image_size``: the callable names it, or it is a torchvision ViT
    (whose builders take it through ``**kwargs``, as the ResNets, which refuse it, do too)."""
    signature = _signature(fn)
    return str(spec.get("torchvision", "")).startswith("vit_") or (
        signature is not None and "image_size" in signature.parameters
    )


def _accepts(fn: Callable, name: str) -> bool:
    signature = _signature(fn)
    params = signature.parameters if signature is not None else {}
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _shape_of(shapes: dict, path: str, module: nn.Module, args: Any, output: Any) -> None:
    if path not in shapes:  # a module called twice (a shared ReLU) keeps its first output's place
        shapes[path] = tuple((output[0] if isinstance(output, tuple) else output).shape)


def _as_1x1_map(module: nn.Module, args: Any, kwargs: dict, output: Tensor) -> Tensor:
    return output[:, :, None, None]


_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def attention_heads(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> Tensor:
    """The per-head outputs of ``nn.MultiheadAttention`` for its inputs, (B, L, heads * head_dim)
    head-major and batch first, before ``out_proj``: ``module.out_proj`` of them is the module's
    output. Attention dropout is not redrawn (read taps in eval mode)."""
    call = {**dict(zip(_MHA_ARGS, args)), **kwargs}
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("attention_heads: bias_k / add_zero_attn are not supported")
    q, k, v = call["query"], call["key"], call["value"]
    if not module.batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    bq, bk, bv = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
    batch, length, heads, dim = q.shape[0], q.shape[1], module.num_heads, module.head_dim

    def split(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.linear(x, w, b).view(batch, x.shape[1], heads, dim).transpose(1, 2)

    mask = _additive_mask(call.get("attn_mask"), call.get("key_padding_mask"), batch, heads, q.dtype)
    out = F.scaled_dot_product_attention(
        split(q, wq, bq),
        split(k, wk, bk),
        split(v, wv, bv),
        attn_mask=mask,
        is_causal=bool(call.get("is_causal")) and mask is None,
    )
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def _additive_mask(attn_mask: Tensor | None, padding: Tensor | None, batch: int, heads: int, dtype) -> Tensor | None:
    """One float mask (B, H | 1, L | 1, S) from MultiheadAttention's two masks (True = not attended)."""

    def additive(mask: Tensor) -> Tensor:
        return (
            torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
            if mask.dtype == torch.bool
            else mask.to(dtype)
        )

    out = None
    if attn_mask is not None:
        out = additive(attn_mask)
        if out.dim() == 3:
            out = out.view(batch, heads, *out.shape[1:])
    if padding is not None:
        pad = additive(padding).view(batch, 1, 1, -1)
        out = pad if out is None else out + pad
    return out


# ---------------------------------------------------------------- shipped declarations


def shipped(net: nn.Module) -> tuple[list[str], list[dict[str, str | None]]]:
    """Taps and connections for the torchvision families we know, else none."""
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(net, ResNet) and isinstance(net.layer1[0], BasicBlock):
        blocks = [f"layer{i}.{j}" for i in range(1, 5) for j in range(len(getattr(net, f"layer{i}")))]
        taps = ["bn1", *blocks]
        connections = [{"param": f"{b}.conv2.weight", "inputs": f"{b}.bn1", "outputs": f"{b}.bn2"} for b in blocks]
        return taps, connections
    if isinstance(net, VisionTransformer):
        layers = [f"encoder.layers.{name}" for name in net.encoder.layers._modules]
        taps = ["conv_proj"] + [t for layer in layers for t in (f"{layer}.self_attention", layer)] + ["encoder.ln"]
        connections = [
            c
            for layer in layers
            for c in (
                {"param": f"{layer}.mlp.0.weight", "inputs": f"{layer}.ln_2", "outputs": f"{layer}.mlp.1"},
                {"param": f"{layer}.mlp.3.weight", "inputs": f"{layer}.mlp.1", "outputs": f"{layer}.mlp.3"},
            )
        ]
        return taps, connections
    return [], []
